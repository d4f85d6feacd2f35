"""Careless input a new user gives (issue 14, items 7-10), through the real `nnunet-fseft` commands
on tiny synthetic raw datasets: each is refused in one sentence before anything is written, or
written with a clear word where writing is still right. No foundation is trained here."""
import json
import os
import subprocess
import sys

import pytest

from nnunet_fseft.synth import synth_dataset

A, B = 531, 532  # two tiny raw datasets of the same anatomy


def tree(folder):
    """Every path below `folder`, with the bytes of each file: what a refusal must leave as it was."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            found[os.path.join(root, d)] = None
        for f in files:
            found[os.path.join(root, f)] = open(os.path.join(root, f), "rb").read()
    return found


@pytest.fixture
def tiny_workspace(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    synth_dataset(A, 6, ["liver"], shape=(16, 16, 16), name="TinyA")
    synth_dataset(B, 3, ["spleen"], shape=(16, 16, 16), name="TinyB", seed=1)
    return tmp_path


def cli(*args):
    """`nnunet-fseft ARGS` in this environment: (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "nnunet_fseft.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def refused(*args, says):
    """The command exits 2 with one error line holding each of `says`, and no traceback."""
    status, out, err = cli(*args)
    assert status == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nnunet-fseft {args[0]}: error: "), err
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


def dataset_json(tiny_workspace, dataset):
    folder = {A: "Dataset531_TinyA", B: "Dataset532_TinyB"}[dataset]
    return tiny_workspace / "nnUNet_raw" / folder / "dataset.json"


# --- item 7: a dataset.json without a required key, or not JSON at all -------------------------

def without(tiny_workspace, key):
    """Dataset A's dataset.json with `key` removed; returns its path."""
    path = dataset_json(tiny_workspace, A)
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))
    return path


def test_a_dataset_json_without_file_ending_is_named_with_the_key(tiny_workspace, tmp_path):
    path = without(tiny_workspace, "file_ending")
    before = tree(tiny_workspace)
    foundation = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"  # never reached: the target is read first
    says = [str(path), "has no 'file_ending'"]
    refused("kshot", "-d", A, "-k", "1", "--test", "1", says=says)
    refused("combine", "-d", B, A, "-o", 533, says=says)
    refused("adopt", "--foundation", foundation, "-d", A, says=says)
    assert tree(tiny_workspace) == before


@pytest.mark.parametrize("key", ["labels", "channel_names"])
def test_every_required_key_is_checked(tiny_workspace, key):
    path = without(tiny_workspace, key)
    refused("kshot", "-d", A, "-k", "1", "--test", "1", says=[str(path), f"has no '{key}'"])


def test_a_dataset_json_that_is_not_json_is_named(tiny_workspace, tmp_path):
    path = dataset_json(tiny_workspace, A)
    path.write_text(path.read_text()[:-5])  # cut short, as an editor crash leaves it
    before = tree(tiny_workspace)
    for args in (["kshot", "-d", A, "-k", "1", "--test", "1"], ["combine", "-d", B, A, "-o", 533],
                 ["adopt", "--foundation", tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres", "-d", A]):
        refused(*args, says=[str(path), "is not valid JSON", "line "])
    assert tree(tiny_workspace) == before


# --- item 8: a plans name is a name, not a path -------------------------------------------------

@pytest.mark.parametrize("plans_name", ["../../x", "a/b", ".."])
def test_a_plans_name_that_is_a_path_is_refused(tiny_workspace, tmp_path, plans_name):
    before = tree(tiny_workspace)
    refused("adopt", "--foundation", tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres", "-d", A,
            "--plans-name", plans_name, says=["is not a name", "no path separator or '..'"])
    assert tree(tiny_workspace) == before and not (tmp_path / "x.json").exists()


def test_commands_reading_plans_refuse_a_path_too(tiny_workspace):
    refused("params", "-d", A, "-p", "../../x", says=["Plans name '../../x' is not a name"])


# --- item 9: repeats that cannot differ ---------------------------------------------------------

def test_kshot_says_when_repeats_draw_the_same_support_cases(tiny_workspace):
    """Exactly K cases outside the held-out set: every repeat trains on them. Still written (the
    repeats still measure the training's own variation, and K = every case is a valid choice), with
    a warning naming the identical folds."""
    status, out, err = cli("kshot", "-d", A, "-k", 4, "--test", 2, "--repeats", 3)
    assert status == 0, err
    splits = json.loads((tiny_workspace / "nnUNet_preprocessed" / "Dataset531_TinyA" / "splits_final.json").read_text())
    assert len(splits) == 3 and splits[0]["train"] == splits[1]["train"] == splits[2]["train"]
    warnings = [line for line in out.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "K = 4 takes every one of the 4 cases outside the held-out set" in warnings[0], out

    for seed in range(3):  # K = 1 of 5 cases: two repeats now and then draw the same case
        status, out, err = cli("kshot", "-d", A, "-k", 1, "--test", 1, "--repeats", 2, "--seed", seed)
        splits = json.loads((tiny_workspace / "nnUNet_preprocessed" / "Dataset531_TinyA" / "splits_final.json").read_text())
        same = splits[0]["train"] == splits[1]["train"]
        assert status == 0 and ("folds 0, 1 drew the same 1 support cases by chance" in out) == same, out
        assert same or "Warning" not in out


# --- item 10: a shape nothing can be drawn in ---------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 0, 0), (32, -1, 32), (8, 32, 32)])
def test_synth_refuses_a_shape_too_small_before_writing(tiny_workspace, shape):
    before = tree(tiny_workspace)
    refused("synth", "-d", 534, "--cases", 2, "--shape", *shape, says=["--shape", "is too small", "at least 12"])
    assert tree(tiny_workspace) == before
