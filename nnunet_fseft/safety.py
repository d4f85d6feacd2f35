"""Clear errors for bad input, and writes that never lose a user's file."""
import json
import os
import shutil
import time

from nnunet_fseft.errors import InputError


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise InputError(f"The environment variable {name} is not set; export it to the folder nnU-Net uses "
                         f"for it (see nnU-Net's documentation/setting_up_paths.md).")
    return value


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


def backup_if_different(path: str, new_content) -> str:
    """Copies `path` to `path.bak-<time>` unless it is missing or already holds `new_content`
    (a JSON-serialisable object). Returns the backup's path or ''."""
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        try:
            if json.load(f) == json.loads(json.dumps(new_content)):
                return ""
        except ValueError:  # not JSON, or not text: different, so kept
            pass
    backup = backup_name(path)
    shutil.copy2(path, backup)
    return backup


def backup_name(path: str) -> str:
    """`path.bak-<time>`, numbered if that exists too."""
    backup = f"{path}.bak-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(backup):
        backup, n = f"{path}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    return backup


def keep_existing(path: str) -> str:
    """Moves an existing file to a backup, so that nothing is overwritten; returns the backup or ''."""
    if not os.path.exists(path):
        return ""
    backup = backup_name(path)
    shutil.move(path, backup)
    return backup


def save_json_kept(obj, path: str) -> str:
    """Writes JSON, keeping a backup of a different file already there. Returns the backup or ''."""
    backup = backup_if_different(path, obj)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    return backup
