"""Few-shot Dice of the black-box methods against zero-shot and full fine-tuning, on a base organ.

A small foundation is trained on five base organs (scanner A), then adapted to one of them
(default: spleen) on another scanner (B), with K = 1 and 5 support scans and 3 repetitions,
through the real commands: `nnunet-fseft zeroshot`, nnUNetv2_train with LinearProbe,
SpatialAdapter, SpatialAdapterTI and FullFT, nnUNetv2_predict and nnU-Net's evaluator on the
same held-out scans. Transductive inference takes those held-out scans as its unlabelled
query volumes (nnUNet_fseft_query), as the FSEFT paper does.

    python benchmarks/fewshot_blackbox.py --workdir /tmp/fsbench [--device cuda] [--organ spleen]

Prints mean +- sd of Dice per method and K, and writes results.json and report.md in the workdir.
About an hour on two CPU cores.
"""
import argparse
import json
import os
import re
import time

import numpy as np

from nnunet_fseft.demo import BASE_ORGANS, SCHEDULES, SHAPE, Demo

METHODS = ["LinearProbe", "SpatialAdapter", "SpatialAdapterTI", "FullFT"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--organ", default="spleen", choices=BASE_ORGANS)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--finetune", type=int, nargs=2, default=None, help="epochs and iterations per epoch")
    args = ap.parse_args()

    from nnunet_fseft.kshot import write_kshot_splits
    from nnunet_fseft.plans_presets import apply_preset
    from nnunet_fseft.synth import synth_dataset
    from nnunet_fseft.zeroshot import held_out_cases, zeroshot

    d = Demo(args.workdir, args.device)
    schedule = SCHEDULES[args.device]
    finetune = tuple(args.finetune) if args.finetune else schedule["finetune"]
    foundation = os.path.join(d.env["nnUNet_results"], "Dataset100_BenchFoundation")
    if not os.path.isdir(foundation):
        d.say(f"foundation: {', '.join(BASE_ORGANS)} on scanner A")
        synth_dataset(100, 16, BASE_ORGANS, seed=0, name="BenchFoundation", shape=(SHAPE,) * 3)
        d.run(["nnUNetv2_plan_and_preprocess", "-d", 100, "-c", "3d_fullres", "-np", "2"])
        plans = apply_preset("100", "cpu_tiny" if args.device == "cpu" else "cpu_small")
        d.train(100, "all", plans, "nnUNetTrainerFSEFT_Pretrain", schedule["foundation"])
    foundation = os.path.join(foundation, next(f for f in os.listdir(foundation) if f.startswith("nnUNetTrainerFSEFT_Pretrain")))

    rows, zero = [], {}
    for k in args.k:
        target_id = 600 + k  # one dataset per K (identical scans), so results folders do not collide
        name = f"Dataset{target_id:03d}_Bench{args.organ.capitalize()}K{k}"
        raw = os.path.join(d.env["nnUNet_raw"], name)
        if not os.path.isdir(raw):
            synth_dataset(target_id, 16, [args.organ], seed=7, name=f"Bench{args.organ.capitalize()}K{k}",
                          scanner="B", shape=(SHAPE,) * 3)
            d.adopt(foundation, target_id)
            write_kshot_splits(str(target_id), k, repeats=args.repeats, seed=0, test=args.test)
        queries = os.path.join(args.workdir, f"held_out_K{k}")  # the held-out scans: predicted and TI's queries
        if not os.path.isdir(queries):
            os.makedirs(queries)
            for case in held_out_cases(name, 0):
                os.symlink(os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"), os.path.join(queries, f"{case}_0000.nii.gz"))
        if not zero:
            zero, _ = zeroshot(str(target_id), device=args.device, mirroring=False)
            d.say(f"zero-shot Dice: {zero}")
        for fold in range(args.repeats):  # repeat-major: an interrupted run leaves every method compared
            for method in args.methods:
                trainer = f"nnUNetTrainerFSEFT_{method}"
                pred = os.path.join(args.workdir, "predictions", f"K{k}", method, f"fold{fold}")
                failed = os.path.join(pred, "failed.txt")
                if not os.path.isfile(os.path.join(pred, "summary.json")) and not os.path.isfile(failed):
                    d.say(f"K={k} {method} repeat {fold}")
                    try:
                        out, seconds = d.train(target_id, fold, "FSEFTPlans", trainer, finetune,
                                               **({"nnUNet_fseft_query": queries} if method.endswith("TI") else {}))
                        d.run(["nnUNetv2_predict", "-i", queries, "-o", pred, "-d", target_id, "-c", "3d_fullres",
                               "-f", fold, "-p", "FSEFTPlans", "-tr", trainer, "-device", args.device, "--disable_tta"])
                        d.run(["nnUNetv2_evaluate_simple", os.path.join(raw, "labelsTr"), pred, "-l", 1, "-np", 2,
                               "--chill"])
                    except RuntimeError as e:  # one failed run is a result too; the others go on
                        os.makedirs(pred, exist_ok=True)
                        with open(failed, "w") as f:
                            f.write(str(e))
                        d.say(f"   failed: {e}")
                    else:
                        trainable = re.search(r"training ([\d,]+) of", out).group(1)
                        with open(os.path.join(pred, "seconds.txt"), "w") as f:
                            f.write(f"{seconds:.1f} {trainable}")
                if os.path.isfile(failed):
                    rows.append({"K": k, "method": method, "repeat": fold, "dice": float("nan"), "failed": True})
                    continue
                with open(os.path.join(pred, "summary.json")) as f:
                    dice = json.load(f)["foreground_mean"]["Dice"]
                seconds, trainable = open(os.path.join(pred, "seconds.txt")).read().split()
                rows.append({"K": k, "method": method, "repeat": fold, "dice": dice, "train_seconds": float(seconds),
                             "trainable": int(trainable.replace(",", ""))})

    lines = [f"Organ: {args.organ} (a base organ of the foundation), scanner B; {args.test} held-out scans; "
             f"fine-tuning {finetune[0]} x {finetune[1]} iterations; device {args.device}.", "",
             "| method | " + " | ".join(f"K={k} Dice (mean ± sd)" for k in args.k) + " | trainable | train s |",
             "|---|" + "---|" * (len(args.k) + 2),
             "| zero-shot (K=0) | " + " | ".join(f"{np.mean(list(zero.values())):.3f}" for _ in args.k) + " | 0 | 0 |"]
    for method in args.methods:
        cells = []
        for k in args.k:
            v = [r["dice"] for r in rows if r["method"] == method and r["K"] == k and not r.get("failed")]
            failed = sum(1 for r in rows if r["method"] == method and r["K"] == k and r.get("failed"))
            cells.append((f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "—") + (f" ({failed} failed)" if failed else ""))
        done = [r for r in rows if r["method"] == method and not r.get("failed")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {done[0]['trainable'] if done else 0:,} | "
                     f"{np.mean([r['train_seconds'] for r in done]) if done else float('nan'):.0f} |")
    report = "\n".join(lines)
    print("\n" + report)
    with open(os.path.join(args.workdir, "report.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"zero_shot": zero, "rows": rows, "organ": args.organ, "finetune": finetune,
                   "device": args.device, "seconds": round(time.time() - d.t0)}, f, indent=2)


if __name__ == "__main__":
    main()
