"""`nnunet-fseft benchmark --executor local --jobs N` against the in-process benchmark, side by side in
one run: the same grid (methods x K x repeats) on the same synthetic base-organ task (spleen,
scanner B), each into a fresh output folder, so that every run trains; wall time of each and their
ratio, mean Dice per method (they should agree within repeat noise: it is the same protocol).

    python benchmarks/local_jobs.py --workdir /tmp/local_jobs --jobs 2
    python benchmarks/local_jobs.py --workdir /tmp/lj --methods BitFit LoRA --k 1 --repeats 2 --schedule 5 20

The foundation is trained as the demo trains it (or --foundation MODEL_FOLDER). Writes
WORKDIR/local_jobs.md and the two benchmark folders WORKDIR/in_process and WORKDIR/local_jobsN.
"""
import argparse
import json
import os
import time

from nnunet_fseft.experiments.demo import SHAPE, Demo


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--foundation", help="an nnU-Net model folder to use instead of training one")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["BitFit", "LoRA", "DecoderFT", "FullFT"])
    ap.add_argument("-k", "--k", dest="k", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--schedule", type=int, nargs=2, default=[5, 20], metavar=("EPOCHS", "ITERS"))
    args = ap.parse_args()

    from nnunet_fseft.datasets.safe_write import keep_existing
    from nnunet_fseft.datasets.synth import synth_dataset
    from nnunet_fseft.experiments.benchmark.jobs import Executor
    from nnunet_fseft.experiments.benchmark.protocol import machine
    from nnunet_fseft.experiments.benchmark.runs import benchmark

    d = Demo(args.workdir, "cpu")
    model = args.foundation or d.train_foundation(610, "BenchFoundation")[0]
    os.environ.update({"nnUNet_fseft_epochs": str(args.schedule[0]), "nnUNet_fseft_iters_per_epoch": str(args.schedule[1]),
                       "nnUNet_n_proc_DA": "0"})
    dataset = 613
    if not os.path.isdir(os.path.join(os.environ["nnUNet_raw"], f"Dataset{dataset}_LocalJobs")):
        synth_dataset(dataset, max(args.k) + 4 + args.test, ["spleen"], seed=dataset, name="LocalJobs", scanner="B",
                      shape=(SHAPE,) * 3)
    d.adopt(model, dataset)  # once, before both grids: neither one's wall time counts it
    measured = []
    for mode, executor in (("in-process", None), (f"local, --jobs {args.jobs}", Executor("local", args.jobs))):
        out = os.path.join(d.workdir, "in_process" if executor is None else f"local_jobs{args.jobs}")
        keep_existing(out)  # a fresh folder: every run trains (an earlier one is kept)
        d.say(f"{mode}: {len(args.methods) * len(args.k) * args.repeats} runs")
        t0 = time.time()
        result = benchmark(model, str(dataset), args.k, args.repeats, args.methods, args.test, out, executor=executor)
        wall = time.time() - t0
        dice = {key: s["dice_mean"] for key, s in json.load(open(os.path.join(out, "results.json")))["summary"].items()}
        measured.append((mode, wall, len(result["runs"]), len(result["failed"]), dice))
        d.say(f"{mode}: {wall:.0f} s")
    m = machine()
    base = measured[0][1]
    lines = [f"# `--executor local --jobs {args.jobs}` against in-process", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}. Grid: {' '.join(args.methods)}, "
             f"K = {args.k}, {args.repeats} repeat(s), {args.test} held-out scans, schedule {args.schedule[0]} "
             f"epochs x {args.schedule[1]} iterations. The foundation is adopted once before both; each grid's "
             f"wall time counts its own zero-shot prediction (once, before its runs).", "",
             "| mode | runs (failed) | wall s | / in-process | " + " | ".join(
                 f"{key.replace('|', ' ')} Dice" for key in measured[0][4]) + " |",
             "|---|---|---|---|" + "---|" * len(measured[0][4])]
    for mode, wall, runs, failed, dice in measured:
        cells = " | ".join(f"{dice.get(key, float('nan')):.3f}" for key in measured[0][4])
        lines.append(f"| {mode} | {runs} ({failed}) | {wall:.0f} | {wall / base:.2f} | {cells} |")
    path = os.path.join(d.workdir, "local_jobs.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    d.say(f"report: {path}")


if __name__ == "__main__":
    main()
