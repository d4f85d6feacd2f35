"""Shared fixtures: one nnU-Net workspace and one tiny foundation per test session.

Everything runs through the real `nnUNetv2_*` and `nnunet-fseft` commands in
subprocesses, on 32^3 synthetic volumes with a narrow network (plans preset cpu_tiny).
"""
import os

import pytest

from helpers import (BASE_TARGET_ID, BASE_TARGET_LABELS, BASE_TARGET_ORGANS, BRATS_FOUNDATION_ID, BRATS_TARGET_ID,
                     FOUNDATION_ID, TARGET_ID, TRAIN_ENV, run)


def pytest_collection_modifyitems(items):
    """A test is end-to-end (marker e2e) when it needs the nnU-Net workspace, i.e. drives the
    real nnUNetv2_* commands: derived from its fixtures, so no test can be forgotten."""
    for item in items:
        if "workspace" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for unit tests of tiny networks: faster than two on a 2-core machine."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    mp = pytest.MonkeyPatch()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(root / var, exist_ok=True)
        mp.setenv(var, str(root / var))
    mp.setenv("nnUNet_compile", "f")
    # nnU-Net's default of 8 workers (validation export, evaluation) is slow for two 32^3 cases: each
    # spawned worker imports torch and nnU-Net again
    mp.setenv("nnUNet_def_n_proc", "1")
    # (nnUNet_n_proc_DA=0 is exported to every command by helpers.run, not here: see COMMAND_ENV)
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def foundation(workspace):
    """A tiny nnU-Net model trained on base organs; returns its results folder."""
    run(["nnunet-fseft", "synth", "-d", FOUNDATION_ID, "--cases", "6", "--shape", "32", "32", "32"])
    run(["nnUNetv2_plan_and_preprocess", "-d", FOUNDATION_ID, "-c", "3d_fullres", "-np", "2"])
    from nnunet_fseft.plans.presets import apply_preset
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


@pytest.fixture(scope="session")
def brats_foundation(workspace):
    """A tiny region-based foundation (4 MRI channels; whole tumour, tumour core, enhancing tumour
    as sigmoid outputs) trained by nnU-Net on the source population; returns its results folder."""
    run(["nnunet-fseft", "synth", "--task", "brats", "-d", BRATS_FOUNDATION_ID, "--cases", "5"])
    run(["nnUNetv2_plan_and_preprocess", "-d", BRATS_FOUNDATION_ID, "-c", "3d_fullres", "-np", "2"])
    from nnunet_fseft.plans.presets import apply_preset
    plans = apply_preset(BRATS_FOUNDATION_ID, "cpu_tiny")
    run(["nnUNetv2_train", BRATS_FOUNDATION_ID, "3d_fullres", "all", "-p", plans, "-tr", "nnUNetTrainerFSEFT_Pretrain",
         "-device", "cpu"], env=TRAIN_ENV)
    folder = (workspace / "nnUNet_results" / "Dataset300_SynthBraTSSource" /
              f"nnUNetTrainerFSEFT_Pretrain__{plans}__3d_fullres")
    assert (folder / "fold_all" / "checkpoint_final.pth").is_file()
    return folder


@pytest.fixture(scope="session")
def brats_target(brats_foundation):
    """The shifted population, adopted, split 2-shot x 1 with 2 held-out cases, and 2 imagesTs scans."""
    run(["nnunet-fseft", "synth", "--task", "brats", "-d", BRATS_TARGET_ID, "--cases", "6", "--scanner", "B",
         "--test", "2", "--seed", "1"])
    run(["nnunet-fseft", "adopt", "--foundation", brats_foundation, "-d", BRATS_TARGET_ID])
    run(["nnunet-fseft", "kshot", "-d", BRATS_TARGET_ID, "-k", "2", "--repeats", "1", "--test", "2"])
    return BRATS_TARGET_ID
