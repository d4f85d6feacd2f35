"""`nnunet-fseft benchmark`: the FSEFT protocol on a user's own data, through nnU-Net's commands.

Every method x K x repeat is one fold of one splits_final.json: fold i * repeats + r trains on
K_i support cases drawn with seed r (nested: the K = 1 case is among the K = 5 ones) and every
fold validates on the same held-out cases. So all runs live side by side in nnU-Net's results
layout, one splits file is written (the user's is kept as a backup) and nothing is retrained
when the benchmark is run again: a run is done when its row is in runs.jsonl. A run whose command
fails is recorded there as failed, with the reason, and the protocol goes on with the others; the
report lists it, and the next benchmark run retries it.

Every run is scored by nnU-Net's evaluator on the held-out cases, per label, or per region for a
dataset of regions (BraTS's "whole tumor", "tumor core", "enhancing tumor"), each by its name in
dataset.json (`label_name`): the mean over cases of Dice, sensitivity and specificity in the run's
row of runs.jsonl ("per_label") and in results.csv, and each case's own in the row's "per_case"
({case: {label: {dice, sensitivity, specificity}}}, null where undefined: no voxel of it in the
reference, nor in the prediction for Dice) and in a second CSV, per_case.csv (one row per run per
case per label; results.csv keeps one row per run per label).

K is a number or "all", every case outside the held-out set (`parse_k`).

The output folder holds one benchmark: its benchmark.json names the dataset, the foundation
(sha256), the schedule and the held-out cases, and a benchmark of anything else is refused
there. Files in it that the benchmark did not write are kept as backups, never replaced.
"""
import json
import os
import time
from typing import List, Optional, Union

import numpy as np

from nnunet_fseft.datasets.dataset_json import has_regions
from nnunet_fseft.datasets.kshot import identical_fold_warnings, parse_k
from nnunet_fseft.datasets.safe_write import backup_name
from nnunet_fseft.environment import schedule_overrides
from nnunet_fseft.errors import InputError
from nnunet_fseft.experiments.benchmark.output_folder import MANIFEST, OutputFolder, link_held_out
from nnunet_fseft.experiments.benchmark.protocol import (folds, machine, method_trainers, run_env, run_order,
                                                         unlearned_labels, versions)
from nnunet_fseft.experiments.benchmark.report import write_reports
from nnunet_fseft.plans import PLANS_NAME
from nnunet_fseft.runner import CommandFailed, quiet, run


def benchmark(foundation: str, dataset: str, ks: List[Union[int, str]], repeats: int, methods: List[str], test: int,
              out: str, fold: str = "all", device: str = "cpu", base_organs: bool = False,
              executor=None, report_only: bool = False, extend: bool = False, reference: Optional[str] = None) -> dict:
    """Trains, predicts and scores every run not done yet; writes results.csv, results.json, report.md
    and figures in OUT. The schedule is the trainers' own, or nnUNet_fseft_epochs / _iters_per_epoch.
    Every check (methods, device, dataset, K, foundation, the folder OUT) comes before any work.
    `base_organs`: the task is to adapt organs the foundation segments, so a label it does not
    segment zero-shot (or knows not at all) stops the benchmark before any training, not only a
    warning in the report. A K of "all" is every case outside the held-out set.
    `executor` (jobs.Executor): every run is a job of its own, locally or on SLURM (jobs.py), not a
    step of this process. `report_only`: nothing is trained; the report is written from the runs
    finished so far (also while another call is running the others).
    `extend`: the target extends its foundation (adopted with --keep-foundation-labels: its scans label
    only the new structures), so every run outputs the foundation's classes too and is scored on all of
    them against `reference`, a folder of the held-out cases' full label maps (also the zero-shot row's);
    the separate K-shot model to compare the new labels with is this benchmark on a dataset of the same
    scans labelled only for them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from nnunet_fseft.foundation.adopt import foundation_checkpoint
    from nnunet_fseft.datasets.dataset_json import read_dataset_json
    from nnunet_fseft.foundation.record import sha256
    from nnunet_fseft.datasets.dataset_json import dataset_name
    from nnunet_fseft.environment import require_env

    trainers = method_trainers(methods)
    if extend:
        # without the foundation's head and anchor (TargetOnly), or with a size prior (TI), an extending
        # target's runs would lose the foundation's classes or fail: refused before any work
        unfit = [m for m, t in trainers.items() if not t.from_foundation or getattr(t, "transductive", False)]
        if unfit:
            raise InputError(f"{', '.join(unfit)} cannot extend a foundation (random weights, or size priors that "
                             f"need every class labelled); leave them out of --methods with --keep-foundation-labels.")
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
    ks = [parse_k(k, len(images), test) for k in ks]
    splits = folds(sorted(set(ks)), repeats, sorted(images), test)  # checks K + test <= cases first
    reference = check_reference(reference, extend, splits[0]["val"], raw)
    checkpoint = foundation_checkpoint(foundation, fold, "checkpoint_final.pth")
    identity = {"dataset": name, "foundation_sha256": sha256(checkpoint), "schedule": schedule_overrides(),
                "held_out": splits[0]["val"]}
    # (only where set, so that the folders of earlier benchmarks stay theirs)
    if extend:
        identity["extends_foundation"] = True
    if reference != os.path.join(raw, "labelsTr"):
        identity["reference"] = reference
    folder = OutputFolder(out, identity)  # refuses another benchmark's folder
    if report_only:
        return _report_only(folder, name, raw, ks, repeats, trainers, splits, images, device)
    with folder.running():  # refuses a second call running in OUT
        return _claim_and_run(folder, foundation, fold, name, raw, images, ks, repeats, trainers, splits, device,
                              base_organs, executor, test, extend, reference)


def check_reference(reference: Optional[str], extend: bool, held_out: list, raw: str) -> str:
    """The folder the runs are scored against: `reference` (every held-out case's label map in it), or
    the dataset's labelsTr; an extending target's labelsTr holds only its new labels, so it needs one."""
    if reference is None:
        if extend:
            raise InputError("An extending target's scans label only its new structures, so scoring the "
                             "foundation's classes needs the held-out scans' full label maps; pass --reference FOLDER.")
        return os.path.join(raw, "labelsTr")
    from nnunet_fseft.datasets.dataset_json import read_dataset_json
    ending = read_dataset_json(os.path.join(raw, "dataset.json"))["file_ending"]
    missing = [c for c in held_out if not os.path.isfile(os.path.join(reference, c + ending))]
    if missing:
        raise InputError(f"--reference {reference} has no label map {missing[0]}{ending} (held-out case); give a "
                         f"folder with one per held-out case, named as in labelsTr.")
    return os.path.abspath(reference)


def _claim_and_run(folder: OutputFolder, foundation, fold, name, raw, images, ks, repeats, trainers, splits, device,
                   base_organs, executor, test, extend=False, reference=None) -> dict:
    out = folder.path
    backups = folder.claim()
    if folder.legacy:
        print(f"{out} was written by an older nnunet-fseft (it has no {MANIFEST}, so nothing says which benchmark "
              f"its runs are of): its runs are kept in {dict(folder.backups)[os.path.join(out, 'runs.jsonl')]} "
              f"and are retrained (their fold folders kept as fold_N.bak-*), its other files kept as backups too")
    else:
        for backup in backups:
            print(f"Kept {os.path.basename(backup).split('.bak-')[0]} (not written by a benchmark) as {backup}")
    for i, _ in enumerate(sorted(set(ks))):  # K = all (or close to it): repeats that train on the same cases
        for warning in identical_fold_warnings(splits[i * repeats:(i + 1) * repeats], len(images) - test):
            print(f"Warning: {warning}")
    try:
        return _run_all(folder, foundation, fold, name, raw, images, ks, repeats, trainers, splits, device,
                        base_organs, executor, extend, reference)
    finally:
        restored = folder.tidy()
        if restored:
            print(f"Nothing ran, so {', '.join(os.path.basename(f) for f in restored)} moved back from the backups")


def _report_only(folder: OutputFolder, name: str, raw: str, ks: list, repeats: int, trainers: dict, splits: list,
                 images: dict, device: str) -> dict:
    """The report of the runs finished so far in OUT (runs.jsonl, and the row.json of jobs that ended
    since their submitter stopped); trains and predicts nothing."""
    from nnunet_fseft.experiments.benchmark.jobs import collect_finished
    from nnunet_fseft.plans.load import load_plans
    if folder.manifest is None or not os.path.isfile(os.path.join(folder.path, RUNS)) and \
            not os.path.isdir(os.path.join(folder.path, "runs")):
        raise InputError(f"No run of this benchmark has finished in {folder.path} yet; run it without --report-only "
                         f"first.")
    plans, dataset_json = load_plans(name, PLANS_NAME)
    todo = run_order(ks, repeats, list(trainers))
    zero = zero_shot_scores(folder, name, plans, dataset_json, device, compute=False)
    with folder.writing():  # one consistent state: no row appended meanwhile
        collect_finished(folder)
        runs, earlier = others_and_earlier(folder, [(m, k, r, tuple(splits[f]["train"])) for m, k, r, f in todo])
        asked = [row for row in earlier if row is not None]
        missing = sum(row is None for row in earlier)
        result = write_reports(folder, runs + asked, zero, sorted(set(ks)), list(trainers),
                               pool=len(images) - len(splits[0]["val"]),
                               zero_scores=zero_shot_details(folder, dataset_json, zero),
                               regions=has_regions(dataset_json["labels"]))
    failed = sum("failed" in row for row in asked)
    print(f"Report of {len(asked) - failed} finished runs of {len(todo)} ({failed} failed, {missing} not finished "
          f"yet)", flush=True)
    return result


def _run_all(folder: OutputFolder, foundation: str, fold: str, name: str, raw: str, images: dict, ks: list,
             repeats: int, trainers: dict, splits: list, device: str, base_organs: bool, executor=None,
             extend: bool = False, reference: Optional[str] = None) -> dict:
    from nnunet_fseft.foundation.adopt import adopt
    from nnunet_fseft.sharing.costs import method_costs
    from nnunet_fseft.datasets.dataset_json import read_json
    from nnunet_fseft.foundation.record import PLANS_KEY
    from nnunet_fseft.plans.load import load_plans
    from nnunet_fseft.datasets.safe_write import save_json_kept

    preprocessed, results_root = os.environ["nnUNet_preprocessed"], os.environ["nnUNet_results"]
    plans_file = os.path.join(preprocessed, name, PLANS_NAME + ".json")
    recorded = {}
    if os.path.isfile(plans_file):
        recorded = read_json(plans_file, "remove it, and the benchmark adopts the foundation again").get(PLANS_KEY, {})
    if recorded.get("sha256") != folder.identity["foundation_sha256"] or bool(recorded.get("extends")) != extend:
        print(f"adopting {foundation} for {name}{' (extending it)' if extend else ''}", flush=True)
        with quiet(folder.log):
            adopt(foundation, name, fold, keep_foundation_labels=extend)
    save_json_kept(splits, os.path.join(preprocessed, name, "splits_final.json"))

    plans, dataset_json = load_plans(name, PLANS_NAME)
    configuration = plans[PLANS_KEY]["configuration"]
    costs = {r["method"]: r for r in method_costs(plans, dataset_json, configuration, list(trainers.values()))}
    held_out = link_held_out(images, splits[0]["val"], os.path.join(folder.path, "held_out"))

    def spec(m: str, k: int, r: int, f: int) -> dict:
        """Everything one run needs, as plain data: what a job on another machine is sent."""
        trainer = trainers[m].__name__
        return {"method": m, "K": k, "repeat": r, "fold": f, "support": splits[f]["train"], "dataset": name,
                "raw": raw, "configuration": configuration, "trainer": trainer, "device": device,
                "env": run_env(trainers[m], device, held_out), "held_out": held_out,
                "fold_dir": os.path.join(results_root, name, f"{trainer}__{PLANS_NAME}__{configuration}", f"fold_{f}"),
                "predictions": os.path.join(folder.path, "predictions", m, f"K{k}", f"repeat{r}"),
                "log": folder.log, "cost": costs.get(trainer, {}), "plans": plans, "dataset_json": dataset_json,
                "reference": reference}

    # first: it can void a base-organ task
    zero = zero_shot_scores(folder, name, plans, dataset_json, device, reference=reference)
    unlearned = unlearned_labels(zero)
    if base_organs and (not zero or unlearned):
        why = f"the foundation {unlearned}" if zero else "the foundation knows none of its labels"
        raise InputError(f"{name} is no base-organ task for this foundation: {why}; train the foundation "
                         f"longer or give another one (and a new output folder), or benchmark another organ.")
    if unlearned:
        print(f"Warning: the foundation {unlearned}: its rows measure a novel organ, not the adaptation of a "
              f"known one", flush=True)
    todo = run_order(ks, repeats, list(trainers))
    from nnunet_fseft.experiments.benchmark.jobs import collect_finished, run_as_jobs, runs_in_flight
    collect_finished(folder)  # runs that jobs of an earlier --executor call finished count as done
    if executor is None:
        busy = runs_in_flight(folder, [spec(*run) for run in todo])
        if busy:
            raise InputError(f"Jobs of an earlier --executor call are still running {', '.join(busy)} in "
                             f"{folder.path}; wait for them, or run the same command with that --executor to "
                             f"follow them.")
        runs = run_pending(folder, todo, splits, device, lambda m, k, r, f: train_and_score(spec(m, k, r, f)))
    else:
        runs = run_as_jobs(folder, [spec(*run) for run in todo], executor)
        if runs is None:  # submitted, not waited for
            return {"runs": [], "failed": [], "submitted": True}
    with folder.writing():
        result = write_reports(folder, runs, zero, sorted(set(ks)), list(trainers),
                               pool=len(images) - len(splits[0]["val"]),
                               zero_scores=zero_shot_details(folder, dataset_json, zero),
                               regions=has_regions(dataset_json["labels"]))
    if result["failed"]:
        print(f"{len(result['failed'])} of {len(todo)} runs failed (listed in {os.path.join(folder.path, 'report.md')},"
              f" all their output in {folder.log if executor is None else 'the log each names'}); run the benchmark "
              f"again to retry them", flush=True)
    return result


RUNS = "runs.jsonl"


def run_key(row: dict) -> tuple:
    """What makes a run the same run: method, K, repeat and its support cases."""
    return row["method"], row["K"], row["repeat"], tuple(row["support"])


def recorded_runs(folder: OutputFolder) -> dict:
    """The latest row of each run in runs.jsonl, by run_key (rows are appended: a retried run's row
    comes after its failed one)."""
    latest = {}
    path = os.path.join(folder.path, RUNS)
    with folder.writing():  # no half-written row: it is appended under the same lock
        if os.path.isfile(path):
            for line in open(path):
                row = json.loads(line)
                latest[run_key(row)] = row
    return latest


def record_run(folder: OutputFolder, row: dict) -> None:
    """Appends one run's row to runs.jsonl, under the folder's write lock."""
    with folder.writing():
        with open(os.path.join(folder.path, RUNS), "a") as fh:
            fh.write(json.dumps(row) + "\n")


def measured_row(m: str, k, r: int, f: int, support: list, device: str, measure) -> dict:
    """One run's row: what `measure()` returns, or, where it raises CommandFailed, the reason it failed
    (the last line of the command's error); then the device, machine and versions."""
    row = {"method": m, "K": k, "repeat": r, "fold": f, "support": support}
    try:
        row.update(measure())
    except CommandFailed as e:
        row["failed"] = e.reason
    row.update({"device": device, "machine": machine(), "versions": versions()})
    return row


def others_and_earlier(folder: OutputFolder, todo_keys: list) -> tuple:
    """(the finished runs of the folder that `todo_keys` does not ask for, another K say; the latest
    row of each asked run, or None)."""
    latest = recorded_runs(folder)
    asked = set(todo_keys)
    others = [row for key, row in latest.items() if key not in asked and "failed" not in row]
    return others, [latest.get(key) for key in todo_keys]


def run_pending(folder: OutputFolder, todo: list, splits: list, device: str, one_run) -> list:
    """Runs each of `todo` ((method, K, repeat, fold) each) that runs.jsonl has no finished row of, one
    after another in this process: `one_run(method, K, repeat, fold)` gives its measurements, or
    raises CommandFailed, which is recorded as a failed run (with the last line of its error as the
    reason) before the next run starts; one failed earlier is retried. Returns the latest row of
    every run in `todo`, after the finished runs of the folder that `todo` does not ask for."""
    runs, earlier_rows = others_and_earlier(folder, [(m, k, r, tuple(splits[f]["train"])) for m, k, r, f in todo])
    for i, ((m, k, r, f), earlier) in enumerate(zip(todo, earlier_rows)):
        step = f"[{i + 1}/{len(todo)}] {m} K={k} repeat {r}"
        if earlier is not None and "failed" not in earlier:
            print(f"{step}: done earlier, skipped", flush=True)
            runs.append(earlier)
            continue
        retry = f", failed earlier ({earlier['failed']}): retried" if earlier is not None else ""
        print(f"{step} (fold {f}){retry}", flush=True)
        row = measured_row(m, k, r, f, splits[f]["train"], device, lambda: one_run(m, k, r, f))
        if "failed" in row:
            print(f"{step} failed: {row['failed']}", flush=True)
        record_run(folder, row)
        runs.append(row)
    return runs


def train_and_score(spec: dict) -> dict:
    """Trains, predicts and scores one run (`spec`: what `_run_all` gives it, plain data), writing only
    the run's own folders: its fold of the trainer's nnU-Net folder and its predictions. Returns its
    measurements; a failed command raises CommandFailed."""
    fold_dir, log = spec["fold_dir"], spec["log"]
    if os.path.isdir(fold_dir):  # not a finished run of ours: keep it rather than overwrite it
        os.rename(fold_dir, backup_name(fold_dir))
    name, configuration, fold, trainer, device = (spec["dataset"], spec["configuration"], str(spec["fold"]),
                                                  spec["trainer"], spec["device"])
    t0 = time.time()
    peak_host = run(["nnUNetv2_train", name, configuration, fold, "-p", PLANS_NAME, "-tr", trainer,
                     "-device", device], log=log, env=spec["env"]).peak_host_mib
    wall = time.time() - t0
    train_log = open(sorted(_glob(fold_dir, "training_log_"))[-1]).read()
    pred = spec["predictions"]
    run(["nnUNetv2_predict", "-i", spec["held_out"], "-o", pred, "-d", name, "-c", configuration, "-f", fold,
         "-p", PLANS_NAME, "-tr", trainer, "-device", device, "--disable_tta"], log=log, env=spec["env"])
    reference = spec.get("reference") or os.path.join(spec["raw"], "labelsTr")  # (jobs submitted before it existed)
    per_label, per_case = evaluate(reference, pred, spec["plans"], spec["dataset_json"])
    cost = spec["cost"]
    return {"wall_s": round(wall, 1), "peak_gpu_mib": _peak_gpu(train_log), "peak_host_mib": round(peak_host, 1),
            "trainable": cost.get("trainable"), "total": cost.get("total"), "adapter_bytes": cost.get("file_bytes"),
            "per_label": per_label, "per_case": per_case}


def _glob(folder, prefix):
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(prefix)]


def _peak_gpu(train_log: str):
    import re
    m = re.findall(r"peak GPU memory ([\d.]+) MiB", train_log)
    return float(m[-1]) if m else None


def evaluate(reference: str, pred: str, plans: dict, dataset_json: dict):
    """nnU-Net's evaluator on the predicted held-out cases (per label, or per region): (per label
    name the mean Dice, sensitivity, specificity; per case per label name its own), `scores`."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.utilities.label_handling.label_handling import get_labelmanager_class_from_plans
    rw = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
    lm = get_labelmanager_class_from_plans(plans)(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    summary = compute_metrics_on_folder(reference, pred, os.path.join(pred, "summary.json"), rw,
                                        dataset_json["file_ending"], labels, lm.ignore_label, chill=True,
                                        num_processes=2)
    return scores(summary, dataset_json["labels"], dataset_json["file_ending"])


def _values(label) -> tuple:
    """The label values a label or region stands for, sorted: 2, "2", [1, 2], (2, 1) and "(1, 2)"."""
    if isinstance(label, str):
        text = label.strip()
        label = [int(x) for x in text.strip("()[]").split(",") if x.strip()] if text[:1] in "([" else int(text)
    if isinstance(label, (list, tuple)):
        return tuple(sorted({int(x) for x in label}))
    return (int(label),)


def label_name(key, labels: dict) -> str:
    """The name in dataset.json's `labels` of one of nnU-Net's metric keys: a label value (1), a
    region (a tuple, (1, 2, 3), as compute_metrics_on_folder returns them) or either as summary.json
    writes it ("1", "(1, 2, 3)"); a region matches its label values in any order."""
    wanted = _values(key)
    for name, value in labels.items():
        if name != "ignore" and _values(value) == wanted:
            return name
    raise KeyError(f"nnU-Net scored {key!r}, which is no label or region of dataset.json ({labels})")


def _ratio(part, whole) -> Optional[float]:
    return float(part / whole) if whole > 0 else None


def scores(summary: dict, labels: dict, file_ending: str):
    """(per label name {dice, sensitivity, specificity}: nnU-Net's mean over cases, sensitivity and
    specificity from its mean TP, FN, TN, FP; per case name the same of each case, None where it is
    undefined) from a summary of compute_metrics_on_folder, returned or read back from summary.json."""
    per_label = {label_name(key, labels): {"dice": float(m["Dice"]),
                                           "sensitivity": float(m["TP"] / max(m["TP"] + m["FN"], 1e-8)),
                                           "specificity": float(m["TN"] / max(m["TN"] + m["FP"], 1e-8))}
                 for key, m in summary["mean"].items()}
    per_case = {}
    for one in summary.get("metric_per_case", []):
        case = os.path.basename(one["reference_file"])
        case = case[:-len(file_ending)] if case.endswith(file_ending) else case
        per_case[case] = {label_name(key, labels): {
            "dice": None if m["Dice"] is None or np.isnan(m["Dice"]) else float(m["Dice"]),
            "sensitivity": _ratio(m["TP"], m["TP"] + m["FN"]), "specificity": _ratio(m["TN"], m["TN"] + m["FP"])}
            for key, m in one["metrics"].items()}
    return per_label, per_case


def zero_shot_scores(folder: OutputFolder, name: str, plans: dict, dataset_json: dict, device: str,
                     compute: bool = True, reference: Optional[str] = None) -> Optional[dict]:
    """The foundation alone on the same held-out cases, for the labels it knows (zero_shot.json);
    None, and no zero-shot row, when it knows none of them (or, not `compute`, when zero_shot.json
    is not there). Any other error is raised, and nothing is written: the next benchmark run
    computes it again."""
    from nnunet_fseft.datasets.dataset_json import read_json
    from nnunet_fseft.foundation.record import recorded_foundation
    from nnunet_fseft.foundation.labels import match_outputs, mixed_outputs
    from nnunet_fseft.foundation.zeroshot import zeroshot
    foundation_labels = recorded_foundation(plans)["labels"]
    regions = has_regions(dataset_json["labels"])
    mixed = mixed_outputs(dataset_json["labels"], foundation_labels, name)
    if mixed:
        print(f"zero-shot: none ({mixed})")
        return None
    if not match_outputs(dataset_json["labels"], foundation_labels):
        print(f"zero-shot: none (no {'region' if regions else 'label'} of {name} is a "
              f"{'region' if regions else 'class'} the foundation knows)")
        return None
    path = os.path.join(folder.path, "zero_shot.json")
    if os.path.isfile(path):
        dice = read_json(path, "remove it, and the benchmark computes it again")
        if isinstance(dice, dict):  # (older versions wrote null after any error)
            return dice
    if not compute:
        return None
    with quiet(folder.log):
        dice, _ = zeroshot(name, PLANS_NAME, 0, os.path.join(folder.path, "predictions", "zero_shot"), device, False,
                           reference=reference)
    if device == "cuda":  # it runs before the trainings now: leave them the GPU memory it cached
        import torch
        torch.cuda.empty_cache()
    with open(folder.replace("zero_shot.json"), "w") as f:
        json.dump(dice, f)
    folder.wrote("zero_shot.json")
    return dice


def zero_shot_details(folder: OutputFolder, dataset_json: dict, zero: Optional[dict]) -> Optional[dict]:
    """The zero-shot scores of the labels in `zero` as a run's row has them ({"per_label": ...,
    "per_case": {case: {label: {dice, sensitivity, specificity}}}}), from the summary.json that
    zeroshot wrote beside its predictions; None where there is none, or it cannot be read: the
    report then has the zero-shot Dice means only."""
    path = os.path.join(folder.path, "predictions", "zero_shot", "summary.json")
    if not zero or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
        labels = {n: v for n, v in dataset_json["labels"].items() if n in zero or n == "background"}
        summary["mean"] = {k: m for k, m in summary["mean"].items() if _known(k, labels)}
        for one in summary["metric_per_case"]:
            one["metrics"] = {k: m for k, m in one["metrics"].items() if _known(k, labels)}
        per_label, per_case = scores(summary, labels, dataset_json["file_ending"])
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return {"per_label": per_label, "per_case": per_case} if per_case else None


def _known(key, labels: dict) -> bool:
    try:
        return label_name(key, labels) != "background"
    except (KeyError, ValueError):
        return False
