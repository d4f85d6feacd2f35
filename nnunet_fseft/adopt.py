"""`nnunet-fseft adopt`: make any trained nnU-Net model the foundation of a target dataset.

Writes the foundation's plans for the target under a new plans name, records in them
which checkpoint is the foundation (and its label names), and runs nnU-Net's own
preprocessing of the target with those plans. Every check runs before preprocessing, and
preprocessing writes under a temporary plans name and data folder that replace the dataset's
plans and data only once it is complete: an interrupted adopt leaves them as they were.
"""
import copy
import json
import os
import shutil

import torch

from nnunet_fseft.dataset_json import channels, read_dataset_json, read_json
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation import PLANS_KEY, read_checkpoint, sha256
from nnunet_fseft.plans_io import check_plans_name
from nnunet_fseft.safety import backup_name, dataset_name, require_env, save_json_kept

# Beginning of the names of an adopt's temporary files in the dataset's preprocessed folder;
# the process id follows, so a later adopt knows which ones an interrupted run left behind.
TEMPORARY = ".fseft-adopt-"
# Beyond this a weight overflows to infinity in the float16 of nnU-Net's mixed-precision training.
FLOAT16_MAX = 65504.0


def parse_model_folder(folder: str):
    """(trainer, plans name, configuration) of an nnU-Net results folder."""
    parts = os.path.basename(os.path.normpath(folder)).split("__")
    if len(parts) != 3:
        raise InputError(f"{folder} is not an nnU-Net model folder (its name should be "
                         f"TRAINER__PLANS__CONFIGURATION, e.g. nnUNetTrainer__nnUNetPlans__3d_fullres).")
    return parts


def foundation_checkpoint(folder: str, fold: str, checkpoint: str) -> str:
    if not os.path.isdir(folder):
        raise InputError(f"Foundation folder {folder} does not exist; pass the nnU-Net results folder "
                         f"of the model (…/DatasetXXX_NAME/TRAINER__PLANS__CONFIGURATION).")
    for f in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(folder, f)):
            raise InputError(f"Foundation folder {folder} has no {f}; it is not a trained nnU-Net model folder.")
    from nnunet_fseft.model_folder import checkpoint_path
    return os.path.abspath(checkpoint_path(folder, fold, checkpoint))


def check_finite(weights: dict, path: str) -> None:
    """A corrupt or diverged checkpoint would train to NaN; its sha256 must not certify it."""
    for name, w in weights.items():
        if not (torch.is_tensor(w) and w.is_floating_point()):
            continue
        if not bool(torch.isfinite(w).all()):
            raise InputError(f"{path} holds NaN or infinite weights (first in '{name}'), so it is corrupt or its "
                             f"training diverged; adopt a checkpoint whose weights are finite.")
        if w.numel() and float(w.abs().max()) > FLOAT16_MAX:
            raise InputError(f"{path} holds weights beyond ±{FLOAT16_MAX:.0f} (first in '{name}'), which no trained "
                             f"network has and mixed precision turns into infinity; adopt an uncorrupted checkpoint.")


def check_channels(foundation_json: dict, target_json: dict, target: str) -> None:
    f, t = channels(foundation_json), channels(target_json)
    if f != t:
        raise InputError(f"{target} has input channels {t} but the foundation was trained on {f}; "
                         f"the target's channel count and modalities must match the foundation's.")


def adopt(foundation: str, target: str, fold: str = "all", checkpoint: str = "checkpoint_final.pth",
          plans_name: str = "FSEFTPlans", num_processes: int = 2):
    """Returns (plans file written for the target, the foundation's configuration)."""
    raw, preprocessed = require_env("nnUNet_raw"), require_env("nnUNet_preprocessed")
    check_plans_name(plans_name)
    name = dataset_name(target)
    target_json = read_dataset_json(os.path.join(raw, name, "dataset.json"))
    trainer, source_plans, configuration = parse_model_folder(foundation)
    ckpt_path = foundation_checkpoint(foundation, fold, checkpoint)
    foundation_json = read_dataset_json(os.path.join(foundation, "dataset.json"))
    check_channels(foundation_json, target_json, name)
    weights = read_checkpoint(ckpt_path)["network_weights"]  # refuses unsafe or non-nnU-Net files
    check_finite(weights, ckpt_path)
    plans = read_json(os.path.join(foundation, "plans.json"), "pass a model folder as nnUNetv2_train wrote it")
    check_architecture(plans, configuration, weights, trainer)
    plans_file = os.path.join(preprocessed, name, plans_name + ".json")
    _refuse_foreign_plans(plans_file, plans_name)
    source_dataset = plans["dataset_name"]
    plans["dataset_name"] = name
    plans["plans_name"] = plans_name
    for c, cfg in plans["configurations"].items():
        if "data_identifier" in cfg:  # own folder, so the target's other preprocessed data is untouched
            cfg["data_identifier"] = f"{plans_name}_{c}"
    plans["image_reader_writer"] = _reader_writer(raw, name, target_json)
    plans[PLANS_KEY] = {
        "checkpoint": ckpt_path,
        "sha256": sha256(ckpt_path),
        "model_folder": os.path.abspath(foundation),
        "fold": fold,
        "trainer": trainer,
        "plans_name": source_plans,
        "configuration": configuration,
        "dataset_name": source_dataset,
        "labels": foundation_json["labels"],
    }
    _preprocess_then_swap(name, plans, plans_file, configuration, num_processes)
    return plans_file, configuration


def _preprocess_then_swap(name: str, plans: dict, plans_file: str, configuration: str, num_processes: int) -> None:
    """nnU-Net's fingerprint and preprocessing of the target with `plans`, into a temporary plans
    name and data folder; then the data folder is renamed into place and the plans are written.
    Until then the dataset keeps its plans, data and dataset.json; an error puts them back as they were."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    raw, out = os.path.join(require_env("nnUNet_raw"), name), os.path.dirname(plans_file)
    target_id = convert_dataset_name_to_id(name)
    created = not os.path.isdir(out)
    _remove_leftovers(out)
    temporary = f"{TEMPORARY}{os.getpid()}-"
    scratch_plans = copy.deepcopy(plans)
    scratch_plans["configurations"][configuration]["data_identifier"] = f"{temporary}data"
    scratch_data = os.path.join(out, f"{temporary}data")
    scratch_plans_file = os.path.join(out, f"{temporary}plans.json")
    dataset_json = os.path.join(out, "dataset.json")
    old_dataset_json = open(dataset_json, "rb").read() if os.path.isfile(dataset_json) else None
    try:
        os.makedirs(out, exist_ok=True)
        if not os.path.isfile(os.path.join(out, "dataset_fingerprint.json")):
            extract_fingerprint_dataset(target_id, num_processes=num_processes, check_dataset_integrity=True,
                                        clean=True, verbose=False)
        shutil.copyfile(os.path.join(raw, "dataset.json"), dataset_json)  # nnU-Net's preprocessing reads it there
        with open(scratch_plans_file, "w") as f:
            json.dump(scratch_plans, f, indent=2)
        preprocess_dataset(target_id, os.path.basename(scratch_plans_file)[:-len(".json")], [configuration],
                           [num_processes])
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for path in (scratch_data, scratch_plans_file):
                _remove(path)
            if old_dataset_json is None:
                _remove(dataset_json)
            else:
                with open(dataset_json, "wb") as f:
                    f.write(old_dataset_json)
        raise
    data = os.path.join(out, PlansManager(plans).get_configuration(configuration).data_identifier)
    old_data = os.path.join(out, f"{temporary}old-data")
    if os.path.isdir(data):
        os.rename(data, old_data)
    os.rename(scratch_data, data)
    save_json_kept(plans, plans_file)
    _remove(scratch_plans_file)
    _remove(old_data)
    if old_dataset_json is not None and not _same_json(old_dataset_json, open(dataset_json, "rb").read()):
        with open(backup_name(dataset_json), "wb") as f:  # the dataset.json it was preprocessed with before
            f.write(old_dataset_json)


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def _remove_leftovers(folder: str) -> None:
    """Removes what an interrupted adopt (a process no longer running) left in the preprocessed folder."""
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        pid = entry[len(TEMPORARY):].split("-")[0] if entry.startswith(TEMPORARY) else ""
        if pid.isdigit() and not _running(int(pid)):
            _remove(os.path.join(folder, entry))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def check_architecture(plans: dict, configuration: str, weights: dict, trainer: str) -> None:
    """The network built from these plans (by the foundation's own trainer where it builds its own
    architecture, as nnU-Net's Primus trainers do) must hold the foundation's tensors; checked here
    rather than at the first nnUNetv2_train after preprocessing."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_fseft.foundation import architecture_trainer, foundation_weights
    pm = PlansManager({**plans, PLANS_KEY: {"trainer": trainer}})
    first = next(k for k in weights if k.endswith("weight"))  # the input conv: its in-channels
    network = architecture_trainer(pm.plans).build_network_architecture(
        pm, pm.get_configuration(configuration), weights[first].shape[1], 2, True)
    try:
        foundation_weights(network, weights, "checkpoint")
    except InputError as e:
        first = str(e).split(";")[0]
        raise InputError(f"The foundation's weights do not fit the network that {trainer} builds from its own "
                         f"plans.json ({first}); is this model folder's checkpoint really from those plans?") from None


def _refuse_foreign_plans(path: str, plans_name: str) -> None:
    """Re-adopting replaces our own plans (the old file is kept); a user's plans are never replaced."""
    if os.path.isfile(path) and PLANS_KEY not in read_json(path, "remove it or choose another --plans-name"):
        raise InputError(f"{path} holds plans that `nnunet-fseft adopt` did not write; "
                         f"choose another --plans-name (default FSEFTPlans).")


def _reader_writer(raw: str, name: str, dataset_json: dict) -> str:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    cases = get_filenames_of_train_images_and_targets(os.path.join(raw, name), dataset_json)
    if not cases:
        raise InputError(f"{name} has no training cases in imagesTr; add at least one labelled case.")
    example = next(iter(cases.values()))["images"][0]
    return determine_reader_writer_from_dataset_json(dataset_json, example, allow_nonmatching_filename=True,
                                                     verbose=False).__name__
