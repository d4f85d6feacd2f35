"""`nnunet-fseft adopt`: make any trained nnU-Net model the foundation of a target dataset.

Writes the foundation's plans for the target under a new plans name, records in them
which checkpoint is the foundation (and its label names), and runs nnU-Net's own
preprocessing of the target with those plans. Every check runs before preprocessing, and
preprocessing writes under a temporary plans name and data folder that replace the dataset's
plans and data only once it is complete: an interrupted adopt leaves them (and the dataset.json
it replaces, kept in a temporary file meanwhile) as they were, or as the next adopt puts them back.
"""
import copy
import json
import os
import re
import secrets
import shutil
import socket

import torch

from nnunet_fseft.datasets.dataset_json import channels, dataset_name, read_dataset_json, read_json
from nnunet_fseft.foundation.extend import (EXTENDS_KEY, describe as describe_extension, extended_target, restore,
                                            write_extended)
from nnunet_fseft.foundation.labels import mixed_outputs
from nnunet_fseft.datasets.safe_write import backup_name, save_json_kept
from nnunet_fseft.environment import require_env
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.record import PLANS_KEY, read_checkpoint, sha256
from nnunet_fseft.network.grouped_head import head_groups
from nnunet_fseft.plans import PLANS_NAME
from nnunet_fseft.plans.load import check_plans_name

# Beginning of the names of an adopt's temporary files in the dataset's preprocessed folder
# (host, process id and a random token follow: see _Scratch).
TEMPORARY = ".fseft-adopt-"
# In the temporary plans: the data folder the adopt swaps, so that a later adopt can undo it.
SWAPPED_DATA_KEY = "fseft_adopt_swaps"
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
    from nnunet_fseft.sharing.model_folder import checkpoint_path
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
    """The target's input channels must be the foundation's, by name and in the same order: the
    network reads channel i as the modality it was trained on (for MRI, T1 / T1ce / T2 / FLAIR).
    Their normalisation then is the foundation's by construction: the target is preprocessed with
    the foundation's plans, which fix one scheme per channel (nnU-Net chose it from the same names)."""
    f, t = channels(foundation_json), channels(target_json)
    if f == t:
        return
    if sorted(f) == sorted(t):
        raise InputError(f"{target} has the foundation's input channels in another order ({t}, the foundation "
                         f"{f}); number the target's image files (_0000, _0001, ...) and its channel_names in the "
                         f"foundation's order, as the network reads channel i as the modality it was trained on.")
    missing, extra = [c for c in f if c not in t], [c for c in t if c not in f]
    what = "; ".join(x for x in (f"missing {missing}" if missing else "", f"not in the foundation {extra}" if extra else "")
                     if x)
    raise InputError(f"{target} has input channels {t} but the foundation was trained on {f} ({what}); the "
                     f"target needs exactly the foundation's channels, named as in its dataset.json.")


def adopt(foundation: str, target: str, fold: str = "all", checkpoint: str = "checkpoint_final.pth",
          plans_name: str = PLANS_NAME, num_processes: int = 2, keep_foundation_labels: bool = False):
    """Returns (plans file written for the target, the foundation's configuration). With
    `keep_foundation_labels` the target extends the foundation (foundation/extend.py): the model
    outputs the foundation's classes and the target's new labels."""
    raw, preprocessed = require_env("nnUNet_raw"), require_env("nnUNet_preprocessed")
    check_plans_name(plans_name)
    name = dataset_name(target)
    target_json = read_dataset_json(os.path.join(raw, name, "dataset.json"))
    trainer, source_plans, configuration = parse_model_folder(foundation)
    ckpt_path = foundation_checkpoint(foundation, fold, checkpoint)
    foundation_json = read_dataset_json(os.path.join(foundation, "dataset.json"))
    check_channels(foundation_json, target_json, name)
    ckpt = read_checkpoint(ckpt_path)  # refuses unsafe or non-nnU-Net files
    weights = ckpt["network_weights"]
    check_finite(weights, ckpt_path)
    plans = read_json(os.path.join(foundation, "plans.json"), "pass a model folder as nnUNetv2_train wrote it")
    check_architecture(plans, configuration, weights, trainer)
    extended = None
    if keep_foundation_labels:  # its checks read every label file: still before anything is written
        extended, annotations = extended_target(os.path.join(raw, name), target_json, foundation_json, name)
    elif EXTENDS_KEY in target_json:
        raise InputError(f"{name}'s dataset.json holds the union of labels an earlier adopt --keep-foundation-labels "
                         f"wrote; pass --keep-foundation-labels again, or put back your own dataset.json (the "
                         f"dataset.json.bak-* it kept) to adapt the foundation without extending it.")
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
        # how its sigmoid outputs become a label map (region-based foundations only; None otherwise)
        "regions_class_order": foundation_json.get("regions_class_order"),
        # the grouped head's rows per target channel (nnunet_fseft/network/grouped_head.py); None for regions
        "head_rows": head_groups((extended or target_json)["labels"], foundation_json["labels"]),
        # the target extends the foundation: its classes and the target's new labels (foundation/extend.py)
        "extends": extended is not None,
        # the axes the foundation was trained to be mirror-invariant along (None: trained without
        # mirroring); adaptation augments and predicts along these alone
        "mirror_axes": _mirror_axes(ckpt),
    }
    mixed = mixed_outputs(target_json["labels"], foundation_json["labels"], name)
    if mixed:
        print(f"Note: {mixed}, so no output starts from the foundation's: every method trains a new head, and "
              f"zeroshot has nothing to predict; write both label sets alike (e.g. as BraTS's regions) for a "
              f"zero-shot start.", flush=True)
    if extended is None:
        _preprocess_then_swap(name, plans, plans_file, configuration, num_processes)
        return plans_file, configuration
    print(describe_extension(extended, annotations), flush=True)
    written = []
    try:
        write_extended(os.path.join(raw, name), extended, annotations, written)  # nnU-Net reads them in raw
        _preprocess_then_swap(name, plans, plans_file, configuration, num_processes)
    except BaseException:
        restore(written)
        raise
    return plans_file, configuration


def _mirror_axes(ckpt: dict):
    axes = ckpt.get("inference_allowed_mirroring_axes")
    return None if axes is None else [int(a) for a in axes]


def _preprocess_then_swap(name: str, plans: dict, plans_file: str, configuration: str, num_processes: int) -> None:
    """nnU-Net's fingerprint and preprocessing of the target with `plans`, into a temporary plans
    name and data folder; then the data folder is renamed into place and the plans are written.
    Until then the dataset keeps its plans and data, and its old dataset.json lies in a temporary
    file: an error puts everything back at once, and after a kill (SIGKILL, OOM) the next adopt does.

    Not atomic: a kill between renaming the new data into place and writing the plans (two renames
    and one small write) leaves the new data beside the old plans until the next adopt puts the old
    data back; and gt_segmentations is updated in place (nnU-Net copies the raw labels into it, the
    same files each time)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    raw, out = os.path.join(require_env("nnUNet_raw"), name), os.path.dirname(plans_file)
    target_id = convert_dataset_name_to_id(name)
    created = not os.path.isdir(out)
    _remove_leftovers(out)
    scratch = _Scratch(out)
    data = os.path.join(out, PlansManager(plans).get_configuration(configuration).data_identifier)
    scratch_plans = copy.deepcopy(plans)
    scratch_plans["configurations"][configuration]["data_identifier"] = os.path.basename(scratch.data)
    scratch_plans[SWAPPED_DATA_KEY] = os.path.basename(data)
    dataset_json = os.path.join(out, "dataset.json")
    try:
        os.makedirs(out, exist_ok=True)
        with open(scratch.plans, "w") as f:  # first: while it exists, the adopt is undone, not finished
            json.dump(scratch_plans, f, indent=2)
        if os.path.isfile(dataset_json):
            shutil.copy2(dataset_json, scratch.dataset_json)
        if not os.path.isfile(os.path.join(out, "dataset_fingerprint.json")):
            extract_fingerprint_dataset(target_id, num_processes=num_processes, check_dataset_integrity=True,
                                        clean=True, verbose=False)
        shutil.copyfile(os.path.join(raw, "dataset.json"), dataset_json)  # nnU-Net's preprocessing reads it there
        preprocess_dataset(target_id, os.path.basename(scratch.plans)[:-len(".json")], [configuration],
                           [num_processes])
        if os.path.isdir(data):
            os.rename(data, scratch.old_data)
        os.rename(scratch.data, data)
        save_json_kept(plans, plans_file)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            _undo(scratch, data)
        raise
    _remove(scratch.plans)  # the swap is complete: the old dataset.json is now a backup, not to restore
    _finish(scratch)


class _Scratch:
    """The names of one adopt's temporary files in the preprocessed folder `out`:
    .fseft-adopt-HOST-PID-TOKEN-WHAT. The host and process id tell a later adopt whether the one
    that wrote them is still running (nnUNet_preprocessed may be shared by several machines); the
    random token keeps apart adopts whose process ids collide (containers)."""
    _REST = re.compile(r"(\d+)-([0-9a-f]{8})-(.+)")

    def __init__(self, out: str, pid: int = None, token: str = None):
        self.out, self.pid, self.token = out, pid or os.getpid(), token or secrets.token_hex(4)
        prefix = os.path.join(out, f"{_this_host_prefix()}{self.pid}-{self.token}-")
        self.data, self.old_data = prefix + "data", prefix + "old-data"
        self.plans, self.dataset_json = prefix + "plans.json", prefix + "dataset.json"

    @classmethod
    def parse(cls, out: str, entry: str):
        """The _Scratch whose file `entry` is, if an adopt on this host wrote it; else None."""
        prefix = _this_host_prefix()
        match = cls._REST.fullmatch(entry[len(prefix):]) if entry.startswith(prefix) else None
        return cls(out, int(match.group(1)), match.group(2)) if match else None


def _this_host_prefix() -> str:
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"  # no '-': it separates the fields
    return f"{TEMPORARY}{host}-"


def _undo(scratch: "_Scratch", data) -> None:
    """Puts back the old data folder `data` (if the swap had begun) and the old dataset.json, and
    removes an unfinished adopt's temporary files."""
    if data and os.path.isdir(scratch.old_data):  # the old data was renamed aside: the new may be in its place
        if not os.path.isdir(scratch.data):
            _remove(data)
        os.rename(scratch.old_data, data)
    if os.path.isfile(scratch.dataset_json):
        os.replace(scratch.dataset_json, os.path.join(scratch.out, "dataset.json"))
    for path in (scratch.data, scratch.plans):
        _remove(path)


def _finish(scratch: "_Scratch") -> None:
    """After a complete swap: the dataset.json it was preprocessed with before is kept as a backup
    if it differs from the new one, and the old data is removed."""
    dataset_json = os.path.join(scratch.out, "dataset.json")
    if os.path.isfile(scratch.dataset_json):
        if _same_json(scratch.dataset_json, dataset_json):
            _remove(scratch.dataset_json)
        else:
            os.replace(scratch.dataset_json, backup_name(dataset_json))
    _remove(scratch.old_data)


def _same_json(a: str, b: str) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return json.load(fa) == json.load(fb)
    except (OSError, ValueError):
        return False


def _remove_leftovers(folder: str) -> None:
    """Completes what an interrupted adopt on this host (a process no longer running) left in the
    preprocessed folder: undone if it had not written its plans (old data and dataset.json put
    back), finished if it had (the old dataset.json kept as a backup); its temporary files removed.
    Another host's files are left alone: we cannot tell whether the adopt there is still running."""
    interrupted = {}
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        scratch = _Scratch.parse(folder, entry)
        if scratch is not None and not _running(scratch.pid):
            interrupted[(scratch.pid, scratch.token)] = scratch
    for scratch in interrupted.values():
        if not os.path.isfile(scratch.plans):
            _finish(scratch)
            continue
        try:
            with open(scratch.plans) as f:
                data = os.path.join(folder, json.load(f)[SWAPPED_DATA_KEY])
        except (OSError, ValueError, KeyError):  # cut short while written, first of all: nothing else was done
            data = None
        _undo(scratch, data)


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
    from nnunet_fseft.foundation.record import architecture_trainer, foundation_weights
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
