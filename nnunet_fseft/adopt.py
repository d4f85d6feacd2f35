"""`nnunet-fseft adopt`: make any trained nnU-Net model the foundation of a target dataset.

Writes the foundation's plans for the target under a new plans name, records in them
which checkpoint is the foundation (and its label names), and runs nnU-Net's own
preprocessing of the target with those plans. Every check runs before preprocessing.
"""
import os
import shutil
from typing import Optional

from nnunet_fseft.foundation import PLANS_KEY, read_checkpoint, sha256
from nnunet_fseft.safety import backup_if_different, dataset_name, require_env, save_json_kept


def parse_model_folder(folder: str):
    """(trainer, plans name, configuration) of an nnU-Net results folder."""
    parts = os.path.basename(os.path.normpath(folder)).split("__")
    if len(parts) != 3:
        raise ValueError(f"{folder} is not an nnU-Net model folder (its name should be "
                         f"TRAINER__PLANS__CONFIGURATION, e.g. nnUNetTrainer__nnUNetPlans__3d_fullres).")
    return parts


def foundation_checkpoint(folder: str, fold: str, checkpoint: str) -> str:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Foundation folder {folder} does not exist; pass the nnU-Net results folder "
                                f"of the model (…/DatasetXXX_NAME/TRAINER__PLANS__CONFIGURATION).")
    for f in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(folder, f)):
            raise FileNotFoundError(f"Foundation folder {folder} has no {f}; it is not a trained nnU-Net model folder.")
    from nnunet_fseft.model_folder import checkpoint_path
    return os.path.abspath(checkpoint_path(folder, fold, checkpoint))


def channels(dataset_json: dict) -> list:
    """The input channels' names in order, lower case: what must agree between datasets."""
    c = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return [str(c[k]).strip().lower() for k in sorted(c, key=int)]


def check_channels(foundation_json: dict, target_json: dict, target: str) -> None:
    f, t = channels(foundation_json), channels(target_json)
    if f != t:
        raise ValueError(f"{target} has input channels {t} but the foundation was trained on {f}; "
                         f"the target's channel count and modalities must match the foundation's.")


def adopt(foundation: str, target: str, fold: str = "all", checkpoint: str = "checkpoint_final.pth",
          plans_name: str = "FSEFTPlans", num_processes: int = 2):
    """Returns (plans file written for the target, the foundation's configuration)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    raw, preprocessed = require_env("nnUNet_raw"), require_env("nnUNet_preprocessed")
    trainer, source_plans, configuration = parse_model_folder(foundation)
    ckpt_path = foundation_checkpoint(foundation, fold, checkpoint)
    weights = read_checkpoint(ckpt_path)["network_weights"]  # refuses unsafe or non-nnU-Net files
    plans = load_json(os.path.join(foundation, "plans.json"))
    check_architecture(plans, configuration, weights, trainer)
    name = dataset_name(target)
    target_json = load_json(os.path.join(raw, name, "dataset.json"))
    foundation_json = load_json(os.path.join(foundation, "dataset.json"))
    check_channels(foundation_json, target_json, name)
    _refuse_foreign_plans(os.path.join(preprocessed, name, plans_name + ".json"), plans_name)
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

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                        preprocess_dataset)
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
    target_id = convert_dataset_name_to_id(name)
    out = os.path.join(preprocessed, name)
    os.makedirs(out, exist_ok=True)
    if not os.path.isfile(os.path.join(out, "dataset_fingerprint.json")):
        extract_fingerprint_dataset(target_id, num_processes=num_processes, check_dataset_integrity=True,
                                    clean=True, verbose=False)
    # nnU-Net's preprocessing reads dataset.json from the preprocessed folder
    backup_if_different(os.path.join(out, "dataset.json"), target_json)
    shutil.copyfile(os.path.join(raw, name, "dataset.json"), os.path.join(out, "dataset.json"))
    plans_file = os.path.join(out, plans_name + ".json")
    save_json_kept(plans, plans_file)
    preprocess_dataset(target_id, plans_name, [configuration], [num_processes])
    return plans_file, configuration


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
    except ValueError as e:
        first = str(e).split(";")[0]
        raise ValueError(f"The foundation's weights do not fit the network that {trainer} builds from its own "
                         f"plans.json ({first}); is this model folder's checkpoint really from those plans?") from None


def _refuse_foreign_plans(path: str, plans_name: str) -> None:
    """Re-adopting replaces our own plans (the old file is kept); a user's plans are never replaced."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    if os.path.isfile(path) and PLANS_KEY not in load_json(path):
        raise FileExistsError(f"{path} holds plans that `nnunet-fseft adopt` did not write; "
                              f"choose another --plans-name (default FSEFTPlans).")


def _reader_writer(raw: str, name: str, dataset_json: dict) -> str:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    cases = get_filenames_of_train_images_and_targets(os.path.join(raw, name), dataset_json)
    if not cases:
        raise ValueError(f"{name} has no training cases in imagesTr; add at least one labelled case.")
    example = next(iter(cases.values()))["images"][0]
    return determine_reader_writer_from_dataset_json(dataset_json, example, allow_nonmatching_filename=True,
                                                     verbose=False).__name__
