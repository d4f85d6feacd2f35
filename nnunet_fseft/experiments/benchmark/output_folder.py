"""The benchmark's output folder: benchmark.json (which benchmark it holds, what it wrote), backups
of files it did not write, and the held-out images it links."""
import json
import os
import shutil
from typing import List, Optional

from nnunet_fseft.datasets.safe_write import keep_existing
from nnunet_fseft.errors import InputError


MANIFEST = "benchmark.json"
FIGURES = ("dice_vs_k.png", "dice_vs_parameters.png", "cost.png", "dice_boxplot.png", "dice_boxplot_per_label.png")
# Everything a benchmark writes in its output folder
OUTPUTS = ("runs.jsonl", "log.txt", "zero_shot.json", "results.csv", "per_case.csv", "results.json", "report.md",
           *FIGURES, "held_out", "predictions")


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
        self.manifest["written"][name] = _digest(os.path.join(self.path, name))

    def save(self) -> None:
        with open(self.manifest_path, "w") as f:
            json.dump(self.manifest, f, indent=1)

    def tidy(self) -> List[str]:
        """After the benchmark, also one that stopped early (a refusal in adopt, say): no empty log is
        left, and what this call claimed but never used (no run, no log) is undone: its files are
        removed, the ones it moved to backups are moved back, the folder is removed if it made it.
        Returns the files moved back."""
        restored = []
        if os.path.isfile(self.log) and os.path.getsize(self.log) == 0:
            os.remove(self.log)
        if self.claimed and not os.path.exists(self.log) and not os.path.exists(os.path.join(self.path, "runs.jsonl")):
            os.remove(self.manifest_path)
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
