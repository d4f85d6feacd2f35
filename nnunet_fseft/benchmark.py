"""`nnunet-fseft benchmark`: the FSEFT protocol on a user's own data, through nnU-Net's commands.

Every method x K x repeat is one fold of one splits_final.json: fold i * repeats + r trains on
K_i support cases drawn with seed r (nested: the K = 1 case is among the K = 5 ones) and every
fold validates on the same held-out cases. So all runs live side by side in nnU-Net's results
layout, one splits file is written (the user's is kept as a backup) and nothing is retrained
when the benchmark is run again: a run is done when its row is in runs.jsonl.
"""
import csv
import json
import os
import platform
import subprocess
import sys
import time
from typing import List, Optional

import numpy as np

PLANS = "FSEFTPlans"
COLUMNS = ["method", "K", "repeat", "fold", "label", "dice", "sensitivity", "specificity", "wall_s",
           "peak_gpu_mib", "peak_host_mib", "trainable", "total", "adapter_bytes", "device", "machine", "versions"]


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


def benchmark(foundation: str, dataset: str, ks: List[int], repeats: int, methods: List[str], test: int,
              out: str, fold: str = "all", device: str = "cpu") -> dict:
    """Trains, predicts and scores every run not done yet; writes results.csv, results.json, report.md
    and figures in OUT. The schedule is the trainers' own, or nnUNet_fseft_epochs / _iters_per_epoch."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_fseft.adapter_file import load_plans, method_costs
    from nnunet_fseft.adopt import adopt
    from nnunet_fseft.foundation import PLANS_KEY, sha256
    from nnunet_fseft.kshot import training_cases
    from nnunet_fseft.safety import dataset_name, require_env, save_json_kept
    from nnunet_fseft.trainers import METHODS

    trainers = {}
    for m in methods:
        name = f"nnUNetTrainerFSEFT_{m}"
        if name not in METHODS:
            raise ValueError(f"Unknown method '{m}'; choose from: {', '.join(t[len('nnUNetTrainerFSEFT_'):] for t in METHODS)}.")
        trainers[m] = name
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but torch sees no GPU; use --device cpu.")
    name = dataset_name(dataset)
    preprocessed = require_env("nnUNet_preprocessed")
    results_root = require_env("nnUNet_results")
    splits = folds(sorted(set(ks)), repeats, training_cases(name), test)  # checks K + test <= cases first
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "log.txt"), "a")

    plans_file = os.path.join(preprocessed, name, PLANS + ".json")
    from nnunet_fseft.adopt import foundation_checkpoint
    ckpt = foundation_checkpoint(foundation, fold, "checkpoint_final.pth")
    recorded = load_json(plans_file).get(PLANS_KEY, {}) if os.path.isfile(plans_file) else {}
    if recorded.get("sha256") != sha256(ckpt):
        print(f"adopting {foundation} for {name}", flush=True)
        _quiet(log, adopt, foundation, name, fold)
    configuration = load_json(plans_file)[PLANS_KEY]["configuration"]
    save_json_kept(splits, os.path.join(preprocessed, name, "splits_final.json"))

    plans, dataset_json = load_plans(name, PLANS)
    costs = {r["method"]: r for r in method_costs(plans, dataset_json, configuration, [METHODS[t] for t in trainers.values()])}
    raw = os.path.join(require_env("nnUNet_raw"), name)
    held_out = os.path.join(out, "held_out")
    if not os.path.isdir(held_out):
        os.makedirs(held_out)
        for case in splits[0]["val"]:
            for f in sorted(os.listdir(os.path.join(raw, "imagesTr"))):
                if f.startswith(case + "_") and len(f) - len(case) == len("_0000" + dataset_json["file_ending"]):
                    os.symlink(os.path.join(raw, "imagesTr", f), os.path.join(held_out, f))
    labels = {v: n for n, v in dataset_json["labels"].items() if isinstance(v, int) and v > 0}

    done_path = os.path.join(out, "runs.jsonl")
    done = [json.loads(line) for line in open(done_path)] if os.path.isfile(done_path) else []
    finished = {(r["method"], r["K"], r["repeat"]) for r in done}
    env = {**os.environ, "nnUNet_compile": os.environ.get("nnUNet_compile", "f")}
    if device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "0")
    todo = [(k, r, m) for k in sorted(set(ks)) for r in range(repeats) for m in trainers]
    for i, (k, r, m) in enumerate(todo):
        if (m, k, r) in finished:
            print(f"[{i + 1}/{len(todo)}] {m} K={k} repeat {r}: done earlier, skipped", flush=True)
            continue
        f = sorted(set(ks)).index(k) * repeats + r
        print(f"[{i + 1}/{len(todo)}] {m} K={k} repeat {r} (fold {f})", flush=True)
        trainer = trainers[m]
        model = os.path.join(results_root, name, f"{trainer}__{PLANS}__{configuration}")
        fold_dir = os.path.join(model, f"fold_{f}")
        if os.path.isdir(fold_dir):  # not a finished run of ours: keep it rather than overwrite it
            from nnunet_fseft.safety import backup_name
            os.rename(fold_dir, backup_name(fold_dir))
        t0 = time.time()
        peak_host = _run(log, ["nnUNetv2_train", name, configuration, str(f), "-p", PLANS, "-tr", trainer,
                               "-device", device], env)
        wall = time.time() - t0
        train_log = open(sorted(_glob(fold_dir, "training_log_"))[-1]).read()
        pred = os.path.join(out, "predictions", m, f"K{k}", f"repeat{r}")
        _run(log, ["nnUNetv2_predict", "-i", held_out, "-o", pred, "-d", name, "-c", configuration, "-f", str(f),
                   "-p", PLANS, "-tr", trainer, "-device", device, "--disable_tta"], env)
        metrics = _evaluate(os.path.join(raw, "labelsTr"), pred, plans, dataset_json)
        cost = costs.get(trainer, {})
        row = {"method": m, "K": k, "repeat": r, "fold": f, "wall_s": round(wall, 1),
               "peak_gpu_mib": _peak_gpu(train_log), "peak_host_mib": round(peak_host, 1),
               "trainable": cost.get("trainable"), "total": cost.get("total"), "adapter_bytes": cost.get("file_bytes"),
               "device": device, "machine": machine(), "versions": versions(),
               "per_label": {labels[int(l)]: v for l, v in metrics.items()}}
        with open(done_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        done.append(row)
    zero = _zero_shot(name, out, device, log)
    return write_reports(out, done, zero, sorted(set(ks)), list(trainers))


def _quiet(log, fn, *args):
    streams = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = log
    try:
        return fn(*args)
    finally:
        sys.stdout, sys.stderr = streams


def _glob(folder, prefix):
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(prefix)]


def _run(log, args, env) -> float:
    """Runs an installed command with its output to the log; returns its peak resident memory in MiB."""
    cmd = [os.path.join(os.path.dirname(sys.executable), args[0])] + args[1:]
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (exit {p.returncode}); its output is in {log.name}.")
    return usage.ru_maxrss / 1024


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


def _zero_shot(name: str, out: str, device: str, log) -> Optional[dict]:
    """The foundation alone on the same held-out cases, for the labels it knows; None if none match."""
    from nnunet_fseft.zeroshot import zeroshot
    path = os.path.join(out, "zero_shot.json")
    if os.path.isfile(path):
        return json.load(open(path))
    try:
        dice, _ = _quiet(log, zeroshot, name, PLANS, 0, os.path.join(out, "predictions", "zero_shot"), device, False)
    except ValueError as e:  # no label of the target is a class of the foundation
        log.write(f"zero-shot: {e}\n")
        dice = None
    with open(path, "w") as f:
        json.dump(dice, f)
    return dice


def write_reports(out: str, runs: list, zero: Optional[dict], ks: list, methods: list) -> dict:
    rows = []
    for run in runs:
        for label, m in run["per_label"].items():
            rows.append({**{c: run.get(c) for c in COLUMNS}, "label": label, **m,
                         "machine": json.dumps(run["machine"]), "versions": json.dumps(run["versions"])})
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
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
    result = {"runs": runs, "summary": summary, "zero_shot": zero}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    figures = _figures(out, summary, ks, methods)
    lines = ["# FSEFT benchmark", "", f"Machine: {json.dumps(runs[0]['machine']) if runs else '-'}; "
             f"versions: {json.dumps(runs[0]['versions']) if runs else '-'}.", "",
             "| method | " + " | ".join(f"K={k} Dice (mean ± sd)" for k in ks) + " | trainable | adapter file | train s | peak GPU MiB | peak host MiB |",
             "|---|" + "---|" * (len(ks) + 5)]
    if zero:
        lines.append("| zero-shot | " + " | ".join(f"{np.mean(list(zero.values())):.3f}" for _ in ks) + " | 0 | 0 | 0 | - | - |")
    for m in methods:
        s = [summary.get(f"{m}|K={k}") for k in ks]
        first = next(x for x in s if x) if any(s) else None
        if first is None:
            continue
        lines.append(f"| {m} | " + " | ".join(_mean_sd(x["dice_mean"], x["dice_sd"], x["repeats"]) if x else "-" for x in s)
                     + f" | {first['trainable']:,} | {first['adapter_bytes']:,} B | {first['wall_s']:.0f} | "
                     f"{first['peak_gpu_mib'] if first['peak_gpu_mib'] is not None else '-'} | {first['peak_host_mib']:.0f} |")
    lines += ["", "Per label (Dice / sensitivity / specificity, mean over repeats):", "",
              "| method | K | label | Dice | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for x in summary.values():
        for label, v in x["per_label"].items():
            lines.append(f"| {x['method']} | {x['K']} | {label} | {_mean_sd(*v['dice'], x['repeats'])} | "
                         f"{v['sensitivity'][0]:.3f} | {v['specificity'][0]:.3f} |")
    lines += [""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in figures]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return result


def _mean_sd(mean: float, sd: float, repeats: int) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if repeats > 1 else f"{mean:.3f} (1 run)"


def _figures(out: str, summary: dict, ks: list, methods: list) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for m in methods:
        pts = [(k, summary[f"{m}|K={k}"]) for k in ks if f"{m}|K={k}" in summary]
        ax.errorbar([p[0] for p in pts], [p[1]["dice_mean"] for p in pts], [p[1]["dice_sd"] for p in pts],
                    marker="o", capsize=3, label=m)
    ax.set(xlabel="K (support scans)", ylabel="Dice", xticks=ks)
    ax.legend(fontsize=7)
    names.append(_save(fig, out, "dice_vs_k.png"))
    fig, ax = plt.subplots(figsize=(5, 4))
    for x in summary.values():
        if x["trainable"]:
            ax.scatter(x["trainable"], x["dice_mean"], label=f"{x['method']} K={x['K']}")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="Dice")
    ax.legend(fontsize=6)
    names.append(_save(fig, out, "dice_vs_parameters.png"))
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
    names.append(_save(fig, out, "cost.png"))
    return names


def _save(fig, out, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return name
