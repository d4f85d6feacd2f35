"""`nnunet-fseft kshot`: the one place K-shot splits are drawn.

Fold r trains on K cases drawn with seed S + r; every fold validates on the same N held-out
cases (drawn once with seed S), so Dice is comparable across K, repeats and methods. The
support cases of every fold come from the cases left after the held-out set.

K is a number of at least 1, or "all": every case outside the held-out set (K = cases - test);
`parse_k` is the one place that reads it, for `kshot -k` and `benchmark -k` alike.
"""
import os
from typing import Union

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


ALL = "all"


def parse_k(value: Union[int, str], n_cases: int, test: int) -> int:
    """K as given (a number, or "all") for a dataset of `n_cases` training cases with `test` held out:
    "all" is every case outside the held-out set, n_cases - test. Raises a one-sentence InputError
    for anything else, or a K below 1."""
    text = str(value).strip()
    if text.lower() == ALL:
        if n_cases - test < 1:
            raise InputError(f"-k all leaves no support case: the dataset has {n_cases} training cases and --test "
                             f"holds out {test} of them; lower --test.")
        return n_cases - test
    try:
        k = int(text)
    except ValueError:
        raise InputError(f"-k {text!r} is not a number of support cases; give a whole number of at least 1, or "
                         f"'all' (every case outside the held-out set).") from None
    if k < 1:
        raise InputError(f"-k {k} is below 1; give at least one support case, or 'all' (every case outside the "
                         f"held-out set).")
    return k


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


def write_kshot_splits(dataset: str, k: Union[int, str], repeats: int = 3, seed: int = 0, test: int = 10):
    """Writes nnUNet_preprocessed/DatasetX/splits_final.json (an existing one is kept as a backup);
    `k` a number or "all" (`parse_k`: every case outside the held-out set).
    Returns (path, splits, backup path or '', warnings: a sentence for each group of identical folds).
    Identical folds are written anyway: they still measure the training's own variation."""
    name = dataset_name(dataset)
    cases = training_cases(name)
    splits = kshot_splits(cases, parse_k(k, len(cases), test), repeats, seed, test)
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
