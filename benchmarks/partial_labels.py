"""Partial-label foundation vs a naive one (un-annotated organs taken as background), on synthetic data.

Three source datasets (scanner A) each label only some of five base organs. They are pooled
with `nnunet-fseft combine` and two foundations are trained on the pool with the same optimiser,
schedule and augmentation: nnUNetTrainerFSEFT_FoundationShort (partial-label loss, sampling
balanced over sources) and nnUNetTrainerFSEFT_Pretrain (nnU-Net's loss: every organ a source
does not label is background there). Then, through the real commands:
1. each foundation predicts fully labelled held-out scans (scanner A); per-organ Dice;
2. each is the foundation of `nnunet-fseft benchmark` on a base organ on scanner B: K = 1 and 5
   support scans (default method SpatialAdapter), predicted and scored on the same held-out scans.

    python benchmarks/partial_labels.py --workdir /tmp/plbench [--device cuda]

Resumable: finished steps are skipped. Writes report.md and results.json in the workdir.
"""
import argparse
import json
import os
import time

import numpy as np

from nnunet_fseft.experiments.demo import BASE_ORGANS, Demo, SCHEDULES, SHAPE

SOURCES = {111: ["liver", "spleen"], 112: ["kidney_left", "kidney_right", "stomach"],
           113: ["stomach", "liver", "kidney_left"]}
POOLED, HELD_OUT = 210, 114
FOUNDATIONS = {"partial-label": "nnUNetTrainerFSEFT_FoundationShort", "naive": "nnUNetTrainerFSEFT_Pretrain"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", type=int, default=6, help="scans per source dataset")
    ap.add_argument("--organ", default="spleen", choices=BASE_ORGANS, help="few-shot target organ")
    ap.add_argument("--method", default="SpatialAdapter")
    ap.add_argument("-k", "--k", dest="k", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--finetune", type=int, nargs=2, default=[3, 100], help="epochs and iterations per epoch")
    args = ap.parse_args()

    from nnunet_fseft.experiments.benchmark.runs import benchmark
    from nnunet_fseft.datasets.combine import combine
    from nnunet_fseft.plans.presets import apply_preset
    from nnunet_fseft.datasets.synth import synth_dataset

    d = Demo(args.workdir, args.device)
    raw, results = os.environ["nnUNet_raw"], os.environ["nnUNet_results"]
    pooled = os.path.join(raw, f"Dataset{POOLED}_Pooled")
    if not os.path.isdir(pooled):
        for i, (dataset_id, organs) in enumerate(SOURCES.items()):
            synth_dataset(dataset_id, args.cases, organs, seed=10 + i, name=f"Part{i + 1}", shape=(SHAPE,) * 3)
        synth_dataset(HELD_OUT, 1, BASE_ORGANS, seed=20, name="HeldOut", num_test=args.test, shape=(SHAPE,) * 3)
        combine([str(s) for s in SOURCES], POOLED, "Pooled")
        d.run(["nnUNetv2_plan_and_preprocess", "-d", POOLED, "-c", "3d_fullres", "-np", "2"])
    plans = apply_preset(str(POOLED), "cpu_tiny" if args.device == "cpu" else "cpu_small")
    labels = json.load(open(os.path.join(pooled, "dataset.json")))["labels"]
    held_out = os.path.join(raw, f"Dataset{HELD_OUT}_HeldOut")
    # the held-out scans label the organs in synth order; score them in the pooled label values
    held_labels = os.path.join(args.workdir, "held_out_labels")
    if not os.path.isdir(held_labels):
        _relabel(os.path.join(held_out, "labelsTs"), held_labels,
                 {i + 1: labels[o] for i, o in enumerate(BASE_ORGANS)})

    report = {"foundation_dice": {}, "zero_shot": {}, "fewshot": []}
    models = {kind: os.path.join(results, f"Dataset{POOLED}_Pooled", f"{trainer}__{plans}__3d_fullres")
              for kind, trainer in FOUNDATIONS.items()}
    for kind, trainer in FOUNDATIONS.items():
        model = models[kind]
        if not os.path.isfile(os.path.join(model, "fold_all", "checkpoint_final.pth")):
            d.say(f"{kind} foundation ({trainer})")
            d.train(POOLED, "all", plans, trainer, SCHEDULES[args.device]["foundation"])
        pred = os.path.join(args.workdir, "foundation_predictions", kind)
        if not os.path.isfile(os.path.join(pred, "summary.json")):
            d.run(["nnUNetv2_predict", "-i", os.path.join(held_out, "imagesTs"), "-o", pred, "-d", POOLED,
                   "-c", "3d_fullres", "-f", "all", "-p", plans, "-tr", trainer, "-device", args.device,
                   "--disable_tta"])
            d.run(["nnUNetv2_evaluate_simple", held_labels, pred, "-l", *[v for v in labels.values() if v], "-np", 2])
        summary = json.load(open(os.path.join(pred, "summary.json")))
        report["foundation_dice"][kind] = {name: summary["mean"][str(v)]["Dice"] for name, v in labels.items() if v}

    # few-shot: the same benchmark on top of each foundation, each on a target of its own (identical scans)
    os.environ.update({"nnUNet_fseft_epochs": str(args.finetune[0]), "nnUNet_fseft_iters_per_epoch": str(args.finetune[1])})
    for i, (kind, model) in enumerate(models.items()):
        target_id, name = 620 + 10 * i, f"Target{kind.split('-')[0].capitalize()}"
        if not os.path.isdir(os.path.join(raw, f"Dataset{target_id}_{name}")):
            synth_dataset(target_id, 16, [args.organ], seed=7, name=name, scanner="B", shape=(SHAPE,) * 3)
        d.say(f"{kind} foundation: few-shot {args.method} (nnunet-fseft benchmark)")
        result = benchmark(model, str(target_id), args.k, args.repeats, [args.method], args.test,
                           os.path.join(args.workdir, f"fewshot_{kind}"), device=args.device)
        zero = result["zero_shot"]  # None: the foundation knows no label of the target
        report["zero_shot"][kind] = float(np.mean(list(zero.values()))) if zero else None
        report["fewshot"] += [{"foundation": kind, "K": r["K"], "repeat": r["repeat"],
                               "dice": r["per_label"][args.organ]["dice"]} for r in result["runs"]]

    organs = [n for n, v in labels.items() if v]
    labelled_in = {o: sum(o in s for s in SOURCES.values()) for o in organs}
    lines = [f"Sources: {len(SOURCES)} x {args.cases} scans (scanner A, {SHAPE}^3), each labelling only some organs: "
             + "; ".join(f"Dataset{i}: {', '.join(o)}" for i, o in SOURCES.items()) + ".",
             f"Foundations: {SCHEDULES[args.device]['foundation'][0]} x {SCHEDULES[args.device]['foundation'][1]} "
             f"iterations each, same optimiser and augmentation (equal-sized sources, so balanced sampling draws like "
             f"uniform sampling: the loss is the difference); device {args.device}.", "",
             f"Held-out Dice ({args.test} fully labelled scans, scanner A):", "",
             "| foundation | " + " | ".join(f"{o} ({labelled_in[o]}/{len(SOURCES)})" for o in organs) + " | mean |",
             "|---|" + "---|" * (len(organs) + 1)]
    for kind, dice in report["foundation_dice"].items():
        lines.append(f"| {kind} | " + " | ".join(f"{dice[o]:.3f}" for o in organs) + f" | {np.mean(list(dice.values())):.3f} |")
    lines += ["", f"Few-shot {args.method} on {args.organ}, scanner B ({args.test} held-out scans, "
              f"{args.finetune[0]} x {args.finetune[1]} iterations), Dice mean ± sd over {args.repeats} repeats:", "",
              "| foundation | zero-shot | " + " | ".join(f"K={k}" for k in args.k) + " |",
              "|---|---|" + "---|" * len(args.k)]
    for kind in FOUNDATIONS:
        cells = []
        for k in args.k:
            v = [r["dice"] for r in report["fewshot"] if r["foundation"] == kind and r["K"] == k]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})" if v else
                         "failed (see its benchmark's report.md)")
        zero = report["zero_shot"][kind]
        lines.append(f"| {kind} | {f'{zero:.3f}' if zero is not None else '-'} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(args.workdir, "report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({**report, "args": vars(args), "seconds": round(time.time() - d.t0)}, f, indent=2)


def _relabel(src: str, dst: str, mapping: dict) -> None:
    import SimpleITK as sitk
    os.makedirs(dst)
    for f in sorted(os.listdir(src)):
        image = sitk.ReadImage(os.path.join(src, f))
        a = sitk.GetArrayFromImage(image)
        out = np.zeros_like(a)
        for old, new in mapping.items():
            out[a == old] = new
        relabelled = sitk.GetImageFromArray(out)
        relabelled.CopyInformation(image)
        sitk.WriteImage(relabelled, os.path.join(dst, f))


if __name__ == "__main__":
    main()
