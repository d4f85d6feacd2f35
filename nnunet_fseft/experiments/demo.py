"""`nnunet-fseft demo`: the whole few-shot loop on synthetic data, through the real commands.

1. synthesise a foundation dataset (base organs, scanner A) and a target dataset with a
   novel, low-contrast organ placed by its neighbours (pancreas-like) on another scanner;
2. plan, preprocess and train a small foundation with nnUNetv2_train;
3. adopt it for the target, draw a K-shot split;
4. fine-tune with the method the README names for a novel organ and with full fine-tuning (nnUNetv2_train);
5. predict the held-out scans (nnUNetv2_predict), score them with nnU-Net's evaluator;
6. print a table and write results.json in the workdir.
Sized to finish in under 20 minutes on two CPU cores.
"""
import json
import os
import re
import time
from typing import Optional

from nnunet_fseft.errors import InputError
from nnunet_fseft.plans import PLANS_NAME
from nnunet_fseft.runner import quiet, run

FOUNDATION_ID, TARGET_ID = 100, 501
BASE_ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach"]
NOVEL_ORGAN = "pancreas"
SHAPE = 40
K = 1
# (epochs, iterations per epoch). CPU: the budget of a 2-core laptop; CUDA: a few minutes on a GPU.
# The CPU foundation learns its organs one at a time; at 30 epochs the last came in the final few
# and one of four trainings never learned the spleen, at 60 each of two had all five by epoch 23
# (benchmarks/results/archive/fseft_synthetic_cpu_history.md, "The benchmark's foundation at 60 epochs").
SCHEDULES = {
    "cpu": {"foundation": (60, 20), "finetune": (25, 20)},
    "cuda": {"foundation": (100, 50), "finetune": (50, 50)},
}
METHODS = ["DecoderFT_lr1e3", "FullFT"]  # the README's first choice for a novel organ at K = 1 (the demo's K), and the baseline


class Demo:
    """A workspace under `workdir` (nnUNet_raw, _preprocessed, _results set for this process and
    the commands it runs), one log for every command's output, and progress lines with the time."""

    def __init__(self, workdir: str, device: str):
        self.workdir, self.device = os.path.abspath(workdir), device
        self.log = os.path.join(self.workdir, "demo_log.txt")
        # nnU-Net's default of 8 export workers is slow on small machines; no compilation of tiny networks
        os.environ.update({"nnUNet_compile": "f", "nnUNet_def_n_proc": "2"})
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ[var] = os.path.join(self.workdir, var)
            os.makedirs(os.environ[var], exist_ok=True)
        self.t0 = time.time()

    def say(self, text: str):
        print(f"[{time.time() - self.t0:6.0f} s] {text}", flush=True)

    def run(self, args, **env):
        """Runs a command with its output in the log, its epoch lines shown as progress."""
        return run(args, log=self.log, env=env, on_line=_show_epoch)

    def adopt(self, foundation: str, target) -> None:
        """`nnunet-fseft adopt`, its nnU-Net preprocessing output and progress bars sent to the log."""
        from nnunet_fseft.foundation.adopt import adopt
        with quiet(self.log):
            adopt(foundation, str(target))

    def train(self, dataset, fold, plans, trainer, schedule, **env) -> float:
        """nnUNetv2_train with `schedule` (epochs, iterations per epoch); returns its wall time."""
        epochs, iters = schedule
        env = {"nnUNet_fseft_epochs": str(epochs), "nnUNet_fseft_iters_per_epoch": str(iters), **env}
        if self.device == "cpu":
            env.setdefault("nnUNet_n_proc_DA", "0")  # one process: augmentation workers only compete for 2 cores
        t = time.time()
        self.run(["nnUNetv2_train", dataset, "3d_fullres", fold, "-p", plans, "-tr", trainer, "-device", self.device],
                 **env)
        return time.time() - t

    def train_foundation(self, dataset_id: int, name: str, arch: Optional[str] = None):
        """A small foundation on the base organs (scanner A), trained unless it is there already, with
        nnU-Net's network or the preset's size of `arch` (plans.presets.ARCHITECTURES); returns its model
        folder and the seconds its training took (0 if it was there)."""
        from nnunet_fseft.plans.presets import apply_preset, preset_plans_name
        from nnunet_fseft.datasets.synth import synth_dataset
        preset = "cpu_tiny" if self.device == "cpu" else "cpu_small"
        plans_name = preset_plans_name("nnUNetPlans", arch, preset)
        folder = os.path.join(os.environ["nnUNet_results"], f"Dataset{dataset_id:03d}_{name}",
                              f"nnUNetTrainerFSEFT_Pretrain__{plans_name}__3d_fullres")
        if os.path.isfile(os.path.join(folder, "fold_all", "checkpoint_final.pth")):
            return folder, 0.0
        self.say(f"foundation: {', '.join(BASE_ORGANS)} on scanner A (nnUNetv2_plan_and_preprocess, nnUNetv2_train)")
        if not os.path.isdir(os.path.join(os.environ["nnUNet_raw"], f"Dataset{dataset_id:03d}_{name}")):
            synth_dataset(dataset_id, 16, BASE_ORGANS, seed=0, name=name, shape=(SHAPE,) * 3)
        # planned again: a foundation of another network on the same scans, or an interrupted try
        self.run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "2"])
        plans = apply_preset(str(dataset_id), preset, arch=arch)
        assert os.path.basename(folder).split("__")[1] == plans, plans
        seconds = self.train(dataset_id, "all", plans, "nnUNetTrainerFSEFT_Pretrain", SCHEDULES[self.device]["foundation"])
        self.say(f"   foundation trained in {seconds:.0f} s")
        return folder, seconds


def _show_epoch(line: str) -> None:
    m = re.search(r"Epoch (\d+)$", line.strip())
    if m and int(m.group(1)) % 5 == 0:
        print(f"          epoch {m.group(1)}", flush=True)


def check_demo_args(workdir: str, device: str) -> None:
    """A demo starts in an empty folder, and on a GPU only where torch sees one."""
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise InputError(f"{workdir} is not empty; pass another --workdir or remove it.")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError("--device cuda was given but torch sees no GPU; use --device cpu.")


def run_demo(workdir: str, device: str = "cpu") -> dict:
    check_demo_args(workdir, device)
    from nnunet_fseft.sharing.costs import method_costs
    from nnunet_fseft.datasets.kshot import write_kshot_splits
    from nnunet_fseft.plans.load import load_plans
    from nnunet_fseft.datasets.synth import synth_dataset
    from nnunet_fseft.trainers import METHODS as TRAINERS

    d = Demo(workdir, device)
    d.say(f"workdir {d.workdir}; nnU-Net output goes to {d.log}")
    d.say(f"1/6 synthesising the target: a novel organ ({NOVEL_ORGAN}) on scanner B")
    synth_dataset(TARGET_ID, 12, [NOVEL_ORGAN], seed=1, name="DemoTarget", scanner="B", num_test=8,
                  shape=(SHAPE,) * 3)
    d.say("2/6 synthesising, planning, preprocessing and training the foundation")
    foundation, foundation_time = d.train_foundation(FOUNDATION_ID, "DemoFoundation")

    d.say(f"3/6 adopting the foundation for the target and drawing a {K}-shot split")
    d.adopt(foundation, TARGET_ID)
    write_kshot_splits(str(TARGET_ID), K, repeats=1, seed=0, test=2)
    plans, dataset_json = load_plans(str(TARGET_ID), PLANS_NAME)
    trainers = [f"nnUNetTrainerFSEFT_{m}" for m in METHODS]
    costs = {c["method"]: c for c in method_costs(plans, dataset_json, "3d_fullres", [TRAINERS[t] for t in trainers])}

    rows = []
    target = os.path.join(os.environ["nnUNet_raw"], "Dataset501_DemoTarget")
    for i, (method, trainer) in enumerate(zip(METHODS, trainers)):
        d.say(f"4/6 fine-tuning with {method} ({i + 1}/{len(METHODS)})")
        seconds = d.train(TARGET_ID, 0, PLANS_NAME, trainer, SCHEDULES[device]["finetune"])
        d.say(f"5/6 predicting {NOVEL_ORGAN} on the 8 held-out scans with {method} (nnUNetv2_predict) and scoring them")
        pred = os.path.join(d.workdir, "predictions", method)
        d.run(["nnUNetv2_predict", "-i", os.path.join(target, "imagesTs"), "-o", pred, "-d", TARGET_ID,
               "-c", "3d_fullres", "-f", 0, "-p", PLANS_NAME, "-tr", trainer, "-device", device, "--disable_tta"])
        d.run(["nnUNetv2_evaluate_simple", os.path.join(target, "labelsTs"), pred, "-l", 1, "-np", 2])
        with open(os.path.join(pred, "summary.json")) as f:
            dice = json.load(f)["foreground_mean"]["Dice"]
        rows.append({"method": method, "K": K, "dice": round(dice, 4), "trainable_parameters": costs[trainer]["trainable"],
                     "total_parameters": costs[trainer]["total"], "train_seconds": round(seconds, 1)})

    d.say("6/6 results (Dice of the novel organ on 8 held-out scans)")
    print(f"\n{'method':<16} {'K':>2} {'Dice':>6} {'trainable':>11} {'of total':>9} {'wall time':>10}")
    for r in rows:
        print(f"{r['method']:<16} {r['K']:>2} {r['dice']:>6.3f} {r['trainable_parameters']:>11,} "
              f"{100 * r['trainable_parameters'] / r['total_parameters']:>8.1f}% {r['train_seconds']:>9.0f}s")
    result = {"device": device, "organ": NOVEL_ORGAN, "test_cases": 8, "foundation_train_seconds":
              round(foundation_time, 1), "total_seconds": round(time.time() - d.t0, 1), "rows": rows}
    with open(os.path.join(d.workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nWrote {os.path.join(d.workdir, 'results.json')} ({result['total_seconds']:.0f} s in all)")
    return result
