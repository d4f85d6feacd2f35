"""`nnunet-fseft benchmark --executor slurm`: the job array submitit writes, checked without a cluster
(sbatch and srun are stand-ins that record the script), and the refusals of the executor options.
The local executor runs for real in test_benchmark_e2e.py."""
import json
import os
import sys

import pytest

from helpers import fails_with
from nnunet_fseft.errors import InputError
from nnunet_fseft.experiments.benchmark.jobs import Executor, run_as_jobs
from nnunet_fseft.experiments.benchmark.output_folder import OutputFolder

IDENTITY = {"dataset": "Dataset601_A", "foundation_sha256": "a" * 64, "schedule": {"epochs": None,
            "iterations_per_epoch": None}, "held_out": ["case_0", "case_3"]}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch and srun on PATH: sbatch copies the script it is given to `seen` and answers as SLURM does."""
    bin_dir, seen = tmp_path / "bin", tmp_path / "seen.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {seen}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return seen


def spec(method, fold):
    return {"method": method, "K": 1, "repeat": 0, "fold": fold, "support": ["case_1"], "device": "cuda", "env": {},
            "trainer": f"nnUNetTrainerFSEFT_{method}"}


def test_the_slurm_job_array_asks_for_the_partition_gpus_time_and_passes_the_environment(tmp_path, fake_slurm,
                                                                                         capsys):
    folder = OutputFolder(str(tmp_path / "out"), IDENTITY)
    folder.claim()
    executor = Executor("slurm", jobs=3, wait=False,
                        slurm={"partition": "gpu-a100", "gpus_per_job": 1, "time_min": 90, "account": "lab42"})
    run_as_jobs(folder, [spec("LoRA", 0), spec("BitFit", 0)], executor)
    script = fake_slurm.read_text()
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --gpus-per-node=1", "#SBATCH --time=90",
                 "#SBATCH --account=lab42", "#SBATCH --array=0-1%2",  # 2 runs, at most 3 at once
                 f"export nnUNet_raw={tmp_path / 'raw'}", f"export nnUNet_results={tmp_path / 'results'}",
                 f"{sys.executable} -u -m submitit.core._submit {tmp_path / 'out' / 'jobs'}"):
        assert line in script.splitlines() or line in script, line
    said = capsys.readouterr().out
    assert "LoRA K=1 repeat 0: SLURM job 4242_0, log " in said and "BitFit K=1 repeat 0: SLURM job 4242_1" in said
    assert "Submitted 2 jobs; when they have ended, run the same command with --report-only" in said
    # each run has its folder and the id of this try; nothing else of the benchmark was written
    for method in ("LoRA", "BitFit"):
        run_dir = tmp_path / "out" / "runs" / method / "K1" / "repeat0"
        assert set(os.listdir(run_dir)) == {"attempt.json", "lock"} and json.loads((run_dir / "attempt.json").read_text())
    assert not (tmp_path / "out" / "runs.jsonl").exists()


def test_a_job_of_an_earlier_try_does_no_work(tmp_path, fake_slurm):
    """Submitting again while the first array is queued: the first jobs find another try's id and stop."""
    from nnunet_fseft.experiments.benchmark.jobs import run_job
    folder = OutputFolder(str(tmp_path / "out"), IDENTITY)
    folder.claim()
    first = [spec("LoRA", 0)]
    run_as_jobs(folder, first, Executor("slurm", wait=False))
    run_as_jobs(folder, [spec("LoRA", 0)], Executor("slurm", wait=False))  # a new try, the old folder kept
    assert len(os.listdir(tmp_path / "out" / "runs" / "LoRA" / "K1")) == 2  # repeat0 and the first try's backup
    assert run_job(first[0]) is None  # the first try's job starting late: the run folder is the second try's
    assert sorted(os.listdir(first[0]["run_dir"])) == ["attempt.json", "lock"]  # it wrote nothing (no job.json, no row)


def test_executor_options_are_checked_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="^--no-wait is for --executor slurm"):
        Executor("local", wait=False)
    with pytest.raises(InputError, match="^--jobs must be at least 1, got 0"):
        Executor("local", jobs=0)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    with pytest.raises(InputError, match=r'needs submitit; install it with: pip install "nnunet-fseft\[cluster\]"'):
        Executor("local")


def test_slurm_without_slurm_commands_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    with pytest.raises(InputError, match="^--executor slurm needs SLURM's sbatch and srun"):
        Executor("slurm")


def test_cli_refuses_job_options_without_an_executor(tmp_path):
    fails_with(["nnunet-fseft", "benchmark", "--foundation", tmp_path, "-d", "1", "-o", tmp_path / "o", "--jobs", "2"],
               "--jobs needs --executor local or slurm")


def test_a_second_benchmark_call_in_the_same_folder_is_refused(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"), IDENTITY)
    with folder.running():
        with pytest.raises(InputError, match=r"^Another `nnunet-fseft benchmark` is running in .* \(pid \d+ on .*\); "
                                             r"wait for it to end, or run this one with --report-only"):
            with OutputFolder(str(tmp_path / "out"), IDENTITY).running():
                pass
    with OutputFolder(str(tmp_path / "out"), IDENTITY).running():  # the lock ended with the first call
        pass


def test_a_submitted_benchmark_keeps_its_folder_and_the_job_script_leaves_the_gpus_to_slurm(tmp_path, fake_slurm,
                                                                                            monkeypatch):
    """--no-wait on a fresh folder: nothing has run yet, but the jobs will, so the folder is kept."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    folder = OutputFolder(str(tmp_path / "out"), IDENTITY)
    folder.claim()
    assert run_as_jobs(folder, [spec("LoRA", 0)], Executor("slurm", wait=False)) is None
    folder.tidy()
    assert (tmp_path / "out" / "benchmark.json").is_file()
    assert "CUDA_VISIBLE_DEVICES" not in fake_slurm.read_text()


def test_finished_rows_of_jobs_are_collected_once_and_backups_of_earlier_tries_never(tmp_path):
    from nnunet_fseft.experiments.benchmark.jobs import collect_finished, runs_in_flight
    from nnunet_fseft.experiments.benchmark.output_folder import file_lock
    from nnunet_fseft.experiments.benchmark.runs import recorded_runs
    folder = OutputFolder(str(tmp_path / "out"), IDENTITY)
    folder.claim()
    runs = tmp_path / "out" / "runs" / "LoRA" / "K1"
    for name, row in (("repeat0", {"wall_s": 1.0}), ("repeat0.bak-20261207-120000", {"failed": "old try"})):
        (runs / name).mkdir(parents=True)
        (runs / name / "row.json").write_text(json.dumps({**spec("LoRA", 0), **row}))
    assert collect_finished(folder) == 1 and collect_finished(folder) == 0
    (row,) = recorded_runs(folder).values()
    assert row["wall_s"] == 1.0 and "failed" not in row
    assert runs_in_flight(folder, [spec("LoRA", 0)]) == []
    with file_lock(str(runs / "repeat0" / "lock")):  # a job of an earlier call is running it
        assert runs_in_flight(folder, [spec("LoRA", 0)]) == ["LoRA K=1 repeat 0"]
