"""Shared fixtures: one nnU-Net workspace and one tiny foundation per test session.

Everything runs through the real `nnUNetv2_*` and `nnunet-fseft` commands in
subprocesses, on 32^3 synthetic volumes with a narrow network (plans preset cpu_tiny).
"""
import glob
import os
import subprocess
import sys

import pytest

FOUNDATION_ID, TARGET_ID, BASE_TARGET_ID = "100", "501", "503"
# The foundation's four organs (liver 1, spleen 2, kidney_left 3, kidney_right 4) under other names
# and in another order: zero-shot matching must find every one and map each to its own channel.
BASE_TARGET_ORGANS = ["spleen", "liver", "kidney_right", "kidney_left"]
BASE_TARGET_LABELS = {"background": 0, "lien": 1, "Liver": 2, "Kidney_R": 3, "left kidney": 4}
FOUNDATION_TO_BASE_TARGET = {0: 0, 1: 2, 2: 1, 3: 4, 4: 3}  # foundation label -> target label
BIN = os.path.dirname(sys.executable)  # the commands installed beside this interpreter


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for unit tests of tiny networks: faster than two on a 2-core machine."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(args, env=None, check=True, timeout=900):
    """Runs a command of this environment; returns CompletedProcess (stdout+stderr in .stdout)."""
    cmd = [os.path.join(BIN, args[0])] + [str(a) for a in args[1:]]
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-4000:]}")
    return p


def images(workspace):
    """The target's unlabelled test images."""
    return workspace / "nnUNet_raw" / "Dataset501_SynthCTB" / "imagesTs"


def segmentations(folder):
    """The two predicted segmentations in a folder, as arrays."""
    import SimpleITK as sitk
    files = sorted(glob.glob(os.path.join(folder, "*.nii.gz")))
    assert len(files) == 2, files
    return [sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in files]


WITHOUT_PLUGIN = """
import os, sys
if __name__ == "__main__":  # nnU-Net's spawned preprocessing workers import this file again
    # nnU-Net as a colleague without nnunet-fseft has it: our package cannot be imported, and
    # nnU-Net searches no folder of ours for trainers.
    for name in list(sys.modules):
        if name.startswith("nnunet_fseft"):
            del sys.modules[name]
    sys.modules["nnunet_fseft"] = None
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if "nnunet_fseft" not in p)
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder
    sys.argv = ["nnUNetv2_predict_from_modelfolder"] + sys.argv[1:]
    predict_entry_point_modelfolder()
"""


# Training only: nnUNet_n_proc_DA=0 crashes nnUNetv2_plan_and_preprocess (torch.set_num_threads(0)).
TRAIN_ENV = {"nnUNet_n_proc_DA": "0", "nnUNet_fseft_epochs": "2", "nnUNet_fseft_iters_per_epoch": "3"}


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    mp = pytest.MonkeyPatch()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(root / var, exist_ok=True)
        mp.setenv(var, str(root / var))
    mp.setenv("nnUNet_compile", "f")
    mp.setenv("nnUNet_def_n_proc", "2")  # nnU-Net's default of 8 export workers is slow on 2 cores
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def foundation(workspace):
    """A tiny nnU-Net model trained on base organs; returns its results folder."""
    run(["nnunet-fseft", "synth", "-d", FOUNDATION_ID, "--cases", "6", "--shape", "32", "32", "32"])
    run(["nnUNetv2_plan_and_preprocess", "-d", FOUNDATION_ID, "-c", "3d_fullres", "-np", "2"])
    from nnunet_fseft.plans_presets import apply_preset
    plans = apply_preset(FOUNDATION_ID, "cpu_tiny")
    run(["nnUNetv2_train", FOUNDATION_ID, "3d_fullres", "all", "-p", plans, "-tr", "nnUNetTrainerFSEFT_Pretrain",
         "-device", "cpu"], env=TRAIN_ENV)
    folder = workspace / "nnUNet_results" / "Dataset100_SynthCTA" / f"nnUNetTrainerFSEFT_Pretrain__{plans}__3d_fullres"
    assert (folder / "fold_all" / "checkpoint_final.pth").is_file()
    return folder


@pytest.fixture(scope="session")
def target(foundation):
    """A novel-organ dataset from another scanner, adopted and split 1-shot x 2 repeats."""
    run(["nnunet-fseft", "synth", "-d", TARGET_ID, "--cases", "6", "--organs", "pancreas", "--scanner", "B",
         "--test", "2", "--seed", "1", "--shape", "32", "32", "32"])
    run(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", TARGET_ID])
    run(["nnunet-fseft", "kshot", "-d", TARGET_ID, "-k", "1", "--repeats", "2", "--test", "2"])
    return TARGET_ID


@pytest.fixture(scope="session")
def base_target(foundation, workspace):
    """The foundation's own organs on new scans, labelled with synonyms; adopted, 1-shot x 1,
    with 2 unlabelled imagesTs scans (transductive queries)."""
    import json
    run(["nnunet-fseft", "synth", "-d", BASE_TARGET_ID, "--cases", "4", "--test", "2", "--seed", "5",
         "--shape", "32", "32", "32", "--name", "SynthBase", "--organs", *BASE_TARGET_ORGANS])
    path = workspace / "nnUNet_raw" / "Dataset503_SynthBase" / "dataset.json"
    dataset = json.loads(path.read_text())
    assert dataset["labels"] == {"background": 0, **{o: i + 1 for i, o in enumerate(BASE_TARGET_ORGANS)}}
    path.write_text(json.dumps({**dataset, "labels": BASE_TARGET_LABELS}, indent=2))
    run(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", BASE_TARGET_ID])
    run(["nnunet-fseft", "kshot", "-d", BASE_TARGET_ID, "-k", "1", "--repeats", "1", "--test", "2"])
    return BASE_TARGET_ID
