"""The one reader of nnU-Net's dataset.json (and of the other JSON files users hand us), and
what our commands need from it.

Every command reads a dataset.json through `read_dataset_json`, so a broken file or a missing
key is named in one sentence instead of surfacing as a KeyError or the JSON parser's message;
`read_json` does the same for plans and label maps.
The keys `combine` writes for the partial-label trainer live here too: the command that writes
them and the loss that reads them both import this module, not each other.
"""
import json
import os

from nnunet_fseft.environment import require_env
from nnunet_fseft.errors import InputError

# The keys our commands read, and what each means, for the sentence that says one is missing.
REQUIRED = {
    "labels": 'the label names and values, e.g. {"background": 0, "liver": 1}',
    "file_ending": 'the file ending of its images and labels, e.g. ".nii.gz"',
    "channel_names": 'the input channels, e.g. {"0": "CT"}',
}

ANNOTATIONS = "annotations.json"
ANNOTATIONS_KEY = "fseft_annotations"  # in dataset.json, which nnU-Net copies to preprocessed and results


def read_json(path: str, fix: str) -> object:
    """The JSON in the file at `path`, or one sentence naming the file, where it stops being
    JSON (or that it is not text at all), and `fix` (what the file must hold)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}.") from None
        except UnicodeDecodeError as e:
            raise InputError(f"{path} is not valid JSON (it is not UTF-8 text: byte {e.start} cannot be decoded, "
                             f"so it is binary or another encoding); {fix}.") from None


def read_dataset_json(path: str) -> dict:
    """The dataset.json at `path`, or one sentence naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist; every nnU-Net dataset needs its dataset.json.")
    content = read_json(path, "fix the file (nnU-Net's dataset.json format)")
    if not isinstance(content, dict):
        raise InputError(f"{path} must hold a JSON object (nnU-Net's dataset.json), not a {type(content).__name__}.")
    for key, meaning in REQUIRED.items():
        # nnU-Net still reads the old name `modality` for the channels
        if key not in content and not (key == "channel_names" and "modality" in content):
            raise InputError(f"{path} has no '{key}' ({meaning}); add it, as nnU-Net's dataset format requires.")
    return content


def has_regions(labels: dict) -> bool:
    """A label set with regions (a label given as several values, as nnU-Net's LabelManager decides):
    sigmoid outputs, one channel per region, not one class per voxel."""
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())


def region_channels(labels: dict) -> dict:
    """name -> (output channel, its label values) of a region-based label set, in nnU-Net's order
    (the order of dataset.json, background and the ignore label left out): channel i of the sigmoid
    head is the i-th region."""
    regions = [(n, tuple(v) if isinstance(v, (list, tuple)) else (int(v),)) for n, v in labels.items()
               if n != "ignore" and set(v if isinstance(v, (list, tuple)) else [v]) != {0}]
    return {n: (i, values) for i, (n, values) in enumerate(regions)}


def plain_labels(labels: dict) -> dict:
    """name -> value of the single-valued labels, background included (regions and nnU-Net's ignore
    label left out; a list of one value is that value, as nnU-Net reads it)."""
    one = {n: v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for n, v in labels.items()}
    return {n: int(v) for n, v in one.items() if isinstance(v, int) and n != "ignore"}


def plain_foreground(labels: dict) -> dict:
    """name -> value of the single-valued labels without background: the classes a softmax head segments."""
    return {n: v for n, v in plain_labels(labels).items() if v != 0}


def not_one_class_per_voxel(label_manager) -> str:
    """'regions' or 'an ignore label' where a dataset's labels are not one dense class per voxel
    (what partial labels and size priors need), else ''."""
    if label_manager.has_regions:
        return "regions"
    return "an ignore label" if label_manager.has_ignore_label else ""


def channels(dataset_json: dict) -> list:
    """The input channels' names in order, lower case: what must agree between datasets."""
    c = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return [str(c[k]).strip().lower() for k in sorted(c, key=int)]


def dataset_name(dataset: str) -> str:
    """DatasetXXX_NAME of a raw dataset given by id or name, or one clear sentence."""
    raw = require_env("nnUNet_raw")
    text = str(dataset)
    if text.startswith("Dataset"):
        found = [text] if os.path.isdir(os.path.join(raw, text)) else []
    elif text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        found = sorted(d for d in os.listdir(raw) if d.startswith(prefix)) if os.path.isdir(raw) else []
    else:
        raise InputError(f"'{dataset}' is neither a dataset id nor a DatasetXXX_NAME; pass e.g. -d 501.")
    if not found:
        raise InputError(f"Dataset {dataset} does not exist in nnUNet_raw ({raw}); "
                         f"create it there first (or check the id).")
    if len(found) > 1:
        raise InputError(f"Dataset id {dataset} matches several folders in nnUNet_raw ({', '.join(found)}); "
                         f"rename one or pass the full name.")
    if not os.path.isfile(os.path.join(raw, found[0], "dataset.json")):
        raise InputError(f"{os.path.join(raw, found[0])} has no dataset.json; it is not an nnU-Net raw dataset.")
    return found[0]
