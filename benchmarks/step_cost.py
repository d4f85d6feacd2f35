"""Training step time and peak memory of each method against full fine-tuning, side by side.

Builds nnU-Net's default 3d_fullres network (PlainConvUNet, 6 stages, 32..320 features, as
nnU-Net plans it for a 128^3 CT patch), adapts it with each trainer's own `adapt()`, and
times training steps with nnU-Net's deep-supervised Dice + CE loss and AdamW, all methods
in one process so that the ratios compare like with like.

    python benchmarks/step_cost.py                        # GPU if there is one, else CPU
    python benchmarks/step_cost.py --device cpu --patch 64 --steps 3
"""
import argparse
import platform
import time

import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_fseft.parameters import count_parameters
from nnunet_fseft.trainers import nnUNetTrainerFSEFT_FullFT, nnUNetTrainerFSEFT_LoRA

METHODS = {"FullFT": nnUNetTrainerFSEFT_FullFT, "LoRA": nnUNetTrainerFSEFT_LoRA}
NUM_CLASSES = 5

DEFAULT_3D_FULLRES = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6,
    "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


def build(method_cls, device):
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                 dict(DEFAULT_3D_FULLRES), ["conv_op", "norm_op", "dropout_op", "nonlin"],
                                 1, NUM_CLASSES, deep_supervision=True)
    return method_cls.adapt(net).to(device)


def nnunet_loss():
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    weights = torch.tensor([1 / 2 ** i for i in range(5)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, (weights / weights.sum()).tolist())


def measure(method_cls, args, device):
    torch.manual_seed(0)
    net = build(method_cls, device).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nnunet_loss()
    x = torch.randn(args.batch, 1, *[args.patch] * 3, device=device)
    targets = [torch.randint(0, NUM_CLASSES, (args.batch, 1, *[args.patch // 2 ** i] * 3), device=device)
               for i in range(5)]
    if args.compile:
        net = torch.compile(net)
    amp = device.type == "cuda" and not args.fp32

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp, dtype=torch.float16):
            loss = loss_fn(net(x), targets)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    trainable, total = count_parameters(net)
    del net, opt
    return seconds, peak, trainable, total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--patch", type=int, default=None, help="cube edge (default 128 on GPU, 64 on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    p.add_argument("--fp32", action="store_true", help="no fp16 autocast on GPU")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.patch = args.patch or (128 if gpu else 64)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)

    machine = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} CPU, " \
                                                        f"{torch.get_num_threads()} threads"
    print(f"# {machine}; torch {torch.__version__}; batch {args.batch}, patch {args.patch}^3, "
          f"{'fp16 autocast' if gpu and not args.fp32 else 'fp32'}{', compiled' if args.compile else ''}")
    rows = {name: measure(cls, args, device) for name, cls in METHODS.items()}
    base_t, base_m = rows["FullFT"][0], rows["FullFT"][1]
    print(f"{'method':<8} {'trainable':>11} {'%':>6} {'step ms':>9} {'x FullFT':>9} {'peak GiB':>9} {'x FullFT':>9}")
    for name, (sec, peak, trainable, total) in rows.items():
        print(f"{name:<8} {trainable:>11,} {100 * trainable / total:>6.2f} {1000 * sec:>9.1f} {sec / base_t:>9.2f} "
              f"{peak:>9.2f} {peak / base_m if gpu else float('nan'):>9.2f}")


if __name__ == "__main__":
    main()
