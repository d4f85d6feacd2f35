"""Foundation pre-training on pooled, partially labelled datasets, through the real commands:
`nnunet-fseft combine`, `nnUNetv2_plan_and_preprocess --verify_dataset_integrity`,
`nnUNetv2_train -tr nnUNetTrainerFSEFT_FoundationShort`, `nnUNetv2_predict`, `nnunet-fseft adopt`."""
import json
import os

import numpy as np
import pytest

from helpers import PREDICT_ON_CPU, TRAIN_ENV, fails_with, run, tree

SOURCE_A, SOURCE_B, POOLED = "110", "111", "210"
ORGANS_A, ORGANS_B = ["liver", "spleen"], ["kidney_left", "kidney_right"]


@pytest.fixture(scope="module")
def sources(workspace):
    """Two synthetic datasets labelling different organs of the same anatomy."""
    run(["nnunet-fseft", "synth", "-d", SOURCE_A, "--cases", "4", "--test", "1", "--shape", "32", "32", "32",
         "--name", "PartA", "--organs", *ORGANS_A])
    run(["nnunet-fseft", "synth", "-d", SOURCE_B, "--cases", "4", "--seed", "3", "--shape", "32", "32", "32",
         "--name", "PartB", "--organs", *ORGANS_B])
    return workspace / "nnUNet_raw"


def test_bad_input_to_combine_writes_nothing(sources, tmp_path):
    raw = sources
    before = sorted(os.listdir(raw))
    fails_with(["nnunet-fseft", "combine", "-d", SOURCE_A, "999", "-o", "212"], "Dataset 999 does not exist")
    fails_with(["nnunet-fseft", "combine", "-d", SOURCE_A, SOURCE_B, "-o", SOURCE_A], "already used by")

    def variant(new_id, edit, drop_label=False):
        """A copy of source B whose dataset.json is changed by `edit` (and one label file removed)."""
        folder = raw / f"Dataset{new_id}_Variant"
        os.makedirs(folder / "labelsTr")
        os.symlink(raw / "Dataset111_PartB" / "imagesTr", folder / "imagesTr")
        for f in sorted(os.listdir(raw / "Dataset111_PartB" / "labelsTr"))[int(drop_label):]:
            os.symlink(raw / "Dataset111_PartB" / "labelsTr" / f, folder / "labelsTr" / f)
        meta = json.loads((raw / "Dataset111_PartB" / "dataset.json").read_text())
        edit(meta)
        (folder / "dataset.json").write_text(json.dumps(meta))
        return str(new_id)

    two_channels = variant(120, lambda m: m.update(channel_names={"0": "CT", "1": "PET"}))
    fails_with(["nnunet-fseft", "combine", "-d", SOURCE_A, two_channels, "-o", "212"], "same channels")
    lien = variant(121, lambda m: m.update(labels={"background": 0, "lien": 1, "Spleen": 2}))
    fails_with(["nnunet-fseft", "combine", "-d", SOURCE_A, lien, "-o", "212"], "which both mean 'spleen'")
    joined = variant(122, lambda m: m.update(labels={"background": 0, "kidneys": 1, "lien": 2}))
    fails_with(["nnunet-fseft", "combine", "-d", SOURCE_B, joined, "-o", "212"], "join them with a --label-map")
    # the label map fixes it, but that source's files hold a value its dataset.json does not name
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"kidney_left": "kidney", "kidney_right": "kidney"}))
    short = variant(123, lambda m: m.update(labels={"background": 0, "kidneys": 1}))
    fails_with(["nnunet-fseft", "combine", "-d", SOURCE_B, short, "-o", "212", "--label-map", label_map],
               "holds label value(s) [2]")
    unlabelled = variant(124, lambda m: None, drop_label=True)
    fails_with(["nnunet-fseft", "combine", "-d", SOURCE_A, unlabelled, "-o", "212"], "PartB_000.nii.gz; every training image")
    assert sorted(os.listdir(raw)) == sorted(before + [f"Dataset{i}_Variant" for i in range(120, 125)])


@pytest.fixture(scope="module")
def pooled(sources):
    """The two sources pooled, checked by nnU-Net and preprocessed; returns the plans name."""
    raw = sources
    trees = {s: tree(raw / s) for s in ("Dataset110_PartA", "Dataset111_PartB")}
    run(["nnunet-fseft", "combine", "-d", SOURCE_A, SOURCE_B, "-o", POOLED, "--name", "Pooled"])
    assert {s: tree(raw / s) for s in trees} == trees  # the sources are only read
    run(["nnUNetv2_plan_and_preprocess", "-d", POOLED, "-c", "3d_fullres", "-np", "2", "--verify_dataset_integrity"])
    from nnunet_fseft.plans.presets import apply_preset
    return apply_preset(POOLED, "cpu_tiny")


def test_pool_pretrain_predict_and_adopt(workspace, sources, pooled):
    raw, results, plans = sources, workspace / "nnUNet_results", pooled
    labels = json.loads((raw / "Dataset210_Pooled" / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
    annotations = json.loads((raw / "Dataset210_Pooled" / "annotations.json").read_text())
    assert annotations["cases"]["Dataset110_PartA_000"]["annotated"] == [1, 2]
    assert annotations["cases"]["Dataset111_PartB_003"]["annotated"] == [3, 4]

    run(["nnUNetv2_train", POOLED, "3d_fullres", "0", "-p", plans, "-tr", "nnUNetTrainerFSEFT_FoundationShort",
             "-device", "cpu"], env={**TRAIN_ENV, "nnUNet_fseft_epochs": "4", "nnUNet_fseft_iters_per_epoch": "50"})
    model = results / "Dataset210_Pooled" / f"nnUNetTrainerFSEFT_FoundationShort__{plans}__3d_fullres"
    log = _log(model / "fold_0")
    assert "Dataset110_PartA annotates liver, spleen" in log and "Dataset111_PartB annotates kidney_left, kidney_right" in log
    assert log.count("Epoch time") == 4  # nnUNet_fseft_epochs
    # the trainer kept a copy where later runs find it without nnUNet_raw
    assert (workspace / "nnUNet_preprocessed" / "Dataset210_Pooled" / "annotations.json").is_file()
    validation = model / "fold_0" / "validation"
    masked = json.loads((validation / "summary.json").read_text())
    unmasked = json.loads((validation / "summary_all_labels.json").read_text())
    for case in masked["metric_per_case"]:  # each case scored on its own source's organs only
        name = os.path.basename(case["reference_file"])[:-len(".nii.gz")]
        assert sorted(map(int, case["metrics"])) == annotations["cases"][name]["annotated"]
    assert all(len(c["metrics"]) == 4 for c in unmasked["metric_per_case"])

    out = workspace / "pooled_predictions"
    run(["nnUNetv2_predict", "-i", raw / "Dataset110_PartA" / "imagesTs", "-o", out, "-d", POOLED, "-c", "3d_fullres",
         "-f", "0", "-p", plans, "-tr", "nnUNetTrainerFSEFT_FoundationShort", *PREDICT_ON_CPU])
    import SimpleITK as sitk
    predicted = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "PartA_004.nii.gz")))).tolist())
    assert predicted & {1, 2} and predicted & {3, 4}, predicted  # organs of both sources on one scan

    # Adopted for a target that names organs its own way, the foundation's unified names are recorded,
    # so head initialisation finds them.
    run(["nnunet-fseft", "synth", "-d", "211", "--cases", "2", "--seed", "7", "--shape", "32", "32", "32",
         "--name", "NamedOtherwise", "--organs", "spleen", "kidney_right"])
    meta_path = raw / "Dataset211_NamedOtherwise" / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "labels": {"background": 0, "Lien": 1, "right kidney": 2}}))
    run(["nnunet-fseft", "adopt", "--foundation", model, "--fold", "0", "-d", "211"])
    from nnunet_fseft.foundation.record import PLANS_KEY
    from nnunet_fseft.foundation.labels import match_labels
    recorded = json.loads((workspace / "nnUNet_preprocessed" / "Dataset211_NamedOtherwise" / "FSEFTPlans.json")
                          .read_text())[PLANS_KEY]["labels"]
    assert recorded == labels
    matches = match_labels({"background": 0, "Lien": 1, "right kidney": 2}, recorded)
    assert [(m[0], m[3]) for m in matches] == [("Lien", 2), ("right kidney", 4)]


def test_the_foundation_trainer_keeps_nnunets_schedule(workspace, pooled):
    """nnUNetTrainerFSEFT_Foundation itself: nnU-Net's SGD and test-time mirroring, our overrides of
    the schedule, and the masked validation summary."""
    run(["nnUNetv2_train", POOLED, "3d_fullres", "1", "-p", pooled, "-tr", "nnUNetTrainerFSEFT_Foundation",
         "-device", "cpu"], env={**TRAIN_ENV, "nnUNet_fseft_epochs": "1", "nnUNet_fseft_iters_per_epoch": "2"})
    fold = workspace / "nnUNet_results" / "Dataset210_Pooled" / f"nnUNetTrainerFSEFT_Foundation__{pooled}__3d_fullres" / "fold_1"
    debug = json.loads((fold / "debug.json").read_text())
    assert debug["optimizer"].startswith("SGD") and debug["inference_allowed_mirroring_axes"] != "None"
    assert debug["num_epochs"] == "1" and debug["num_iterations_per_epoch"] == "2"
    assert (fold / "validation" / "summary_all_labels.json").is_file()
    assert _log(fold).count("Epoch time") == 1


def test_a_pooled_dataset_without_its_annotations_does_not_train(workspace, pooled, tmp_path):
    kept = []
    for folder in (workspace / "nnUNet_raw", workspace / "nnUNet_preprocessed"):
        path = folder / "Dataset210_Pooled" / "annotations.json"
        if path.is_file():
            kept.append((path, tmp_path / f"{len(kept)}.json"))
            path.rename(kept[-1][1])
    try:
        p = run(["nnUNetv2_train", POOLED, "3d_fullres", "2", "-p", pooled, "-tr", "nnUNetTrainerFSEFT_Foundation",
                 "-device", "cpu"], env=TRAIN_ENV, check=False)
    finally:
        for path, backup in kept:
            backup.rename(path)
    assert p.returncode != 0 and "names the annotations file annotations.json" in p.stdout
    assert "Epoch 0" not in p.stdout


def _log(fold):
    return "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
