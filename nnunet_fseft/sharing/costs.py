"""What each method costs on a dataset's network, without training: trainable and total
parameters and the size of its adapter file (what `nnunet-fseft params` prints and
`benchmark` reports)."""
from typing import List

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.parameters import count_parameters
from nnunet_fseft.sharing.adapter_file import safetensors_bytes, trained_tensors
from nnunet_fseft.sharing.model_folder import build_network
from nnunet_fseft.tuners import is_adapter_parameter


def method_costs(plans: dict, dataset_json: dict, configuration: str, trainers) -> List[dict]:
    """Per method: trainable and total parameters and the size of its adapter file, without training;
    a method that does not apply to this network gets its one-sentence reason instead."""
    rows = []
    for t in trainers:
        try:
            network = build_network(t, plans, dataset_json, configuration, deep_supervision=True)
        except InputError as e:  # black-box methods read the foundation file itself
            rows.append({"method": t.__name__, "not_applicable": str(e)})
            continue
        trainable, total = count_parameters(network)
        size = len(safetensors_bytes(trained_tensors(network), {"method": t.__name__, "plans": plans,
                                                                 "dataset_json": dataset_json}))
        adapters = sum(p.numel() for n, p in network.named_parameters() if is_adapter_parameter(n))
        rows.append({"method": t.__name__, "trainable": trainable, "total": total, "file_bytes": size,
                     "full_bytes": 4 * (total - adapters)})  # fp32 weights of a full copy of the model
    return rows
