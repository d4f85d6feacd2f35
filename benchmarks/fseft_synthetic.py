"""The FSEFT protocol on synthetic data with `nnunet-fseft benchmark`: a base-organ task and a
novel-organ task, K = 1, 5, 10, repeats, every method (or --methods).

1. a foundation on five base organs (scanner A), planned, preprocessed and trained with
   nnUNetv2_train as the demo trains it (or --foundation MODEL_FOLDER);
2. two targets on another scanner (B): a base organ the foundation knows (default spleen; the
   report adds the zero-shot row, and the script stops before any of its training when the foundation
   does not segment that organ zero-shot: run it again with another --organ, or --tasks novel), and
   pancreas, a novel, low-contrast organ placed by its neighbours;
3. `nnunet_fseft.experiments.benchmark.runs.benchmark` for each: adopt, K-shot folds, nnUNetv2_train,
   nnUNetv2_predict on the same held-out scans (also the query volumes of transductive methods),
   nnU-Net's evaluator, report and figures.
With `--tasks extend`: the pancreas added to the foundation's organs (`--keep-foundation-labels`), from
scans labelled only for it, against zero-shot on the old organs and a separate K-shot model on the pancreas.
Resumable: run it again and finished runs are skipped. Writes WORKDIR/{base,novel}/ and one
combined report (--report, figures copied beside it).

    python benchmarks/fseft_synthetic.py --workdir /tmp/fseft_bench --device cuda
    python benchmarks/fseft_synthetic.py --workdir /tmp/fb --k 1 --repeats 3 --methods LoRA FullFT \\
        --report /tmp/fb/report.md
    python benchmarks/fseft_synthetic.py --workdir /tmp/fm --arch mednext-s --methods Start ConvAdapter FullFT
    (--schedule EPOCHS ITERS fixes every run's length instead of the trainers' own schedule)
"""
import argparse
import os
import platform
import shutil

import numpy as np

from nnunet_fseft.experiments.demo import BASE_ORGANS, Demo, NOVEL_ORGAN, SHAPE
from nnunet_fseft.plans.presets import ARCHITECTURES

TASKS = ("base", "novel", "extend")
EXTEND_ID, SEPARATE_ID = 613, 614


def task_dataset(task: str, base_organ: str):
    """(dataset id, name, organ, output folder name) of a task; each base organ has a dataset of its own."""
    if task == "novel":
        return 612, "BenchNovel", NOVEL_ORGAN, "novel"
    if base_organ == "spleen":
        return 611, "BenchBase", "spleen", "base"
    return 640 + BASE_ORGANS.index(base_organ), f"BenchBase{base_organ.capitalize()}", base_organ, f"base_{base_organ}"


def parser(description=__doc__, tasks=("base", "novel"), methods=None, ks=(1, 5, 10)) -> argparse.ArgumentParser:
    """The command line; other scripts run the same protocol with other defaults."""
    from nnunet_fseft.trainers import METHODS
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--foundation", help="an nnU-Net model folder to use instead of training one")
    ap.add_argument("--arch", choices=list(ARCHITECTURES),
                    help="the trained foundation's network (default nnU-Net's own), at the preset's size")
    ap.add_argument("--tasks", nargs="+", default=list(tasks), choices=list(TASKS),
                    help="base, novel, and extend: the novel organ added to the foundation's organs "
                         "(adopt --keep-foundation-labels), from scans that label only it")
    ap.add_argument("--organ", default="spleen", choices=BASE_ORGANS, help="organ of the base task")
    ap.add_argument("-k", "--k", dest="k", type=int, nargs="+", default=list(ks),
                    help="support scans per run, run in the order given (-k 5 1: K = 5 first)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test", type=int, default=8, help="held-out scans per task")
    ap.add_argument("--methods", nargs="+", default=methods or ["Start"] + [m[len("nnUNetTrainerFSEFT_"):] for m in METHODS],
                    help="methods to run; Start is the untrained network every method starts from (step 0)")
    ap.add_argument("--schedule", "--finetune", dest="schedule", type=int, nargs=2,
                    help="epochs and iterations per epoch of every fine-tuning (default: each trainer's own "
                         "schedule, which follows K and stops on a training-loss plateau)")
    ap.add_argument("--pool", type=int, default=10,
                    help="scans per task outside the held-out ones that the K support scans are drawn from "
                         "(at least the largest K): with a pool of K every repeat draws the same support")
    ap.add_argument("--report", help="combined report to write (default WORKDIR/report.md)")
    return ap


def main(args=None):
    from nnunet_fseft.experiments.benchmark.runs import benchmark
    from nnunet_fseft.experiments.benchmark.protocol import machine
    from nnunet_fseft.datasets.synth import synth_dataset

    if args is None:
        ap = parser()
        args = ap.parse_args()
        if args.foundation and args.arch:
            ap.error("--arch chooses the network of the foundation this script trains; a --foundation has its own")
    d = Demo(args.workdir, args.device)
    model = args.foundation or d.train_foundation(610, "BenchFoundation", args.arch)[0]
    if args.schedule:
        os.environ.update({"nnUNet_fseft_epochs": str(args.schedule[0]),
                           "nnUNet_fseft_iters_per_epoch": str(args.schedule[1])})
        length = f"Fine-tuning schedule {args.schedule[0]} epochs x {args.schedule[1]} iterations"
    else:
        for var in ("nnUNet_fseft_epochs", "nnUNet_fseft_iters_per_epoch"):
            os.environ.pop(var, None)
        length = "Each trainer's own fine-tuning schedule (length from K, early stop on a training-loss plateau)"
    report = args.report or os.path.join(d.workdir, "report.md")
    figures = os.path.splitext(report)[0]
    os.makedirs(figures, exist_ok=True)
    m = machine()
    parts = [f"# FSEFT benchmark on synthetic data ({args.device})", "",
             f"Machine: {m['cpu']} ({platform.platform()}), {m['cores']} cores, GPU: {m['gpu']}. "
             f"{length}; K = {args.k}, {args.repeats} repeat(s), "
             f"{args.test} held-out scans per task; foundation `{os.path.basename(model)}`.", ""]
    for task in args.tasks:
        if task == "extend":
            parts += extend_task(d, model, args)
            continue
        dataset, name, organ, folder = task_dataset(task, args.organ)
        raw = os.path.join(os.environ["nnUNet_raw"], f"Dataset{dataset}_{name}")
        if not os.path.isdir(raw):
            synth_dataset(dataset, max(args.pool, *args.k) + args.test, [organ], seed=dataset, name=name, scanner="B",
                          shape=(SHAPE,) * 3)
        d.say(f"{task} organ task ({organ}): nnunet-fseft benchmark")
        out = os.path.join(d.workdir, folder)
        benchmark(model, str(dataset), args.k, args.repeats, args.methods, args.test, out, device=args.device,
                  base_organs=task == "base")
        text = open(os.path.join(out, "report.md")).read().split("\n", 3)[3]  # without its title and machine line
        for f in os.listdir(out):
            if f.endswith(".png"):
                shutil.copy(os.path.join(out, f), os.path.join(figures, f"{task}_{f}"))
                text = text.replace(f"]({f})", f"]({os.path.basename(figures)}/{task}_{f})")
        parts += [f"## {task.capitalize()} organ: {organ}", "", text]
    with open(report, "w") as f:
        f.write("\n".join(parts))
    d.say(f"report: {report}")


def _rewrite_labels(src: str, dst: str, edit) -> None:
    """Every label file of `src` written to `dst` as edit(array)."""
    import SimpleITK as sitk
    os.makedirs(dst, exist_ok=True)
    for f in sorted(os.listdir(src)):
        image = sitk.ReadImage(os.path.join(src, f))
        new = sitk.GetImageFromArray(edit(sitk.GetArrayFromImage(image)).astype(np.uint8))
        new.CopyInformation(image)
        sitk.WriteImage(new, os.path.join(dst, f))


def extend_datasets(args, reference: str):
    """The extend task's two datasets of the same scanner-B scans (same case names, so the same folds and
    held-out scans): EXTEND_ID labels only the pancreas, at the value after the foundation's five organs,
    to extend the foundation; SEPARATE_ID labels it as 1, for the separate K-shot model. `reference` gets
    every scan's full label map (the foundation's organs and the pancreas)."""
    import json
    from nnunet_fseft.datasets.synth import synth_dataset
    new = len(BASE_ORGANS) + 1
    raw_root = os.environ["nnUNet_raw"]
    extend = os.path.join(raw_root, f"Dataset{EXTEND_ID}_BenchExtend")
    if not os.path.isdir(extend):
        synth_dataset(EXTEND_ID, max(args.pool, *args.k) + args.test, BASE_ORGANS + [NOVEL_ORGAN], seed=EXTEND_ID,
                      name="BenchExtend", scanner="B", shape=(SHAPE,) * 3)
        labels = os.path.join(extend, "labelsTr")
        shutil.copytree(labels, reference)
        _rewrite_labels(reference, labels, lambda a: np.where(a == new, new, 0))
        meta_path = os.path.join(extend, "dataset.json")
        meta = json.load(open(meta_path))
        with open(meta_path, "w") as f:
            json.dump({**meta, "labels": {"background": 0, NOVEL_ORGAN: new}}, f, indent=2)
    separate = os.path.join(raw_root, f"Dataset{SEPARATE_ID}_BenchExtendSeparate")
    if not os.path.isdir(separate):
        os.makedirs(separate)
        os.symlink(os.path.join(extend, "imagesTr"), os.path.join(separate, "imagesTr"))
        _rewrite_labels(reference, os.path.join(separate, "labelsTr"), lambda a: (a == new))
        meta = json.load(open(os.path.join(extend, "dataset.json")))
        meta = {k: v for k, v in meta.items() if not k.startswith("fseft_")}
        with open(os.path.join(separate, "dataset.json"), "w") as f:
            json.dump({**meta, "labels": {"background": 0, NOVEL_ORGAN: 1}}, f, indent=2)
    return str(EXTEND_ID), str(SEPARATE_ID)


def extend_task(d, model: str, args) -> list:
    """The extend task's benchmarks and its report section: per label, the extended model against the
    foundation's zero-shot (its organs) and against the separate K-shot model (the pancreas)."""
    from nnunet_fseft.experiments.benchmark.runs import RUNS, benchmark
    reference = os.path.join(d.workdir, "extend_reference")
    extend, separate = extend_datasets(args, reference)
    methods = [m for m in args.methods if m != "TargetOnly"]  # random weights know no foundation class to keep
    d.say("extend task: the pancreas added to the foundation's organs (nnunet-fseft benchmark --keep-foundation-labels)")
    out_extend, out_separate = os.path.join(d.workdir, "extend"), os.path.join(d.workdir, "extend_separate")
    benchmark(model, extend, args.k, args.repeats, methods, args.test, out_extend, device=args.device, extend=True,
              reference=reference)
    d.say("extend task: the separate K-shot pancreas model on the same scans")
    benchmark(model, separate, args.k, args.repeats, methods, args.test, out_separate, device=args.device)

    def dice(folder):  # (method, K, label) -> Dice of each repeat
        import json
        found = {}
        for line in open(os.path.join(folder, RUNS)):
            row = json.loads(line)
            for label, m in row.get("per_label", {}).items():
                found.setdefault((row["method"], row["K"], label), {})[row["repeat"]] = m["dice"]
        return found

    import json
    ext, sep = dice(out_extend), dice(out_separate)
    zero = json.load(open(os.path.join(out_extend, "zero_shot.json")))

    def ms(values):
        v = list(values)
        return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    lines = ["## Extend: the pancreas added to the foundation's five organs", "",
             "Scans of scanner B labelled only for the pancreas; `adopt --keep-foundation-labels`. Old organs "
             "against the foundation's zero-shot, the pancreas against a separate K-shot model of the same method "
             "(`extend_separate/`), the same folds and held-out scans; mean ± sd over repeats.", "",
             "| method | K | label | extended | reference | extended - reference |", "|---|---|---|---|---|---|"]
    for (method, k, label), repeats in sorted(ext.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
        if label in zero:
            ref, what = [zero[label]], "zero-shot"
        elif (method, k, label) in sep:
            ref, what = list(sep[(method, k, label)].values()), "separate"
        else:
            continue
        lines.append(f"| {method} | {k} | {label} | {ms(repeats.values())} | {ms(ref)} ({what}) | "
                     f"{np.mean(list(repeats.values())) - np.mean(ref):+.3f} |")
    return lines + [""]


if __name__ == "__main__":
    main()
