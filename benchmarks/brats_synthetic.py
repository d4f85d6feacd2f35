"""PEFT-MedNeXt's protocol on synthetic brain-tumour MRI with `nnunet-fseft benchmark`: a
region-based foundation trained on the source population (BraTS-2021-like), adapted to the
shifted target (BraTS-Africa-like) from K = 5 and K = all of its small training pool, every method
against the foundation as it is (source-only) and the target alone from scratch (TargetOnly).

1. the foundation: --source-cases source cases, planned, preprocessed and trained as `nnunet-fseft
   demo --task brats` trains it, for --foundation-schedule (or --foundation MODEL_FOLDER);
2. the source's own held-out Dice: the foundation on --test new source cases (what the shift costs
   is measured against it);
3. the target: --pool + --test cases of the shifted population; `benchmark` (adopt, K-shot folds,
   nnUNetv2_train, nnUNetv2_predict on the same held-out scans, nnU-Net's evaluator per region,
   report, boxplots). K = all takes the whole pool, so its repeats differ by training randomness only.
Resumable: run it again and finished runs are skipped.

    python benchmarks/brats_synthetic.py --workdir /tmp/brats_bench --schedule 10 20 --test 6
    python benchmarks/brats_synthetic.py --workdir /tmp/bm --arch mednext-s --methods ConvAdapter FullFT
    (add Start to --methods for the step-0 row; on matched regions it is the zero-shot row, tested)
"""
import argparse
import json
import os
import platform

from nnunet_fseft.experiments.demo import Demo
from nnunet_fseft.experiments.demo_brats import SHAPE, score, train_brats_foundation
from nnunet_fseft.plans.presets import ARCHITECTURES

FOUNDATION_ID, SOURCE_TEST_ID, TARGET_ID = 620, 621, 622
METHODS = ["FullFT", "DecoderFT", "LoRA", "BitFit", "ConvAdapter", "ConvAdapterParallel", "MedAdapter",
           "LinearProbe", "SpatialAdapter", "TargetOnly"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--foundation", help="a region-based nnU-Net model folder to use instead of training one")
    ap.add_argument("--arch", choices=list(ARCHITECTURES),
                    help="the trained foundation's network (default nnU-Net's own), at the preset's size")
    ap.add_argument("--source-cases", type=int, default=32, help="source cases the foundation is trained on")
    ap.add_argument("--foundation-schedule", type=int, nargs=2, default=[60, 20], metavar=("EPOCHS", "ITERS"))
    ap.add_argument("-k", "--k", dest="k", nargs="+", default=["5", "all"], help="support scans per run, or 'all'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test", type=int, default=8, help="held-out scans of the target (and of the source)")
    ap.add_argument("--pool", type=int, default=10, help="target training scans outside the held-out ones (K = all)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--schedule", type=int, nargs=2, metavar=("EPOCHS", "ITERS"),
                    help="epochs and iterations per epoch of every run, TargetOnly included (the same budget); "
                         "default: each trainer's own schedule")
    ap.add_argument("--report", help="combined report (default WORKDIR/report.md)")
    return ap


def source_held_out(d: Demo, model: str, test: int) -> dict:
    """The foundation on new cases of its own population: its Dice before any shift."""
    from nnunet_fseft.datasets.dataset_json import read_dataset_json
    from nnunet_fseft.datasets.synth_brats import synth_brats_dataset
    raw = os.path.join(os.environ["nnUNet_raw"], f"Dataset{SOURCE_TEST_ID}_BenchBraTSSourceTest")
    if not os.path.isdir(raw):
        synth_brats_dataset(SOURCE_TEST_ID, test, seed=SOURCE_TEST_ID, name="BenchBraTSSourceTest",
                            population="source", shape=(SHAPE,) * 3)
    pred = os.path.join(d.workdir, "source_held_out")
    if not os.path.isdir(pred):
        d.run(["nnUNetv2_predict_from_modelfolder", "-i", os.path.join(raw, "imagesTr"), "-o", pred, "-m", model,
               "-f", "all", "-device", d.device, "--disable_tta"])
    with open(os.path.join(model, "plans.json")) as f:
        plans = json.load(f)
    return score("source held-out", 0, os.path.join(raw, "labelsTr"), pred, plans,
                 read_dataset_json(os.path.join(model, "dataset.json")))


def main(args=None):
    from nnunet_fseft.datasets.synth_brats import synth_brats_dataset
    from nnunet_fseft.experiments.benchmark.protocol import machine
    from nnunet_fseft.experiments.benchmark.runs import benchmark

    if args is None:
        ap = parser()
        args = ap.parse_args()
        if args.foundation and args.arch:
            ap.error("--arch chooses the network of the foundation this script trains; a --foundation has its own")
    d = Demo(args.workdir, args.device)
    model = args.foundation or train_brats_foundation(d, FOUNDATION_ID, "BenchBraTSFoundation", args.source_cases,
                                                      args.foundation_schedule, args.arch)[0]
    if args.schedule:
        os.environ.update({"nnUNet_fseft_epochs": str(args.schedule[0]),
                           "nnUNet_fseft_iters_per_epoch": str(args.schedule[1])})
        length = f"every run {args.schedule[0]} epochs x {args.schedule[1]} iterations"
    else:
        length = "each trainer's own schedule"
    source = source_held_out(d, model, args.test)
    d.say(f"source held-out mean Dice {source['mean_dice']:.3f} ({source['dice']})")
    raw = os.path.join(os.environ["nnUNet_raw"], f"Dataset{TARGET_ID}_BenchBraTSTarget")
    if not os.path.isdir(raw):
        synth_brats_dataset(TARGET_ID, args.pool + args.test, seed=TARGET_ID, name="BenchBraTSTarget",
                            population="target", shape=(SHAPE,) * 3)
    out = os.path.join(d.workdir, "target")
    benchmark(model, str(TARGET_ID), args.k, args.repeats, args.methods, args.test, out, device=args.device)
    text = open(os.path.join(out, "report.md")).read().split("\n", 3)[3]  # without its title and machine line
    m = machine()
    report = args.report or os.path.join(d.workdir, "report.md")
    figures = os.path.relpath(out, os.path.dirname(os.path.abspath(report)))
    for f in os.listdir(out):
        if f.endswith(".png"):
            text = text.replace(f"]({f})", f"]({figures}/{f})")
    source_line = (f"The foundation on {args.test} held-out cases of its own (source) population: mean Dice "
                   f"{source['mean_dice']:.3f} (" + ", ".join(f"{r} {v:.3f}" for r, v in source["dice"].items()) +
                   f"; sensitivity {source['sensitivity']:.3f}, specificity {source['specificity']:.3f}).")
    with open(report, "w") as f:
        f.write("\n".join([f"# PEFT-MedNeXt's protocol on synthetic BraTS-like MRI ({args.device})", "",
                           f"Machine: {m['cpu']} ({platform.platform()}), {m['cores']} cores, GPU: {m['gpu']}. "
                           f"{length}; K = {args.k}, {args.repeats} repeats, {args.test} held-out target scans, "
                           f"pool {args.pool}; foundation `{os.path.basename(model)}`.", "", source_line, "", text]))
    d.say(f"report: {report}")


if __name__ == "__main__":
    main()
