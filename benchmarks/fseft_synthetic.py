"""The FSEFT protocol on synthetic data with `nnunet-fseft benchmark`: a base-organ task and a
novel-organ task, K = 1, 5, 10, repeats, every method (or --methods).

1. a foundation on five base organs (scanner A), planned, preprocessed and trained with
   nnUNetv2_train as the demo trains it (or --foundation MODEL_FOLDER);
2. two targets on another scanner (B): spleen, an organ the foundation knows (the report adds
   the zero-shot row), and pancreas, a novel, low-contrast organ placed by its neighbours;
3. `nnunet_fseft.benchmark.benchmark` for each: adopt, K-shot folds, nnUNetv2_train,
   nnUNetv2_predict on the same held-out scans, nnU-Net's evaluator, report and figures.
Resumable: run it again and finished runs are skipped. Writes WORKDIR/{base,novel}/ and one
combined report (--report, figures copied beside it).

    python benchmarks/fseft_synthetic.py --workdir /tmp/fseft_bench --device cuda
    python benchmarks/fseft_synthetic.py --workdir /tmp/fb --k 1 5 --repeats 1 --methods LoRA FullFT \\
        --schedule 10 10 --report benchmarks/results/fseft_synthetic_cpu.md
"""
import argparse
import os
import platform
import shutil

from nnunet_fseft.demo import BASE_ORGANS, NOVEL_ORGAN, SCHEDULES, SHAPE, Demo

TASKS = {"base": (611, "spleen"), "novel": (612, NOVEL_ORGAN)}


def foundation(d: Demo) -> str:
    from nnunet_fseft.plans_presets import apply_preset
    from nnunet_fseft.synth import synth_dataset
    plans = "nnUNetPlans_cpu_tiny" if d.device == "cpu" else "nnUNetPlans_cpu_small"
    folder = os.path.join(d.env["nnUNet_results"], "Dataset610_BenchFoundation",
                          f"nnUNetTrainerFSEFT_Pretrain__{plans}__3d_fullres")
    if os.path.isfile(os.path.join(folder, "fold_all", "checkpoint_final.pth")):
        return folder
    d.say("foundation: synthesising, planning, training (nnUNetv2_train)")
    synth_dataset(610, 16, BASE_ORGANS, seed=0, name="BenchFoundation", shape=(SHAPE,) * 3)
    d.run(["nnUNetv2_plan_and_preprocess", "-d", "610", "-c", "3d_fullres", "-np", "2"])
    assert apply_preset("610", "cpu_tiny" if d.device == "cpu" else "cpu_small") == plans
    d.train("610", "all", plans, "nnUNetTrainerFSEFT_Pretrain", SCHEDULES[d.device]["foundation"])
    return folder


def main():
    from nnunet_fseft.benchmark import benchmark, machine
    from nnunet_fseft.synth import synth_dataset
    from nnunet_fseft.trainers import METHODS

    every = [m[len("nnUNetTrainerFSEFT_"):] for m in METHODS]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--foundation", help="an nnU-Net model folder to use instead of training one")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test", type=int, default=8, help="held-out scans per task")
    ap.add_argument("--methods", nargs="+", default=every)
    ap.add_argument("--schedule", type=int, nargs=2, help="epochs and iterations per epoch of every fine-tuning "
                                                          "(default: the demo's for the device)")
    ap.add_argument("--report", help="combined report to write (default WORKDIR/report.md)")
    args = ap.parse_args()

    d = Demo(args.workdir, args.device)
    model = args.foundation or foundation(d)
    epochs, iters = args.schedule or SCHEDULES[args.device]["finetune"]
    os.environ.update({"nnUNet_fseft_epochs": str(epochs), "nnUNet_fseft_iters_per_epoch": str(iters),
                       "nnUNet_compile": "f", "nnUNet_def_n_proc": "2"})
    report = args.report or os.path.join(d.workdir, "report.md")
    figures = os.path.splitext(report)[0]
    os.makedirs(figures, exist_ok=True)
    m = machine()
    parts = [f"# FSEFT benchmark on synthetic data ({args.device})", "",
             f"Machine: {m['cpu']} ({platform.platform()}), {m['cores']} cores, GPU: {m['gpu']}. "
             f"Fine-tuning schedule {epochs} epochs x {iters} iterations; K = {args.k}, {args.repeats} repeat(s), "
             f"{args.test} held-out scans per task; foundation `{os.path.basename(model)}`.", ""]
    for task in args.tasks:
        dataset, organ = TASKS[task]
        raw = os.path.join(d.env["nnUNet_raw"], f"Dataset{dataset}_Bench{task.capitalize()}")
        if not os.path.isdir(raw):
            synth_dataset(dataset, max(args.k) + args.test, [organ], seed=dataset, name=f"Bench{task.capitalize()}",
                          scanner="B", shape=(SHAPE,) * 3)
        d.say(f"{task} organ task ({organ}): nnunet-fseft benchmark")
        out = os.path.join(d.workdir, task)
        benchmark(model, str(dataset), args.k, args.repeats, args.methods, args.test, out, device=args.device)
        text = open(os.path.join(out, "report.md")).read().split("\n", 3)[3]  # without its title and machine line
        for name in os.listdir(out):
            if name.endswith(".png"):
                shutil.copy(os.path.join(out, name), os.path.join(figures, f"{task}_{name}"))
                text = text.replace(f"]({name})", f"]({os.path.basename(figures)}/{task}_{name})")
        parts += [f"## {task.capitalize()} organ: {organ}", "", text]
    with open(report, "w") as f:
        f.write("\n".join(parts))
    d.say(f"report: {report}")


if __name__ == "__main__":
    main()
