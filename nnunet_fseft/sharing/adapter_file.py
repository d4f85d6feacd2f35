"""Adapter files: only what a method trained, one small file per task.

`export` writes a safetensors file (no pickle) whose metadata holds, as JSON, the method, its
hyper-parameters, the target's plans and dataset.json, and the sha256 of the foundation
checkpoint it belongs to; the same JSON is written beside it for people to read.
`import` rebuilds a model folder nnUNetv2_predict runs from that file and the foundation.
"""
import json
import os
from typing import Dict, Tuple

import torch
from torch import nn

from nnunet_fseft.datasets.safe_write import keep_existing
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.record import PLANS_KEY, find_trainer, load_foundation_weights, recorded_foundation, sha256
from nnunet_fseft.network.black_box import is_black_box
from nnunet_fseft.sharing.model_folder import (build_network, checkpoint_path, load_model, refuse_foundation_folder,
                                               require_fseft_trainer, write_model)
from nnunet_fseft.tuners.registry import tuner_hyperparameters

METADATA_KEY = "nnunet_fseft"
FORMAT = 1


def saved_buffers(network: nn.Module) -> Dict[str, torch.Tensor]:
    """The buffers an adapter file carries: every persistent one (Primus's rotary tables are not) that
    training can change. BatchNorm statistics change even where their layer is frozen, and its step
    counter is a scalar; integer tables of more than one value are built from the architecture alone
    (Swin-UNETR's relative_position_index, 7 MB of LoRA's 7.5 MB file) and the foundation rebuilds them."""
    saved = network.state_dict()
    return {n: b for n, b in network.named_buffers()
            if n in saved and (b.is_floating_point() or b.numel() == 1)}


def trained_tensors(network: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors a method trains (parameters with requires_grad) and the buffers training changes."""
    tensors = {n: p for n, p in network.named_parameters() if p.requires_grad}
    tensors.update(saved_buffers(network))
    return {n: t.detach().cpu().contiguous() for n, t in tensors.items()}


def method_settings(trainer_class) -> dict:
    """What a rebuilt network depends on: the method, its groups and hyper-parameters."""
    settings = {"tuner": trainer_class.tuner, "trainable": list(trainer_class.trainable)}
    if getattr(trainer_class, "adapter", None):  # black-box methods
        settings["adapter"] = trainer_class.adapter
    if trainer_class.tuner is not None:
        settings.update({k: list(v) if isinstance(v, tuple) else v
                         for k, v in tuner_hyperparameters(trainer_class.tuner, trainer_class).items()})
    return settings


def safetensors_bytes(tensors: Dict[str, torch.Tensor], info: dict) -> bytes:
    """The adapter file's bytes: `tensors` with `info` as its metadata (what `params` reports as its size)."""
    from safetensors.torch import save
    return save(tensors, metadata={METADATA_KEY: json.dumps(info)})


def export_adapter(folder: str, out: str, fold: str = "0", checkpoint: str = "checkpoint_final.pth") -> Tuple[str, int]:
    """Writes OUT (safetensors) and OUT.json; returns (OUT, its size in bytes). OUT a folder (one
    that exists, or ends in a slash): the file is written inside it, as OUT/DATASET__TRAINER__fold_F.safetensors."""
    trainer_class, plans, dataset_json, ckpt, network = load_model(folder, fold, checkpoint)
    require_fseft_trainer(trainer_class, folder)
    record = recorded_foundation(plans)
    if record is None:
        raise InputError(f"The plans of {folder} record no foundation (was it trained with -pretrained_weights?); "
                         f"an adapter file needs the foundation recorded by `nnunet-fseft adopt`.")
    info = {
        "format": FORMAT,
        "method": trainer_class.__name__,
        "settings": method_settings(trainer_class),
        "configuration": ckpt["init_args"]["configuration"],
        "fold": str(fold),
        "foundation": {"sha256": record["sha256"], "checkpoint_file": os.path.basename(record["checkpoint"]),
                       "fold": record["fold"], "trainer": record["trainer"], "plans_name": record["plans_name"],
                       "dataset_name": record["dataset_name"], "model_folder": record["model_folder"]},
        "inference_allowed_mirroring_axes": list(ckpt.get("inference_allowed_mirroring_axes") or []),
        "plans": plans,
        "dataset_json": dataset_json,
    }
    data = safetensors_bytes(trained_tensors(network), info)
    if os.path.isdir(out) or out.endswith(os.sep):  # a folder is never moved aside: the file goes into it
        out = os.path.join(out, f"{plans['dataset_name']}__{trainer_class.__name__}__fold_{fold}.safetensors")
    if os.path.isdir(out + ".json"):
        raise InputError(f"{out}.json is a folder, where export writes the adapter file's description; "
                         f"pass another -o.")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    keep_existing(out)
    with open(out, "wb") as f:
        f.write(data)
    keep_existing(out + ".json")
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    return out, len(data)


def read_adapter(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise InputError(f"Adapter file {path} does not exist; write one with `nnunet-fseft export`.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path} is not a safetensors file ({e}); pass a file written by `nnunet-fseft export`.") from None
    if METADATA_KEY not in meta:
        raise InputError(f"{path} is a safetensors file but not an nnunet-fseft adapter file (no '{METADATA_KEY}' "
                         f"metadata); pass a file written by `nnunet-fseft export`.")
    try:
        info = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise InputError(f"{path} has damaged nnunet-fseft metadata; export the adapter again.") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise InputError(f"{path} has adapter-file format {info.get('format')}, this nnunet-fseft reads format "
                         f"{FORMAT}; import it with the nnunet-fseft version that wrote it.")
    return tensors, info


def import_adapter(path: str, foundation_folder: str, out_folder: str) -> str:
    """Rebuilds a model folder from an adapter file and its foundation; returns the checkpoint written."""
    tensors, info = read_adapter(path)
    rec = info["foundation"]
    refuse_foundation_folder(out_folder, [foundation_folder, rec["model_folder"]])
    foundation_ckpt = checkpoint_path(foundation_folder, rec["fold"], rec["checkpoint_file"])
    found = sha256(foundation_ckpt)
    if found != rec["sha256"]:
        raise InputError(f"{path} was trained on the foundation with sha256 {rec['sha256'][:12]}…, but "
                         f"{foundation_ckpt} has sha256 {found[:12]}…; pass the foundation model folder it was "
                         f"trained on ({rec['model_folder']}).")
    trainer_class = find_trainer(info["method"])
    if method_settings(trainer_class) != info["settings"]:
        raise InputError(f"{path} was trained with {info['method']} settings {info['settings']}, but this "
                         f"installation's {info['method']} has {method_settings(trainer_class)}; import it with "
                         f"the nnunet-fseft version that trained it.")
    plans, dataset_json = info["plans"], info["dataset_json"]
    plans[PLANS_KEY] = {**plans[PLANS_KEY], "checkpoint": os.path.abspath(foundation_ckpt),
                        "model_folder": os.path.abspath(foundation_folder)}
    network = build_network(trainer_class, plans, dataset_json, info["configuration"])
    if not is_black_box(network):  # a black-box network reads its foundation when it is built
        load_foundation_weights(network, foundation_ckpt)  # its sha256 was checked above
    own = dict(network.named_parameters())
    own.update(network.named_buffers())
    missing = sorted(n for n, p in network.named_parameters() if p.requires_grad and n not in tensors)
    unknown = sorted(set(tensors) - set(own))
    if missing or unknown:
        raise InputError(f"{path} does not fit the network {info['method']} builds "
                         f"({'missing ' + missing[0] if missing else 'unknown tensor ' + unknown[0]}); "
                         f"was it written by another nnunet-fseft version?")
    with torch.no_grad():
        for name, t in tensors.items():  # by parameter, so every alias of a shared tensor gets it
            own[name].copy_(t)
    return write_model(out_folder, info["fold"], "checkpoint_final.pth", plans, dataset_json, info["method"],
                       info["configuration"], network.state_dict(), tuple(info["inference_allowed_mirroring_axes"]))
