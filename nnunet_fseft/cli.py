"""`nnunet-fseft` command line. Heavy imports happen inside each command."""
import argparse
import os
import sys

import numpy as np

from nnunet_fseft.errors import InputError
from nnunet_fseft.plans import PLANS_NAME


def cmd_env(args):
    from nnunet_fseft import discovery
    if discovery.EXT_FOLDER in discovery.listed_folders():
        print(f"# nnU-Net finds our trainers in this environment (nnUNet_extTrainer lists {discovery.EXT_FOLDER}).")
    else:
        print("# nnU-Net would not find our trainers here; run this (or add it to your shell profile):")
    print(discovery.export_line())


def cmd_adopt(args):
    from nnunet_fseft.foundation.adopt import adopt
    path, configuration = adopt(args.foundation, args.d, args.fold, args.checkpoint, args.plans_name, args.np,
                                args.keep_foundation_labels)
    print(f"Wrote {path}; fine-tune with: nnUNetv2_train {args.d} {configuration} FOLD -p {args.plans_name} "
          f"-tr nnUNetTrainerFSEFT_LoRA")


def cmd_kshot(args):
    from nnunet_fseft.datasets.kshot import write_kshot_splits
    path, splits, backup, warnings = write_kshot_splits(args.d, args.k, args.repeats, args.seed, args.test)
    if backup:
        print(f"Kept the previous splits as {backup}")
    for warning in warnings:
        print(f"Warning: {warning}")
    k = len(splits[0]["train"])
    every = " (all: every case outside the held-out set)" if str(args.k).strip().lower() == "all" else ""
    print(f"Wrote {path}: {len(splits)} folds of K={k}{every} support cases, "
          f"{len(splits[0]['val'])} held-out cases shared by every fold.")


def cmd_synth(args):
    if args.task == "brats":
        if args.organs is not None:
            raise InputError("--organs applies to --task ct only (BraTS-like cases are always labelled edema, "
                             "necrosis and enhancing tumour); leave --organs out.")
        from nnunet_fseft.datasets.synth_brats import synth_brats_dataset
        path = synth_brats_dataset(args.d, args.cases, seed=args.seed, name=args.name,
                                   population={"A": "source", "B": "target"}[args.scanner], num_test=args.test,
                                   shape=tuple(args.shape or (32, 32, 32)))
    else:
        from nnunet_fseft.datasets.synth import synth_dataset
        organs = args.organs if args.organs is not None else ["liver", "spleen", "kidney_left", "kidney_right"]
        path = synth_dataset(args.d, args.cases, organs, seed=args.seed, name=args.name, scanner=args.scanner,
                             num_test=args.test, shape=tuple(args.shape or (48, 48, 48)))
    print(f"Wrote {path}")


def cmd_combine(args):
    from nnunet_fseft.datasets.combine import combine
    from nnunet_fseft.datasets.dataset_json import ANNOTATIONS, read_dataset_json, read_json
    path = combine(args.d, args.o, args.name, args.label_map, args.copy, args.np)
    labels = {v: n for n, v in read_dataset_json(os.path.join(path, "dataset.json"))["labels"].items()}
    annotations = read_json(os.path.join(path, ANNOTATIONS), "run `nnunet-fseft combine` again")
    for source, a in annotations["sources"].items():
        print(f"{source}: " + ", ".join(f"{old} -> {new} {labels[new]}" for old, new in a["label_values"].items()))
    print(f"Wrote {path} (which classes each case annotates: {ANNOTATIONS}); pre-train a foundation on it with:\n"
          f"  nnUNetv2_plan_and_preprocess -d {args.o} --verify_dataset_integrity\n"
          f"  nnUNetv2_train {args.o} 3d_fullres all -tr nnUNetTrainerFSEFT_Foundation")


def cmd_benchmark(args):
    from nnunet_fseft.experiments.benchmark.runs import benchmark
    executor = None
    if args.executor != "none":
        from nnunet_fseft.experiments.benchmark.jobs import Executor
        executor = Executor(args.executor, args.jobs, wait=not args.no_wait, slurm={
            "partition": args.slurm_partition, "gpus_per_job": args.slurm_gpus_per_job, "time_min": args.slurm_time,
            "cpus_per_job": args.slurm_cpus_per_job, "mem_gb": args.slurm_mem_gb, "account": args.slurm_account,
            "qos": args.slurm_qos, "constraint": args.slurm_constraint})
    elif args.no_wait:
        raise InputError("--no-wait needs --executor slurm.")
    elif args.jobs != 1:
        raise InputError("--jobs needs --executor local or slurm.")
    result = benchmark(args.foundation, args.d, args.k, args.repeats, args.methods, args.test, args.o, args.fold,
                       args.device, executor=executor, report_only=args.report_only,
                       extend=args.keep_foundation_labels, reference=args.reference)
    if result.get("submitted"):
        return
    print(f"Wrote results.csv, per_case.csv, results.json, report.md and figures in {args.o}")
    if result.get("failed"):  # the other runs were made and reported; scripts still need to notice
        sys.exit(1)


def cmd_demo(args):
    if args.task == "brats":
        from nnunet_fseft.experiments.demo_brats import run_brats_demo
        run_brats_demo(args.workdir, args.device)
    else:
        from nnunet_fseft.experiments.demo import run_demo
        run_demo(args.workdir, args.device)


def cmd_params(args):
    from nnunet_fseft.plans.load import load_plans
    plans, dataset_json = load_plans(args.d, args.plans_name)  # before the trainers' imports: a wrong -p is said at once
    from nnunet_fseft.sharing.costs import method_costs
    from nnunet_fseft.foundation.record import find_trainer
    from nnunet_fseft.trainers import METHODS
    if args.c not in plans["configurations"]:
        raise InputError(f"Plans {args.plans_name} have no configuration '{args.c}'; available: "
                         f"{', '.join(plans['configurations'])}.")
    trainers = [find_trainer(t) for t in args.tr] if args.tr else list(METHODS.values())
    rows = method_costs(plans, dataset_json, args.c, trainers)
    print(f"{'method':<44} {'trainable':>12} {'total':>12} {'%':>7} {'file':>10} {'% of full':>9}")
    for r in rows:
        if "not_applicable" in r:
            print(f"{r['method']:<44} {'n/a':>12}  {r['not_applicable']}")
            continue
        print(f"{r['method']:<44} {r['trainable']:>12,} {r['total']:>12,} {100 * r['trainable'] / r['total']:>6.2f}% "
              f"{_size(r['file_bytes']):>10} {100 * r['file_bytes'] / r['full_bytes']:>8.2f}%")


def cmd_plans(args):
    from nnunet_fseft.plans.presets import apply_preset
    name = apply_preset(args.d, args.preset, args.plans_name, args.c, args.arch)
    print(f"wrote plans {name}; train the foundation with: nnUNetv2_train {args.d} {args.c} all "
          f"-tr nnUNetTrainerFSEFT_Pretrain -p {name}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def cmd_export(args):
    from nnunet_fseft.sharing.adapter_file import export_adapter
    path, size = export_adapter(args.model_folder, args.o, args.f, args.checkpoint)
    print(f"Wrote {path} ({_size(size)}) and {path}.json")


def cmd_import(args):
    from nnunet_fseft.sharing.adapter_file import import_adapter
    path = import_adapter(args.file, args.foundation, args.o)
    print(f"Wrote {path}; predict with nnUNetv2_predict_from_modelfolder -m {args.o} -f "
          f"{os.path.basename(os.path.dirname(path))[len('fold_'):]} (or nnUNetv2_predict, if {args.o} is in nnUNet_results)")


def cmd_merge(args):
    from nnunet_fseft.sharing.merge import merge_model
    for path in merge_model(args.model_folder, args.o):
        print(f"Wrote {path}")


def cmd_zeroshot(args):
    from nnunet_fseft.foundation.zeroshot import zeroshot
    dice, out = zeroshot(args.d, args.plans_name, args.f, args.o, args.device, not args.disable_tta, args.np,
                         args.reference)
    print(f"Zero-shot (K = 0) Dice of the foundation on the held-out cases (nnU-Net's summary.json in {out}):")
    for label, value in dice.items():
        print(f"  {label:<30} {value:.4f}")
    print(f"  {'mean':<30} {np.mean(list(dice.values())):.4f}")


# Flags several commands share, spelt as nnU-Net spells them (the long forms are aliases).
def _plans_arg(s, help: str) -> None:
    s.add_argument("-p", "--plans-name", dest="plans_name", default=PLANS_NAME, help=help)


def _device_arg(s) -> None:
    s.add_argument("-device", "--device", dest="device", default="cpu", choices=["cpu", "cuda"])


def _processes_arg(s, what: str) -> None:
    s.add_argument("-np", type=int, default=2, help=f"processes for {what} (default 2)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunet-fseft", description="Few-shot, parameter-efficient fine-tuning of "
                                "nnU-Net foundation models through the standard nnU-Net commands.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("env", help="print the nnUNet_extTrainer export for installs where discovery is not automatic")
    s.set_defaults(func=cmd_env)

    s = sub.add_parser("adopt", help="make a trained nnU-Net model the foundation of a target dataset")
    s.add_argument("--foundation", required=True, help="nnU-Net results folder TRAINER__PLANS__CONFIGURATION")
    s.add_argument("-f", "--fold", dest="fold", default="all", help="fold of the foundation to use (default: all)")
    s.add_argument("-chk", "--checkpoint", dest="checkpoint", default="checkpoint_final.pth")
    s.add_argument("-d", required=True, help="target dataset id or name (in nnUNet_raw)")
    s.add_argument("--keep-foundation-labels", action="store_true",
                   help="extend the foundation: the model outputs its classes and the target's new labels, learnt "
                        "from scans annotated only for those (number them after the foundation's values)")
    _plans_arg(s, "name of the plans to write (default FSEFTPlans; -p of nnUNetv2_train)")
    _processes_arg(s, "preprocessing")
    s.set_defaults(func=cmd_adopt)

    s = sub.add_parser("kshot", help="write K-shot splits_final.json (fold r = repeat r)")
    s.add_argument("-d", required=True)
    s.add_argument("-k", "--k", dest="k", required=True,
                   help="support cases per fold, or 'all': every case outside the held-out set")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test", type=int, default=10, help="held-out cases, the same for every fold")
    s.set_defaults(func=cmd_kshot)

    s = sub.add_parser("synth", help="write a synthetic raw nnU-Net dataset: CT-like abdomen or BraTS-like brain tumour MRI")
    s.add_argument("--task", default="ct", choices=["ct", "brats"],
                   help="ct: abdominal CT phantoms (default); brats: T1, T1ce, T2, FLAIR with edema, necrosis and "
                        "enhancing tumour, trained as nnU-Net regions")
    s.add_argument("-d", type=int, required=True)
    s.add_argument("--cases", type=int, required=True)
    s.add_argument("--organs", nargs="+", default=None,
                   help="ct only: the organs to label (default liver spleen kidney_left kidney_right)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", default=None)
    s.add_argument("--scanner", default="A", choices=["A", "B"],
                   help="ct: B is another scanner (noise, contrast, spacing); brats: A is the source population "
                        "(BraTS-2021-like), B the target (BraTS-Africa-like: thick slices, low SNR, bias, weak "
                        "enhancement, larger tumours)")
    s.add_argument("--test", type=int, default=0, help="extra cases in imagesTs/labelsTs")
    s.add_argument("--shape", type=int, nargs=3, default=None, help="z y x voxels (default 48 48 48 for ct, 32 32 32 for brats)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("combine", help="pool partially labelled raw datasets into one, for foundation pre-training")
    s.add_argument("-d", nargs="+", required=True, help="source dataset ids or names (in nnUNet_raw; only read)")
    s.add_argument("-o", type=int, required=True, help="id of the pooled dataset to write")
    s.add_argument("--name", default=None, help="its name (default Combined)")
    s.add_argument("--label-map", default=None, help='JSON {"source name": "unified name"}: synonyms, or '
                   'joining left and right ({"kidney_left": "kidney", "kidney_right": "kidney"})')
    s.add_argument("--copy", action="store_true", help="copy the images (default: symbolic links)")
    _processes_arg(s, "remapping label files")
    s.set_defaults(func=cmd_combine)

    s = sub.add_parser("plans", help="plans beside a dataset's nnU-Net plans, same preprocessing: another "
                       "network (MedNeXt, Swin-UNETR) and/or a narrow CPU preset")
    s.add_argument("-d", required=True, help="dataset id or name (planned with nnUNetv2_plan_and_preprocess)")
    s.add_argument("-p", "--plans-name", dest="plans_name", default="nnUNetPlans",
                   help="the source plans (default nnUNetPlans)")
    s.add_argument("-c", default="3d_fullres", help="configuration whose patch size a configuration without its own "
                   "takes (default 3d_fullres)")
    s.add_argument("--arch", default=None, choices=["mednext-s", "mednext-b", "mednext-m", "mednext-l", "swin-unetr"],
                   help="the network (MONAI's; pip install \"nnunet-fseft[monai]\"); the patch size is rounded to "
                        "what it divides (MedNeXt: 16, Swin-UNETR: 32)")
    s.add_argument("--preset", default=None, help="cpu_tiny or cpu_small: a narrow network for CPU tests and demos")
    s.set_defaults(func=cmd_plans)

    s = sub.add_parser("params", help="trainable and total parameters and adapter-file size of each method")
    s.add_argument("-d", required=True, help="dataset id or name (preprocessed)")
    _plans_arg(s, "plans name (default FSEFTPlans)")
    s.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    s.add_argument("-tr", nargs="+", default=None, help="trainers (default: every nnunet-fseft method)")
    s.set_defaults(func=cmd_params)

    s = sub.add_parser("export", help="write only what a method trained: a small adapter file")
    s.add_argument("model_folder", help="nnU-Net results folder TRAINER__PLANS__CONFIGURATION")
    s.add_argument("-o", required=True, help="adapter file to write (safetensors; FILE.json beside it)")
    s.add_argument("-f", "--fold", dest="f", default="0", help="fold (default 0)")
    s.add_argument("-chk", "--checkpoint", dest="checkpoint", default="checkpoint_final.pth")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="rebuild a model folder from an adapter file and its foundation")
    s.add_argument("file", help="adapter file written by `nnunet-fseft export`")
    s.add_argument("--foundation", required=True, help="the foundation's nnU-Net model folder")
    s.add_argument("-o", required=True, help="model folder to write")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("merge", help="merge LoRA/BitFit/AffineNorm/FT into plain weights: a model folder for nnU-Net alone")
    s.add_argument("model_folder", help="nnU-Net results folder TRAINER__PLANS__CONFIGURATION")
    s.add_argument("-o", required=True, help="model folder to write (e.g. …/nnUNetTrainer__FSEFTPlans__3d_fullres)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("zeroshot", help="Dice of the foundation alone on the held-out cases, for the labels it knows (K = 0)")
    s.add_argument("-d", required=True, help="target dataset id or name (adopted, with K-shot splits)")
    _plans_arg(s, "plans name (default FSEFTPlans)")
    s.add_argument("-f", "--fold", dest="f", type=int, default=0,
                   help="fold of splits_final.json whose held-out cases to score (default 0)")
    s.add_argument("-o", default=None, help="output folder (default nnUNet_results/DATASET/fseft_zeroshot__PLANS__CONFIG)")
    _device_arg(s)
    s.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (faster)")
    _processes_arg(s, "evaluation")
    s.add_argument("--reference", help="folder of the held-out cases' label maps to score against (default labelsTr; "
                                       "needed for a target adopted with --keep-foundation-labels)")
    s.set_defaults(func=cmd_zeroshot)

    s = sub.add_parser("benchmark", help="the FSEFT protocol: every method x K x repeat trained, predicted and scored")
    s.add_argument("--foundation", required=True, help="the foundation's nnU-Net model folder")
    s.add_argument("-f", "--fold", dest="fold", default="all", help="fold of the foundation (default all)")
    s.add_argument("-d", required=True, help="target dataset id or name (in nnUNet_raw; adopted if needed)")
    s.add_argument("-k", "--k", dest="k", nargs="+", default=[1, 5, 10],
                   help="support cases per run, or 'all': every case outside the held-out set; the K values run "
                        "in the order given (-k 5 1: K = 5 first)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--methods", nargs="+", default=["LoRA", "SpatialAdapter", "FullFT"],
                   help="trainer names without nnUNetTrainerFSEFT_ (also Start, the step-0 network, and "
                        "TargetOnly, the target trained alone from scratch)")
    s.add_argument("--test", type=int, default=10, help="held-out cases, the same for every run")
    s.add_argument("-o", required=True, help="output folder (results.csv, results.json, report.md, figures)")
    s.add_argument("--keep-foundation-labels", action="store_true",
                   help="the target extends the foundation (adopt --keep-foundation-labels): every class is scored")
    s.add_argument("--reference", help="folder of the held-out cases' full label maps to score against "
                                       "(needed with --keep-foundation-labels; default labelsTr)")
    _device_arg(s)
    s.add_argument("--executor", choices=["none", "local", "slurm"], default="none",
                   help="none (default): the runs one after another in this process; local or slurm: one job per "
                        "run through submitit (pip install \"nnunet-fseft[cluster]\"), on this machine or on SLURM")
    s.add_argument("--jobs", type=int, default=1, help="jobs running at once (local or slurm; default 1)")
    s.add_argument("--no-wait", action="store_true",
                   help="slurm: submit the jobs and return; --report-only later writes the report")
    s.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report of the runs finished so far in -o")
    g = s.add_argument_group("SLURM (--executor slurm)")
    g.add_argument("--slurm-partition", default=None, help="partition (default: the cluster's)")
    g.add_argument("--slurm-gpus-per-job", type=int, default=1, help="GPUs per job (default 1)")
    g.add_argument("--slurm-time", type=int, default=24 * 60, help="time limit per job in minutes (default 1440)")
    g.add_argument("--slurm-cpus-per-job", type=int, default=8, help="CPU cores per job (default 8)")
    g.add_argument("--slurm-mem-gb", type=int, default=32, help="memory per job in GB (default 32)")
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--slurm-qos", default=None)
    g.add_argument("--slurm-constraint", default=None)
    s.set_defaults(func=cmd_benchmark)

    s = sub.add_parser("demo", help="the whole few-shot loop on synthetic data, end to end")
    _device_arg(s)
    s.add_argument("--task", default="ct", choices=["ct", "brats"],
                   help="ct: a novel abdominal organ on another scanner (default); brats: brain-tumour MRI regions "
                        "on a shifted population (PEFT-MedNeXt's setting)")
    s.add_argument("--workdir", default=os.path.join(os.getcwd(), "nnunet_fseft_demo"))
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"nnunet-fseft {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
