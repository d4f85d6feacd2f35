"""Adapter files: only what a method trained, one small file per task.

`export` writes a safetensors file (no pickle) whose metadata holds, as JSON, the method, its
hyper-parameters, the target's plans and dataset.json, and the sha256 of the foundation
checkpoint it belongs to; the same JSON is written beside it for people to read.
`import` rebuilds a model folder nnUNetv2_predict runs from that file and the foundation.
`merge` folds mergeable methods into plain weights: a model folder for nnU-Net alone.
`method_costs` is what `nnunet-fseft params` prints.
"""
import json
import os
from typing import Dict, List, Tuple

import torch
from torch import nn

from nnunet_fseft.blackbox import is_black_box
from nnunet_fseft.foundation import (PLANS_KEY, architecture_trainer, find_trainer, load_foundation_weights,
                                     recorded_foundation, sha256)
from nnunet_fseft.model_folder import build_network, checkpoint_path, load_json, load_model, write_model
from nnunet_fseft.parameters import count_parameters
from nnunet_fseft.safety import keep_existing
from nnunet_fseft.tuners import is_adapter_parameter
from nnunet_fseft.tuners.registry import is_mergeable, merge_tuner, tuner_hyperparameters

METADATA_KEY = "nnunet_fseft"
FORMAT = 1


def trained_tensors(network: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors a method trains (parameters with requires_grad) and every buffer: buffers
    such as BatchNorm statistics change in training even where their layer is frozen, and are small."""
    saved = network.state_dict()  # persistent buffers only (Primus's rotary tables are rebuilt)
    tensors = {n: p for n, p in network.named_parameters() if p.requires_grad}
    tensors.update({n: b for n, b in network.named_buffers() if n in saved})
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


def _fseft_trainer(trainer_class, folder: str):
    from nnunet_fseft.trainers import nnUNetTrainerFSEFT
    if not issubclass(trainer_class, nnUNetTrainerFSEFT):
        raise ValueError(f"{folder} was trained with {trainer_class.__name__}, not an nnunet-fseft method; "
                         f"export and merge work on models trained with nnUNetTrainerFSEFT_* trainers.")


def _safetensors_bytes(tensors: Dict[str, torch.Tensor], info: dict) -> bytes:
    from safetensors.torch import save
    return save(tensors, metadata={METADATA_KEY: json.dumps(info)})


def export_adapter(folder: str, out: str, fold: str = "0", checkpoint: str = "checkpoint_final.pth") -> Tuple[str, int]:
    """Writes OUT (safetensors) and OUT.json; returns (OUT, its size in bytes)."""
    trainer_class, plans, dataset_json, ckpt, network = load_model(folder, fold, checkpoint)
    _fseft_trainer(trainer_class, folder)
    record = recorded_foundation(plans)
    if record is None:
        raise ValueError(f"The plans of {folder} record no foundation (was it trained with -pretrained_weights?); "
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
    data = _safetensors_bytes(trained_tensors(network), info)
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
        raise FileNotFoundError(f"Adapter file {path} does not exist; write one with `nnunet-fseft export`.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a safetensors file ({e}); pass a file written by `nnunet-fseft export`.") from None
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file but not an nnunet-fseft adapter file (no '{METADATA_KEY}' "
                         f"metadata); pass a file written by `nnunet-fseft export`.")
    try:
        info = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise ValueError(f"{path} has damaged nnunet-fseft metadata; export the adapter again.") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path} has adapter-file format {info.get('format')}, this nnunet-fseft reads format "
                         f"{FORMAT}; import it with the nnunet-fseft version that wrote it.")
    return tensors, info


def import_adapter(path: str, foundation_folder: str, out_folder: str) -> str:
    """Rebuilds a model folder from an adapter file and its foundation; returns the checkpoint written."""
    tensors, info = read_adapter(path)
    rec = info["foundation"]
    foundation_ckpt = checkpoint_path(foundation_folder, rec["fold"], rec["checkpoint_file"])
    found = sha256(foundation_ckpt)
    if found != rec["sha256"]:
        raise ValueError(f"{path} was trained on the foundation with sha256 {rec['sha256'][:12]}…, but "
                         f"{foundation_ckpt} has sha256 {found[:12]}…; pass the foundation model folder it was "
                         f"trained on ({rec['model_folder']}).")
    trainer_class = find_trainer(info["method"])
    if method_settings(trainer_class) != info["settings"]:
        raise ValueError(f"{path} was trained with {info['method']} settings {info['settings']}, but this "
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
        raise ValueError(f"{path} does not fit the network {info['method']} builds "
                         f"({'missing ' + missing[0] if missing else 'unknown tensor ' + unknown[0]}); "
                         f"was it written by another nnunet-fseft version?")
    with torch.no_grad():
        for name, t in tensors.items():  # by parameter, so every alias of a shared tensor gets it
            own[name].copy_(t)
    return write_model(out_folder, info["fold"], "checkpoint_final.pth", plans, dataset_json, info["method"],
                       info["configuration"], network.state_dict(), tuple(info["inference_allowed_mirroring_axes"]))


def merge_model(folder: str, out_folder: str) -> List[str]:
    """Writes a plain nnU-Net model folder, every fold and checkpoint, with the method folded in."""
    if os.path.abspath(folder) == os.path.abspath(out_folder):
        raise ValueError("merge writes a new model folder; pass an -o different from the model folder.")
    sources = sorted((d[len("fold_"):], c) for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                     if d.startswith("fold_") and os.path.isdir(os.path.join(folder, d))
                     for c in os.listdir(os.path.join(folder, d)) if c in ("checkpoint_final.pth", "checkpoint_best.pth"))
    if not sources:
        raise FileNotFoundError(f"{folder} holds no fold_*/checkpoint_final.pth or checkpoint_best.pth; pass the "
                                f"model folder of a finished nnUNetv2_train run.")
    written = []
    for fold, name in sources:
        trainer_class, plans, dataset_json, ckpt, network = load_model(folder, fold, name)
        _fseft_trainer(trainer_class, folder)
        if not is_mergeable(trainer_class.tuner):
            raise ValueError(f"{trainer_class.__name__} adds non-linear adapter branches, which cannot be folded "
                             f"into the foundation's weights; share it with `nnunet-fseft export` instead "
                             f"(mergeable: LoRA, BitFit, AffineNorm and the fine-tuning baselines).")
        if is_black_box(network):
            raise ValueError(f"{trainer_class.__name__} is a black-box adapter on the foundation's features, not a "
                             f"change of its weights; share it with `nnunet-fseft export` instead.")
        merge_tuner(network, trainer_class.tuner)
        plain_trainer = architecture_trainer(plans)
        configuration = ckpt["init_args"]["configuration"]
        plain = build_network(plain_trainer, plans, dataset_json, configuration)
        plain.load_state_dict(network.state_dict())  # strict: nothing of the method is left
        out_plans = {k: v for k, v in plans.items() if k != PLANS_KEY}
        record = recorded_foundation(plans) or {}
        out_plans["fseft_merged_from"] = {"method": trainer_class.__name__, "foundation_sha256": record.get("sha256")}
        written.append(write_model(out_folder, fold, name, out_plans, dataset_json, plain_trainer.__name__,
                                   configuration, plain.state_dict(), ckpt.get("inference_allowed_mirroring_axes")))
    return written


def method_costs(plans: dict, dataset_json: dict, configuration: str, trainers) -> List[dict]:
    """Per method: trainable and total parameters and the size of its adapter file, without training;
    a method that does not apply to this network gets its one-sentence reason instead."""
    rows = []
    for t in trainers:
        try:
            network = build_network(t, plans, dataset_json, configuration, deep_supervision=True)
        except (ValueError, FileNotFoundError) as e:  # black-box methods read the foundation file itself
            rows.append({"method": t.__name__, "not_applicable": str(e)})
            continue
        trainable, total = count_parameters(network)
        size = len(_safetensors_bytes(trained_tensors(network), {"method": t.__name__, "plans": plans,
                                                                 "dataset_json": dataset_json}))
        adapters = sum(p.numel() for n, p in network.named_parameters() if is_adapter_parameter(n))
        rows.append({"method": t.__name__, "trainable": trainable, "total": total, "file_bytes": size,
                     "full_bytes": 4 * (total - adapters)})  # fp32 weights of a full copy of the model
    return rows


def load_plans(dataset: str, plans_name: str) -> Tuple[dict, dict]:
    """The preprocessed plans and dataset.json of a dataset given by id or name."""
    from nnunet_fseft.safety import require_env
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    preprocessed = require_env("nnUNet_preprocessed")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise FileNotFoundError(f"Dataset {dataset} is not in nnUNet_preprocessed ({preprocessed}); adopt or "
                                f"plan it first.") from None
    plans_file = os.path.join(preprocessed, name, plans_name + ".json")
    if not os.path.isdir(os.path.join(preprocessed, name)):
        raise FileNotFoundError(f"{name} has not been preprocessed (no {os.path.join(preprocessed, name)}); run "
                                f"`nnunet-fseft adopt` or nnUNetv2_plan_and_preprocess for it first.")
    if not os.path.isfile(plans_file):
        have = sorted(f[:-5] for f in os.listdir(os.path.join(preprocessed, name))
                      if "Plans" in f and f.endswith(".json"))
        raise FileNotFoundError(f"{name} has no plans {plans_name} in nnUNet_preprocessed; available: "
                                f"{', '.join(have) or 'none'} (pass one with -p).")
    return load_json(plans_file), load_json(os.path.join(preprocessed, name, "dataset.json"))
