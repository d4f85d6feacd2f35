"""K-shot splits: the draw itself, the file nnU-Net reads, and the `nnunet-fseft kshot` command."""
import glob
import json
import os
import random
import re

import numpy as np
import pytest

from helpers import fails_with, nnunet_folders, run
from nnunet_fseft.datasets.kshot import (identical_fold_warnings, identical_folds, kshot_splits, parse_k,
                                         write_kshot_splits)
from nnunet_fseft.datasets.synth import synth_dataset
from nnunet_fseft.errors import InputError

CASES = [f"case_{i:03d}" for i in range(20)]
DATASET_ID = 517


# ----------------------------------------------------------------------------------------------
# kshot_splits
# ----------------------------------------------------------------------------------------------

def test_every_fold_shares_one_held_out_set_and_trains_on_k_other_cases():
    k, repeats, test = 3, 4, 5
    splits = kshot_splits(CASES, k, repeats, seed=7, test=test)
    assert len(splits) == repeats
    val = splits[0]["val"]
    assert len(val) == test and len(set(val)) == test and set(val) <= set(CASES)
    for fold in splits:
        assert set(fold) == {"train", "val"}
        assert fold["val"] == val
        assert len(fold["train"]) == k and len(set(fold["train"])) == k
        assert set(fold["train"]) <= set(CASES)
        assert not set(fold["train"]) & set(val)
        assert all(type(c) is str for c in fold["train"] + fold["val"])  # JSON-serialisable, not numpy str


def test_fold_r_is_the_draw_with_seed_plus_r():
    seed, k, test = 11, 4, 6
    splits = kshot_splits(CASES, k, 3, seed=seed, test=test)
    held_out = sorted(np.random.RandomState(seed).choice(sorted(CASES), test, replace=False).tolist())
    assert splits[0]["val"] == held_out
    pool = [c for c in sorted(CASES) if c not in held_out]
    for r, fold in enumerate(splits):
        redraw = sorted(np.random.RandomState(seed + r).choice(pool, k, replace=False).tolist())
        assert fold["train"] == redraw


def test_splits_are_reproducible_and_independent_of_input_order():
    a = kshot_splits(CASES, 5, 3, seed=0, test=10)
    b = kshot_splits(CASES, 5, 3, seed=0, test=10)
    shuffled = list(CASES)
    random.Random(3).shuffle(shuffled)
    assert shuffled != CASES
    c = kshot_splits(shuffled, 5, 3, seed=0, test=10)
    assert a == b == c


def test_more_repeats_keep_the_earlier_folds():
    three = kshot_splits(CASES, 2, 3, seed=5, test=4)
    five = kshot_splits(CASES, 2, 5, seed=5, test=4)
    assert five[:3] == three


def test_repeats_draw_different_support_sets():
    splits = kshot_splits(CASES, 3, 5, seed=0, test=5)
    assert len({tuple(f["train"]) for f in splits}) > 1
    # and another seed draws another held-out set
    assert kshot_splits(CASES, 3, 1, seed=1, test=5)[0]["val"] != splits[0]["val"]


def test_whole_pool_is_allowed():
    splits = kshot_splits(CASES, 15, 2, seed=0, test=5)
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == sorted(CASES)


def test_k_all_is_every_case_outside_the_held_out_set():
    assert parse_k("all", 20, 5) == 15 and parse_k("ALL", 20, 5) == 15
    assert parse_k("5", 20, 5) == 5 and parse_k(5, 20, 5) == 5  # from the command line, or from Python
    splits = kshot_splits(CASES, parse_k("all", len(CASES), 5), 3, seed=0, test=5)
    assert all(sorted(f["train"] + f["val"]) == sorted(CASES) and len(f["train"]) == 15 for f in splits)
    assert identical_folds(splits) == [[0, 1, 2]]
    assert len(identical_fold_warnings(splits, pool=15)) == 1


@pytest.mark.parametrize("text, words", [("abc", "-k 'abc' is not a number of support cases"),
                                         ("2.5", "-k '2.5' is not a number"), ("0", "-k 0 is below 1"),
                                         ("-1", "-k -1 is below 1"), ("", "-k '' is not a number")])
def test_a_k_that_is_no_number_of_cases_is_refused_in_one_sentence(text, words):
    with pytest.raises(InputError) as info:
        parse_k(text, 20, 5)
    message = str(info.value)
    assert message.startswith(words) and "'all'" in message and message.count(". ") == 0 and message.endswith(".")


def test_k_all_with_every_case_held_out_is_refused():
    with pytest.raises(InputError, match="^-k all leaves no support case: the dataset has 5 training cases and --test "
                                         "holds out 5 of them; lower --test.$"):
        parse_k("all", 5, 5)


def test_identical_folds_are_found():
    whole_pool = kshot_splits(CASES[:8], 5, 3, seed=0, test=3)  # K = the 5 cases outside the held-out set
    assert identical_folds(whole_pool) == [[0, 1, 2]]
    assert identical_folds(kshot_splits(CASES, 3, 5, seed=0, test=5)) == []


def test_a_warning_for_each_group_of_identical_folds_of_one_file():
    whole_pool = kshot_splits(CASES[:8], 5, 3, seed=0, test=3)
    assert identical_fold_warnings(whole_pool, pool=5) == [
        "K = 5 takes every one of the 5 cases outside the held-out set, so all 3 folds train on the same support "
        "cases and differ only in training randomness; lower -k or --test for different support sets."]
    assert identical_fold_warnings(whole_pool[:1], pool=5) == []  # one fold: nothing to be identical to
    by_chance = [{"train": ["a"], "val": ["x"]}, {"train": ["b"], "val": ["x"]}, {"train": ["a"], "val": ["x"]}]
    assert identical_fold_warnings(by_chance, pool=3) == [
        "folds 0, 2 drew the same 1 support cases by chance, so they differ only in training randomness; pass "
        "another --seed for different support sets."]
    assert identical_fold_warnings(kshot_splits(CASES, 3, 5, seed=0, test=5), pool=15) == []


def test_k_plus_test_larger_than_dataset_raises_naming_both_numbers():
    with pytest.raises(InputError) as info:
        kshot_splits(CASES, 13, 3, seed=0, test=9)
    message = str(info.value)
    numbers = re.findall(r"\d+", message)
    assert "13" in numbers and "9" in numbers and "20" in numbers


@pytest.mark.parametrize("k, repeats, test", [(0, 3, 5), (-1, 3, 5), (3, 0, 5), (3, 3, 0)])
def test_non_positive_arguments_raise(k, repeats, test):
    with pytest.raises(InputError):
        kshot_splits(CASES, k, repeats, seed=0, test=test)


# ----------------------------------------------------------------------------------------------
# write_kshot_splits, on a tiny synthetic raw dataset
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch):
    nnunet_folders(tmp_path, monkeypatch)
    raw, preprocessed = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed"
    folder = synth_dataset(DATASET_ID, 6, ["liver"], shape=(16, 16, 16))
    assert os.path.dirname(folder) == str(raw)
    assert len(os.listdir(os.path.join(folder, "labelsTr"))) == 6
    return {"raw": raw, "preprocessed": preprocessed, "name": os.path.basename(folder)}


def _load(path):
    with open(path) as f:
        return json.load(f)


def _backups(path):
    return sorted(glob.glob(path + ".bak-*"))


def test_write_kshot_splits_keeps_a_backup_of_different_splits(tiny_dataset):
    path, first, backup, _ = write_kshot_splits(str(DATASET_ID), 2, repeats=2, seed=0, test=3)
    assert path == os.path.join(str(tiny_dataset["preprocessed"]), tiny_dataset["name"], "splits_final.json")
    assert backup == "" and _backups(path) == []
    assert _load(path) == first
    cases = {f"{tiny_dataset['name'].split('_', 1)[1]}_{i:03d}" for i in range(6)}
    for fold in first:
        assert len(fold["train"]) == 2 and len(fold["val"]) == 3
        assert set(fold["train"] + fold["val"]) <= cases

    path2, second, backup2, _ = write_kshot_splits(str(DATASET_ID), 3, repeats=2, seed=0, test=3)
    assert path2 == path and second != first
    assert os.path.basename(backup2).startswith("splits_final.json.bak-")
    assert _backups(path) == [backup2]
    assert _load(backup2) == first
    assert _load(path) == second

    # the same arguments again: nothing to keep
    path3, third, backup3, _ = write_kshot_splits(str(DATASET_ID), 3, repeats=2, seed=0, test=3)
    assert backup3 == "" and third == second
    assert _backups(path) == [backup2]
    assert _load(path) == second

    # back to the first K, within the same second: a second, distinct backup; the first is untouched
    _, _, backup4, _ = write_kshot_splits(str(DATASET_ID), 2, repeats=2, seed=0, test=3)
    assert backup4 and backup4 != backup2
    assert _backups(path) == sorted([backup2, backup4])
    assert _load(backup2) == first and _load(backup4) == second
    assert _load(path) == first


def test_write_kshot_splits_accepts_the_dataset_name(tiny_dataset):
    path, splits, _, _ = write_kshot_splits(tiny_dataset["name"], 1, repeats=1, seed=0, test=2)
    assert _load(path) == splits and len(splits) == 1


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def test_cli_kshot_too_large_exits_2_with_one_error_line(tiny_dataset):
    fails_with(["nnunet-fseft", "kshot", "-d", DATASET_ID, "-k", "5", "--test", "5"], "fewer than K + test = 5 + 5")
    assert not os.path.exists(os.path.join(str(tiny_dataset["preprocessed"]), tiny_dataset["name"],
                                           "splits_final.json"))


def test_cli_kshot_writes_the_splits(tiny_dataset):
    result = run(["nnunet-fseft", "kshot", "-d", DATASET_ID, "-k", "2", "--test", "3", "--repeats", "2"])
    path = os.path.join(str(tiny_dataset["preprocessed"]), tiny_dataset["name"], "splits_final.json")
    written = _load(path)
    assert written == write_kshot_splits(str(DATASET_ID), 2, repeats=2, seed=0, test=3)[1]
    assert path in result.stdout


def test_cli_kshot_k_all_takes_every_case_outside_the_held_out_set(tiny_dataset):
    result = run(["nnunet-fseft", "kshot", "-d", DATASET_ID, "-k", "all", "--test", "2", "--repeats", "2"])
    path = os.path.join(str(tiny_dataset["preprocessed"]), tiny_dataset["name"], "splits_final.json")
    written = _load(path)
    assert [len(f["train"]) for f in written] == [4, 4] and written[0]["train"] == written[1]["train"]
    assert "K = 4 takes every one of the 4 cases outside the held-out set" in result.stdout
    assert "2 folds of K=4 (all: every case outside the held-out set) support cases" in result.stdout


def test_cli_kshot_k_that_is_no_number_exits_2_with_one_error_line(tiny_dataset):
    fails_with(["nnunet-fseft", "kshot", "-d", DATASET_ID, "-k", "abc"], "-k 'abc' is not a number of support cases")
    fails_with(["nnunet-fseft", "kshot", "-d", DATASET_ID, "-k", "0"], "-k 0 is below 1")
    assert not os.path.exists(os.path.join(str(tiny_dataset["preprocessed"]), tiny_dataset["name"],
                                           "splits_final.json"))
