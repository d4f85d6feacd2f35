"""Writes that never lose a user's file: what a write would replace is kept as a backup first."""
import json
import os
import shutil
import time


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
