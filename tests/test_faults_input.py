"""Careless input a new user gives (issue 14, items 7-10), through the real `nnunet-fseft` commands
on tiny synthetic raw datasets: each is refused in one sentence before anything is written, or
written with a clear word where writing is still right. No foundation is trained here."""
import json
import os
import socket
import subprocess
import sys

import pytest

from helpers import nnunet_folders, tree
from nnunet_fseft import cli
from nnunet_fseft.datasets.synth import synth_dataset

A, B = 531, 532  # two tiny raw datasets of the same anatomy


@pytest.fixture
def tiny_workspace(tmp_path, monkeypatch):
    nnunet_folders(tmp_path, monkeypatch)
    synth_dataset(A, 6, ["liver"], shape=(16, 16, 16), name="TinyA")
    synth_dataset(B, 3, ["spleen"], shape=(16, 16, 16), name="TinyB", seed=1)
    return tmp_path


def nnunet_fseft(capsys, *args):
    """`nnunet-fseft ARGS`, run in this process (its argument parsing and error handling included):
    (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        cli.main([str(a) for a in args])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def refused(capsys, *args, says):
    """helpers.fails_with's check for a command run in this process: exit status 2 and one error
    line, on stderr, holding each of `says`."""
    status, out, err = nnunet_fseft(capsys, *args)
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


def test_a_dataset_json_without_file_ending_is_named_with_the_key(tiny_workspace, tmp_path, capsys):
    path = without(tiny_workspace, "file_ending")
    before = tree(tiny_workspace)
    foundation = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"  # never reached: the target is read first
    says = [str(path), "has no 'file_ending'"]
    refused(capsys, "kshot", "-d", A, "-k", "1", "--test", "1", says=says)
    refused(capsys, "combine", "-d", B, A, "-o", 533, says=says)
    refused(capsys, "adopt", "--foundation", foundation, "-d", A, says=says)
    assert tree(tiny_workspace) == before


@pytest.mark.parametrize("key", ["labels", "channel_names"])
def test_every_required_key_is_checked(tiny_workspace, key, capsys):
    path = without(tiny_workspace, key)
    refused(capsys, "kshot", "-d", A, "-k", "1", "--test", "1", says=[str(path), f"has no '{key}'"])


@pytest.mark.parametrize("damage, says", [
    (lambda text: text[:-5].encode(), "line "),  # cut short, as an editor crash leaves it
    (lambda text: b"\x80\x00" + os.urandom(64), "not UTF-8 text"),  # a binary file saved under the name
], ids=["cut short", "binary"])
def test_a_dataset_json_that_is_not_json_is_named(tiny_workspace, tmp_path, damage, says, capsys):
    path = dataset_json(tiny_workspace, A)
    path.write_bytes(damage(path.read_text()))
    before = tree(tiny_workspace)
    for args in (["kshot", "-d", A, "-k", "1", "--test", "1"], ["combine", "-d", B, A, "-o", 533],
                 ["adopt", "--foundation", tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres", "-d", A]):
        refused(capsys, *args, says=[str(path), "is not valid JSON", says])
    assert tree(tiny_workspace) == before


def test_plans_and_splits_that_are_not_json_are_named(tiny_workspace, capsys):
    from nnunet_fseft.errors import InputError
    from nnunet_fseft.plans.presets import apply_preset
    from nnunet_fseft.foundation.zeroshot import held_out_cases
    folder = tiny_workspace / "nnUNet_preprocessed" / "Dataset531_TinyA"
    folder.mkdir()
    for name in ("FSEFTPlans.json", "nnUNetPlans.json", "splits_final.json"):
        (folder / name).write_bytes(b'{"configurations": ')
    refused(capsys, "params", "-d", A, says=[str(folder / "FSEFTPlans.json"), "is not valid JSON", "adopt"])
    with pytest.raises(InputError, match=f"{folder / 'nnUNetPlans.json'} is not valid JSON"):
        apply_preset(str(A), "cpu_tiny")
    with pytest.raises(InputError, match=f"{folder / 'splits_final.json'} is not valid JSON .*nnunet-fseft kshot"):
        held_out_cases("Dataset531_TinyA", 0)


# --- item 8: a plans name is a name, not a path -------------------------------------------------

@pytest.mark.parametrize("plans_name", ["../../x", "a/b", ".."])
def test_a_plans_name_that_is_a_path_is_refused(tiny_workspace, tmp_path, plans_name, capsys):
    before = tree(tiny_workspace)
    refused(capsys, "adopt", "--foundation", tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres", "-d", A,
            "--plans-name", plans_name, says=["is not a name", "no path separator or '..'"])
    assert tree(tiny_workspace) == before and not (tmp_path / "x.json").exists()


def test_commands_reading_plans_refuse_a_path_too(tiny_workspace, capsys):
    refused(capsys, "params", "-d", A, "-p", "../../x", says=["Plans name '../../x' is not a name"])


# --- item 9: repeats that cannot differ ---------------------------------------------------------

def test_kshot_says_when_repeats_draw_the_same_support_cases(tiny_workspace, capsys):
    """Exactly K cases outside the held-out set: every repeat trains on them. Still written (the
    repeats still measure the training's own variation, and K = every case is a valid choice), with
    a warning naming the identical folds."""
    status, out, err = nnunet_fseft(capsys, "kshot", "-d", A, "-k", 4, "--test", 2, "--repeats", 3)
    assert status == 0, err
    splits = json.loads((tiny_workspace / "nnUNet_preprocessed" / "Dataset531_TinyA" / "splits_final.json").read_text())
    assert len(splits) == 3 and splits[0]["train"] == splits[1]["train"] == splits[2]["train"]
    warnings = [line for line in out.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "K = 4 takes every one of the 4 cases outside the held-out set" in warnings[0], out

    for seed in range(3):  # K = 1 of 5 cases: two repeats now and then draw the same case
        status, out, err = nnunet_fseft(capsys, "kshot", "-d", A, "-k", 1, "--test", 1, "--repeats", 2, "--seed", seed)
        splits = json.loads((tiny_workspace / "nnUNet_preprocessed" / "Dataset531_TinyA" / "splits_final.json").read_text())
        same = splits[0]["train"] == splits[1]["train"]
        assert status == 0 and ("folds 0, 1 drew the same 1 support cases by chance" in out) == same, out
        assert same or "Warning" not in out


# --- item 10: a shape nothing can be drawn in ---------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 0, 0), (32, -1, 32), (8, 32, 32)])
def test_synth_refuses_a_shape_too_small_before_writing(tiny_workspace, shape, capsys):
    before = tree(tiny_workspace)
    refused(capsys, "synth", "-d", 534, "--cases", 2, "--shape", *shape, says=["--shape", "is too small", "at least 12"])
    assert tree(tiny_workspace) == before


# --- item 5, the clean-up: what a killed adopt left is undone or finished by the next one --------

def dead_pid():
    """The process id of a process that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("stage", ["preprocessing", "swapping", "swapped"])
def test_the_next_adopt_undoes_or_finishes_what_a_killed_one_left(tmp_path, stage):
    """Killed while preprocessing, or between swapping the data and writing the plans: the old data
    and dataset.json are put back. Killed after writing the plans: the new state stays, and the old
    dataset.json is kept as a backup. Files of an adopt still running, or of another host's (which
    may be running), are left alone."""
    from nnunet_fseft.foundation.adopt import SWAPPED_DATA_KEY, _remove_leftovers, _Scratch
    folder = tmp_path / "Dataset591_Adopted"
    (folder / "P_3d_fullres").mkdir(parents=True)
    (folder / "P_3d_fullres" / "old.npz").write_text("old data")
    (folder / "P.json").write_text('{"old": "plans"}')
    (folder / "dataset.json").write_text('{"new": "dataset.json"}')  # copied from nnUNet_raw by the killed adopt
    killed = _Scratch(str(folder), dead_pid())
    with open(killed.dataset_json, "w") as f:
        f.write('{"old": "dataset.json"}')
    with open(killed.plans, "w") as f:
        json.dump({SWAPPED_DATA_KEY: "P_3d_fullres"}, f)
    os.mkdir(killed.data)
    with open(os.path.join(killed.data, "new.npz"), "w") as f:
        f.write("new data")
    if stage in ("swapping", "swapped"):
        os.rename(folder / "P_3d_fullres", killed.old_data)
        os.rename(killed.data, folder / "P_3d_fullres")
    if stage == "swapped":
        (folder / "P.json").write_text('{"new": "plans"}')
        os.remove(killed.plans)
    running = _Scratch(str(folder))  # this process: an adopt still running
    other_host = f".fseft-adopt-another.host-{killed.pid}-0123abcd-dataset.json"
    for path in (running.dataset_json, folder / other_host):
        with open(path, "w") as f:
            f.write("{}")

    _remove_leftovers(str(folder))

    left = tree(folder)
    assert sorted(k for k in left if k.startswith(".fseft-adopt-")) == \
        sorted([os.path.basename(running.dataset_json), other_host])
    if stage == "swapped":
        assert left["P_3d_fullres/new.npz"] == b"new data" and "P_3d_fullres/old.npz" not in left
        assert left["dataset.json"] == b'{"new": "dataset.json"}'
        backups = [k for k in left if k.startswith("dataset.json.bak-")]
        assert len(backups) == 1 and left[backups[0]] == b'{"old": "dataset.json"}'
    else:
        assert left["P_3d_fullres/old.npz"] == b"old data" and "P_3d_fullres/new.npz" not in left
        assert left["dataset.json"] == b'{"old": "dataset.json"}' and left["P.json"] == b'{"old": "plans"}'
        assert not [k for k in left if ".bak-" in k]


def test_temporary_names_hold_the_host_the_process_and_a_token(tmp_path):
    from nnunet_fseft.foundation.adopt import _Scratch
    a, b = _Scratch(str(tmp_path)), _Scratch(str(tmp_path))
    assert a.data != b.data  # two adopts with the same process id (containers) do not share files
    name = os.path.basename(a.data)
    assert socket.gethostname().split("-")[0] in name and f"-{os.getpid()}-{a.token}-" in name
    parsed = _Scratch.parse(str(tmp_path), name)
    assert (parsed.pid, parsed.token) == (os.getpid(), a.token)
    assert _Scratch.parse(str(tmp_path), name.replace(".fseft-adopt-", ".fseft-adopt-x")) is None
