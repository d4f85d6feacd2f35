"""The benchmark's runs as jobs: one job per (method, K, repeat), sent through submitit to this
machine (`--executor local`) or to SLURM (`--executor slurm`), instead of one after another in the
benchmark's own process.

Who writes what:
- a job writes only its run's own folders: OUT/runs/METHOD/K<k>/repeat<r>/ (log.txt, job.json,
  row.json), its predictions (OUT/predictions/METHOD/K<k>/repeat<r>/) and its fold of the trainer's
  nnU-Net folder. (nnU-Net's trainer also rewrites the trainer folder's plans.json and dataset.json
  at the start of every fold's training, with the same content: that is nnU-Net's own way of
  training folds side by side, not ours.)
- the submitting process writes runs.jsonl (a job's row.json appended once it has one, or a failed
  row naming the job's log when it ended without one), benchmark.json and the reports, each under
  the output folder's write lock; `--report-only` does the same from whatever has finished.
Resuming: a run is done when runs.jsonl (or a row.json not appended yet) has its finished row; the
next benchmark call with the same arguments submits the others again. A job holds its run's lock
while it runs, so a run still running from an earlier call (its submitter killed, say) is watched,
not started twice; a run's folder from an earlier try is kept as a backup before a new try. Each
try has an id in the run folder's attempt.json: a job of an older try (one still queued on SLURM
when the benchmark was called again) finds another id there and exits without work.
Preprocessing, adoption, the splits, the costs and the zero-shot prediction are done once, by the
submitter, before any job starts.
"""
import glob
import json
import os
import shutil
import sys
import time
import uuid
from typing import List, Optional

from nnunet_fseft.datasets.safe_write import keep_existing
from nnunet_fseft.environment import THREADS
from nnunet_fseft.errors import InputError
from nnunet_fseft.experiments.benchmark.output_folder import Busy, OutputFolder, file_lock

EXECUTORS = ("local", "slurm")
# Environment a job needs, written into a SLURM job's script so that it does not depend on the
# cluster exporting the submitter's environment
# (not CUDA_VISIBLE_DEVICES: SLURM sets it to the GPUs it gives the job)
JOB_ENV_PREFIXES = ("nnUNet_",)


class Executor:
    """Where the jobs run: `kind` local or slurm, at most `jobs` at once; `slurm` holds SLURM's
    parameters (partition, gpus_per_job, time_min, cpus_per_job, mem_gb, account, qos, constraint).
    `wait`: stay until every job has ended, then write the report (else submit and return)."""

    def __init__(self, kind: str, jobs: int = 1, slurm: Optional[dict] = None, wait: bool = True):
        if kind not in EXECUTORS:
            raise InputError(f"Unknown executor '{kind}'; choose one of: {', '.join(EXECUTORS)}.")
        if jobs < 1:
            raise InputError(f"--jobs must be at least 1, got {jobs}.")
        if kind == "local" and not wait:
            raise InputError("--no-wait is for --executor slurm: local jobs are followed by the process that started "
                             "them; run that one in the background instead (nohup ... &).")
        import importlib.util
        if importlib.util.find_spec("submitit") is None:
            raise InputError(f"--executor {kind} needs submitit; install it with: pip install \"nnunet-fseft[cluster]\"")
        if kind == "slurm" and not all(shutil.which(c) for c in ("sbatch", "srun")):
            raise InputError("--executor slurm needs SLURM's sbatch and srun, which are not on PATH here; run the "
                             "benchmark on the cluster's login node, or use --executor local.")
        self.kind, self.jobs, self.slurm, self.wait = kind, jobs, dict(slurm or {}), wait

    def cpus_per_job(self) -> int:
        return int(self.slurm.get("cpus_per_job") or 8)

    def threads(self) -> Optional[int]:
        """CPU threads each CPU training gets: a SLURM job's cores, or this machine's cores shared by the
        local jobs; None: nnU-Net's own choice (every core), for a single local job."""
        if self.kind == "slurm":
            return self.cpus_per_job()
        if self.jobs > 1:
            return max(1, len(os.sched_getaffinity(0)) // self.jobs)
        return None

    def make(self, folder: str):
        """The submitit executor writing its files (scripts, pickles, logs) in `folder`."""
        import submitit
        if self.kind == "local":  # no time limit: an in-process run has none either
            executor = submitit.LocalExecutor(folder=folder)
            executor.update_parameters(timeout_min=60 * 24 * 365)
            return executor
        time_min = int(self.slurm.get("time_min") or 24 * 60)
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        given = {"partition": self.slurm.get("partition"), "account": self.slurm.get("account"),
                 "qos": self.slurm.get("qos"), "constraint": self.slurm.get("constraint")}
        gpus = int(self.slurm.get("gpus_per_job", 1))
        if gpus:
            given["gpus_per_node"] = gpus
        executor.update_parameters(
            cpus_per_task=self.cpus_per_job(),
            mem=f"{int(self.slurm.get('mem_gb', 32))}G", time=time_min, job_name="nnunet-fseft-benchmark",
            array_parallelism=self.jobs, stderr_to_stdout=True, setup=job_setup(),
            **{k: v for k, v in given.items() if v})  # unset: the cluster's default
        return executor


def job_setup() -> List[str]:
    """The lines a SLURM job's script runs first: the nnU-Net environment of the submitter (its
    folders and settings), exported, so the job finds the same data whatever the cluster exports.
    The job runs the submitter's own Python (submitit starts sys.executable): the same venv."""
    import shlex
    return [f"export {k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith(JOB_ENV_PREFIXES)]


def run_folder(folder: OutputFolder, spec: dict) -> str:
    return os.path.join(folder.path, "runs", spec["method"], f"K{spec['K']}", f"repeat{spec['repeat']}")


def run_job(spec: dict) -> Optional[dict]:
    """One job: trains, predicts and scores the run of `spec` and writes its row.json (the row
    runs.jsonl gets). Returns that row, or None where it did no work: the run is running in another
    job, or this job is of an older try (attempt.json names another)."""
    from nnunet_fseft.experiments.benchmark.runs import measured_row, train_and_score
    here = spec["run_dir"]
    try:
        with file_lock(os.path.join(here, "lock"), blocking=False):
            with open(os.path.join(here, "attempt.json")) as f:
                if json.load(f)["attempt"] != spec["attempt"]:
                    return None
            job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or ""
            _write_json(os.path.join(here, "job.json"), {"pid": os.getpid(), "host": os.uname().nodename,
                                                         "job_id": job_id, "started": time.time()})
            if THREADS in spec["env"]:  # this process's own torch work (scoring) shares the cores too
                import torch
                torch.set_num_threads(int(spec["env"][THREADS]))
            row = measured_row(spec["method"], spec["K"], spec["repeat"], spec["fold"], spec["support"],
                               spec["device"], lambda: train_and_score(spec))
            if "failed" in row:
                row["failed"] += f" (log: {spec['log']})"
            _write_json(os.path.join(here, "row.json"), row)
            return row
    except Busy:
        return None


def _write_json(path: str, obj) -> None:
    """Written whole or not at all: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _finished_row(spec_or_dir) -> Optional[dict]:
    path = os.path.join(spec_or_dir, "row.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return None


def collect_finished(folder: OutputFolder) -> int:
    """Appends to runs.jsonl the row.json of every run folder (not the backups of earlier tries) that it
    has not got yet: a job that ended after its submitter did. Returns how many. Under the write
    lock: also from --report-only."""
    from nnunet_fseft.experiments.benchmark.runs import RUNS, recorded_runs, run_key
    added = 0
    with folder.writing():
        latest = recorded_runs(folder)
        for row_file in sorted(glob.glob(os.path.join(glob.escape(folder.path), "runs", "*", "K*", "repeat*",
                                                      "row.json"))):
            if ".bak-" in os.path.basename(os.path.dirname(row_file)):
                continue
            row = _finished_row(os.path.dirname(row_file))
            if row is None or latest.get(run_key(row)) == row:
                continue
            if latest.get(run_key(row)) is not None and "failed" not in latest[run_key(row)]:
                continue  # finished already
            with open(os.path.join(folder.path, RUNS), "a") as fh:
                fh.write(json.dumps(row) + "\n")
            latest[run_key(row)] = row
            added += 1
    return added


def _prepare(folder: OutputFolder, spec: dict, executor: Executor) -> Optional[str]:
    """Gives `spec` its run folder, log and try id; returns None, or why it is not submitted now: it
    is running in a job of an earlier call. The folder of an earlier try is moved aside while its
    lock is held, so a late job of that try finds the lock taken or the new try's id, and stops."""
    here = run_folder(folder, spec)
    os.makedirs(here, exist_ok=True)
    try:
        with file_lock(os.path.join(here, "lock"), blocking=False):
            if set(os.listdir(here)) - {"lock"}:
                keep_existing(here)  # an earlier try: kept, never overwritten
                os.makedirs(here)
            spec.update(run_dir=here, log=os.path.join(here, "log.txt"), attempt=uuid.uuid4().hex)
            if spec["device"] == "cpu" and executor.threads():  # nnU-Net's CPU training takes every core
                spec["env"] = {**spec["env"], THREADS: str(executor.threads())}
            _write_json(os.path.join(here, "attempt.json"), {"attempt": spec["attempt"]})
    except Busy as e:
        return f"still running in a job of an earlier call ({e})"
    return None


def runs_in_flight(folder: OutputFolder, specs: List[dict]) -> List[str]:
    """The runs of `specs` that a job (of an earlier call) is running now: it holds the run's lock."""
    busy = []
    for spec in specs:
        lock = os.path.join(run_folder(folder, spec), "lock")
        if os.path.isfile(lock):
            try:
                with file_lock(lock, blocking=False):
                    pass
            except Busy:
                busy.append(f"{spec['method']} K={spec['K']} repeat {spec['repeat']}")
    return busy


class _Progress:
    """One line while waiting: runs done / running / failed / queued and the time so far (a tqdm bar
    on a terminal, else a line each time the counts change)."""

    def __init__(self, total: int):
        self.total, self.t0, self.last, self.bar = total, time.time(), None, None
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="run", dynamic_ncols=True)

    def show(self, done: int, running: int, failed: int, queued: int) -> None:
        counts = (done, running, failed, queued)
        text = f"runs: {done} done, {running} running, {failed} failed, {queued} queued"
        if self.bar is not None:
            self.bar.n = done + failed
            self.bar.set_postfix_str(text, refresh=True)
        elif counts != self.last:
            minutes, seconds = divmod(int(time.time() - self.t0), 60)
            print(f"{text} (of {self.total}; {minutes} min {seconds:02d} s)", flush=True)
        self.last = counts

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_as_jobs(folder: OutputFolder, specs: List[dict], executor: Executor, poll_s: float = 2.0) -> Optional[list]:
    """Runs every spec that runs.jsonl has no finished row of, as one job each; waits for them (unless
    the executor does not wait: then returns None once they are submitted), appending each job's
    row to runs.jsonl as it ends, or a failed row with its log where it ended without one. Returns
    what run_pending returns: the latest row of every run asked, after the finished runs the specs
    do not ask for."""
    from nnunet_fseft.experiments.benchmark.runs import others_and_earlier, run_key
    collect_finished(folder)
    others, earlier_rows = others_and_earlier(folder, [run_key(s) for s in specs])
    pending, watched, rows = [], [], {}
    for i, (spec, earlier) in enumerate(zip(specs, earlier_rows)):
        step = f"[{i + 1}/{len(specs)}] {spec['method']} K={spec['K']} repeat {spec['repeat']}"
        if earlier is not None and "failed" not in earlier:
            print(f"{step}: done earlier, skipped", flush=True)
            rows[i] = earlier
            continue
        busy = _prepare(folder, spec, executor)
        if busy:
            print(f"{step}: {busy}; waiting for it", flush=True)
            watched.append(i)
            continue
        retry = f", failed earlier ({earlier['failed']}): retried" if earlier is not None else ""
        print(f"{step} (fold {spec['fold']}){retry}: job", flush=True)
        pending.append(i)
    if pending or watched:
        waited = _Jobs(folder, specs, executor, poll_s).run(pending, watched)
        if waited is None:
            return None
        rows.update(waited)
    return others + [rows[i] for i in range(len(specs)) if i in rows]


class _Jobs:
    """Submits the pending runs (at most executor.jobs running at once, counting the runs followed
    from an earlier call) and follows them until each has ended, recording its row."""

    def __init__(self, folder: OutputFolder, specs: List[dict], executor: Executor, poll_s: float):
        from nnunet_fseft.experiments.benchmark.protocol import machine, versions
        self.folder, self.specs, self.executor, self.poll_s = folder, specs, executor, poll_s
        self.submitit = executor.make(os.path.join(folder.path, "jobs"))
        self.about = {"device": specs[0]["device"], "machine": machine(), "versions": versions()}
        self.gpus = _local_gpus(executor, specs[0]["device"])  # local jobs on GPUs: one each, in turn
        self.slot = {}  # index -> the GPU its local job was given
        self.rows = {}

    def _failed(self, i: int, why: str) -> dict:
        spec = self.specs[i]
        return {"method": spec["method"], "K": spec["K"], "repeat": spec["repeat"], "fold": spec["fold"],
                "support": spec["support"], **self.about, "failed": why}

    def _submit(self, indices: List[int]) -> dict:
        try:
            if self.executor.kind == "slurm":  # one job array: SLURM keeps at most `jobs` of them running
                with self.submitit.batch():
                    handles = [self.submitit.submit(run_job, self.specs[i]) for i in indices]
                return dict(zip(indices, handles))
            i = indices[0]
            if self.gpus:
                self.slot[i] = min(self.gpus, key=lambda g: sum(s == g for s in self.slot.values()))
                self.submitit.update_parameters(gpus_per_node=1, visible_gpus=[int(self.slot[i])])
            return {i: self.submitit.submit(run_job, self.specs[i])}
        except Exception as e:  # sbatch refused the job (a partition, account or limit the cluster does not have)
            if isinstance(e, InputError):
                raise
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise InputError(f"Submitting the benchmark's jobs failed ({last}); check the --slurm-* options "
                             f"against the cluster's sinfo / sacctmgr, or use --executor local.")

    def _next(self, queue: List[int], running: dict) -> int:
        """The next queued run, preferring a method none of the running jobs trains: runs of one
        trainer share nnU-Net's trainer folder, whose plans.json each of its trainings rewrites."""
        busy = {self.specs[i]["trainer"] for i in running}
        for i in queue:
            if self.specs[i]["trainer"] not in busy:
                return i
        return queue[0]

    def _row_of(self, i: int, job) -> dict:
        """The row of a job that has ended: its row.json, or what it returned, or a failed row
        naming its log where it left neither (killed, out of time or memory, a crash outside the
        commands)."""
        row = _finished_row(self.specs[i]["run_dir"])
        if row is None and job.paths.result_pickle.exists():
            try:
                row = job.result()
            except Exception as e:  # the job raised: the last line of its trace says what
                lines = str(e).strip().splitlines()
                return self._failed(i, f"job {job.job_id} failed: {lines[-1] if lines else type(e).__name__}; "
                                       f"its log: {job.paths.stdout}")
        if row is None:
            return self._failed(i, f"job {job.job_id} ended without a result (killed, or out of time or memory?); "
                                   f"its log: {job.paths.stdout}")
        return row

    def run(self, pending: List[int], watched: List[int]) -> Optional[dict]:
        from nnunet_fseft.experiments.benchmark.runs import record_run, recorded_runs, run_key
        jobs, queue = {}, list(pending)
        if self.executor.kind == "slurm" and queue:
            jobs = self._submit(queue)
            queue = []
            for i, job in jobs.items():
                print(f"  {self.specs[i]['method']} K={self.specs[i]['K']} repeat {self.specs[i]['repeat']}: SLURM job "
                      f"{job.job_id}, log {job.paths.stdout}", flush=True)
            if not self.executor.wait:
                print(f"Submitted {len(jobs)} jobs; when they have ended, run the same command with --report-only "
                      f"(or without it, to retry the failed ones)", flush=True)
                return None
        progress = _Progress(len(pending) + len(watched))
        failed = 0
        try:
            while queue or jobs or watched:
                for i in [i for i, job in jobs.items() if job.done()]:
                    row = self._row_of(i, jobs.pop(i))
                    self.slot.pop(i, None)
                    record_run(self.folder, row)
                    failed += "failed" in row
                    self.rows[i] = row
                for i in list(watched):  # a job of an earlier call: ended when it no longer holds the run's lock
                    if runs_in_flight(self.folder, [self.specs[i]]):
                        continue
                    watched.remove(i)
                    collect_finished(self.folder)
                    row = recorded_runs(self.folder).get(run_key(self.specs[i]))
                    if row is None or "failed" in row and not _finished_row(run_folder(self.folder, self.specs[i])):
                        row = self._failed(i, f"the job of an earlier call running it ended without a result; its "
                                              f"log: {os.path.join(run_folder(self.folder, self.specs[i]), 'log.txt')}")
                        record_run(self.folder, row)
                    failed += "failed" in row
                    self.rows[i] = row
                while queue and len(jobs) + len(watched) < self.executor.jobs:  # the freed places
                    i = self._next(queue, jobs)
                    queue.remove(i)
                    jobs.update(self._submit([i]))
                progress.show(len(self.rows) - failed, len(jobs) + len(watched), failed, len(queue))
                if queue or jobs or watched:
                    time.sleep(self.poll_s)
        finally:
            progress.close()
            if self.executor.kind == "local":  # Ctrl-C or an error here: the local jobs stop with us (SLURM's go on)
                for job in jobs.values():
                    job.cancel(check=False)
        return self.rows


def _local_gpus(executor: Executor, device: str) -> List[str]:
    """The GPUs local jobs take turns on, as CUDA_VISIBLE_DEVICES names them here (none on CPU:
    submitit then hides every GPU from the jobs)."""
    if executor.kind != "local" or device != "cuda":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
        if not all(g.isdigit() for g in gpus):
            raise InputError(f"--executor local gives each job one GPU by number, and CUDA_VISIBLE_DEVICES is "
                             f"'{visible}'; set it to GPU numbers (e.g. 0,1) or unset it.")
        return gpus
    import torch
    return [str(g) for g in range(torch.cuda.device_count())]
