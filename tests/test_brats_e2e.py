"""Brain-tumour MRI through the real commands: a 4-channel, region-based foundation (whole tumour,
tumour core, enhancing tumour as sigmoid outputs, as nnU-Net's BraTS conversion writes them) adapted
to a shifted population by every kind of trainer, predicted by nnU-Net's own predictor
(regions_class_order), scored by its evaluator; zero-shot = step 0; export / import and merge;
the MRI input checks of adopt; and the benchmark with K = all."""
import json
import shutil
import sys

import numpy as np
import pytest

from helpers import PREDICT_ON_CPU, TRAIN_ENV, WITHOUT_PLUGIN, fails_with, run, segmentations
from nnunet_fseft.plans import PLANS_NAME

REGIONS = ["whole tumor", "tumor core", "enhancing tumor"]


def raw(workspace):
    return workspace / "nnUNet_raw" / "Dataset301_SynthBraTSTarget"


def results(workspace, trainer):
    return workspace / "nnUNet_results" / "Dataset301_SynthBraTSTarget" / f"{trainer}__{PLANS_NAME}__3d_fullres"


def train(target, trainer):
    return run(["nnUNetv2_train", target, "3d_fullres", "0", "-p", PLANS_NAME, "-tr", trainer, "-device", "cpu"],
               env=TRAIN_ENV).stdout


def validation_dice(workspace, trainer) -> dict:
    """nnU-Net's own validation of the fold (the held-out cases): Dice per region, by region."""
    summary = json.loads((results(workspace, trainer) / "fold_0" / "validation" / "summary.json").read_text())
    return {k: v["Dice"] for k, v in summary["mean"].items()}


# Every kind of trainer: what regions change (sigmoid head rows, the anchor, black-box heads, no foundation)
# is the same for the variants of one kind. Left out for CI's 40 minutes: DecoderFT (FullFT with a frozen
# encoder; its freezing is checked in test_methods.py) and the parallel conv adapter (its injection: test_methods.py,
# test_monai_nets.py); no other test trains either through nnUNetv2_train
@pytest.mark.parametrize("method", ["FullFT", "LoRA", "BitFit", "ConvAdapter", "MedAdapter", "LinearProbe",
                                    "SpatialAdapter", "TargetOnly"])
def test_every_trainer_trains_predicts_and_is_scored_per_region(method, workspace, brats_target):
    trainer = f"nnUNetTrainerFSEFT_{method}"
    log = train(brats_target, trainer)
    if method == "TargetOnly":
        assert "nnU-Net's random initialisation, no foundation weights" in log
    else:  # every region starts from the foundation's sigmoid row and is held by the anchor
        assert "'enhancing tumor' (2) <- foundation 'enhancing tumor' (2); new: none" in log
        assert "zero-shot anchor: the start's segmentation of the regions 'whole tumor'" in log
    dice = validation_dice(workspace, trainer)
    assert set(dice) == {"(1, 2, 3)", "(2, 3)", "(3,)"} and all(0 <= d <= 1 for d in dice.values() if d == d)
    predictions = sorted((results(workspace, trainer) / "fold_0" / "validation").glob("*.nii.gz"))
    import SimpleITK as sitk
    assert len(predictions) == 2
    for p in predictions:  # a label map made with regions_class_order: BraTS's converted values only
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(p))))) <= {0, 1, 2, 3}


def test_step_0_is_the_zero_shot_prediction_of_the_matched_regions(workspace, brats_target, tmp_path):
    out = run(["nnunet-fseft", "zeroshot", "-d", brats_target, "--disable_tta", "-o", tmp_path / "zs"]).stdout
    assert all(f"  {r}" in out for r in REGIONS)
    train(brats_target, "nnUNetTrainerFSEFT_Start")
    start = results(workspace, "nnUNetTrainerFSEFT_Start") / "fold_0" / "validation"
    for got, want in zip(segmentations(start), segmentations(tmp_path / "zs" / "predictions")):
        assert np.array_equal(got, want)
    zero = json.loads((tmp_path / "zs" / "summary.json").read_text())["mean"]
    assert {k: v["Dice"] for k, v in zero.items()} == validation_dice(workspace, "nnUNetTrainerFSEFT_Start")


def predict(workspace, model_folder, out, env=None):
    run(["nnUNetv2_predict_from_modelfolder", "-i", raw(workspace) / "imagesTs", "-o", out, "-m", model_folder,
         "-f", "0", *PREDICT_ON_CPU], env=env)
    return segmentations(out)


def test_export_import_and_merge_predict_what_was_trained(workspace, brats_foundation, brats_target, tmp_path):
    trainer = "nnUNetTrainerFSEFT_LoRA"
    folder = results(workspace, trainer)
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        train(brats_target, trainer)
    want = predict(workspace, folder, tmp_path / "want")
    adapter = tmp_path / "tumour.safetensors"
    run(["nnunet-fseft", "export", folder, "-o", adapter, "-f", "0"])
    imported = tmp_path / "imported" / folder.name
    run(["nnunet-fseft", "import", adapter, "--foundation", brats_foundation, "-o", imported])
    for got, w in zip(predict(workspace, imported, tmp_path / "imported_pred"), want):
        assert np.array_equal(got, w)
    merged = tmp_path / f"nnUNetTrainer__{PLANS_NAME}__3d_fullres"  # a sigmoid head is plain: nothing grouped
    run(["nnunet-fseft", "merge", folder, "-o", merged])
    script = tmp_path / "predict_without_plugin.py"
    script.write_text(WITHOUT_PLUGIN)
    run([sys.executable, script, "-i", raw(workspace) / "imagesTs", "-o", tmp_path / "merged_pred", "-m", merged,
         "-f", "0", *PREDICT_ON_CPU])
    for got, w in zip(segmentations(tmp_path / "merged_pred"), want):
        assert (got == w).mean() > 0.9999


def test_size_priors_are_refused_for_regions_before_training(workspace, brats_target):
    p = run(["nnUNetv2_train", brats_target, "3d_fullres", "0", "-p", PLANS_NAME, "-tr", "nnUNetTrainerFSEFT_LinearProbeTI",
             "-device", "cpu"], env=TRAIN_ENV, check=False)
    assert p.returncode != 0 and "size priors need dense labels with one class per voxel" in p.stdout
    assert "this dataset uses regions" in p.stdout and "Epoch 0" not in p.stdout


def _variant(workspace, dataset_id: str, channel_names: dict, files, **changes):
    """A copy of the target's raw dataset with other channel names, the image files `files(case)` gives
    and `changes` to its dataset.json."""
    source = raw(workspace)
    name = f"Dataset{dataset_id}_Variant{dataset_id}"
    folder = workspace / "nnUNet_raw" / name
    shutil.copytree(source / "labelsTr", folder / "labelsTr")
    (folder / "imagesTr").mkdir()
    for label in (folder / "labelsTr").glob("*.nii.gz"):
        case = label.name[:-len(".nii.gz")]
        for i, f in enumerate(files(case)):
            shutil.copy(source / "imagesTr" / f"{case}_{f:04d}.nii.gz", folder / "imagesTr" / f"{case}_{i:04d}.nii.gz")
    dataset = json.loads((source / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**dataset, "channel_names": channel_names, "numTest": 0,
                                                     **changes}))
    return dataset_id


@pytest.mark.parametrize("dataset_id, channels, files, text", [
    ("302", {"0": "T1ce", "1": "T1", "2": "T2", "3": "FLAIR"}, lambda c: [1, 0, 2, 3],
     "has the foundation's input channels in another order"),
    ("303", {"0": "T1", "1": "T1ce", "2": "T2"}, lambda c: [0, 1, 2], "missing ['flair']"),
])
def test_mri_channels_are_checked_by_name_and_nothing_is_written(dataset_id, channels, files, text, workspace,
                                                                  brats_foundation, brats_target):
    _variant(workspace, dataset_id, channels, files)
    fails_with(["nnunet-fseft", "adopt", "--foundation", brats_foundation, "-d", dataset_id], text)
    assert not (workspace / "nnUNet_preprocessed" / f"Dataset{dataset_id}_Variant{dataset_id}").exists()


def test_benchmark_on_regions_with_k_all_scores_each_region(workspace, brats_foundation, brats_target, tmp_path):
    out = tmp_path / "bench"
    said = run(["nnunet-fseft", "benchmark", "--foundation", brats_foundation, "-d", brats_target, "-k", "all",
                "--repeats", "1", "--test", "2", "--methods", "Start", "TargetOnly", "-o", out], env=TRAIN_ENV).stdout
    assert "failed" not in said
    report = (out / "report.md").read_text()
    assert "| zero-shot (source-only) |" in report and "| TargetOnly |" in report and "K=4 (all)" in report
    assert all(f"| {r} |" in report for r in REGIONS) and "Against the paper" in report
    assert (out / "dice_boxplot.png").is_file() and (out / "per_case.csv").is_file()
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"Start", "TargetOnly"}
    assert all(set(r["per_label"]) == set(REGIONS) and len(r["per_case"]) == 2 for r in rows)


def test_zero_shot_predicts_a_region_the_foundation_does_not_know_nowhere(workspace, brats_foundation, brats_target,
                                                                         tmp_path):
    """nnU-Net's sliding window sums Gaussian-weighted logits in float16: the unknown region's constant
    logit must stay finite there, and paint nothing over the known regions."""
    mri = json.loads((raw(workspace) / "dataset.json").read_text())["channel_names"]
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "edema": [1, 4]}
    target = _variant(workspace, "304", mri, lambda c: [0, 1, 2, 3], labels=labels, regions_class_order=[1, 2, 1])
    run(["nnunet-fseft", "adopt", "--foundation", brats_foundation, "-d", target])
    run(["nnunet-fseft", "kshot", "-d", target, "-k", "2", "--repeats", "1", "--test", "2"])
    out = run(["nnunet-fseft", "zeroshot", "-d", target, "--disable_tta", "-o", tmp_path / "zs"]).stdout
    assert "  whole tumor" in out and "  tumor core" in out and "  edema" not in out
    for seg in segmentations(tmp_path / "zs" / "predictions"):
        assert set(np.unique(seg)) <= {0, 1, 2}
