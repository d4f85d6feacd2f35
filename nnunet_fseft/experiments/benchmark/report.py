"""The benchmark's report: results.csv, results.json, report.md and the figures, from its runs."""
import csv
import json
import os
from typing import Optional

import numpy as np

from nnunet_fseft.experiments.benchmark.output_folder import OutputFolder
from nnunet_fseft.experiments.benchmark.protocol import COLUMNS, STEP0, unlearned_labels


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
