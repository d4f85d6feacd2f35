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
import json
import os
import time
from typing import List, Optional

from nnunet_fseft.datasets.dataset_json import has_regions, plain_foreground
from nnunet_fseft.datasets.safe_write import backup_name
from nnunet_fseft.environment import schedule_overrides
from nnunet_fseft.errors import InputError
from nnunet_fseft.experiments.benchmark.output_folder import MANIFEST, OutputFolder, link_held_out
from nnunet_fseft.experiments.benchmark.protocol import (folds, machine, method_trainers, run_env, run_order,
                                                         unlearned_labels, versions)
from nnunet_fseft.experiments.benchmark.report import write_reports
from nnunet_fseft.plans import PLANS_NAME
from nnunet_fseft.runner import CommandFailed, quiet, run


def benchmark(foundation: str, dataset: str, ks: List[int], repeats: int, methods: List[str], test: int,
              out: str, fold: str = "all", device: str = "cpu", base_organs: bool = False) -> dict:
    """Trains, predicts and scores every run not done yet; writes results.csv, results.json, report.md
    and figures in OUT. The schedule is the trainers' own, or nnUNet_fseft_epochs / _iters_per_epoch.
    Every check (methods, device, dataset, K, foundation, the folder OUT) comes before any work.
    `base_organs`: the task is to adapt organs the foundation segments, so a label it does not
    segment zero-shot (or knows not at all) stops the benchmark before any training, not only a
    warning in the report."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from nnunet_fseft.foundation.adopt import foundation_checkpoint
    from nnunet_fseft.datasets.dataset_json import read_dataset_json
    from nnunet_fseft.foundation.record import sha256
    from nnunet_fseft.datasets.dataset_json import dataset_name
    from nnunet_fseft.environment import require_env

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
    identity = {"dataset": name, "foundation_sha256": sha256(checkpoint), "schedule": schedule_overrides(),
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
    if recorded.get("sha256") != folder.identity["foundation_sha256"]:
        print(f"adopting {foundation} for {name}", flush=True)
        with quiet(folder.log):
            adopt(foundation, name, fold)
    save_json_kept(splits, os.path.join(preprocessed, name, "splits_final.json"))

    plans, dataset_json = load_plans(name, PLANS_NAME)
    configuration = plans[PLANS_KEY]["configuration"]
    costs = {r["method"]: r for r in method_costs(plans, dataset_json, configuration, list(trainers.values()))}
    held_out = link_held_out(images, splits[0]["val"], os.path.join(folder.path, "held_out"))
    labels = {v: n for n, v in plain_foreground(dataset_json["labels"]).items()}

    def one_run(m: str, k: int, r: int, f: int) -> dict:
        """Trains, predicts and scores one run; a failed command raises CommandFailed."""
        trainer = trainers[m].__name__
        env = run_env(trainers[m], device, held_out)
        fold_dir = os.path.join(results_root, name, f"{trainer}__{PLANS_NAME}__{configuration}", f"fold_{f}")
        if os.path.isdir(fold_dir):  # not a finished run of ours: keep it rather than overwrite it
            os.rename(fold_dir, backup_name(fold_dir))
        t0 = time.time()
        peak_host = run(["nnUNetv2_train", name, configuration, str(f), "-p", PLANS_NAME, "-tr", trainer,
                         "-device", device], log=folder.log, env=env).peak_host_mib
        wall = time.time() - t0
        train_log = open(sorted(_glob(fold_dir, "training_log_"))[-1]).read()
        pred = os.path.join(folder.path, "predictions", m, f"K{k}", f"repeat{r}")
        run(["nnUNetv2_predict", "-i", held_out, "-o", pred, "-d", name, "-c", configuration, "-f", str(f),
             "-p", PLANS_NAME, "-tr", trainer, "-device", device, "--disable_tta"], log=folder.log, env=env)
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
    from nnunet_fseft.datasets.dataset_json import read_json
    from nnunet_fseft.foundation.record import recorded_foundation
    from nnunet_fseft.foundation.labels import match_labels
    from nnunet_fseft.foundation.zeroshot import zeroshot
    foundation_labels = recorded_foundation(plans)["labels"]
    if has_regions(foundation_labels):
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
        dice, _ = zeroshot(name, PLANS_NAME, 0, os.path.join(folder.path, "predictions", "zero_shot"), device, False)
    if device == "cuda":  # it runs before the trainings now: leave them the GPU memory it cached
        import torch
        torch.cuda.empty_cache()
    with open(folder.replace("zero_shot.json"), "w") as f:
        json.dump(dice, f)
    folder.wrote("zero_shot.json")
    return dice
