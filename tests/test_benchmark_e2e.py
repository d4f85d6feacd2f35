"""`nnunet-fseft benchmark` end to end on CPU: two methods, K = 1, one repeat, through nnU-Net's commands
(its output folder without training: test_benchmark_folder.py)."""
import csv
import json

import pytest

from helpers import TRAIN_ENV, fails_with, run

COLUMNS = ["method", "K", "repeat", "fold", "label", "dice", "sensitivity", "specificity", "wall_s", "peak_gpu_mib",
           "peak_host_mib", "trainable", "total", "adapter_bytes", "device", "machine", "versions"]


def backups(folder, name):
    return [p.read_text() for p in folder.iterdir() if p.name.startswith(name + ".bak-")]


def bench_args(foundation, out):
    """Two methods, K = 1, one repeat: what the in-process and the job benchmarks both run."""
    return ["nnunet-fseft", "benchmark", "--foundation", foundation, "-d", "504", "--k", "1", "--repeats", "1",
            "--methods", "LinearProbeTI", "BitFit", "--test", "2", "-o", out]


@pytest.fixture(scope="module")
def in_process(foundation, tmp_path_factory):
    """The benchmark run in-process, into a folder that holds two files of the user's: (args, its
    output folder, what it printed)."""
    run(["nnunet-fseft", "synth", "-d", "504", "--cases", "4", "--seed", "11", "--scanner", "B", "--organs", "spleen",
         "--shape", "32", "32", "32", "--name", "BenchTarget"])
    out = tmp_path_factory.mktemp("in_process") / "bench"
    out.mkdir()
    (out / "results.csv").write_text("the user's own results")
    (out / "report.md").write_text("the user's own report")
    args = bench_args(foundation, out)
    return args, out, run(args, env=TRAIN_ENV).stdout


def test_benchmark_writes_every_file_and_resumes(in_process, workspace, tmp_path):
    args, out, first = in_process
    fails_with(args[:11] + ["LoRA", "Nope", "--test", "2", "-o", tmp_path / "x"], "Unknown method 'Nope'")
    fails_with(args[:6] + ["--k", "5"] + args[8:], "fewer than K + test = 5 + 2")
    assert not (tmp_path / "x").exists()
    assert "[1/2] LinearProbeTI K=1 repeat 0 (fold 0)" in first and "[2/2] BitFit K=1 repeat 0" in first
    assert backups(out, "results.csv") == ["the user's own results"]
    assert backups(out, "report.md") == ["the user's own report"]
    for f in ("results.csv", "results.json", "report.md", "dice_vs_k.png", "dice_vs_parameters.png", "cost.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    # the transductive run adapted on the held-out scans it was scored on (the dataset has no imagesTs)
    assert "Caching the features of 2 query volumes" in (out / "log.txt").read_text()
    # nnU-Net's validation after training is skipped: nnUNetv2_predict segments the same scans
    assert (out / "log.txt").read_text().count("validation after training skipped") == 2
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


def children(pid):
    """The processes whose parent is `pid` (Linux's /proc)."""
    import os
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


def alive(pid):
    """Running, not a zombie waiting to be reaped."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def files_of(*folders):
    """Every file under `folders`, with its size and modification time."""
    found = {}
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                found[str(f)] = (f.stat().st_size, f.stat().st_mtime_ns)
    return found


def test_local_jobs_give_the_in_process_table_and_a_killed_job_is_rerun_alone(in_process, foundation, workspace,
                                                                               tmp_path):
    """--executor local --jobs 2: one submitit job per run, two at once. One job is killed (SIGKILL,
    as a cluster kills a job out of time) while it trains: the report lists it as failed with its
    log, the next call reruns it alone and touches no file of the other run, the call after that
    trains nothing, and the table has the rows and fields of the in-process benchmark's."""
    import os
    import signal
    import subprocess
    import time
    from nnunet_fseft.runner import command_env, command_path
    from helpers import COMMAND_ENV
    from nnunet_fseft.plans import PLANS_NAME
    out = tmp_path / "jobs"
    args = [str(a) for a in bench_args(foundation, out)] + ["--executor", "local", "--jobs", "2"]
    env = command_env("nnunet-fseft", {**COMMAND_ENV, **TRAIN_ENV})
    killed = out / "runs" / "BitFit" / "K1" / "repeat0"
    p = subprocess.Popen([command_path(args[0])] + args[1:], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not ((killed / "log.txt").is_file() and "nnUNetv2_train" in (killed / "log.txt").read_text()):
        assert p.poll() is None and time.time() - t0 < 600, "the BitFit job never started training"
        time.sleep(0.5)
    job = json.loads((killed / "job.json").read_text())["pid"]
    while not children(job):  # its log names the command just before starting it
        assert time.time() - t0 < 600, "the job started no command"
        time.sleep(0.1)
    training = children(job)
    os.kill(job, signal.SIGKILL)
    said = p.communicate(timeout=900)[0]
    assert not any(alive(pid) for pid in training)  # its nnUNetv2_train died with it (runner: PR_SET_PDEATHSIG)
    assert p.returncode == 1, said[-3000:]  # a failed run: the exit status says so
    assert "[1/2] LinearProbeTI K=1 repeat 0 (fold 0): job" in said and "runs: " in said
    report = (out / "report.md").read_text()
    failed = next(line for line in report.splitlines() if line.startswith("- BitFit K=1 repeat 0 (fold 0): job "))
    assert "ended without a result" in failed and str(out / "jobs") in failed
    rows = [json.loads(line) for line in open(out / "runs.jsonl")]
    assert sorted((r["method"], "failed" in r) for r in rows) == [("BitFit", True), ("LinearProbeTI", False)]

    other = (out / "runs" / "LinearProbeTI", out / "predictions" / "LinearProbeTI",
             workspace / "nnUNet_results" / "Dataset504_BenchTarget" / f"nnUNetTrainerFSEFT_LinearProbeTI__{PLANS_NAME}"
             f"__3d_fullres" / "fold_0")
    before = files_of(*other)
    again = run(args, env=TRAIN_ENV).stdout
    assert "[1/2] LinearProbeTI K=1 repeat 0: done earlier, skipped" in again
    assert "[2/2] BitFit K=1 repeat 0 (fold 0), failed earlier (job " in again
    assert files_of(*other) == before  # the other run's files untouched, its nnU-Net fold too
    assert [p.name.split(".bak-")[0] for p in killed.parent.iterdir()] == ["repeat0", "repeat0"]  # the killed try kept
    assert "failed" not in json.loads((killed / "row.json").read_text())

    rows = list(csv.DictReader(open(out / "results.csv")))
    in_process_rows = list(csv.DictReader(open(in_process[1] / "results.csv")))
    key = ("method", "K", "repeat", "fold", "label")
    assert [tuple(r[c] for c in key) for r in rows] == [tuple(r[c] for c in key) for r in in_process_rows]
    assert list(rows[0]) == list(in_process_rows[0]) == COLUMNS
    assert all(r[c] != "" for r in rows for c in COLUMNS if c != "peak_gpu_mib")

    runs = (out / "runs.jsonl").read_text()
    third = run(args, env=TRAIN_ENV).stdout
    assert third.count("done earlier, skipped") == 2 and ": job" not in third
    assert (out / "runs.jsonl").read_text() == runs
    report = run(args[:-4] + ["--report-only"], env=TRAIN_ENV).stdout
    assert "Report of 2 finished runs of 2 (0 failed, 0 not finished yet)" in report
