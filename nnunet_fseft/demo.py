"""`nnunet-fseft demo`: the whole few-shot loop on synthetic data, through the real commands.

1. synthesise a foundation dataset (base organs, scanner A) and a target dataset with a
   novel, low-contrast organ placed by its neighbours (pancreas-like) on another scanner;
2. plan, preprocess and train a small foundation with nnUNetv2_train;
3. adopt it for the target, draw a K-shot split;
4. fine-tune with LoRA and with full fine-tuning (nnUNetv2_train);
5. predict the held-out scans (nnUNetv2_predict), score them with nnU-Net's evaluator;
6. print a table and write results.json in the workdir.
Sized to finish in under 20 minutes on two CPU cores.
"""
import json
import os
import re
import subprocess
import sys
import time

FOUNDATION_ID, TARGET_ID = 100, 501
BASE_ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach"]
NOVEL_ORGAN = "pancreas"
SHAPE = 40
K = 1
# (epochs, iterations per epoch). CPU: the budget of a 2-core laptop; CUDA: a few minutes on a GPU.
SCHEDULES = {
    "cpu": {"foundation": (30, 20), "finetune": (25, 20)},
    "cuda": {"foundation": (100, 50), "finetune": (50, 50)},
}
METHODS = ["LoRA", "FullFT"]


class Demo:
    def __init__(self, workdir: str, device: str):
        self.workdir, self.device = os.path.abspath(workdir), device
        self.log = os.path.join(self.workdir, "demo_log.txt")
        self.env = {**os.environ, "nnUNet_compile": "f", "nnUNet_def_n_proc": "2", "PYTHONUNBUFFERED": "1"}
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            self.env[var] = os.environ[var] = os.path.join(self.workdir, var)
            os.makedirs(self.env[var], exist_ok=True)
        self.t0 = time.time()

    def say(self, text: str):
        print(f"[{time.time() - self.t0:6.0f} s] {text}", flush=True)

    def run(self, args, **extra_env) -> str:
        """Runs a command, streams its epoch lines as progress, keeps its output in the log."""
        cmd = [os.path.join(os.path.dirname(sys.executable), args[0])] + [str(a) for a in args[1:]]
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            p = subprocess.Popen(cmd, env={**self.env, **extra_env}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            out = []
            for line in p.stdout:
                log.write(line)
                out.append(line)
                m = re.search(r"Epoch (\d+)$", line.strip())
                if m and int(m.group(1)) % 5 == 0:
                    print(f"          epoch {m.group(1)}", flush=True)
            if p.wait() != 0:
                raise RuntimeError(f"{args[0]} failed (exit {p.returncode}); see {self.log}.")
        return "".join(out)

    def adopt(self, foundation: str, target) -> None:
        """`nnunet-fseft adopt`, its nnU-Net preprocessing output and progress bars sent to the log."""
        from nnunet_fseft.adopt import adopt
        with open(self.log, "a") as log:
            streams = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = log
            try:
                adopt(foundation, str(target))
            finally:
                sys.stdout, sys.stderr = streams

    def train(self, dataset, fold, plans, trainer, schedule, **extra_env):
        epochs, iters = schedule
        env = {"nnUNet_fseft_epochs": str(epochs), "nnUNet_fseft_iters_per_epoch": str(iters), **extra_env}
        if self.device == "cpu":
            env["nnUNet_n_proc_DA"] = "0"
        t = time.time()
        out = self.run(["nnUNetv2_train", dataset, "3d_fullres", fold, "-p", plans, "-tr", trainer,
                        "-device", self.device], **env)
        return out, time.time() - t


def run_demo(workdir: str, device: str = "cpu") -> dict:
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise FileExistsError(f"{workdir} is not empty; pass another --workdir or remove it.")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but torch sees no GPU; use --device cpu.")
    from nnunet_fseft.kshot import write_kshot_splits
    from nnunet_fseft.plans_presets import apply_preset
    from nnunet_fseft.synth import synth_dataset

    d = Demo(workdir, device)
    schedule = SCHEDULES[device]
    d.say(f"workdir {d.workdir}; nnU-Net output goes to {d.log}")
    d.say(f"1/6 synthesising foundation data ({', '.join(BASE_ORGANS)}; scanner A) and a target with a "
          f"novel organ ({NOVEL_ORGAN}; scanner B)")
    synth_dataset(FOUNDATION_ID, 16, BASE_ORGANS, seed=0, name="DemoFoundation", shape=(SHAPE,) * 3)
    synth_dataset(TARGET_ID, 12, [NOVEL_ORGAN], seed=1, name="DemoTarget", scanner="B", num_test=8,
                  shape=(SHAPE,) * 3)

    d.say("2/6 planning, preprocessing and training the foundation (nnUNetv2_plan_and_preprocess, nnUNetv2_train)")
    d.run(["nnUNetv2_plan_and_preprocess", "-d", FOUNDATION_ID, "-c", "3d_fullres", "-np", "2"])
    plans = apply_preset(str(FOUNDATION_ID), "cpu_tiny" if device == "cpu" else "cpu_small")
    _, foundation_time = d.train(FOUNDATION_ID, "all", plans, "nnUNetTrainerFSEFT_Pretrain", schedule["foundation"])
    foundation = os.path.join(d.env["nnUNet_results"], "Dataset100_DemoFoundation",
                              f"nnUNetTrainerFSEFT_Pretrain__{plans}__3d_fullres")
    d.say(f"   foundation trained in {foundation_time:.0f} s")

    d.say(f"3/6 adopting the foundation for the target and drawing a {K}-shot split")
    d.adopt(foundation, TARGET_ID)
    write_kshot_splits(str(TARGET_ID), K, repeats=1, seed=0, test=2)

    rows = []
    target = os.path.join(d.env["nnUNet_raw"], "Dataset501_DemoTarget")
    for i, method in enumerate(METHODS):
        trainer = f"nnUNetTrainerFSEFT_{method}"
        d.say(f"4/6 fine-tuning with {method} ({i + 1}/{len(METHODS)})")
        out, seconds = d.train(TARGET_ID, 0, "FSEFTPlans", trainer, schedule["finetune"])
        trainable, total = (int(x.replace(",", "")) for x in
                            re.search(r"training ([\d,]+) of ([\d,]+) parameters", out).groups())
        d.say(f"5/6 predicting {NOVEL_ORGAN} on the 8 held-out scans with {method} (nnUNetv2_predict) and scoring them")
        pred = os.path.join(d.workdir, "predictions", method)
        d.run(["nnUNetv2_predict", "-i", os.path.join(target, "imagesTs"), "-o", pred, "-d", TARGET_ID,
               "-c", "3d_fullres", "-f", 0, "-p", "FSEFTPlans", "-tr", trainer, "-device", device, "--disable_tta"])
        d.run(["nnUNetv2_evaluate_simple", os.path.join(target, "labelsTs"), pred, "-l", 1, "-np", 2])
        with open(os.path.join(pred, "summary.json")) as f:
            dice = json.load(f)["foreground_mean"]["Dice"]
        rows.append({"method": method, "K": K, "dice": round(dice, 4), "trainable_parameters": trainable,
                     "total_parameters": total, "train_seconds": round(seconds, 1)})

    d.say("6/6 results (Dice of the novel organ on 8 held-out scans)")
    print(f"\n{'method':<8} {'K':>2} {'Dice':>6} {'trainable':>11} {'of total':>9} {'wall time':>10}")
    for r in rows:
        print(f"{r['method']:<8} {r['K']:>2} {r['dice']:>6.3f} {r['trainable_parameters']:>11,} "
              f"{100 * r['trainable_parameters'] / r['total_parameters']:>8.1f}% {r['train_seconds']:>9.0f}s")
    result = {"device": device, "organ": NOVEL_ORGAN, "test_cases": 8, "foundation_train_seconds":
              round(foundation_time, 1), "total_seconds": round(time.time() - d.t0, 1), "rows": rows}
    with open(os.path.join(d.workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nWrote {os.path.join(d.workdir, 'results.json')} ({result['total_seconds']:.0f} s in all)")
    return result
