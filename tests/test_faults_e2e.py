"""Faults that lost data or gave a wrong answer without a word (issue 14, items 3-6 and 11),
reproduced through the real commands on the session's tiny foundation and target."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from helpers import COMMAND_ENV, TRAIN_ENV_NO_VALIDATION, fails_with, run, tree
from nnunet_fseft.foundation.record import PLANS_KEY, read_checkpoint
from nnunet_fseft.plans import PLANS_NAME
from nnunet_fseft.runner import command_path

BITFIT = "nnUNetTrainerFSEFT_BitFit"


def preprocessed(workspace):
    return workspace / "nnUNet_preprocessed" / "Dataset501_SynthCTB"


@pytest.fixture(scope="module")
def bitfit(workspace, target):
    """A model of a mergeable method, trained on fold 1 of the target."""
    run(["nnUNetv2_train", target, "3d_fullres", "1", "-p", PLANS_NAME, "-tr", BITFIT, "-device", "cpu"],
        env=TRAIN_ENV_NO_VALIDATION)
    return workspace / "nnUNet_results" / "Dataset501_SynthCTB" / f"{BITFIT}__FSEFTPlans__3d_fullres"


# --- item 6: export -o an existing folder -------------------------------------------------------

def test_export_into_an_existing_folder_writes_the_file_inside_it(bitfit, tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "mine.txt").write_text("a file of the user's")
    run(["nnunet-fseft", "export", bitfit, "-o", folder, "-f", "1"])
    adapter = folder / f"Dataset501_SynthCTB__{BITFIT}__fold_1.safetensors"
    assert folder.is_dir() and (folder / "mine.txt").read_text() == "a file of the user's"
    assert adapter.is_file() and (folder / (adapter.name + ".json")).is_file()
    assert sorted(os.listdir(tmp_path)) == ["adapters"]  # nothing renamed beside it


# --- item 3: import and merge never write where a foundation lives ------------------------------

def test_import_and_merge_refuse_to_write_into_a_foundation(bitfit, foundation, tmp_path):
    adapter = tmp_path / "bitfit.safetensors"
    run(["nnunet-fseft", "export", bitfit, "-o", adapter, "-f", "1"])
    copy = tmp_path / "copy" / foundation.name  # the same foundation elsewhere (same sha256)
    shutil.copytree(foundation, copy)
    before = tree(foundation.parent)
    for out in (foundation, foundation / "fold_all", foundation.parent):  # the folder, inside it, above it
        fails_with(["nnunet-fseft", "import", adapter, "--foundation", foundation, "-o", out],
                   "would write into the foundation model folder")
        fails_with(["nnunet-fseft", "merge", bitfit, "-o", out], "would write into the foundation model folder")
    # the foundation given is a copy, but -o is the one the target's plans record
    fails_with(["nnunet-fseft", "import", adapter, "--foundation", copy, "-o", foundation], "-o " + str(foundation))
    assert tree(foundation.parent) == before


# --- item 4: a foundation with corrupt weights ---------------------------------------------------

@pytest.mark.parametrize("value, says", [(float("nan"), "holds NaN or infinite weights"),
                                         (3e38, "holds weights beyond ±65504")])
def test_a_foundation_with_corrupt_weights_is_not_adopted(workspace, foundation, target, tmp_path, value, says):
    corrupt = tmp_path / foundation.name
    shutil.copytree(foundation, corrupt)
    path = corrupt / "fold_all" / "checkpoint_final.pth"
    checkpoint = read_checkpoint(str(path))
    name = next(k for k in checkpoint["network_weights"] if k.startswith("encoder") and k.endswith("weight"))
    checkpoint["network_weights"][name].view(-1)[:5] = value
    torch.save(checkpoint, path)
    line = fails_with(["nnunet-fseft", "adopt", "--foundation", corrupt, "-d", target, "--plans-name", "Corrupt"],
                      says)
    assert f"(first in '{name}')" in line and str(path) in line
    assert not (preprocessed(workspace) / "Corrupt.json").exists()


# --- item 5: an interrupted adopt leaves the dataset as it was -----------------------------------

def test_an_interrupted_adopt_leaves_the_old_plans_and_data(workspace, foundation, target):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = preprocessed(workspace)
    run(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", target, "--plans-name", "Interrupted"])
    # as if preprocessed with an older dataset.json: the adopt replaces it with nnUNet_raw's
    old_dataset_json = json.dumps({**json.loads((folder / "dataset.json").read_text()), "description": "older"})
    (folder / "dataset.json").write_text(old_dataset_json)
    before = tree(folder)
    assert "Interrupted.json" in before and "Interrupted_3d_fullres" in before

    p = subprocess.Popen([command_path("nnunet-fseft"), "adopt", "--foundation", str(foundation), "-d", target,
                          "--plans-name", "Interrupted", "-np", "1"], start_new_session=True,
                         env={**os.environ, **COMMAND_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(folder.glob(f".fseft-adopt-*-{p.pid}-*-data")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "adopt finished before it could be interrupted"
    scratch = list(folder.glob(f".fseft-adopt-*-{p.pid}-*-data"))
    assert scratch, "preprocessing did not start"
    os.killpg(p.pid, signal.SIGKILL)  # adopt and its preprocessing workers, as a crash or kill -9 ends them
    p.wait()

    after = {k: v for k, v in tree(folder).items() if not k.startswith(".fseft-adopt-")}
    unchanged = [k for k in before if not k.startswith("gt_segmentations") and k != "dataset.json"]
    assert {k: after.get(k, "missing") for k in unchanged} == {k: before[k] for k in unchanged}
    infer_dataset_class(str(folder / "Interrupted_3d_fullres"))  # what nnUNetv2_train failed on
    # nnUNet_raw's dataset.json is in place (preprocessing reads it there); the old one is kept beside it
    assert after["dataset.json"] != old_dataset_json.encode()
    kept = folder / (scratch[0].name[:-len("data")] + "dataset.json")
    assert kept.read_text() == old_dataset_json

    run(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", target, "--plans-name", "Interrupted"])
    assert not [e for e in os.listdir(folder) if e.startswith(".fseft-adopt-")]  # the leftovers are removed
    assert sorted(os.listdir(folder / "Interrupted_3d_fullres")) == \
        sorted(k.split("/", 1)[1] for k in before if k.startswith("Interrupted_3d_fullres/"))
    # its clean-up put the old dataset.json back, so that this adopt, replacing it, kept it as a backup
    backups = [f for f in os.listdir(folder) if f.startswith("dataset.json.bak-")]
    assert [(folder / f).read_text() for f in backups].count(old_dataset_json) == 1, backups


# --- item 11: a refusal inside nnUNetv2_train ends in one clear line with its fix ----------------

def test_a_foundation_changed_since_adopt_stops_training_with_the_file_it_needs(workspace, foundation, target):
    folder = preprocessed(workspace)
    plans = json.loads((folder / "FSEFTPlans.json").read_text())
    plans["plans_name"] = "Changed"
    plans[PLANS_KEY]["sha256"] = "0" * 64  # as if the file at the recorded path had been replaced since
    (folder / "Changed.json").write_text(json.dumps(plans))
    try:
        p = run(["nnUNetv2_train", target, "3d_fullres", "0", "-p", "Changed", "-tr", "nnUNetTrainerFSEFT_LoRA",
                 "-device", "cpu"], env=TRAIN_ENV_NO_VALIDATION, check=False)
    finally:
        (folder / "Changed.json").unlink()
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode != 0 and "Epoch 0" not in p.stdout
    assert last.startswith("nnunet_fseft.errors.InputError: Foundation "), last
    assert f"put the foundation checkpoint with sha256 {'0' * 64} back at {plans[PLANS_KEY]['checkpoint']}" in last
