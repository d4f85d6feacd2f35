"""Extending a foundation (`adopt --keep-foundation-labels`): the union of labels, the refusals, and
through the real commands a target annotated only for a new organ, adapted, predicted with every
class in one label map, and merged into a plain nnU-Net model that predicts the same."""
import json
import os
import sys

import numpy as np
import pytest

from helpers import PREDICT_ON_CPU, TRAIN_ENV_NO_VALIDATION, WITHOUT_PLUGIN, fails_with, run, tree
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.labels import extend_labels
from nnunet_fseft.network.grouped_head import head_groups

FOUNDATION_LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
EXTEND_ID = "520"


def test_the_union_keeps_the_foundations_values_and_appends_the_new_labels():
    union, annotated = extend_labels({"background": 0, "pancreas": 5, "Lien": 2, "tumour": 6}, FOUNDATION_LABELS)
    assert union == {**FOUNDATION_LABELS, "pancreas": 5, "tumour": 6}
    assert annotated == [2, 5, 6]  # the spleen is annotated too: its label overrides the anchor
    # the grouped head is the foundation's whole head plus one row per new label
    assert head_groups(union, FOUNDATION_LABELS) == [[0], [1], [2], [3], [4], [5], [6]]


@pytest.mark.parametrize("labels, says", [
    ({"background": 0, "Liver": 5}, "it is the foundation's 'liver' (1), not a new label; give it the value 1"),
    ({"background": 0, "pancreas": 1}, "has the value 1, which is the foundation's 'liver'; number new labels from 5"),
    ({"background": 0, "pancreas": 6}, "have the values [6]; give them [5]"),
    ({"background": 0, "liver": 1}, "names no label the foundation lacks"),
    ({"background": 0, "tumour": [1, 2], "core": 2}, "region-based"),
])
def test_labels_that_do_not_extend_the_foundation_are_refused_in_one_sentence(labels, says):
    from test_methods import one_sentence
    with pytest.raises(InputError) as e:
        extend_labels(labels, FOUNDATION_LABELS, "Dataset520_X")
    assert says in str(e.value) and one_sentence(str(e.value)), str(e.value)


def _write_labels(folder, edit):
    """Rewrites every label file in `folder` with edit(case index, array)."""
    import SimpleITK as sitk
    for i, f in enumerate(sorted(os.listdir(folder))):
        image = sitk.ReadImage(str(folder / f))
        new = sitk.GetImageFromArray(edit(i, sitk.GetArrayFromImage(image)))
        new.CopyInformation(image)
        sitk.WriteImage(new, str(folder / f))


@pytest.fixture(scope="module")
def extend_target(workspace, foundation):
    """Scans of the foundation's scanner with the pancreas labelled (5, after the foundation's four
    organs) and nothing else; adopted to extend the foundation, 1-shot x 1."""
    run(["nnunet-fseft", "synth", "-d", EXTEND_ID, "--cases", "4", "--test", "2", "--seed", "11", "--shape", "32", "32",
         "32", "--name", "Extend", "--organs", *list(FOUNDATION_LABELS)[1:], "pancreas"])
    raw = workspace / "nnUNet_raw" / f"Dataset{EXTEND_ID}_Extend"
    import shutil
    shutil.copytree(raw / "labelsTr", workspace / "extend_reference")  # every organ: to score the old ones
    _write_labels(raw / "labelsTr", lambda i, a: np.where(a == 5, 5, 0).astype(a.dtype))
    meta = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "pancreas": 5}}, indent=2))
    p = run(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", EXTEND_ID, "--keep-foundation-labels"])
    assert "the model outputs its 4 classes and the new 'pancreas'; the scans annotate pancreas" in p.stdout
    run(["nnunet-fseft", "kshot", "-d", EXTEND_ID, "-k", "1", "--repeats", "1", "--test", "2"])
    return raw


def test_adopt_writes_the_union_and_what_the_scans_annotate_keeping_the_users_file(foundation, extend_target):
    raw = extend_target
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {**FOUNDATION_LABELS, "pancreas": 5}
    backups = [f for f in os.listdir(raw) if f.startswith("dataset.json.bak-")]
    assert len(backups) == 1 and json.loads((raw / backups[0]).read_text())["labels"] == {"background": 0, "pancreas": 5}
    annotations = json.loads((raw / meta["fseft_annotations"]).read_text())
    assert {c: a["annotated"] for c, a in annotations["cases"].items()} == {f"Extend_{i:03d}": [5] for i in range(4)}
    # labelsTr holds only the pancreas: zero-shot scores need the full maps
    fails_with(["nnunet-fseft", "zeroshot", "-d", EXTEND_ID], "pass --reference with full label maps")
    # a plain adopt of the extended dataset would train the union as fully labelled
    fails_with(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", EXTEND_ID, "--plans-name", "Other"],
               "pass --keep-foundation-labels again, or put back your own dataset.json")


def test_an_extended_model_predicts_every_class_in_one_label_map_and_merges(workspace, foundation, extend_target,
                                                                           tmp_path):
    import SimpleITK as sitk
    trainer = "nnUNetTrainerFSEFT_LoRA"
    run(["nnUNetv2_train", EXTEND_ID, "3d_fullres", "0", "-p", "FSEFTPlans", "-tr", trainer, "-device", "cpu"],
        env=TRAIN_ENV_NO_VALIDATION)
    folder = workspace / "nnUNet_results" / f"Dataset{EXTEND_ID}_Extend" / f"{trainer}__FSEFTPlans__3d_fullres"
    log = "".join(p.read_text() for p in (folder / "fold_0").glob("training_log_*.txt"))
    assert "target annotates pancreas" in log
    assert "zero-shot anchor: the start's segmentation of 'liver', 'spleen', 'kidney_left', 'kidney_right'" in log
    split = json.loads((workspace / "nnUNet_preprocessed" / f"Dataset{EXTEND_ID}_Extend" / "splits_final.json")
                       .read_text())[0]
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for case in split["val"]:
        os.symlink(extend_target / "imagesTr" / f"{case}_0000.nii.gz", held_out / f"{case}_0000.nii.gz")
    run(["nnUNetv2_predict", "-i", held_out, "-o", tmp_path / "plugin", "-d", EXTEND_ID, "-c", "3d_fullres", "-f", "0",
         "-p", "FSEFTPlans", "-tr", trainer, *PREDICT_ON_CPU], env=TRAIN_ENV_NO_VALIDATION)
    # the zero-shot model on the same scans: what the foundation's classes should still look like
    run(["nnUNetv2_predict_from_modelfolder", "-i", held_out, "-o", tmp_path / "zero_shot", "-m", foundation, "-f", "all",
         *PREDICT_ON_CPU])
    got, zero_shot = ([sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / f"{case}.nii.gz")))
                       for case in split["val"]] for d in ("plugin", "zero_shot"))
    got, zero_shot = np.stack(got), np.stack(zero_shot)
    assert set(np.unique(got)) <= set(range(6))
    known = zero_shot > 0  # the foundation's organs as it segments them (the tiny foundation: well or not)
    assert known.any() and (got[known] == zero_shot[known]).mean() > 0.5, "the foundation's organs are lost"
    merged = tmp_path / "nnUNetTrainer__FSEFTPlans__3d_fullres"
    run(["nnunet-fseft", "merge", folder, "-o", merged])
    script = tmp_path / "predict_without_plugin.py"
    script.write_text(WITHOUT_PLUGIN)
    run([sys.executable, script, "-i", held_out, "-o", tmp_path / "merged", "-m", merged, "-f", "0", *PREDICT_ON_CPU])
    for case in split["val"]:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / f"{case}.nii.gz"))) for d in ("plugin", "merged"))
        assert (a == b).mean() > 0.9999


def test_targets_that_do_not_say_what_they_annotate_are_refused_before_anything_is_written(
        workspace, foundation, extend_target):
    """A label named as a foundation class at another value, and a foundation class labelled in some
    scans only; one sentence each, and the raw and preprocessed folders stay as they were."""
    raw = workspace / "nnUNet_raw"
    folder = raw / "Dataset521_ExtendBad"
    os.makedirs(folder / "labelsTr")
    os.symlink(extend_target / "imagesTr", folder / "imagesTr")
    import shutil
    for f in sorted(os.listdir(extend_target / "labelsTr")):
        shutil.copy(extend_target / "labelsTr" / f, folder / "labelsTr" / f)
    meta = json.loads((extend_target / "dataset.json").read_text())
    meta = {k: v for k, v in meta.items() if not k.startswith("fseft_")}
    (folder / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "Liver": 5}}))
    before = tree(raw), tree(workspace / "nnUNet_preprocessed")
    fails_with(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", "521", "--keep-foundation-labels"],
               "it is the foundation's 'liver' (1), not a new label")
    assert (tree(raw), tree(workspace / "nnUNet_preprocessed")) == before
    (folder / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "spleen": 2, "pancreas": 5}}))
    before = tree(raw), tree(workspace / "nnUNet_preprocessed")
    fails_with(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", "521", "--keep-foundation-labels"],
               "names the foundation's class 'spleen' (2) but no scan labels it")
    assert (tree(raw), tree(workspace / "nnUNet_preprocessed")) == before
    # the spleen (2) labelled in the first scan only
    _write_labels(folder / "labelsTr", lambda i, a: np.where((i == 0) & (a == 0) & (np.arange(a.size).reshape(a.shape)
                                                                                   < 50), 2, a).astype(a.dtype))
    (folder / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "spleen": 2, "pancreas": 5}}))
    before = tree(raw), tree(workspace / "nnUNet_preprocessed")
    fails_with(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", "521", "--keep-foundation-labels"],
               "labels the foundation's class 'spleen' (2) in some scans but not in Extend_001")
    assert (tree(raw), tree(workspace / "nnUNet_preprocessed")) == before


def test_the_benchmark_scores_an_extending_target_on_every_class(workspace, foundation, extend_target, tmp_path):
    """`nnunet-fseft benchmark --keep-foundation-labels --reference`: the runs and the zero-shot row are scored
    against the full label maps, the old organs and the new one; without --reference it stops at once."""
    args = ["nnunet-fseft", "benchmark", "--foundation", foundation, "-d", EXTEND_ID, "-k", "1", "--repeats", "1",
            "--test", "2", "--methods", "Start", "--keep-foundation-labels"]
    fails_with([*args, "-o", tmp_path / "refused"], "pass --reference FOLDER")
    fails_with([*args[:-2], "TargetOnly", "--keep-foundation-labels", "-o", tmp_path / "refused"],
               "TargetOnly cannot extend a foundation")
    assert not (tmp_path / "refused").exists()
    run([*args, "-o", tmp_path / "bench", "--reference", workspace / "extend_reference"], env=TRAIN_ENV_NO_VALIDATION)
    row = json.loads((tmp_path / "bench" / "runs.jsonl").read_text().splitlines()[-1])
    assert set(row["per_label"]) == set(FOUNDATION_LABELS) - {"background"} | {"pancreas"}
    zero = json.loads((tmp_path / "bench" / "zero_shot.json").read_text())
    assert set(zero) == set(FOUNDATION_LABELS) - {"background"}
    for summary in (tmp_path / "bench" / "predictions").rglob("summary.json"):  # the zero-shot row's and the run's
        references = {os.path.dirname(c["reference_file"]) for c in json.loads(summary.read_text())["metric_per_case"]}
        assert references == {str(workspace / "extend_reference")}, summary
    for organ, dice in zero.items():  # step 0 is the foundation on its own organs
        assert abs(row["per_label"][organ]["dice"] - dice) < 0.05, (organ, row["per_label"], zero)
