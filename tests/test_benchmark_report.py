"""The benchmark's scores and report, without training: nnU-Net's metric keys (labels, regions as
tuples, both as summary.json writes them) named as dataset.json names them, per-case scores kept,
and report.md's table (sensitivity, specificity, sd over cases), its "Against the paper" block and
the boxplots, from run rows built by hand (end to end: test_benchmark_e2e.py)."""
import csv
import json

import numpy as np
import pytest

from nnunet_fseft.experiments.benchmark.output_folder import OutputFolder
from nnunet_fseft.experiments.benchmark.protocol import ZERO_SHOT, is_peft
from nnunet_fseft.experiments.benchmark.report import write_reports
from nnunet_fseft.experiments.benchmark.runs import evaluate, label_name, scores, zero_shot_details

BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
PLAIN = {"background": 0, "liver": 1, "spleen": 2}


def test_label_name_maps_label_values_regions_and_their_strings():
    assert label_name(2, PLAIN) == "spleen" and label_name(np.int64(1), PLAIN) == "liver"
    assert label_name("2", PLAIN) == "spleen"  # as summary.json writes a label
    assert label_name((1, 2, 3), BRATS) == "whole tumor"  # as compute_metrics_on_folder returns a region
    assert label_name("(1, 2, 3)", BRATS) == "whole tumor"  # ... and summary.json writes it
    assert label_name("(2, 3)", BRATS) == "tumor core" and label_name((3, 2), BRATS) == "tumor core"
    assert label_name((3,), BRATS) == "enhancing tumor" and label_name("(3,)", BRATS) == "enhancing tumor"
    assert label_name(3, {**BRATS, "enhancing tumor": 3}) == "enhancing tumor"  # a region of one value, as an int
    for key, labels in [(3, PLAIN), ((1, 2), BRATS), ("(1, 2)", BRATS)]:
        with pytest.raises(KeyError):
            label_name(key, labels)


def _write(array, path):
    import SimpleITK as sitk
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def test_a_region_dataset_is_scored_per_region_and_per_case_by_name(tmp_path):
    """nnU-Net's evaluator itself, on two 4^3 cases of a BraTS-like dataset: regions come back as
    tuples (the benchmark crashed on them); the same scores from summary.json's string keys."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    a = np.zeros((4, 4, 4))
    a[0, 0, :2], a[1, 0, :2], a[2, 0, :2] = 1, 2, 3
    _write(a, ref / "BraTS_001.nii.gz")
    _write(a, pred / "BraTS_001.nii.gz")  # perfect
    b_ref, b_pred = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    b_ref[0, 0, :] = 1  # oedema only: no core, no enhancing tumour
    b_pred[0, 0, :2] = 1  # half of it found
    _write(b_ref, ref / "BraTS_002.nii.gz")
    _write(b_pred, pred / "BraTS_002.nii.gz")
    plans = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager"}
    dataset_json = {"labels": BRATS, "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz"}
    per_label, per_case = evaluate(str(ref), str(pred), plans, dataset_json)
    assert list(per_label) == ["whole tumor", "tumor core", "enhancing tumor"]
    assert per_label["whole tumor"]["dice"] == pytest.approx((1 + 2 * 2 / (2 * 2 + 2)) / 2)
    assert per_label["tumor core"]["dice"] == pytest.approx(1.0)  # nnU-Net's nanmean: case 2 has none
    assert per_label["whole tumor"]["sensitivity"] == pytest.approx((6 + 2) / 2 / ((6 + 2) / 2 + 2 / 2))
    assert sorted(per_case) == ["BraTS_001", "BraTS_002"]
    assert per_case["BraTS_001"]["enhancing tumor"] == {"dice": 1.0, "sensitivity": 1.0, "specificity": 1.0}
    assert per_case["BraTS_002"]["whole tumor"] == pytest.approx({"dice": 2 / 3, "sensitivity": 0.5, "specificity": 1.0})
    assert per_case["BraTS_002"]["tumor core"] == {"dice": None, "sensitivity": None, "specificity": 1.0}
    with open(pred / "summary.json") as f:
        written = json.load(f)
    assert "(1, 2, 3)" in written["mean"]
    assert scores(written, BRATS, ".nii.gz") == (per_label, per_case)


# ----------------------------------------------------------------------------------------------
# write_reports on run rows built by hand
# ----------------------------------------------------------------------------------------------

def identity():
    return {"dataset": "Dataset700_BraTSAfrica", "foundation_sha256": "a" * 64,
            "schedule": {"epochs": "2", "iterations_per_epoch": "3"}, "held_out": ["a", "b"]}


def row(method, k, repeat, case_dice, labels, sensitivity=0.8, specificity=0.99):
    """A finished run whose every label has Dice case_dice[case] on each case."""
    per_case = {case: {label: {"dice": d, "sensitivity": sensitivity, "specificity": specificity} for label in labels}
                for case, d in case_dice.items()}
    mean = float(np.mean(list(case_dice.values())))
    return {"method": method, "K": k, "repeat": repeat, "fold": repeat, "support": ["c"], "wall_s": 1.0,
            "peak_gpu_mib": None, "peak_host_mib": 100.0, "trainable": 10, "total": 100, "adapter_bytes": 40,
            "per_label": {label: {"dice": mean, "sensitivity": sensitivity, "specificity": specificity} for label in labels},
            "per_case": per_case, "device": "cpu", "machine": {}, "versions": {}}


REGIONS = ["whole tumor", "tumor core", "enhancing tumor"]
METHODS = ["LoRA", "BitFit", "DecoderFT", "FullFT", "TargetOnly", "Start"]


def brats_runs():
    """K = 1 and K = 3, every case outside the held-out set; two repeats each."""
    rows = []
    for k, dice in [(1, {"LoRA": [(0.6, 0.8), (0.6, 1.0)], "BitFit": [(0.4, 0.6)] * 2, "DecoderFT": [(0.95, 0.95)] * 2,
                         "FullFT": [(0.5, 0.7)] * 2, "TargetOnly": [(0.1, 0.3)] * 2, "Start": [(0.0, 0.2)] * 2}),
                    (3, {"LoRA": [(0.8, 0.9)] * 2, "BitFit": [(0.9, 0.9)] * 2, "FullFT": [(0.95, 0.95)] * 2,
                         "TargetOnly": [(0.5, 0.7)] * 2, "Start": [(0.99, 0.99)] * 2})]:
        for m, repeats in dice.items():
            sens, spec = {"LoRA": (0.7, 0.98), "TargetOnly": (0.9, 1.0), "Start": (0.1, 0.5)}.get(m, (0.8, 0.99))
            rows += [row(m, k, r, dict(zip("ab", d)), REGIONS, sens, spec) for r, d in enumerate(repeats)]
    return rows


ZERO = {"whole tumor": 0.4, "tumor core": 0.2}  # the foundation knows two of the three regions
ZERO_SCORES = {"per_label": {"whole tumor": {"dice": 0.4, "sensitivity": 0.5, "specificity": 0.9},
                             "tumor core": {"dice": 0.2, "sensitivity": 0.7, "specificity": 0.95}},
               "per_case": {"a": {"whole tumor": {"dice": 0.6, "sensitivity": 0.5, "specificity": 0.9},
                                  "tumor core": {"dice": 0.2, "sensitivity": 0.7, "specificity": 0.95}},
                            "b": {"whole tumor": {"dice": 0.2, "sensitivity": 0.5, "specificity": 0.9},
                                  "tumor core": {"dice": 0.2, "sensitivity": None, "specificity": 0.95}}}}


@pytest.fixture
def brats_report(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"), identity())
    folder.claim()
    result = write_reports(folder, brats_runs(), ZERO, [1, 3], METHODS, pool=3, zero_scores=ZERO_SCORES, regions=True)
    return tmp_path / "out", result


def test_the_table_has_sensitivity_specificity_and_sd_over_cases(brats_report):
    out, result = brats_report
    report = (out / "report.md").read_text()
    assert ("| method | K=1 Dice (mean ± sd) | K=1 sd over cases | K=1 sensitivity | K=1 specificity | "
            "K=3 (all) Dice (mean ± sd) | K=3 (all) sd over cases | K=3 (all) sensitivity | K=3 (all) specificity | "
            "trainable |") in report
    # LoRA K=1: case means 0.7 (sd 0.1) and 0.8 (sd 0.2): 0.75 ± 0.05 over repeats, 0.15 over cases
    assert "| LoRA | 0.750 ± 0.050 | 0.150 | 0.700 | 0.980 | 0.850 ± 0.000 | 0.050 | 0.700 | 0.980 | 10 | 40 B | 1 | - | 100 |" \
        in report
    assert f"| {ZERO_SHOT} | 0.300 | 0.100 | 0.600 | 0.925 | 0.300 | 0.100 | 0.600 | 0.925 | 0 | 0 | 0 | - | - |" in report
    assert "| zero-shot |" not in report and "Per region (Dice / sensitivity / specificity" in report
    assert "| LoRA | 3 (all) | tumor core | 0.850 ± 0.000 | 0.700 | 0.980 |" in report
    assert "K=3 (all) takes every case outside the held-out set" in report
    lora = result["summary"]["LoRA|K=1"]
    assert lora["dice_sd_cases"] == pytest.approx(0.15) and lora["sensitivity_mean"] == pytest.approx(0.7)
    assert result["zero_shot_row"]["dice_sd_cases"] == pytest.approx(0.1) and result["pool"] == 3


def test_the_report_compares_as_the_paper_does(brats_report):
    """Start (0.99 at K = 3) is no method to compare with, DecoderFT (0.95 at K = 1) no PEFT method."""
    out, _ = brats_report
    report = (out / "report.md").read_text()
    assert "Against the paper" in report
    assert (f"- {ZERO_SHOT} 0.300 (sd over cases 0.100) against the best method at the largest K, K=3 (all): FullFT "
            f"0.950 (sd over cases 0.000); difference +0.650; over the regions zero-shot scores (whole tumor, tumor core) "
            f"FullFT 0.950, difference +0.650.") in report
    assert ("- Best PEFT method against TargetOnly: K=1: LoRA 0.750 (sd over cases 0.150) against TargetOnly 0.200 "
            "(sd over cases 0.100), difference +0.550; K=3 (all): BitFit 0.900 (sd over cases 0.000) against TargetOnly "
            "0.600 (sd over cases 0.100), difference +0.300.") in report
    assert ("- Best PEFT method against FullFT: K=1: LoRA 0.750 (sd over cases 0.150) against FullFT 0.600 (sd over "
            "cases 0.100), difference +0.150; K=3 (all): BitFit 0.900 (sd over cases 0.000) against FullFT 0.950 (sd "
            "over cases 0.000), difference -0.050.") in report
    assert "- Mean sensitivity 0.800, mean specificity 0.990 (over the 9 method x K rows, Start left out)." in report
    assert [m for m in METHODS + ["LoRA_DecoderFT", "DecoderFT_lr1e3", "MyLoRA"] if is_peft(m)] == \
        ["LoRA", "BitFit", "LoRA_DecoderFT", "MyLoRA"]


def test_the_boxplots_and_the_per_case_csv(brats_report):
    import matplotlib.image
    out, _ = brats_report
    report = (out / "report.md").read_text()
    for name in ("dice_boxplot", "dice_boxplot_per_label"):
        assert f"![{name}]({name}.png)" in report
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one panel per K, one per region: the per-region figure is the wider
    assert matplotlib.image.imread(out / "dice_boxplot_per_label.png").shape[1] > \
        matplotlib.image.imread(out / "dice_boxplot.png").shape[1]
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "K", "repeat", "fold", "case", "label", "dice", "sensitivity", "specificity"]
    zero = [r for r in rows if r["method"] == ZERO_SHOT]
    assert len(zero) == 4 and {r["K"] for r in zero} == {"0"}
    assert len(rows) - len(zero) == len(brats_runs()) * 2 * 3  # each run: two cases, three regions
    lora = [r for r in rows if r["method"] == "LoRA" and r["K"] == "1" and r["repeat"] == "1" and r["case"] == "b"]
    assert [(r["label"], float(r["dice"])) for r in lora] == [(region, 1.0) for region in REGIONS]
    assert [r["sensitivity"] for r in zero if r["case"] == "b"] == ["0.5", ""]  # undefined: empty


def test_plain_labels_without_per_case_scores_keep_their_report(tmp_path):
    """Rows of an older version (no per_case) and a zero-shot Dice without its summary: no boxplot,
    sd over cases and the zero-shot's sensitivity unknown ("-"), the table per label."""
    folder = OutputFolder(str(tmp_path / "out"), identity())
    folder.claim()
    rows = [row("LoRA", 1, 0, {"a": 0.5, "b": 0.7}, ["spleen"]), row("FullFT", 1, 0, {"a": 0.6, "b": 0.6}, ["spleen"])]
    del rows[1]["per_case"]
    write_reports(folder, rows, {"spleen": 0.3}, [1], ["LoRA", "FullFT"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| {ZERO_SHOT} | 0.300 | - | - | - | 0 | 0 | 0 | - | - |" in report
    assert "| LoRA | 0.600 (1 run) | 0.100 | 0.800 | 0.990 | 10 |" in report
    assert "| FullFT | 0.600 (1 run) | - | 0.800 | 0.990 | 10 |" in report
    assert "Per label (Dice / sensitivity / specificity" in report and "(all)" not in report
    assert "- Best PEFT method against FullFT: K=1: LoRA 0.600 (sd over cases 0.100) against FullFT 0.600, " \
           "difference +0.000." in report
    assert "TargetOnly" not in report  # no such row: no such comparison
    assert (tmp_path / "out" / "dice_boxplot.png").is_file()  # LoRA's cases
    del rows[0]["per_case"]
    other = OutputFolder(str(tmp_path / "older"), identity())
    other.claim()
    write_reports(other, rows, None, [1], ["LoRA", "FullFT"])
    assert not (tmp_path / "older" / "dice_boxplot.png").exists()
    assert "dice_boxplot" not in (tmp_path / "older" / "report.md").read_text()
    assert "Against the paper" in (tmp_path / "older" / "report.md").read_text()  # sensitivity vs specificity


def test_the_zero_shot_scores_per_case_come_from_its_summary(tmp_path):
    """zeroshot's summary.json beside its predictions, keys as nnU-Net writes them: only the regions
    the zero-shot Dice names are kept; no summary, no per-case scores."""
    folder = OutputFolder(str(tmp_path / "out"), identity())
    folder.claim()
    dataset_json = {"labels": BRATS, "file_ending": ".nii.gz"}
    assert zero_shot_details(folder, dataset_json, ZERO) is None
    metrics = {"Dice": 0.5, "TP": 1, "FN": 1, "TN": 8, "FP": 0}
    summary = {"mean": {"(1, 2, 3)": metrics, "(2, 3)": metrics, "(3,)": metrics},
               "metric_per_case": [{"reference_file": f"/raw/labelsTr/BraTS_00{i}.nii.gz",
                                    "metrics": {"(1, 2, 3)": metrics, "(2, 3)": {**metrics, "Dice": float("nan")}}}
                                   for i in (1, 2)]}
    (tmp_path / "out" / "predictions" / "zero_shot").mkdir(parents=True)
    (tmp_path / "out" / "predictions" / "zero_shot" / "summary.json").write_text(json.dumps(summary))
    details = zero_shot_details(folder, dataset_json, ZERO)
    assert list(details["per_label"]) == ["whole tumor", "tumor core"]  # the enhancing tumour is no zero-shot region
    assert details["per_label"]["whole tumor"] == {"dice": 0.5, "sensitivity": 0.5, "specificity": 1.0}
    assert details["per_case"]["BraTS_002"] == {"whole tumor": {"dice": 0.5, "sensitivity": 0.5, "specificity": 1.0},
                                                "tumor core": {"dice": None, "sensitivity": 0.5, "specificity": 1.0}}
    assert zero_shot_details(folder, dataset_json, None) is None


def test_zero_shot_of_regions_needs_a_foundation_of_regions_it_knows(tmp_path, capsys):
    from nnunet_fseft.experiments.benchmark.runs import zero_shot_scores
    from nnunet_fseft.foundation.record import PLANS_KEY
    folder = OutputFolder(str(tmp_path / "out"), identity())
    folder.claim()
    dataset_json = {"labels": BRATS, "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz"}
    plain = {PLANS_KEY: {"labels": {"background": 0, "tumor": 1}}}
    assert zero_shot_scores(folder, "Dataset700_BraTSAfrica", plain, dataset_json, "cpu") is None
    assert ("zero-shot: none (Dataset700_BraTSAfrica uses regions (sigmoid outputs) and the foundation plain labels "
            "(softmax))") in capsys.readouterr().out
    other = {PLANS_KEY: {"labels": {"background": 0, "lesion": [1, 2], "core": [2]}}}
    assert zero_shot_scores(folder, "Dataset700_BraTSAfrica", other, dataset_json, "cpu") is None
    assert "zero-shot: none (no region of Dataset700_BraTSAfrica is a region the foundation knows)" \
        in capsys.readouterr().out
