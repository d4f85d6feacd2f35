"""nnU-Net model folders (TRAINER__PLANS__CONFIGURATION/fold_F/checkpoint_*.pth): reading one
back into the network its trainer builds, and writing one that nnUNetv2_predict runs.

Used by `export`, `import` and `merge`; nothing here trains."""
import os
from typing import Tuple

import torch
from torch import nn

from nnunet_fseft.datasets.dataset_json import read_json
from nnunet_fseft.datasets.safe_write import keep_existing, save_json_kept
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.record import PLANS_KEY, find_trainer, read_checkpoint


def load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist; pass an nnU-Net model folder "
                         f"(…/DatasetXXX_NAME/TRAINER__PLANS__CONFIGURATION).")
    return read_json(path, "pass a model folder as nnUNetv2_train wrote it")


def build_network(trainer_class, plans: dict, dataset_json: dict, configuration: str,
                  deep_supervision: bool = False) -> nn.Module:
    """The network `trainer_class` builds from plans, as nnUNetPredictor builds it."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    return trainer_class.build_network_architecture(
        pm, cm, determine_num_input_channels(pm, cm, dataset_json),
        pm.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=deep_supervision)


def checkpoint_path(folder: str, fold: str, checkpoint: str) -> str:
    """FOLDER/fold_F/CHECKPOINT, or one sentence listing the checkpoints the folder has."""
    path = os.path.join(folder, f"fold_{fold}", checkpoint)
    if not os.path.isfile(path):
        found = sorted(f"{d}/{c}" for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if d.startswith("fold_") for c in os.listdir(os.path.join(folder, d)) if c.endswith(".pth"))
        raise InputError(f"{folder} holds no fold_{fold}/{checkpoint}; available: "
                         f"{', '.join(found) or 'none (is it an nnU-Net model folder, and is training finished?)'}.")
    return path


def load_model(folder: str, fold: str, checkpoint: str = "checkpoint_final.pth") -> Tuple[type, dict, dict, dict, nn.Module]:
    """(trainer class, plans, dataset.json, checkpoint, network with its weights) of one fold."""
    plans = load_json(os.path.join(folder, "plans.json"))
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    path = checkpoint_path(folder, fold, checkpoint)
    ckpt = read_checkpoint(path)
    trainer_class = find_trainer(ckpt["trainer_name"])
    network = build_network(trainer_class, plans, dataset_json, ckpt["init_args"]["configuration"])
    own, saved = set(network.state_dict()), set(ckpt["network_weights"])
    if own != saved:
        first = sorted(own - saved)[:1] or sorted(saved - own)[:1]
        raise InputError(f"{path} does not fit the network {ckpt['trainer_name']} builds from {folder}/plans.json "
                         f"(first differing tensor: {first[0]}); was it written by another nnunet-fseft version?")
    network.load_state_dict(ckpt["network_weights"])
    return trainer_class, plans, dataset_json, ckpt, network


def require_fseft_trainer(trainer_class, folder: str) -> None:
    from nnunet_fseft.trainers import nnUNetTrainerFSEFT
    if not issubclass(trainer_class, nnUNetTrainerFSEFT):
        raise InputError(f"{folder} was trained with {trainer_class.__name__}, not an nnunet-fseft method; "
                         f"export and merge work on models trained with nnUNetTrainerFSEFT_* trainers.")


def refuse_foundation_folder(out_folder: str, foundations) -> None:
    """A model folder is never written where a foundation lives (in it, above it or below it): every
    dataset adopted from that foundation checks its checkpoint's sha256. `foundations` are the model
    folders we were given; those recorded by any adopted plans in nnUNet_preprocessed are added."""
    out = os.path.realpath(out_folder)
    for foundation in set(foundations) | recorded_foundation_folders():
        f = os.path.realpath(foundation)
        if out == f or out.startswith(f + os.sep) or f.startswith(out + os.sep):
            raise InputError(f"-o {out_folder} would write into the foundation model folder {foundation} (or a "
                             f"folder holding it), whose checkpoint adopted datasets check; pass an -o of its own.")


def recorded_foundation_folders() -> set:
    """The model folders of the foundations that plans in nnUNet_preprocessed record."""
    import json
    root, found = os.environ.get("nnUNet_preprocessed"), set()
    for dataset in (os.listdir(root) if root and os.path.isdir(root) else []):
        folder = os.path.join(root, dataset)
        for f in (os.listdir(folder) if os.path.isdir(folder) else []):
            if not f.endswith(".json") or f in ("dataset.json", "dataset_fingerprint.json", "splits_final.json"):
                continue
            try:
                with open(os.path.join(folder, f)) as file:
                    record = json.load(file).get(PLANS_KEY)
            except (OSError, ValueError, AttributeError):  # not plans of ours: nothing recorded
                continue
            if isinstance(record, dict) and record.get("model_folder"):
                found.add(record["model_folder"])
    return found


def write_model(folder: str, fold: str, checkpoint: str, plans: dict, dataset_json: dict, trainer_name: str,
                configuration: str, weights: dict, mirroring_axes) -> str:
    """Writes plans.json, dataset.json and fold_F/CHECKPOINT in nnU-Net's layout, keeping any older
    files as backups. The checkpoint holds what nnUNetPredictor reads, and no optimiser state."""
    os.makedirs(os.path.join(folder, f"fold_{fold}"), exist_ok=True)
    save_json_kept(plans, os.path.join(folder, "plans.json"))
    save_json_kept(dataset_json, os.path.join(folder, "dataset.json"))
    path = os.path.join(folder, f"fold_{fold}", checkpoint)
    keep_existing(path)
    torch.save({
        # a black-box network's state also holds `_extra_state` (which foundation it needs), not a tensor
        "network_weights": {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in weights.items()},
        "optimizer_state": None, "grad_scaler_state": None, "logging": None, "_best_ema": None,
        "current_epoch": 0,
        "init_args": {"plans": plans, "configuration": configuration,
                      "fold": int(fold) if str(fold).isdigit() else fold, "dataset_json": dataset_json},
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": mirroring_axes,
    }, path)
    return path
