"""Cost of each method against full fine-tuning, side by side in one run.

Builds nnU-Net's default 3d_fullres network (PlainConvUNet, 6 stages, 32..320 features, as
nnU-Net plans it for a 128^3 CT patch; `--arch resenc` for a ResEnc-M-like one, `--arch mednext-s|mednext-b|
swin-unetr` for MONAI's networks at their published sizes), adapts it
with each trainer's own `adapt()`, and reports per method: trainable parameters, adapter-file
size (what `nnunet-fseft export` writes) against the full weights, and the time and peak memory
of training steps with nnU-Net's deep-supervised Dice + CE loss and AdamW. Black-box methods
(one output, no deep supervision) run as their trainers do: on cached features (a batch of
the foundation's last decoder features) or, for `SpatialAdapterOnline`, through the frozen
foundation from images. Transductive variants cost their base method plus one whole-volume
adapter pass per step, which depends on the query volume's size; they are left out. Last, the
inference time of a merged LoRA model against the foundation's.

    python benchmarks/step_cost.py                        # GPU if there is one, else CPU
    python benchmarks/step_cost.py --device cpu --patch 64 --steps 3
    python benchmarks/step_cost.py --methods FullFT LoRA BitFit
    python benchmarks/step_cost.py --device cpu --arch mednext-s --methods FullFT LoRA ConvAdapter

On CPU each method runs in a forked process and its memory is the resident set it adds (no allocator
statistics there); on GPU, torch's peak allocation.
"""
import argparse
import multiprocessing
import os
import platform
import resource
import time

import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.black_box import build_black_box
from nnunet_fseft.network.parameters import count_parameters
from nnunet_fseft.sharing.adapter_file import safetensors_bytes, trained_tensors
from nnunet_fseft.trainers import METHODS as TRAINERS
from nnunet_fseft.trainers.blackbox import nnUNetTrainerFSEFT_BlackBox
from nnunet_fseft.tuners.registry import merge_tuner

PREFIX = "nnUNetTrainerFSEFT_"
METHODS = {name[len(PREFIX):]: cls for name, cls in TRAINERS.items() if not getattr(cls, "transductive", False)}
NUM_CLASSES = 5

DEFAULT_3D_FULLRES = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6,
    "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


RESENC_M = {**{k: v for k, v in DEFAULT_3D_FULLRES.items() if k != "n_conv_per_stage"},
            "n_blocks_per_stage": [1, 3, 4, 6, 6, 6]}
ARCHITECTURES = {"plain": ("PlainConvUNet", DEFAULT_3D_FULLRES), "resenc": ("ResidualEncoderUNet", RESENC_M),
                 # MONAI's, at their published sizes, as `nnunet-fseft plans --arch` writes them
                 "mednext-s": None, "mednext-b": None, "swin-unetr": None}


def network_from_plans(arch: str, deep_supervision: bool):
    if ARCHITECTURES[arch] is None:
        from nnunet_fseft.plans.presets import ARCHITECTURES as MONAI_NETS
        spec = MONAI_NETS[arch]()
        strides = [[1, 1, 1]] + [[2, 2, 2]] * spec["levels"]
        return get_network_from_plans(spec["network"], dict(spec["kwargs"], strides=strides, n_stages=len(strides)),
                                      [], 1, NUM_CLASSES, deep_supervision=deep_supervision)
    name, kwargs = ARCHITECTURES[arch]
    return get_network_from_plans(f"dynamic_network_architectures.architectures.unet.{name}", dict(kwargs),
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, NUM_CLASSES,
                                  deep_supervision=deep_supervision)


def is_black_box(method_cls) -> bool:
    return method_cls is not None and issubclass(method_cls, nnUNetTrainerFSEFT_BlackBox)


def build(method_cls, args, device, deep_supervision=True):
    net = network_from_plans(args.arch, deep_supervision)
    if is_black_box(method_cls):
        net = build_black_box(net, method_cls.adapter, NUM_CLASSES)
        net.takes_features = method_cls.features == "cached"
        return net.to(device)
    return (method_cls.adapt(net) if method_cls else net).to(device)


def file_bytes(net) -> int:
    return len(safetensors_bytes(trained_tensors(net), {}))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def nnunet_loss(deep_supervision=True):
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if not deep_supervision:
        return loss
    weights = torch.tensor([1 / 2 ** i for i in range(5)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, (weights / weights.sum()).tolist())


def measure(method_cls, args, device):
    rss_at_start = _rss_gib() if device.type == "cpu" else 0.0
    torch.manual_seed(0)
    net = build(method_cls, args, device).train()
    size = file_bytes(net)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    black_box = is_black_box(method_cls)
    loss_fn = nnunet_loss(deep_supervision=not black_box)
    channels = net.foundation.channels if black_box and net.takes_features else 1  # cached features, or images
    x = torch.randn(args.batch, channels, *[args.patch] * 3, device=device)
    targets = [torch.randint(0, NUM_CLASSES, (args.batch, 1, *[args.patch // 2 ** i] * 3), device=device)
               for i in range(5)]
    if black_box:
        targets = targets[0]
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
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else _peak_rss_gib() - rss_at_start
    trainable, total = count_parameters(net)
    del net, opt
    return seconds, peak, trainable, total, size


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def measure_apart(method_cls, args, device):
    """On CPU each method runs in its own forked process, so that its peak memory (resident set above the
    process's at the fork) is its own; None where the method refuses the architecture."""
    if device.type == "cuda":
        return _or_refused(method_cls, args, device)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(_or_refused, (method_cls, args, device))


def _or_refused(method_cls, args, device):
    try:
        return measure(method_cls, args, device)
    except InputError as e:
        return str(e)


def inference_ms(net, args, device) -> float:
    """Forward time of one patch, as the sliding-window predictor runs it."""
    net.eval()
    x = torch.randn(1, 1, *[args.patch] * 3, device=device)
    amp = device.type == "cuda" and not args.fp32
    with torch.no_grad(), torch.autocast(device.type, enabled=amp, dtype=torch.float16):
        for _ in range(args.warmup):
            net(x)
        synchronize(device)
        t = time.perf_counter()
        for _ in range(args.steps * 2):
            net(x)
        synchronize(device)
    return 1000 * (time.perf_counter() - t) / (args.steps * 2)


def merged_inference(args, device):
    """(foundation, LoRA unmerged, LoRA merged) inference ms, interleaved twice to even out drift."""
    torch.manual_seed(0)
    foundation = build(None, args, device, deep_supervision=False)
    lora = build(METHODS["LoRA"], args, device, deep_supervision=False)
    merged = build(METHODS["LoRA"], args, device, deep_supervision=False)
    merge_tuner(merged, METHODS["LoRA"].tuner)
    times = {"foundation": [], "LoRA": [], "LoRA merged": []}
    for _ in range(2):
        for name, net in zip(times, (foundation, lora, merged)):
            times[name].append(inference_ms(net, args, device))
    return {k: min(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--patch", type=int, default=None, help="cube edge (default 128 on GPU, 64 on CPU)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    p.add_argument("--fp32", action="store_true", help="no fp16 autocast on GPU")
    p.add_argument("--arch", default="plain", choices=sorted(ARCHITECTURES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: all ({' '.join(METHODS)})")
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
    names = ["FullFT"] + [m for m in args.methods if m != "FullFT"]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {' '.join(METHODS)}")
    rows = {name: measure_apart(METHODS[name], args, device) for name in names}
    base_t, base_m, base_f = rows["FullFT"][0], rows["FullFT"][1], rows["FullFT"][4]
    memory = "peak GiB" if gpu else "+RSS GiB"  # CPU: resident set above the process's before the method
    print(f"{'method':<22} {'trainable':>11} {'%':>6} {'file MB':>8} {'% full':>7} {'step ms':>9} {'x FullFT':>9} "
          f"{memory:>9} {'x FullFT':>9}")
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"{name:<22} {'n/a':>11}  {row}")
            continue
        sec, peak, trainable, total, size = row
        print(f"{name:<22} {trainable:>11,} {100 * trainable / total:>6.2f} {size / 2 ** 20:>8.2f} "
              f"{100 * size / base_f:>7.2f} {1000 * sec:>9.1f} {sec / base_t:>9.2f} "
              f"{peak:>9.2f} {peak / base_m:>9.2f}")
    inf = merged_inference(args, device)
    print(f"# inference, one {args.patch}^3 patch: " + ", ".join(
        f"{k} {v:.1f} ms ({v / inf['foundation']:.3f}x)" for k, v in inf.items()))


if __name__ == "__main__":
    main()
