"""The benchmark's report: results.csv (one row per run per label or region), per_case.csv (one
row per run per held-out case per label or region, and the zero-shot prediction's as K = 0),
results.json, report.md and the figures, from its runs.

Every score is per label, or per region for a dataset of regions, by its name. The main table has,
per K, the mean over labels (regions) of Dice, sensitivity and specificity, each a mean over
repeats, the sd over repeats of the mean Dice, and the sd over cases: the mean over repeats of each
run's sd over the held-out cases of the case's mean Dice over labels (a case's labels whose Dice is
undefined, empty in reference and prediction, are left out of its mean, as nnU-Net's nanmean
does). dice_boxplot.png shows those per-case mean Dice, pooled over repeats, per method and K (the
paper's main figure), dice_boxplot_per_label.png the per-case Dice of each label (region)."""
import csv
import json
import os
from typing import Optional

import numpy as np

from nnunet_fseft.experiments.benchmark.output_folder import OutputFolder
from nnunet_fseft.experiments.benchmark.protocol import (CASE_COLUMNS, COLUMNS, STEP0, ZERO_SHOT, is_peft,
                                                         unlearned_labels)


def write_reports(folder: OutputFolder, runs: list, zero: Optional[dict], ks: list, methods: list,
                  pool: Optional[int] = None, zero_scores: Optional[dict] = None, regions: bool = False) -> dict:
    """results.csv, per_case.csv, results.json, report.md and the figures in the benchmark's folder;
    `runs` may hold failed runs (a `failed` reason instead of measurements): they are listed, not
    scored. `zero`: zero-shot Dice per label; `zero_scores`: the zero-shot prediction's "per_label"
    and "per_case" scores, as a run's row has them, where known; `pool`: the cases outside the
    held-out set (a K of all of them is reported as "K=N (all)"); `regions`: the labels are regions."""
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
    _write_per_case(folder, runs, zero_scores)
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
                                    "dice_sd": float(np.std(mean_dice)), "dice_sd_cases": _sd_over_cases(rs),
                                    **_mean_over_labels(rs), "per_label": per_label,
                                    "trainable": rs[0]["trainable"], "adapter_bytes": rs[0]["adapter_bytes"],
                                    "wall_s": float(np.mean([r["wall_s"] for r in rs])),
                                    "peak_gpu_mib": rs[0]["peak_gpu_mib"], "peak_host_mib": float(np.mean([r["peak_host_mib"] for r in rs]))}
    zero_row = _zero_row(zero, zero_scores)
    result = {"benchmark": folder.identity, "runs": runs, "failed": failed, "summary": summary, "zero_shot": zero,
              "zero_shot_scores": zero_scores, "zero_shot_row": zero_row, "pool": pool}
    with open(folder.replace("results.json"), "w") as f:
        json.dump(result, f, indent=1)
    folder.wrote("results.json")
    figures = _figures(folder, summary, ks, methods, zero)
    figures += _boxplots(folder, runs, ks, methods, zero, zero_scores, pool)
    one = (runs or failed or [None])[0]
    what = "regions" if regions else "labels"
    lines = ["# FSEFT benchmark", "", f"Machine: {json.dumps(one['machine']) if one else '-'}; "
             f"versions: {json.dumps(one['versions']) if one else '-'}.", "",
             "| method | " + " | ".join(f"K={_k(k, pool)} Dice (mean ± sd) | K={_k(k, pool)} sd over cases | "
                                        f"K={_k(k, pool)} sensitivity | K={_k(k, pool)} specificity" for k in ks)
             + " | trainable | adapter file | train s | peak GPU MiB | peak host MiB |",
             "|---|" + "---|" * (4 * len(ks) + 5)]
    if zero:
        lines.append(f"| {ZERO_SHOT} | " + " | ".join(
            f"{zero_row['dice_mean']:.3f} | {_num(zero_row['dice_sd_cases'])} | {_num(zero_row['sensitivity_mean'])} | "
            f"{_num(zero_row['specificity_mean'])}" for _ in ks) + " | 0 | 0 | 0 | - | - |")
    for m in methods:
        s = [summary.get(f"{m}|K={k}") for k in ks]
        lost = [sum(r["method"] == m and r["K"] == k for r in failed) for k in ks]
        cells = [(_mean_sd(x["dice_mean"], x["dice_sd"], x["repeats"]) + (f" ({n} failed)" if n else "") +
                  f" | {_num(x['dice_sd_cases'])} | {x['sensitivity_mean']:.3f} | {x['specificity_mean']:.3f}") if x
                 else "failed | - | - | -" if n else "- | - | - | -" for x, n in zip(s, lost)]
        first = next((x for x in s if x), None)
        if first is None and not any(lost):
            continue
        cost = (f"{first['trainable']:,} | {first['adapter_bytes']:,} B | {first['wall_s']:.0f} | "
                f"{first['peak_gpu_mib'] if first['peak_gpu_mib'] is not None else '-'} | {first['peak_host_mib']:.0f}"
                if first else "- | - | - | - | -")
        lines.append(f"| {STEP0 if m == 'Start' else m} | " + " | ".join(cells) + f" | {cost} |")
    lines += ["", f"Dice, sensitivity and specificity: the mean over the {what} of nnU-Net's mean over the held-out "
                  f"cases, then over repeats (± sd over repeats); sd over cases: the mean over repeats of the sd over "
                  f"the held-out cases of each case's mean Dice over the {what}."]
    shared = sorted({x["K"] for x in summary.values() if x["K"] == pool and x["repeats"] > 1})
    if shared:
        lines += ["", f"K={_k(shared[0], pool)} takes every case outside the held-out set: its repeats train on the "
                      f"same support cases, so its sd over repeats is the training's own variation only."]
    lines += _against_the_paper(summary, zero_row, pool, what)
    unlearned = unlearned_labels(zero)
    if unlearned:
        lines += ["", f"The foundation {unlearned}: for it this is a novel-organ task, whatever the label's name."]
    if failed:
        lines += ["", "Failed runs (run the benchmark again to retry them; their output is in log.txt, or in the log "
                      "a job's line names):", ""]
        lines += [f"- {r['method']} K={r['K']} repeat {r['repeat']} (fold {r['fold']}): {r['failed']}" for r in failed]
    lines += ["", f"Per {'region' if regions else 'label'} (Dice / sensitivity / specificity, mean over repeats):", "",
              f"| method | K | {'region' if regions else 'label'} | Dice | sensitivity | specificity |",
              "|---|---|---|---|---|---|"]
    for x in summary.values():
        for label, v in x["per_label"].items():
            lines.append(f"| {x['method']} | {_k(x['K'], pool)} | {label} | {_mean_sd(*v['dice'], x['repeats'])} | "
                         f"{v['sensitivity'][0]:.3f} | {v['specificity'][0]:.3f} |")
    lines += [""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in figures]
    with open(folder.replace("report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    folder.wrote("report.md")
    folder.save()
    return result


def _k(k: int, pool: Optional[int]) -> str:
    """K as the report names it: "20 (all)" where K is every case outside the held-out set."""
    return f"{k} (all)" if pool is not None and k == pool else str(k)


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mean_sd(mean: float, sd: float, repeats: int) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if repeats > 1 else f"{mean:.3f} (1 run)"


def case_mean_dice(per_case: Optional[dict]) -> dict:
    """case -> its mean Dice over labels (regions); labels of undefined Dice (None) are left out, and a
    case with none defined."""
    means = {}
    for case, labels in (per_case or {}).items():
        dice = [v["dice"] for v in labels.values() if v.get("dice") is not None]
        if dice:
            means[case] = float(np.mean(dice))
    return means


def _sd_over_cases(rs: list) -> Optional[float]:
    """The mean over runs of each run's sd over cases of the case's mean Dice; None without per-case scores."""
    sds = [float(np.std(list(means.values()))) for means in (case_mean_dice(r.get("per_case")) for r in rs) if means]
    return float(np.mean(sds)) if sds else None


def _mean_over_labels(rs: list) -> dict:
    """sensitivity_mean, specificity_mean: the mean over repeats of the mean over labels."""
    return {f"{metric}_mean": float(np.mean([np.mean([v[metric] for v in r["per_label"].values()]) for r in rs]))
            for metric in ("sensitivity", "specificity")}


def _zero_row(zero: Optional[dict], zero_scores: Optional[dict]) -> Optional[dict]:
    """The zero-shot row: mean Dice over the labels it scores (zero_shot.json), and where its scores
    are known, its sd over cases and mean sensitivity and specificity."""
    if not zero:
        return None
    row = {"dice_mean": float(np.mean(list(zero.values()))), "dice_sd_cases": None, "sensitivity_mean": None,
           "specificity_mean": None, "labels": list(zero)}
    if zero_scores:
        row["dice_sd_cases"] = _sd_over_cases([zero_scores])
        if zero_scores.get("per_label"):
            row.update(_mean_over_labels([zero_scores]))
    return row


def _write_per_case(folder: OutputFolder, runs: list, zero_scores: Optional[dict]) -> None:
    rows = [{"method": ZERO_SHOT, "K": 0, "repeat": "", "fold": "", "case": case, "label": label, **v}
            for case, labels in ((zero_scores or {}).get("per_case") or {}).items() for label, v in labels.items()]
    rows += [{"method": r["method"], "K": r["K"], "repeat": r["repeat"], "fold": r["fold"], "case": case,
              "label": label, **v} for r in runs for case, labels in (r.get("per_case") or {}).items()
             for label, v in labels.items()]
    with open(folder.replace("per_case.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CASE_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    folder.wrote("per_case.csv")


def _with_sd(name: str, x: dict) -> str:
    sd = f" (sd over cases {x['dice_sd_cases']:.3f})" if x.get("dice_sd_cases") is not None else ""
    return f"{name} {x['dice_mean']:.3f}{sd}"


def _against_the_paper(summary: dict, zero_row: Optional[dict], pool: Optional[int], what: str = "labels") -> list:
    """The paper's comparisons, in numbers from these runs, for those whose rows exist: zero-shot
    (source-only) against the best method at the largest K, the best PEFT method against TargetOnly
    and against FullFT at each K, and mean sensitivity against mean specificity. Mean Dice over labels,
    mean over repeats; differences are the first minus the second."""
    rows = [x for x in summary.values() if x["method"] != "Start"]
    said = []
    if zero_row and rows:
        k = max(x["K"] for x in rows)
        best = max((x for x in rows if x["K"] == k), key=lambda x: x["dice_mean"])
        same = ""
        if set(zero_row["labels"]) != set(best["per_label"]) and set(zero_row["labels"]) <= set(best["per_label"]):
            on_zero = float(np.mean([best["per_label"][label]["dice"][0] for label in zero_row["labels"]]))
            same = (f"; over the {what} zero-shot scores ({', '.join(zero_row['labels'])}) {best['method']} "
                    f"{on_zero:.3f}, difference {on_zero - zero_row['dice_mean']:+.3f}")
        said.append(f"- {_with_sd(ZERO_SHOT, zero_row)} against the best method at the largest K, K={_k(k, pool)}: "
                    f"{_with_sd(best['method'], best)}; difference {best['dice_mean'] - zero_row['dice_mean']:+.3f}"
                    f"{same}.")
    for reference in ("TargetOnly", "FullFT"):
        per_k = []
        for k in sorted({x["K"] for x in rows}):
            peft = [x for x in rows if x["K"] == k and is_peft(x["method"])]
            ref = summary.get(f"{reference}|K={k}")
            if peft and ref:
                best = max(peft, key=lambda x: x["dice_mean"])
                per_k.append(f"K={_k(k, pool)}: {_with_sd(best['method'], best)} against {_with_sd(reference, ref)}, "
                             f"difference {best['dice_mean'] - ref['dice_mean']:+.3f}")
        if per_k:
            said.append(f"- Best PEFT method against {reference}: " + "; ".join(per_k) + ".")
    if rows:
        said.append(f"- Mean sensitivity {np.mean([x['sensitivity_mean'] for x in rows]):.3f}, mean specificity "
                    f"{np.mean([x['specificity_mean'] for x in rows]):.3f} (over the {len(rows)} method x K rows"
                    f"{', Start left out' if len(rows) < len(summary) else ''}).")
    if not said:
        return []
    return ["", f"Against the paper (PEFT-MedNeXt's comparisons, in this benchmark's numbers: mean Dice over the "
                f"{what}, mean over repeats; differences are the first minus the second):", ""] + said


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
        ax.axhline(float(np.mean(list(zero.values()))), color="k", linestyle="--", label=ZERO_SHOT)
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


def _boxplots(folder: OutputFolder, runs: list, ks: list, methods: list, zero: Optional[dict],
              zero_scores: Optional[dict], pool: Optional[int]) -> list:
    """dice_boxplot.png: one panel per K, a box per method of its per-case mean Dice over labels,
    pooled over repeats, the zero-shot (source-only) box first where its per-case scores are known
    (else its mean as a dashed line); dice_boxplot_per_label.png: one panel per label (region), a box
    per method and K of the label's per-case Dice. Neither without per-case scores (runs of older
    versions)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    zero_cases = list(case_mean_dice((zero_scores or {}).get("per_case")).values())
    pooled = {(m, k): [d for r in runs if r["method"] == m and r["K"] == k
                       for d in case_mean_dice(r.get("per_case")).values()] for m in methods for k in ks}
    panels = [k for k in ks if any(pooled[(m, k)] for m in methods)]
    if not panels:
        return []
    names = []
    width = max(4.0, 1.5 + 0.6 * (len(methods) + 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.5), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], panels):
        shown = [m for m in methods if pooled[(m, k)]]
        data, ticks = [pooled[(m, k)] for m in shown], list(shown)
        if zero_cases:
            data, ticks = [zero_cases] + data, [ZERO_SHOT] + ticks
        ax.boxplot(data)
        ax.set_xticks(range(1, len(ticks) + 1), ticks, rotation=45, ha="right", fontsize=7)
        if zero and not zero_cases:
            ax.axhline(float(np.mean(list(zero.values()))), color="k", linestyle="--", label=ZERO_SHOT)
            ax.legend(fontsize=7)
        ax.set(title=f"K={_k(k, pool)}", ylim=(-0.02, 1.02))
    axes[0][0].set(ylabel="per-case mean Dice (pooled over repeats)")
    names.append(_save(fig, folder, "dice_boxplot.png"))

    labels = list(dict.fromkeys(label for r in runs for case in (r.get("per_case") or {}).values() for label in case))
    zero_per_label = {label: [v[label]["dice"] for v in ((zero_scores or {}).get("per_case") or {}).values()
                              if label in v and v[label]["dice"] is not None] for label in labels}
    groups = [(m, k) for k in panels for m in methods if pooled[(m, k)]]
    columns = min(3, len(labels))  # many labels (13 organs): rows of three panels
    rows = -(-len(labels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(4.0, 1.5 + 0.5 * (len(groups) + 1)) * columns, 4.5 * rows),
                             squeeze=False, sharey=True)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for ax, label in zip(axes.flat, labels):
        data, ticks = [], []
        if zero_per_label[label]:
            data, ticks = [zero_per_label[label]], [ZERO_SHOT]
        for m, k in groups:
            values = [v[label]["dice"] for r in runs if r["method"] == m and r["K"] == k
                      for v in (r.get("per_case") or {}).values() if label in v and v[label]["dice"] is not None]
            if values:
                data.append(values)
                ticks.append(f"{m} K={_k(k, pool)}")
        if data:
            ax.boxplot(data)
            ax.set_xticks(range(1, len(ticks) + 1), ticks, rotation=45, ha="right", fontsize=7)
        if zero and label in zero and not zero_per_label[label]:
            ax.axhline(zero[label], color="k", linestyle="--", label=ZERO_SHOT)
            ax.legend(fontsize=7)
        ax.set(title=label, ylim=(-0.02, 1.02))
    for ax in axes[:, 0]:
        ax.set(ylabel="per-case Dice (pooled over repeats)")
    names.append(_save(fig, folder, "dice_boxplot_per_label.png"))
    return names


def _save(fig, folder: OutputFolder, name: str) -> str:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(folder.replace(name), dpi=100)
    plt.close(fig)
    folder.wrote(name)
    return name
