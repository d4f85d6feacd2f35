"""`nnunet-fseft benchmark`: the FSEFT protocol on a user's own data, through nnU-Net's commands.

Every method x K x repeat is one fold of one splits_final.json: fold i * repeats + r trains on
K_i support cases drawn with seed r (nested: the K = 1 case is among the K = 5 ones) and every
fold validates on the same held-out cases. So all runs live side by side in nnU-Net's results
layout, one splits file is written (the user's is kept as a backup) and nothing is retrained
when the benchmark is run again: a run is done when its row is in runs.jsonl. A run whose command
fails is recorded there as failed, with the reason, and the protocol goes on with the others; the
report lists it, and the next benchmark run retries it.

The output folder holds one benchmark: its benchmark.json names the dataset, the foundation
(sha256), the schedule and the held-out cases, and a benchmark of anything else is refused
there. Files in it that the benchmark did not write are kept as backups, never replaced.
"""
import csv
import json
import os
import platform
import shutil
import time
from typing import List, Optional

import numpy as np

from nnunet_fseft.errors import InputError
from nnunet_fseft.runner import CommandFailed, quiet, run
from nnunet_fseft.safety import backup_name, keep_existing

PLANS = "FSEFTPlans"
COLUMNS = ["method", "K", "repeat", "fold", "label", "dice", "sensitivity", "specificity", "wall_s",
           "peak_gpu_mib", "peak_host_mib", "trainable", "total", "adapter_bytes", "device", "machine", "versions"]
MANIFEST = "benchmark.json"
FIGURES = ("dice_vs_k.png", "dice_vs_parameters.png", "cost.png")
# Everything a benchmark writes in its output folder
OUTPUTS = ("runs.jsonl", "log.txt", "zero_shot.json", "results.csv", "results.json", "report.md", *FIGURES,
           "held_out", "predictions")
# The Start row's name in reports: the untrained network every method starts from
STEP0 = "Start (step 0 of every method)"
# A zero-shot Dice below this on a label the foundation names: it names the organ but never learned it
# (a short foundation training can miss one), so that label is a novel organ in all but name.
UNLEARNED_DICE = 0.05
# The schedule overrides every run gets (unset: each trainer's own schedule)
SCHEDULE = {"epochs": "nnUNet_fseft_epochs", "iterations_per_epoch": "nnUNet_fseft_iters_per_epoch"}


def machine() -> dict:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "gpu": gpu}


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("torch", "nnunetv2", "nnunet-fseft", "dynamic-network-architectures")}


def folds(ks: List[int], repeats: int, cases: list, test: int, seed: int = 0) -> list:
    from nnunet_fseft.kshot import kshot_splits
    return [s for k in ks for s in kshot_splits(cases, k, repeats, seed, test)]


def run_order(ks: List[int], repeats: int, methods: list) -> list:
    """(method, K, repeat, fold) of every run, K in the order asked (`-k 5 1` runs K = 5 first);
    fold numbers follow the K values sorted, as `folds` writes them, whatever that order."""
    by_size = sorted(set(ks))
    return [(m, k, r, by_size.index(k) * repeats + r) for k in dict.fromkeys(ks) for r in range(repeats)
            for m in methods]


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
    from nnunet_fseft.foundation import sha256
    return sha256(path) if os.path.isfile(path) else None


def _short(value) -> str:
    if isinstance(value, list):
        return f"{len(value)} cases: {', '.join(value[:3])}{', ...' if len(value) > 3 else ''}"
    if isinstance(value, dict):  # the schedule
        return ", ".join(f"{k} {v if v is not None else 'of the trainer'}" for k, v in value.items())
    text = str(value)
    return text[:12] + "..." if len(text) == 64 else text  # a sha256


def schedule() -> dict:
    """The schedule every run of this benchmark gets: the overrides set, None where the trainers' own."""
    return {key: os.environ.get(var) or None for key, var in SCHEDULE.items()}


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


def run_env(trainer_cls, device: str, held_out: str) -> dict:
    """What nnUNetv2_train and nnUNetv2_predict get for one run, on top of this environment: no
    compilation unless asked, single-process augmentation on CPU unless asked, and for a
    transductive method the held-out scans as its query volumes (nnUNet_fseft_query), i.e. the
    scans it is scored on, as the FSEFT paper adapts."""
    from nnunet_fseft.transductive import QUERY_ENV
    env = {"nnUNet_compile": os.environ.get("nnUNet_compile", "f")}
    if device == "cpu":
        env["nnUNet_n_proc_DA"] = os.environ.get("nnUNet_n_proc_DA", "0")
    if getattr(trainer_cls, "transductive", False):
        env[QUERY_ENV] = os.path.abspath(held_out)
    return env


def trainer_classes() -> dict:
    """What a benchmark can run, by trainer name: every method, and `Start`, the network they all
    start from (no training: each method's step-0 row)."""
    from nnunet_fseft.trainers import METHODS, nnUNetTrainerFSEFT_Start
    return {**METHODS, "nnUNetTrainerFSEFT_Start": nnUNetTrainerFSEFT_Start}


def method_trainers(methods: List[str]) -> dict:
    """Method name -> its trainer class: one of ours by its name without nnUNetTrainerFSEFT_, or a
    subclass of ours by its full class name, as nnU-Net finds it (a user's variant in a folder of
    nnUNet_extTrainer, say with other hyper-parameters: benchmarks/lr_sweep.py runs those)."""
    from nnunet_fseft.foundation import find_trainer
    from nnunet_fseft.trainers import nnUNetTrainerFSEFT
    ours = trainer_classes()
    found = {}
    for m in methods:
        cls = ours.get(f"nnUNetTrainerFSEFT_{m}")
        if cls is None:
            try:
                cls = find_trainer(m)
            except InputError:
                cls = None
        if cls is None or not issubclass(cls, nnUNetTrainerFSEFT):
            raise InputError(f"Unknown method '{m}'; choose from: "
                             f"{', '.join(t[len('nnUNetTrainerFSEFT_'):] for t in ours)}, or give the full class name "
                             f"of a subclass of nnUNetTrainerFSEFT that nnU-Net finds (nnUNet_extTrainer).")
        found[m] = cls
    return found


def benchmark(foundation: str, dataset: str, ks: List[int], repeats: int, methods: List[str], test: int,
              out: str, fold: str = "all", device: str = "cpu", base_organs: bool = False) -> dict:
    """Trains, predicts and scores every run not done yet; writes results.csv, results.json, report.md
    and figures in OUT. The schedule is the trainers' own, or nnUNet_fseft_epochs / _iters_per_epoch.
    Every check (methods, device, dataset, K, foundation, the folder OUT) comes before any work.
    `base_organs`: the task is to adapt organs the foundation segments, so a label it does not
    segment zero-shot (or knows not at all) stops the benchmark before any training, not only a
    warning in the report."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from nnunet_fseft.adopt import foundation_checkpoint
    from nnunet_fseft.dataset_json import read_dataset_json
    from nnunet_fseft.foundation import sha256
    from nnunet_fseft.safety import dataset_name, require_env

    trainers = method_trainers(methods)
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError("--device cuda was given but torch sees no GPU; use --device cpu.")
    name = dataset_name(dataset)
    require_env("nnUNet_preprocessed")
    require_env("nnUNet_results")
    raw = os.path.join(require_env("nnUNet_raw"), name)
    images = {c: v["images"] for c, v in get_filenames_of_train_images_and_targets(
        raw, read_dataset_json(os.path.join(raw, "dataset.json"))).items()}
    splits = folds(sorted(set(ks)), repeats, sorted(images), test)  # checks K + test <= cases first
    checkpoint = foundation_checkpoint(foundation, fold, "checkpoint_final.pth")
    identity = {"dataset": name, "foundation_sha256": sha256(checkpoint), "schedule": schedule(),
                "held_out": splits[0]["val"]}
    folder = OutputFolder(out, identity)  # refuses another benchmark's folder
    backups = folder.claim()
    if folder.legacy:
        print(f"{out} was written by an older nnunet-fseft (it has no {MANIFEST}, so nothing says which benchmark "
              f"its runs are of): its runs are kept in {dict(folder.backups)[os.path.join(out, 'runs.jsonl')]} "
              f"and are retrained (their fold folders kept as fold_N.bak-*), its other files kept as backups too")
    else:
        for backup in backups:
            print(f"Kept {os.path.basename(backup).split('.bak-')[0]} (not written by a benchmark) as {backup}")
    try:
        return _run_all(folder, foundation, fold, name, raw, images, ks, repeats, trainers, splits, device,
                        base_organs)
    finally:
        restored = folder.tidy()
        if restored:
            print(f"Nothing ran, so {', '.join(os.path.basename(f) for f in restored)} moved back from the backups")


def _run_all(folder: OutputFolder, foundation: str, fold: str, name: str, raw: str, images: dict, ks: list,
             repeats: int, trainers: dict, splits: list, device: str, base_organs: bool) -> dict:
    from nnunet_fseft.adopt import adopt
    from nnunet_fseft.costs import method_costs
    from nnunet_fseft.dataset_json import read_json
    from nnunet_fseft.foundation import PLANS_KEY
    from nnunet_fseft.plans_io import load_plans
    from nnunet_fseft.safety import save_json_kept

    preprocessed, results_root = os.environ["nnUNet_preprocessed"], os.environ["nnUNet_results"]
    plans_file = os.path.join(preprocessed, name, PLANS + ".json")
    recorded = {}
    if os.path.isfile(plans_file):
        recorded = read_json(plans_file, "remove it, and the benchmark adopts the foundation again").get(PLANS_KEY, {})
    if recorded.get("sha256") != folder.identity["foundation_sha256"]:
        print(f"adopting {foundation} for {name}", flush=True)
        with quiet(folder.log):
            adopt(foundation, name, fold)
    save_json_kept(splits, os.path.join(preprocessed, name, "splits_final.json"))

    plans, dataset_json = load_plans(name, PLANS)
    configuration = plans[PLANS_KEY]["configuration"]
    costs = {r["method"]: r for r in method_costs(plans, dataset_json, configuration, list(trainers.values()))}
    held_out = link_held_out(images, splits[0]["val"], os.path.join(folder.path, "held_out"))
    labels = {v: n for n, v in dataset_json["labels"].items() if isinstance(v, int) and v > 0}

    def one_run(m: str, k: int, r: int, f: int) -> dict:
        """Trains, predicts and scores one run; a failed command raises CommandFailed."""
        trainer = trainers[m].__name__
        env = run_env(trainers[m], device, held_out)
        fold_dir = os.path.join(results_root, name, f"{trainer}__{PLANS}__{configuration}", f"fold_{f}")
        if os.path.isdir(fold_dir):  # not a finished run of ours: keep it rather than overwrite it
            os.rename(fold_dir, backup_name(fold_dir))
        t0 = time.time()
        peak_host = run(["nnUNetv2_train", name, configuration, str(f), "-p", PLANS, "-tr", trainer,
                         "-device", device], log=folder.log, env=env).peak_host_mib
        wall = time.time() - t0
        train_log = open(sorted(_glob(fold_dir, "training_log_"))[-1]).read()
        pred = os.path.join(folder.path, "predictions", m, f"K{k}", f"repeat{r}")
        run(["nnUNetv2_predict", "-i", held_out, "-o", pred, "-d", name, "-c", configuration, "-f", str(f),
             "-p", PLANS, "-tr", trainer, "-device", device, "--disable_tta"], log=folder.log, env=env)
        metrics = _evaluate(os.path.join(raw, "labelsTr"), pred, plans, dataset_json)
        cost = costs.get(trainer, {})
        return {"wall_s": round(wall, 1), "peak_gpu_mib": _peak_gpu(train_log), "peak_host_mib": round(peak_host, 1),
                "trainable": cost.get("trainable"), "total": cost.get("total"), "adapter_bytes": cost.get("file_bytes"),
                "per_label": {labels[int(l)]: v for l, v in metrics.items()}}

    zero = zero_shot_scores(folder, name, plans, dataset_json, device)  # first: it can void a base-organ task
    unlearned = unlearned_labels(zero)
    if base_organs and (not zero or unlearned):
        why = f"the foundation {unlearned}" if zero else "the foundation knows none of its labels"
        raise InputError(f"{name} is no base-organ task for this foundation: {why}; train the foundation "
                         f"longer or give another one (and a new output folder), or benchmark another organ.")
    if unlearned:
        print(f"Warning: the foundation {unlearned}: its rows measure a novel organ, not the adaptation of a "
              f"known one", flush=True)
    todo = run_order(ks, repeats, list(trainers))
    runs = run_pending(folder, todo, splits, device, one_run)
    result = write_reports(folder, runs, zero, sorted(set(ks)), list(trainers))
    if result["failed"]:
        print(f"{len(result['failed'])} of {len(todo)} runs failed (listed in {os.path.join(folder.path, 'report.md')},"
              f" all their output in {folder.log}); run the benchmark again to retry them", flush=True)
    return result


def run_pending(folder: OutputFolder, todo: list, splits: list, device: str, one_run) -> list:
    """Runs each of `todo` ((method, K, repeat, fold) each) that runs.jsonl has no finished row of:
    `one_run(method, K, repeat, fold)` gives its measurements, or raises CommandFailed, which is
    recorded as a failed run (with the last line of its error as the reason) before the next run
    starts; one failed earlier is retried. Returns the latest row of every run in `todo`, after the
    finished runs of the folder that `todo` does not ask for (another K, say)."""
    done_path = os.path.join(folder.path, "runs.jsonl")
    latest = {}  # appended rows: a retried run's row comes after its failed one
    if os.path.isfile(done_path):
        for line in open(done_path):
            row = json.loads(line)
            latest[(row["method"], row["K"], row["repeat"], tuple(row["support"]))] = row
    asked = {(m, k, r, tuple(splits[f]["train"])) for m, k, r, f in todo}
    runs = [row for key, row in latest.items() if key not in asked and "failed" not in row]
    for i, (m, k, r, f) in enumerate(todo):
        support = splits[f]["train"]
        earlier = latest.get((m, k, r, tuple(support)))
        step = f"[{i + 1}/{len(todo)}] {m} K={k} repeat {r}"
        if earlier is not None and "failed" not in earlier:
            print(f"{step}: done earlier, skipped", flush=True)
            runs.append(earlier)
            continue
        retry = f", failed earlier ({earlier['failed']}): retried" if earlier is not None else ""
        print(f"{step} (fold {f}){retry}", flush=True)
        row = {"method": m, "K": k, "repeat": r, "fold": f, "support": support}
        try:
            row.update(one_run(m, k, r, f))
        except CommandFailed as e:
            row["failed"] = e.reason
            print(f"{step} failed: {row['failed']}", flush=True)
        row.update({"device": device, "machine": machine(), "versions": versions()})
        with open(done_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        runs.append(row)
    return runs


def _glob(folder, prefix):
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(prefix)]


def _peak_gpu(train_log: str):
    import re
    m = re.findall(r"peak GPU memory ([\d.]+) MiB", train_log)
    return float(m[-1]) if m else None


def _evaluate(reference: str, pred: str, plans: dict, dataset_json: dict) -> dict:
    """nnU-Net's evaluator on the predicted held-out cases: per label Dice, sensitivity, specificity."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.utilities.label_handling.label_handling import get_labelmanager_class_from_plans
    rw = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
    lm = get_labelmanager_class_from_plans(plans)(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    summary = compute_metrics_on_folder(reference, pred, os.path.join(pred, "summary.json"), rw,
                                        dataset_json["file_ending"], labels, lm.ignore_label, chill=True,
                                        num_processes=2)
    out = {}
    for label, m in summary["mean"].items():
        out[label] = {"dice": float(m["Dice"]), "sensitivity": float(m["TP"] / max(m["TP"] + m["FN"], 1e-8)),
                      "specificity": float(m["TN"] / max(m["TN"] + m["FP"], 1e-8))}
    return out


def zero_shot_scores(folder: OutputFolder, name: str, plans: dict, dataset_json: dict, device: str) -> Optional[dict]:
    """The foundation alone on the same held-out cases, for the labels it knows (zero_shot.json);
    None, and no zero-shot row, when it knows none of them. Any other error is raised, and nothing
    is written: the next benchmark run computes it again."""
    from nnunet_fseft.dataset_json import read_json
    from nnunet_fseft.foundation import recorded_foundation
    from nnunet_fseft.labels import match_labels
    from nnunet_fseft.zeroshot import zeroshot
    foundation_labels = recorded_foundation(plans)["labels"]
    if any(not isinstance(v, int) for v in foundation_labels.values()):
        print("zero-shot: none (the foundation predicts regions, which cannot be renamed to the target's labels)")
        return None
    if not match_labels(dataset_json["labels"], foundation_labels):
        print(f"zero-shot: none (no label of {name} is a class the foundation knows)")
        return None
    path = os.path.join(folder.path, "zero_shot.json")
    if os.path.isfile(path):
        dice = read_json(path, "remove it, and the benchmark computes it again")
        if isinstance(dice, dict):  # (older versions wrote null after any error)
            return dice
    with quiet(folder.log):
        dice, _ = zeroshot(name, PLANS, 0, os.path.join(folder.path, "predictions", "zero_shot"), device, False)
    if device == "cuda":  # it runs before the trainings now: leave them the GPU memory it cached
        import torch
        torch.cuda.empty_cache()
    with open(folder.replace("zero_shot.json"), "w") as f:
        json.dump(dice, f)
    folder.wrote("zero_shot.json")
    return dice


def unlearned_labels(zero: Optional[dict]) -> str:
    """'names X but does not segment it (zero-shot Dice 0.000, below 0.05)' for the labels the
    foundation knows by name whose zero-shot Dice is below UNLEARNED_DICE; '' when there are none."""
    low = {label: d for label, d in (zero or {}).items() if d < UNLEARNED_DICE}
    if not low:
        return ""
    return (f"names {', '.join(low)} but does not segment {'it' if len(low) == 1 else 'them'} "
            f"(zero-shot Dice {', '.join(f'{d:.3f}' for d in low.values())}, below {UNLEARNED_DICE})")


def write_reports(folder: OutputFolder, runs: list, zero: Optional[dict], ks: list, methods: list) -> dict:
    """results.csv, results.json, report.md and the figures in the benchmark's folder; `runs` may hold
    failed runs (a `failed` reason instead of measurements): they are listed, not scored."""
    failed = [r for r in runs if "failed" in r]
    runs = [r for r in runs if "failed" not in r]
    rows = []
    for one in runs:
        for label, m in one["per_label"].items():
            rows.append({**{c: one.get(c) for c in COLUMNS}, "label": label, **m,
                         "machine": json.dumps(one["machine"]), "versions": json.dumps(one["versions"])})
    with open(folder.replace("results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    folder.wrote("results.csv")
    summary = {}
    for m in methods:
        for k in ks:
            rs = [r for r in runs if r["method"] == m and r["K"] == k]
            if not rs:
                continue
            mean_dice = [np.mean([v["dice"] for v in r["per_label"].values()]) for r in rs]
            per_label = {label: {metric: (float(np.mean([r["per_label"][label][metric] for r in rs])),
                                          float(np.std([r["per_label"][label][metric] for r in rs])))
                                 for metric in ("dice", "sensitivity", "specificity")} for label in rs[0]["per_label"]}
            summary[f"{m}|K={k}"] = {"method": m, "K": k, "repeats": len(rs), "dice_mean": float(np.mean(mean_dice)),
                                    "dice_sd": float(np.std(mean_dice)), "per_label": per_label,
                                    "trainable": rs[0]["trainable"], "adapter_bytes": rs[0]["adapter_bytes"],
                                    "wall_s": float(np.mean([r["wall_s"] for r in rs])),
                                    "peak_gpu_mib": rs[0]["peak_gpu_mib"], "peak_host_mib": float(np.mean([r["peak_host_mib"] for r in rs]))}
    result = {"benchmark": folder.identity, "runs": runs, "failed": failed, "summary": summary, "zero_shot": zero}
    with open(folder.replace("results.json"), "w") as f:
        json.dump(result, f, indent=1)
    folder.wrote("results.json")
    figures = _figures(folder, summary, ks, methods, zero)
    one = (runs or failed or [None])[0]
    lines = ["# FSEFT benchmark", "", f"Machine: {json.dumps(one['machine']) if one else '-'}; "
             f"versions: {json.dumps(one['versions']) if one else '-'}.", "",
             "| method | " + " | ".join(f"K={k} Dice (mean ± sd)" for k in ks) + " | trainable | adapter file | train s | peak GPU MiB | peak host MiB |",
             "|---|" + "---|" * (len(ks) + 5)]
    if zero:
        lines.append("| zero-shot | " + " | ".join(f"{np.mean(list(zero.values())):.3f}" for _ in ks) + " | 0 | 0 | 0 | - | - |")
    for m in methods:
        s = [summary.get(f"{m}|K={k}") for k in ks]
        lost = [sum(r["method"] == m and r["K"] == k for r in failed) for k in ks]
        cells = [(_mean_sd(x["dice_mean"], x["dice_sd"], x["repeats"]) + (f" ({n} failed)" if n else "")) if x
                 else "failed" if n else "-" for x, n in zip(s, lost)]
        first = next((x for x in s if x), None)
        if first is None and not any(lost):
            continue
        cost = (f"{first['trainable']:,} | {first['adapter_bytes']:,} B | {first['wall_s']:.0f} | "
                f"{first['peak_gpu_mib'] if first['peak_gpu_mib'] is not None else '-'} | {first['peak_host_mib']:.0f}"
                if first else "- | - | - | - | -")
        lines.append(f"| {STEP0 if m == 'Start' else m} | " + " | ".join(cells) + f" | {cost} |")
    unlearned = unlearned_labels(zero)
    if unlearned:
        lines += ["", f"The foundation {unlearned}: for it this is a novel-organ task, whatever the label's name."]
    if failed:
        lines += ["", "Failed runs (run the benchmark again to retry them; their output is in log.txt):", ""]
        lines += [f"- {r['method']} K={r['K']} repeat {r['repeat']} (fold {r['fold']}): {r['failed']}" for r in failed]
    lines += ["", "Per label (Dice / sensitivity / specificity, mean over repeats):", "",
              "| method | K | label | Dice | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for x in summary.values():
        for label, v in x["per_label"].items():
            lines.append(f"| {x['method']} | {x['K']} | {label} | {_mean_sd(*v['dice'], x['repeats'])} | "
                         f"{v['sensitivity'][0]:.3f} | {v['specificity'][0]:.3f} |")
    lines += [""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in figures]
    with open(folder.replace("report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    folder.wrote("report.md")
    folder.save()
    return result


def _mean_sd(mean: float, sd: float, repeats: int) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if repeats > 1 else f"{mean:.3f} (1 run)"


def _figures(folder: OutputFolder, summary: dict, ks: list, methods: list, zero: Optional[dict] = None) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for m in methods:
        pts = [(k, summary[f"{m}|K={k}"]) for k in ks if f"{m}|K={k}" in summary]
        ax.errorbar([p[0] for p in pts], [p[1]["dice_mean"] for p in pts], [p[1]["dice_sd"] for p in pts],
                    marker="o", capsize=3, label=m)
    if zero:  # the foundation alone: what every method must not fall below
        ax.axhline(float(np.mean(list(zero.values()))), color="k", linestyle="--", label="zero-shot")
    ax.set(xlabel="K (support scans)", ylabel="Dice", xticks=ks)
    ax.legend(fontsize=7)
    names.append(_save(fig, folder, "dice_vs_k.png"))
    fig, ax = plt.subplots(figsize=(5, 4))
    for x in summary.values():
        if x["trainable"]:
            ax.scatter(x["trainable"], x["dice_mean"], label=f"{x['method']} K={x['K']}")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="Dice")
    ax.legend(fontsize=6)
    names.append(_save(fig, folder, "dice_vs_parameters.png"))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 4))
    per_method = {m: [x for x in summary.values() if x["method"] == m] for m in methods}
    shown = [m for m in methods if per_method[m]]
    a1.bar(shown, [np.mean([x["wall_s"] for x in per_method[m]]) for m in shown])
    a1.set(ylabel="training wall time (s)")
    gpu = [per_method[m][0]["peak_gpu_mib"] for m in shown]
    a2.bar(shown, [g if g is not None else per_method[m][0]["peak_host_mib"] for g, m in zip(gpu, shown)])
    a2.set(ylabel="peak GPU memory (MiB)" if all(g is not None for g in gpu) else "peak host memory (MiB)")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=45, labelsize=7)
    names.append(_save(fig, folder, "cost.png"))
    return names


def _save(fig, folder: OutputFolder, name: str) -> str:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(folder.replace(name), dpi=100)
    plt.close(fig)
    folder.wrote(name)
    return name
