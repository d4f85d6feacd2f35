"""Iterations per second of LoRA training fed three ways, side by side in one run:

- cpu:     nnU-Net's own data path (batchgeneratorsv2 augmentation in nnUNet_n_proc_DA workers);
- gpu:     the GPU data path (nnunet_fseft/training/gpu_data/loader.py: support set, crops and augmentation on the device);
- premade: batches made once before timing and kept on the device (no data loading at all: the limit).

It builds its own workspace: a synthetic CT-like foundation dataset and a K-shot target at --shape,
nnU-Net's default plans (`nnUNetv2_plan_and_preprocess`, the default 3d_fullres network), a
foundation trained for a couple of iterations (its weights do not matter for speed), `adopt` and
`kshot`, then one nnUNetTrainerFSEFT_LoRA per mode, built as nnUNetv2_train builds it, timed on
nnU-Net's own `train_step`. Also times the loader alone (batches/s without training).

    python benchmarks/data_path.py -o /tmp/data_path                # GPU, nnUNet_n_proc_DA=2
    python benchmarks/data_path.py -o /tmp/dp --device cpu --shape 48 48 48 --steps 3 --warmup 1
"""
import argparse
import json
import os
import platform
import time

from nnunet_fseft.plans import PLANS_NAME
from nnunet_fseft.runner import run

FOUNDATION_ID, TARGET_ID = "900", "901"
DRAIN = 16  # more than nnU-Net's training queue holds (num_cached = max(6, nnUNet_n_proc_DA // 2))


def prepare(args):
    """Synthetic foundation + target datasets, default plans, a briefly trained foundation, adopt, kshot;
    the commands' output goes to -o/log.txt."""
    log = os.path.join(args.o, "log.txt")

    def sh(*command, env=None):
        print("$", " ".join(str(a) for a in command), flush=True)
        run(command, log=log, env=env)

    shape = [str(s) for s in args.shape]
    results = os.path.join(os.environ["nnUNet_results"], "Dataset900_DataPathFoundation")
    model = os.path.join(results, "nnUNetTrainerFSEFT_Pretrain__nnUNetPlans__3d_fullres")
    if not os.path.isfile(os.path.join(model, "fold_all", "checkpoint_final.pth")):
        sh("nnunet-fseft", "synth", "-d", FOUNDATION_ID, "--cases", "4", "--shape", *shape, "--name", "DataPathFoundation")
        sh("nnUNetv2_plan_and_preprocess", "-d", FOUNDATION_ID, "-c", "3d_fullres", "-np", str(args.np))
        sh("nnUNetv2_train", FOUNDATION_ID, "3d_fullres", "all", "-tr", "nnUNetTrainerFSEFT_Pretrain",
           "-device", args.device, env={"nnUNet_fseft_epochs": "1", "nnUNet_fseft_iters_per_epoch": "2",
                                        "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f"})
    splits = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset901_DataPathTarget", "splits_final.json")
    if not os.path.isfile(splits):
        sh("nnunet-fseft", "synth", "-d", TARGET_ID, "--cases", str(args.k + 1), "--shape", *shape, "--organs", "spleen",
           "--scanner", "B", "--seed", "3", "--name", "DataPathTarget")
        sh("nnunet-fseft", "adopt", "--foundation", model, "-d", TARGET_ID, "-np", str(args.np))
        sh("nnunet-fseft", "kshot", "-d", TARGET_ID, "-k", str(args.k), "--test", "1")


def trainer_for(mode: str, device):
    from nnunetv2.run.run_training import get_trainer_from_args
    os.environ["nnUNet_fseft_gpu_data"] = "1" if mode == "gpu" else "0"
    trainer = get_trainer_from_args(TARGET_ID, "3d_fullres", 0, "nnUNetTrainerFSEFT_LoRA", PLANS_NAME, device=device)
    trainer.initialize()
    trainer.network.train()
    return trainer


def _finish(*loaders):
    for loader in loaders:
        if hasattr(loader, "_finish"):
            loader._finish()


def time_mode(mode: str, args, device) -> dict:
    import torch
    trainer = trainer_for(mode, device)
    train, val = trainer.get_dataloaders()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if mode == "premade":
        premade = []
        for _ in range(args.premade):
            b = next(train)
            premade.append({"data": b["data"].to(device), "target": [t.to(device) for t in b["target"]]})
        batches = (premade[i % len(premade)] for i in range(10 ** 9))
        _finish(train, val)  # no workers running beside the timed steps
    else:
        batches = train
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(next(batches))
    sync()
    steps_per_s = args.steps / (time.perf_counter() - start)
    loader_per_s = None
    if mode != "premade":  # the loader alone: batches per second when nothing else runs
        for _ in range(DRAIN):  # batches the workers queued while the network trained
            next(train)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(train)["data"].to(device, non_blocking=True)
        sync()
        loader_per_s = args.steps / (time.perf_counter() - start)
    _finish(train, val)
    row = {"mode": mode, "iterations_per_s": steps_per_s, "loader_batches_per_s": loader_per_s,
           "patch_size": list(trainer.configuration_manager.patch_size), "batch_size": trainer.batch_size}
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
    del trainer
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", required=True, help="workspace and results folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 160, 160], help="synthetic volume size")
    ap.add_argument("--k", type=int, default=5, help="support cases")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--premade", type=int, default=8, help="distinct pre-made batches cycled in 'premade' mode")
    ap.add_argument("--proc-da", default="2", help="nnUNet_n_proc_DA for the CPU data path (a small workstation)")
    ap.add_argument("--compile", action="store_true", help="let nnU-Net torch.compile the network (GPU)")
    ap.add_argument("--modes", nargs="+", default=["cpu", "gpu", "premade"])
    ap.add_argument("-np", type=int, default=4, help="preprocessing processes")
    args = ap.parse_args()
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = os.path.join(os.path.abspath(args.o), var)
        os.makedirs(os.environ[var], exist_ok=True)
    prepare(args)
    os.environ["nnUNet_n_proc_DA"] = args.proc_da
    os.environ["nnUNet_compile"] = "t" if args.compile else "f"
    os.environ["nnUNet_fseft_epochs"] = "1"  # the trainers' schedule does not matter here

    import torch
    device = torch.device(args.device)
    rows = [time_mode(m, args, device) for m in args.modes]
    base = {r["mode"]: r["iterations_per_s"] for r in rows}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, GPU: {gpu}"
    lines = [f"# LoRA iterations per second by data path ({machine})", "",
             f"torch {torch.__version__}, nnUNet_n_proc_DA={args.proc_da}, compile={args.compile}, "
             f"patch {rows[0]['patch_size']}, batch {rows[0]['batch_size']}, K={args.k}, volumes {args.shape}, "
             f"{args.steps} timed steps after {args.warmup}", "",
             "| data path | iterations/s | vs CPU augmentation | vs pre-made batches | loader alone (batches/s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        vs_cpu = f"{r['iterations_per_s'] / base['cpu']:.2f}x" if "cpu" in base else ""
        vs_pre = f"{r['iterations_per_s'] / base['premade']:.2f}" if "premade" in base else ""
        loader = f"{r['loader_batches_per_s']:.2f}" if r["loader_batches_per_s"] else ""
        lines.append(f"| {r['mode']} | {r['iterations_per_s']:.2f} | {vs_cpu} | {vs_pre} | {loader} |")
    report = "\n".join(lines)
    print(report)
    with open(os.path.join(args.o, "data_path.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.o, "data_path.json"), "w") as f:
        json.dump({"machine": machine, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
