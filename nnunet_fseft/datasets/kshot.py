"""`nnunet-fseft kshot`: the one place K-shot splits are drawn.

Fold r trains on K cases drawn with seed S + r; every fold validates on the same N held-out
cases (drawn once with seed S), so Dice is comparable across K, repeats and methods. The
support cases of every fold come from the cases left after the held-out set.
"""
import os

import numpy as np

from nnunet_fseft.datasets.dataset_json import dataset_name, read_dataset_json
from nnunet_fseft.datasets.safe_write import save_json_kept
from nnunet_fseft.environment import require_env
from nnunet_fseft.errors import InputError


def training_cases(name: str) -> list:
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    folder = os.path.join(require_env("nnUNet_raw"), name)
    dataset_json = read_dataset_json(os.path.join(folder, "dataset.json"))
    return sorted(get_filenames_of_train_images_and_targets(folder, dataset_json))


def kshot_splits(cases: list, k: int, repeats: int, seed: int, test: int) -> list:
    cases = sorted(cases)
    if k < 1 or repeats < 1 or test < 1:
        raise InputError("-k, --repeats and --test must each be at least 1.")
    if k + test > len(cases):
        raise InputError(f"The dataset has {len(cases)} training cases, fewer than K + test = {k} + {test}; "
                         f"lower -k or --test.")
    held_out = sorted(np.random.RandomState(seed).choice(cases, test, replace=False).tolist())
    pool = [c for c in cases if c not in held_out]
    return [{"train": sorted(np.random.RandomState(seed + r).choice(pool, k, replace=False).tolist()),
             "val": held_out} for r in range(repeats)]


def write_kshot_splits(dataset: str, k: int, repeats: int = 3, seed: int = 0, test: int = 10):
    """Writes nnUNet_preprocessed/DatasetX/splits_final.json (an existing one is kept as a backup).
    Returns (path, splits, backup path or '', warnings: a sentence for each group of identical folds).
    Identical folds are written anyway: they still measure the training's own variation."""
    name = dataset_name(dataset)
    cases = training_cases(name)
    splits = kshot_splits(cases, k, repeats, seed, test)
    folder = os.path.join(require_env("nnUNet_preprocessed"), name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "splits_final.json")
    return path, splits, save_json_kept(splits, path), identical_fold_warnings(splits, len(cases) - test)


def identical_folds(splits: list) -> list:
    """Groups (lists of fold numbers, more than one) of folds that train on the same support cases:
    with K equal to (or close to) the cases outside the held-out set, repeats draw the same set."""
    folds = {}
    for r, fold in enumerate(splits):
        folds.setdefault(tuple(fold["train"]), []).append(r)
    return [group for group in folds.values() if len(group) > 1]


def identical_fold_warnings(splits: list, pool: int) -> list:
    """A sentence for each group of folds of these splits that train on the same support cases;
    `pool` is the number of cases outside the held-out set. (Folds of other files are not
    compared: repeat r of seed S is drawn as repeat 0 of seed S + r.)"""
    k = len(splits[0]["train"])
    if k >= pool and len(splits) > 1:
        return [f"K = {k} takes every one of the {pool} cases outside the held-out set, so all {len(splits)} folds "
                f"train on the same support cases and differ only in training randomness; lower -k or --test for "
                f"different support sets."]
    return [f"folds {', '.join(map(str, folds))} drew the same {k} support cases by chance, so they differ only in "
            f"training randomness; pass another --seed for different support sets." for folds in identical_folds(splits)]
