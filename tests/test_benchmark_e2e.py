"""`nnunet-fseft benchmark` end to end on CPU: two methods, K = 1, one repeat, through nnU-Net's commands
(its output folder without training: test_benchmark_folder.py)."""
import csv
import json

from helpers import TRAIN_ENV, fails_with, run

COLUMNS = ["method", "K", "repeat", "fold", "label", "dice", "sensitivity", "specificity", "wall_s", "peak_gpu_mib",
           "peak_host_mib", "trainable", "total", "adapter_bytes", "device", "machine", "versions"]


def backups(folder, name):
    return [p.read_text() for p in folder.iterdir() if p.name.startswith(name + ".bak-")]


def test_benchmark_writes_every_file_and_resumes(foundation, workspace, tmp_path):
    run(["nnunet-fseft", "synth", "-d", "504", "--cases", "4", "--seed", "11", "--scanner", "B", "--organs", "spleen",
         "--shape", "32", "32", "32", "--name", "BenchTarget"])
    args = ["nnunet-fseft", "benchmark", "--foundation", foundation, "-d", "504", "--k", "1", "--repeats", "1",
            "--methods", "LinearProbeTI", "BitFit", "--test", "2", "-o", tmp_path / "bench"]
    fails_with(args[:11] + ["LoRA", "Nope", "--test", "2", "-o", tmp_path / "x"], "Unknown method 'Nope'")
    fails_with(args[:6] + ["--k", "5"] + args[8:], "fewer than K + test = 5 + 2")
    assert not (tmp_path / "x").exists()
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.csv").write_text("the user's own results")
    (out / "report.md").write_text("the user's own report")

    first = run(args, env=TRAIN_ENV).stdout
    assert "[1/2] LinearProbeTI K=1 repeat 0 (fold 0)" in first and "[2/2] BitFit K=1 repeat 0" in first
    assert backups(out, "results.csv") == ["the user's own results"]
    assert backups(out, "report.md") == ["the user's own report"]
    for f in ("results.csv", "results.json", "report.md", "dice_vs_k.png", "dice_vs_parameters.png", "cost.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    # the transductive run adapted on the held-out scans it was scored on (the dataset has no imagesTs)
    assert "Caching the features of 2 query volumes" in (out / "log.txt").read_text()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == ["LinearProbeTI", "BitFit"] and all(r["label"] == "spleen" for r in rows)
    assert list(rows[0]) == COLUMNS
    for r in rows:
        blank = [c for c in COLUMNS if r[c] == "" and c != "peak_gpu_mib"]  # no GPU here
        assert not blank, (r["method"], blank)
        assert 0 <= float(r["dice"]) <= 1 and float(r["wall_s"]) > 0 and int(r["trainable"]) > 0
    assert int(rows[0]["trainable"]) < int(rows[1]["trainable"]) < int(rows[1]["total"])
    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == {"LinearProbeTI|K=1", "BitFit|K=1"} and "spleen" in result["zero_shot"]
    assert result["benchmark"]["dataset"] == "Dataset504_BenchTarget" and len(result["benchmark"]["held_out"]) == 2
    report = (out / "report.md").read_text()
    assert "| zero-shot (source-only) |" in report and "| LinearProbeTI |" in report and "![cost](cost.png)" in report

    runs, trainings = (out / "runs.jsonl").read_text(), (out / "log.txt").read_text().count("nnUNetv2_train ")
    again = run(args, env=TRAIN_ENV).stdout
    assert again.count("done earlier, skipped") == 2
    assert (out / "log.txt").read_text().count("nnUNetv2_train ") == trainings  # nothing retrained
    assert (out / "runs.jsonl").read_text() == runs
    assert len(backups(out, "report.md")) == 1  # what the benchmark wrote itself is replaced
    report = (out / "report.md").read_text()

    # another dataset into the same folder: refused before any work, the report keeps this dataset's labels
    run(["nnunet-fseft", "synth", "-d", "505", "--cases", "4", "--seed", "12", "--scanner", "B", "--organs",
         "kidney_left", "--shape", "32", "32", "32", "--name", "OtherTarget"])
    other = [str(a) if a != "504" else "505" for a in args]
    fails_with(other, "holds a benchmark of another dataset (Dataset504_BenchTarget, not Dataset505_OtherTarget)",
               env=TRAIN_ENV)
    assert (out / "report.md").read_text() == report and "kidney_left" not in report
    assert (out / "runs.jsonl").read_text() == runs
    assert not (workspace / "nnUNet_preprocessed" / "Dataset505_OtherTarget").exists()


def test_a_base_organ_task_stops_before_training_when_the_foundation_does_not_segment_the_organ(
        foundation, workspace, tmp_path, monkeypatch):
    """A short foundation training can name an organ and never learn it (it happened to one of the
    benchmark's foundations with the spleen): a base-organ benchmark then measures a novel organ.
    The real zero-shot prediction runs; the bar is raised above any Dice so that this tiny foundation
    fails it whatever it learned. A task of labels the foundation does not know at all stops too."""
    import pytest
    from nnunet_fseft.experiments.benchmark import protocol, runs
    from nnunet_fseft.errors import InputError
    run(["nnunet-fseft", "synth", "-d", "508", "--cases", "4", "--seed", "13", "--scanner", "B", "--organs", "spleen",
         "--shape", "32", "32", "32", "--name", "BaseCheck"])
    monkeypatch.setattr(protocol, "UNLEARNED_DICE", 1.01)
    out = tmp_path / "bench"
    with pytest.raises(InputError, match=r"^Dataset508_BaseCheck is no base-organ task for this foundation: the "
                                         r"foundation names spleen but does not segment it \(zero-shot Dice 0\.\d{3}, "
                                         r"below 1\.01\); train the foundation longer"):
        runs.benchmark(foundation, "508", [1], 1, ["BitFit"], 2, str(out), base_organs=True)
    assert "nnUNetv2_train" not in (out / "log.txt").read_text() and not (out / "runs.jsonl").exists()
    assert "spleen" in json.loads((out / "zero_shot.json").read_text())  # kept: the next try does not predict again

    run(["nnunet-fseft", "synth", "-d", "509", "--cases", "4", "--seed", "14", "--scanner", "B", "--organs", "pancreas",
         "--shape", "32", "32", "32", "--name", "NovelCheck"])
    with pytest.raises(InputError, match="^Dataset509_NovelCheck is no base-organ task for this foundation: the "
                                         "foundation knows none of its labels;"):
        runs.benchmark(foundation, "509", [1], 1, ["BitFit"], 2, str(tmp_path / "novel"), base_organs=True)
    assert "nnUNetv2_train" not in (tmp_path / "novel" / "log.txt").read_text()
