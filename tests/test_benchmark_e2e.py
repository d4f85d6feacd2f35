"""`nnunet-fseft benchmark` end to end on CPU: two methods, K = 1, one repeat, through nnU-Net's commands."""
import csv
import json

from conftest import TRAIN_ENV, run
from test_bad_input import fails_with

COLUMNS = ["method", "K", "repeat", "fold", "label", "dice", "sensitivity", "specificity", "wall_s", "peak_gpu_mib",
           "peak_host_mib", "trainable", "total", "adapter_bytes", "device", "machine", "versions"]


def test_benchmark_writes_every_file_and_resumes(foundation, workspace, tmp_path):
    run(["nnunet-fseft", "synth", "-d", "504", "--cases", "4", "--seed", "11", "--scanner", "B", "--organs", "spleen",
         "--shape", "32", "32", "32", "--name", "BenchTarget"])
    args = ["nnunet-fseft", "benchmark", "--foundation", foundation, "-d", "504", "--k", "1", "--repeats", "1",
            "--methods", "LinearProbe", "BitFit", "--test", "2", "-o", tmp_path / "bench"]
    fails_with(args[:11] + ["LoRA", "Nope", "--test", "2", "-o", tmp_path / "x"], "Unknown method 'Nope'")
    fails_with(args[:6] + ["--k", "5"] + args[8:], "fewer than K + test = 5 + 2")
    assert not (tmp_path / "x").exists()

    first = run(args, env=TRAIN_ENV).stdout
    assert "[1/2] LinearProbe K=1 repeat 0 (fold 0)" in first and "[2/2] BitFit K=1 repeat 0" in first
    out = tmp_path / "bench"
    for f in ("results.csv", "results.json", "report.md", "dice_vs_k.png", "dice_vs_parameters.png", "cost.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == ["LinearProbe", "BitFit"] and all(r["label"] == "spleen" for r in rows)
    assert list(rows[0]) == COLUMNS
    for r in rows:
        blank = [c for c in COLUMNS if r[c] == "" and c != "peak_gpu_mib"]  # no GPU here
        assert not blank, (r["method"], blank)
        assert 0 <= float(r["dice"]) <= 1 and float(r["wall_s"]) > 0 and int(r["trainable"]) > 0
    assert int(rows[0]["trainable"]) < int(rows[1]["trainable"]) < int(rows[1]["total"])
    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == {"LinearProbe|K=1", "BitFit|K=1"} and "spleen" in result["zero_shot"]
    report = (out / "report.md").read_text()
    assert "| zero-shot |" in report and "| LinearProbe |" in report and "![cost](cost.png)" in report

    runs, trainings = (out / "runs.jsonl").read_text(), (out / "log.txt").read_text().count("nnUNetv2_train ")
    again = run(args, env=TRAIN_ENV).stdout
    assert again.count("done earlier, skipped") == 2
    assert (out / "log.txt").read_text().count("nnUNetv2_train ") == trainings  # nothing retrained
    assert (out / "runs.jsonl").read_text() == runs
