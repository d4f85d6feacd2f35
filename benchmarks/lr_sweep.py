"""Learning rates swept at the real length: each family of methods at three learning rates, on the
trainers' own few-shot schedule, on the base-organ and the novel-organ task of
benchmarks/fseft_synthetic.py, K = 1, 3 repeats (issue 12, item 2).

Each (method, learning rate) is a subclass of the method that sets only `learning_rate`, written to
WORKDIR/sweep_trainers/ and found by nnU-Net through nnUNet_extTrainer, so every run goes through
nnUNetv2_train / nnUNetv2_predict and `nnunet-fseft benchmark` like any other. The report gives, per
family, the mean ± sd Dice of every learning rate on both tasks, and the zero-shot Dice of the base
organ.

    python benchmarks/lr_sweep.py --workdir /tmp/fsb --report benchmarks/results/lr_sweep_cpu.md
    python benchmarks/lr_sweep.py --workdir /tmp/fsb --sweep LoRA=1e-3,3e-3 --repeats 1

Shares the workdir (foundation, datasets) with fseft_synthetic.py; its benchmark folders are
WORKDIR/sweep_base and WORKDIR/sweep_novel. Resumable like every benchmark.
"""
import argparse
import json
import os
import platform

import numpy as np

from fseft_synthetic import TASKS, task_dataset
from nnunet_fseft.experiments.demo import SHAPE

# One method per family of the issue: full, decoder, low-capacity PEFT, LoRA/adapters, black-box, _DecoderFT
SWEEP = {"FullFT": (1e-4, 3e-4, 1e-3), "DecoderFT": (1e-4, 3e-4, 1e-3), "BitFit": (1e-3, 3e-3, 1e-2),
         "LoRA": (1e-3, 3e-3, 1e-2), "LinearProbe": (1e-3, 3e-3, 1e-2), "SpatialAdapter": (1e-4, 3e-4, 1e-3),
         "LoRA_DecoderFT": (1e-4, 3e-4, 1e-3)}
MODULE = "fseft_lr_sweep"


def lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def sweep_name(method: str, lr: float) -> str:
    return f"nnUNetTrainerSweep_{method}_lr{lr_text(lr)}"


def write_trainers(folder: str, sweep: dict) -> None:
    """A module of one subclass per (method, learning rate), for nnU-Net's trainer lookup."""
    os.makedirs(folder, exist_ok=True)
    spec = {sweep_name(m, lr): [f"nnUNetTrainerFSEFT_{m}", lr] for m, lrs in sweep.items() for lr in lrs}
    with open(os.path.join(folder, MODULE + ".py"), "w") as f:
        f.write(f'"""Written by benchmarks/lr_sweep.py: each method at another learning rate."""\n'
                f"from nnunet_fseft import trainers\n\n"
                f"SPEC = {json.dumps(spec, indent=1)}\n"
                f"for _name, (_base, _lr) in SPEC.items():\n"
                f"    globals()[_name] = type(_name, (getattr(trainers, _base),), {{'learning_rate': _lr, "
                f"'__module__': __name__}})\n")


def parse_sweep(items) -> dict:
    if not items:
        return SWEEP
    out = {}
    for item in items:
        method, _, lrs = item.partition("=")
        out[method] = tuple(float(x) for x in lrs.split(","))
    return out


def main():
    from nnunet_fseft.experiments.benchmark.runs import benchmark
    from nnunet_fseft.experiments.benchmark.protocol import machine
    from nnunet_fseft.experiments.demo import Demo
    from nnunet_fseft.discovery import ENV_VAR
    from nnunet_fseft.datasets.synth import synth_dataset

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("-k", "--k", dest="k", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--pool", type=int, default=10)
    ap.add_argument("--sweep", nargs="+", help="METHOD=LR,LR,... (default: every family of SWEEP)")
    ap.add_argument("--report", help="report to write (default WORKDIR/lr_sweep.md)")
    args = ap.parse_args()
    sweep = parse_sweep(args.sweep)

    d = Demo(args.workdir, args.device)
    model = d.train_foundation(610, "BenchFoundation")[0]
    for var in ("nnUNet_fseft_epochs", "nnUNet_fseft_iters_per_epoch"):
        os.environ.pop(var, None)  # the trainers' own schedule: the length they are used with
    folder = os.path.join(d.workdir, "sweep_trainers")
    write_trainers(folder, sweep)
    os.environ[ENV_VAR] = os.pathsep.join([folder] + [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p])
    names = [sweep_name(m, lr) for m, lrs in sweep.items() for lr in lrs]

    results = {}
    for task in args.tasks:
        dataset, name, organ, _ = task_dataset(task, "spleen")
        if not os.path.isdir(os.path.join(os.environ["nnUNet_raw"], f"Dataset{dataset}_{name}")):
            synth_dataset(dataset, max(args.pool, *args.k) + args.test, [organ], seed=dataset, name=name,
                          scanner="B", shape=(SHAPE,) * 3)
        d.say(f"{task} organ task ({organ}): {len(names)} methods x learning rates")
        results[task] = benchmark(model, str(dataset), args.k, args.repeats, names, args.test,
                                  os.path.join(d.workdir, f"sweep_{task}"), device=args.device,
                                  base_organs=task == "base")

    m = machine()
    lines = ["# Learning-rate sweep on synthetic data", "",
             f"Machine: {m['cpu']} ({platform.platform()}), {m['cores']} cores, GPU: {m['gpu']}. Each trainer's own "
             f"few-shot schedule; K = {args.k}, {args.repeats} repeats, {args.test} held-out scans per task. Dice: "
             f"mean ± sd over repeats.", ""]
    zero = (results.get("base") or {}).get("zero_shot")
    if zero:
        lines += [f"Zero-shot Dice of the base organ: {np.mean(list(zero.values())):.3f}.", ""]
    header = [f"{t} K={k}" for k in args.k for t in args.tasks]
    for method, lrs in sweep.items():
        lines += [f"## {method}", "", "| learning rate | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
        for lr in lrs:
            cells = []
            for k in args.k:
                for t in args.tasks:
                    s = results[t]["summary"].get(f"{sweep_name(method, lr)}|K={k}")
                    cells.append(f"{s['dice_mean']:.3f} ± {s['dice_sd']:.3f}" if s else "-")
            lines.append(f"| {lr_text(lr)} | " + " | ".join(cells) + " |")
        lines.append("")
    report = args.report or os.path.join(d.workdir, "lr_sweep.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    d.say(f"report: {report}")


if __name__ == "__main__":
    main()
