"""The benchmark's output folder: benchmark.json (which benchmark it holds, what it wrote), backups
of files it did not write, the held-out images it links, and its two locks: one held by the
benchmark call running there (so a second one is refused), one held while a shared file (runs.jsonl,
benchmark.json, the reports) is written (by that call, or by a --report-only call beside it)."""
import contextlib
import fcntl
import json
import os
import shutil
from typing import List, Optional

from nnunet_fseft.datasets.safe_write import keep_existing
from nnunet_fseft.errors import InputError


MANIFEST = "benchmark.json"
RUNNING_LOCK, WRITE_LOCK = "benchmark.lock", "benchmark.write.lock"
FIGURES = ("dice_vs_k.png", "dice_vs_parameters.png", "cost.png", "dice_boxplot.png", "dice_boxplot_per_label.png")
# Everything a benchmark writes in its output folder
OUTPUTS = ("runs.jsonl", "log.txt", "zero_shot.json", "results.csv", "per_case.csv", "results.json", "report.md",
           *FIGURES, "held_out", "predictions", "runs", "jobs")


_WARNED = set()


def _warn_no_locks(path: str, error: OSError) -> None:
    folder = os.path.dirname(path)
    if folder not in _WARNED:
        _WARNED.add(folder)
        print(f"Warning: the file system of {folder} has no file locks ({error.strerror}): two benchmark calls "
              f"there, or a call and a job of an earlier one, are not kept apart; run one at a time.", flush=True)


class Busy(Exception):
    """The lock is held by another process."""


@contextlib.contextmanager
def file_lock(path: str, blocking: bool = True):
    """An exclusive lock on the file `path` (created if needed) while inside; raises Busy where another
    process holds it and not `blocking`. The lock ends with the process that holds it, however it
    ends, so a killed benchmark or job leaves no stale lock. A file system without locks (some
    cluster file systems) gives no exclusion, and no error."""
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            raise Busy(fh.read().strip())
        except OSError as e:  # ENOLCK / ENOSYS: locks not supported here
            _warn_no_locks(path, e)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
        fh.flush()
        yield


class OutputFolder:
    """The output folder of one benchmark. Its benchmark.json records which benchmark it holds
    (`identity`: dataset, foundation sha256, schedule, held-out cases) and the digest of every
    report file written, so that another benchmark is refused there and a file the benchmark did
    not write, or one changed since, is kept as a backup before it is replaced."""

    def __init__(self, path: str, identity: dict):
        self.path, self.identity = path, identity
        self.log = os.path.join(path, "log.txt")
        self.manifest_path = os.path.join(path, MANIFEST)
        self.created = not os.path.exists(path)
        self.claimed = False  # benchmark.json written by this call
        self.backups = []  # (file, its backup) moved aside by this call's claim()
        self.manifest = self._read()
        self._writing = 0  # depth of writing() in this process
        # runs of a benchmark from before benchmark.json existed: nothing says which benchmark they are of
        self.legacy = self.manifest is None and os.path.isfile(os.path.join(path, "runs.jsonl"))
        if self.manifest is not None:
            self._refuse_another(self.manifest["identity"])

    def _read(self) -> Optional[dict]:
        if not os.path.isfile(self.manifest_path):
            return None
        try:
            with open(self.manifest_path) as f:
                manifest = json.load(f)
            if isinstance(manifest["identity"], dict) and isinstance(manifest["written"], dict):
                return manifest
        except (ValueError, KeyError, TypeError):
            pass
        raise InputError(f"{self.manifest_path} was not written by `nnunet-fseft benchmark`; pass another -o, or "
                         f"move that file away.")

    def _refuse_another(self, theirs: dict) -> None:
        names = {"dataset": "dataset", "foundation_sha256": "foundation", "schedule": "schedule",
                 "held_out": "set of held-out cases"}
        differ = [k for k in names if theirs.get(k) != self.identity[k]]
        if differ:
            what = ", ".join(f"another {names[k]} ({_short(theirs.get(k))}, not {_short(self.identity[k])})"
                             for k in differ)
            raise InputError(f"{self.path} holds a benchmark of {what}; pass another -o for this one, or remove "
                             f"{self.path}.")

    @contextlib.contextmanager
    def running(self):
        """Held by the one benchmark call that runs (or submits) this folder's runs."""
        os.makedirs(self.path, exist_ok=True)
        try:
            with file_lock(os.path.join(self.path, RUNNING_LOCK), blocking=False):
                yield
        except Busy as e:
            raise InputError(f"Another `nnunet-fseft benchmark` is running in {self.path} ({e}); wait for it to "
                             f"end, or run this one with --report-only for a report of the runs finished so far.")

    @contextlib.contextmanager
    def writing(self):
        """Held while runs.jsonl, benchmark.json or a report file is written (re-entrant in this process).
        benchmark.json is read again first: a --report-only call beside this one may have written."""
        if self._writing:
            self._writing += 1
            try:
                yield
            finally:
                self._writing -= 1
            return
        with file_lock(os.path.join(self.path, WRITE_LOCK)):
            self.manifest = self._read() or self.manifest
            self._writing = 1
            try:
                yield
            finally:
                self._writing = 0

    def claim(self) -> List[str]:
        """Creates the folder for this benchmark; in a folder of no benchmark, whatever has the name of
        one of the benchmark's files is moved to a backup first. Returns the backups."""
        os.makedirs(self.path, exist_ok=True)
        if self.manifest is not None:
            return []
        for name in OUTPUTS:
            backup = keep_existing(os.path.join(self.path, name))
            if backup:
                self.backups.append((os.path.join(self.path, name), backup))
        self.manifest = {"identity": self.identity, "written": {}}
        self.save()
        self.claimed = True
        return [b for _, b in self.backups]

    def replace(self, name: str) -> str:
        """The path of a report file about to be written; one there that the benchmark did not write
        (or that changed since) is kept as a backup first."""
        path = os.path.join(self.path, name)
        if os.path.exists(path) and _digest(path) != self.manifest["written"].get(name):
            keep_existing(path)
        return path

    def wrote(self, name: str) -> None:
        with self.writing():
            self.manifest["written"][name] = _digest(os.path.join(self.path, name))
            self.save()

    def save(self) -> None:
        with self.writing():  # whole or not at all: a reader beside us never sees half of it
            with open(self.manifest_path + ".tmp", "w") as f:
                json.dump(self.manifest, f, indent=1)
            os.replace(self.manifest_path + ".tmp", self.manifest_path)

    def tidy(self) -> List[str]:
        """After the benchmark, also one that stopped early (a refusal in adopt, say): no empty log is
        left, and what this call claimed but never used (no run, no log) is undone: its files are
        removed, the ones it moved to backups are moved back, the folder is removed if it made it.
        Returns the files moved back."""
        restored = []
        if os.path.isfile(self.log) and os.path.getsize(self.log) == 0:
            os.remove(self.log)
        ran = [n for n in ("log.txt", "runs.jsonl", "runs") if os.path.exists(os.path.join(self.path, n))]
        if self.claimed and not ran:  # (runs/: jobs were submitted, and may be queued still)
            os.remove(self.manifest_path)
            for lock in (RUNNING_LOCK, WRITE_LOCK):  # a lock held on a removed file excludes nobody new
                if os.path.isfile(os.path.join(self.path, lock)):
                    os.remove(os.path.join(self.path, lock))
            if os.path.isdir(os.path.join(self.path, "held_out")):
                shutil.rmtree(os.path.join(self.path, "held_out"))  # symbolic links: the images stay
            for original, backup in self.backups:
                if not os.path.exists(original):
                    shutil.move(backup, original)
                    restored.append(original)
            if self.created and not os.listdir(self.path):
                os.rmdir(self.path)
        return restored


def _digest(path: str) -> Optional[str]:
    from nnunet_fseft.foundation.record import sha256
    return sha256(path) if os.path.isfile(path) else None


def _short(value) -> str:
    if isinstance(value, list):
        return f"{len(value)} cases: {', '.join(value[:3])}{', ...' if len(value) > 3 else ''}"
    if isinstance(value, dict):  # the schedule
        return ", ".join(f"{k} {v if v is not None else 'of the trainer'}" for k, v in value.items())
    text = str(value)
    return text[:12] + "..." if len(text) == 64 else text  # a sha256


def link_held_out(images: dict, cases: list, folder: str) -> str:
    """`folder` holding exactly the images of the held-out `cases` (symbolic links; `images`: case ->
    its image files): what nnUNetv2_predict segments and the scores are computed on, and the query
    volumes of transductive runs."""
    wanted = {os.path.basename(f): os.path.realpath(f) for c in cases for f in images[c]}
    if os.path.isdir(folder):
        have = {n: os.path.realpath(os.path.join(folder, n)) for n in os.listdir(folder)}
        if have == wanted:
            return folder
        keep_existing(folder)
    os.makedirs(folder)
    for name, target in sorted(wanted.items()):
        os.symlink(target, os.path.join(folder, name))
    return folder
