"""`nnunet-fseft merge`: merge a mergeable method (LoRA, BitFit, AffineNorm, fine-tuning) into
plain weights, so that nnU-Net alone, without nnunet-fseft, runs the model folder it writes."""
import os
from typing import List

from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.record import PLANS_KEY, architecture_trainer, recorded_foundation
from nnunet_fseft.network.black_box import is_black_box
from nnunet_fseft.network.grouped_head import grouped_classes, ungroup_all
from nnunet_fseft.sharing.model_folder import (build_network, load_json, load_model, refuse_foundation_folder,
                                               require_fseft_trainer, write_model)
from nnunet_fseft.tuners.registry import is_mergeable, merge_tuner


def merge_model(folder: str, out_folder: str) -> List[str]:
    """Writes a plain nnU-Net model folder, every fold and checkpoint, with the method merged in."""
    if os.path.realpath(folder) == os.path.realpath(out_folder):
        raise InputError("merge writes a new model folder; pass an -o different from the model folder.")
    sources = sorted((d[len("fold_"):], c) for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                     if d.startswith("fold_") and os.path.isdir(os.path.join(folder, d))
                     for c in os.listdir(os.path.join(folder, d)) if c in ("checkpoint_final.pth", "checkpoint_best.pth"))
    if not sources:
        raise InputError(f"{folder} holds no fold_*/checkpoint_final.pth or checkpoint_best.pth; pass the "
                         f"model folder of a finished nnUNetv2_train run.")
    record = recorded_foundation(load_json(os.path.join(folder, "plans.json"))) or {}
    refuse_foundation_folder(out_folder, [record["model_folder"]] if record.get("model_folder") else [])
    written = []
    for fold, name in sources:
        trainer_class, plans, dataset_json, ckpt, network = load_model(folder, fold, name)
        require_fseft_trainer(trainer_class, folder)
        if not is_mergeable(trainer_class.tuner):
            raise InputError(f"{trainer_class.__name__} adds non-linear adapter branches, which cannot be merged "
                             f"into the foundation's weights; share it with `nnunet-fseft export` instead "
                             f"(mergeable: LoRA, BitFit, AffineNorm and the fine-tuning baselines).")
        if is_black_box(network):
            raise InputError(f"{trainer_class.__name__} is a black-box adapter on the foundation's features, not a "
                             f"change of its weights; share it with `nnunet-fseft export` instead.")
        grouped = grouped_classes(network)
        if grouped:
            names = {v: n for n, v in record.get("labels", {}).items()}
            raise InputError(f"{trainer_class.__name__}'s head groups the foundation's "
                             f"{', '.join(repr(names.get(r, r)) for r in grouped)} with background (log-sum-exp), "
                             f"which a plain nnU-Net head cannot hold; share it with `nnunet-fseft export`, or train "
                             f"a subclass with group_unmatched = False to merge it.")
        ungroup_all(network)  # a head of single rows is a plain conv with its rows reordered
        merge_tuner(network, trainer_class.tuner)
        plain_trainer = architecture_trainer(plans)
        configuration = ckpt["init_args"]["configuration"]
        plain = build_network(plain_trainer, plans, dataset_json, configuration)
        plain.load_state_dict(network.state_dict())  # strict: nothing of the method is left
        out_plans = {k: v for k, v in plans.items() if k != PLANS_KEY}
        out_plans["fseft_merged_from"] = {"method": trainer_class.__name__, "foundation_sha256": record.get("sha256")}
        written.append(write_model(out_folder, fold, name, out_plans, dataset_json, plain_trainer.__name__,
                                   configuration, plain.state_dict(), ckpt.get("inference_allowed_mirroring_axes")))
    return written
