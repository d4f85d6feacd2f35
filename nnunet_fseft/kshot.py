"""`nnunet-fseft kshot`: the one place K-shot splits are drawn.

Fold r trains on K cases drawn with seed S + r; every fold validates on the same N held-out
cases (drawn once with seed S), so Dice is comparable across K, repeats and methods. The
support cases of every fold come from the cases left after the held-out set.
"""
import os

import numpy as np

from nnunet_fseft.safety import dataset_name, require_env, save_json_kept


def training_cases(name: str) -> list:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    folder = os.path.join(require_env("nnUNet_raw"), name)
    return sorted(get_filenames_of_train_images_and_targets(folder, load_json(os.path.join(folder, "dataset.json"))))


def kshot_splits(cases: list, k: int, repeats: int, seed: int, test: int) -> list:
    cases = sorted(cases)
    if k < 1 or repeats < 1 or test < 1:
        raise ValueError("-k, --repeats and --test must each be at least 1.")
    if k + test > len(cases):
        raise ValueError(f"The dataset has {len(cases)} training cases, fewer than K + test = {k} + {test}; "
                         f"lower -k or --test.")
    held_out = sorted(np.random.RandomState(seed).choice(cases, test, replace=False).tolist())
    pool = [c for c in cases if c not in held_out]
    return [{"train": sorted(np.random.RandomState(seed + r).choice(pool, k, replace=False).tolist()),
             "val": held_out} for r in range(repeats)]


def write_kshot_splits(dataset: str, k: int, repeats: int = 3, seed: int = 0, test: int = 10):
    """Writes nnUNet_preprocessed/DatasetX/splits_final.json (an existing one is kept as a backup).
    Returns (path, splits, backup path or '')."""
    name = dataset_name(dataset)
    splits = kshot_splits(training_cases(name), k, repeats, seed, test)
    folder = os.path.join(require_env("nnUNet_preprocessed"), name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "splits_final.json")
    return path, splits, save_json_kept(splits, path)
