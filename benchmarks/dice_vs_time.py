"""Dice against training wall time for the runs of one method in a benchmark folder: how soon a run is
within 0.01 of its final Dice.

The Dice is nnU-Net's per-epoch pseudo-Dice (foreground mean on patches of the validation cases,
which in a K-shot split are the held-out scans), read from each run's checkpoint_final.pth; the
time is from the start of its first epoch. Writes dice_vs_time_METHOD.png in the benchmark folder
and prints one row per run.

    python benchmarks/dice_vs_time.py --benchmark /tmp/fsb/base --method LoRA [--k 1]
"""
import argparse
import json
import os


def curves(benchmark: str, method: str, k: int) -> list:
    """(repeat, seconds from the first epoch's start, pseudo-Dice) per finished run of `method` at K."""
    from nnunet_fseft.foundation.record import read_checkpoint
    manifest = json.load(open(os.path.join(benchmark, "benchmark.json")))
    dataset = manifest["identity"]["dataset"]
    rows = [json.loads(line) for line in open(os.path.join(benchmark, "runs.jsonl"))]
    rows = {(r["repeat"]): r for r in rows if r["method"] == method and r["K"] == k and "failed" not in r}
    out = []
    for repeat, row in sorted(rows.items()):
        model = next(d for d in os.listdir(os.path.join(os.environ["nnUNet_results"], dataset))
                     if d.startswith(f"nnUNetTrainerFSEFT_{method}__"))
        log = read_checkpoint(os.path.join(os.environ["nnUNet_results"], dataset, model, f"fold_{row['fold']}",
                                           "checkpoint_final.pth"))["logging"]
        start = log["epoch_start_timestamps"][0]
        out.append((repeat, [t - start for t in log["epoch_end_timestamps"]], list(log["mean_fg_dice"])))
    return out


def time_to_final(seconds: list, dice: list, tolerance: float = 0.01) -> float:
    """The first time after which the pseudo-Dice stays within `tolerance` of its last value."""
    final = dice[-1]
    for i in range(len(dice)):
        if all(abs(d - final) <= tolerance for d in dice[i:]):
            return seconds[i]
    return seconds[-1]


def main():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", required=True, help="a benchmark's output folder (runs.jsonl, benchmark.json)")
    ap.add_argument("--method", required=True)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--results", help="nnUNet_results of the benchmark (default: the environment's)")
    args = ap.parse_args()
    if args.results:
        os.environ["nnUNet_results"] = args.results
    runs = curves(args.benchmark, args.method, args.k)
    fig, ax = plt.subplots(figsize=(5, 4))
    print("| repeat | epochs | train s | final pseudo-Dice | within 0.01 of it after s (fraction of training) |")
    print("|---|---|---|---|---|")
    for repeat, seconds, dice in runs:
        ax.plot(seconds, dice, marker=".", label=f"repeat {repeat}")
        t = time_to_final(seconds, dice)
        print(f"| {repeat} | {len(dice)} | {seconds[-1]:.0f} | {dice[-1]:.3f} | {t:.0f} ({t / seconds[-1]:.0%}) |")
    ax.set(xlabel="training wall time (s)", ylabel="pseudo-Dice (held-out patches)", title=f"{args.method}, K = {args.k}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(args.benchmark, f"dice_vs_time_{args.method}.png")
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
