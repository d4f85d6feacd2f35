"""The few-shot schedule: how long to train on K support scans, how the learning rate moves,
and when to stop. FSEFT's rule (its code's adaptation settings; docs/design.md, "What the papers do"),
in nnU-Net's terms:

- a *pass* is one sweep over the support set, `patches_per_scan` patches from each of the K
  scans, so ceil(patches_per_scan * K / batch size) steps; training runs at most `max_passes`
  passes, in nnU-Net epochs of a fixed number of steps (short epochs would spend their time in
  nnU-Net's per-epoch validation, plot and log);
- the learning rate rises linearly over `warmup_passes` passes, then decays to 0 by a cosine;
- training stops once the moving average of the *training* loss over `plateau_window` passes has
  improved by less than `plateau_delta` in `plateau_patience` passes. Nothing looks at the
  validation cases: in a K-shot split they are the test set.
"""
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_fseft.environment import EPOCHS, ITERATIONS, positive_int


@dataclass(frozen=True)
class FewShotSchedule:
    epochs: int  # nnU-Net epochs at most
    iterations_per_epoch: int
    steps_per_pass: int
    warmup_steps: int
    window: int  # moving-average window of the train loss, in epochs
    patience: int  # epochs without improvement before stopping

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iterations_per_epoch


def passes_to_epochs(passes: float, steps_per_pass: int, iterations_per_epoch: int, at_least: int = 1) -> int:
    return max(at_least, math.ceil(passes * steps_per_pass / iterations_per_epoch))


def few_shot_schedule(k: int, batch_size: int, iterations_per_epoch: int, *, max_passes: int, patches_per_scan: int,
                      warmup_passes: float, plateau_window: int, plateau_patience: int,
                      epochs: int = None) -> FewShotSchedule:
    """The schedule for K support scans; `epochs` (a trainer's or nnUNet_fseft_epochs) fixes the
    length instead of max_passes. The window and patience are at least 1 and 2 epochs."""
    steps_per_pass = math.ceil(patches_per_scan * k / batch_size)
    epochs = epochs or passes_to_epochs(max_passes, steps_per_pass, iterations_per_epoch)
    total = epochs * iterations_per_epoch
    return FewShotSchedule(
        epochs=epochs, iterations_per_epoch=iterations_per_epoch, steps_per_pass=steps_per_pass,
        warmup_steps=min(math.ceil(warmup_passes * steps_per_pass), total // 2),
        window=passes_to_epochs(plateau_window, steps_per_pass, iterations_per_epoch),
        patience=passes_to_epochs(plateau_patience, steps_per_pass, iterations_per_epoch, at_least=2))


def warmup_cosine(step: int, total: int, warmup: int, lr: float) -> float:
    """Learning rate at `step` (from 0): linear warm-up to `lr` over `warmup` steps (the first step
    already moves), then cosine decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """The learning rate set per step (`at_step`, from the trainer's train_step). nnU-Net calls
    `step(epoch)` at each epoch's start, which sets the rate of that epoch's first step, so
    nnU-Net's log of the learning rate stays right."""

    def __init__(self, optimizer, lr: float, schedule: FewShotSchedule):
        self.optimizer, self.lr, self.schedule = optimizer, lr, schedule

    def at_step(self, step: int) -> None:
        lr = warmup_cosine(step, self.schedule.total_steps, self.schedule.warmup_steps, self.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, epoch: int = 0) -> None:
        self.at_step(epoch * self.schedule.iterations_per_epoch)


def plateaued(losses: Sequence[float], window: int, patience: int, delta: float) -> bool:
    """True once the moving average (over `window` epochs) of the per-epoch train losses has not gone
    below its earlier best by `delta` in the last `patience` epochs. Non-finite epochs never count
    as an improvement (the divergence check stops those trainings)."""
    averages = [sum(losses[i - window + 1:i + 1]) / window for i in range(window - 1, len(losses))]
    if len(averages) <= patience:
        return False
    earlier, recent = averages[:-patience], averages[-patience:]
    best_before = min((a for a in earlier if math.isfinite(a)), default=math.inf)
    best_recent = min((a for a in recent if math.isfinite(a)), default=math.inf)
    return not best_recent < best_before - delta


def describe_schedule(s: FewShotSchedule, k: int, plateau_delta: float) -> str:
    """The log line that says how a K-shot training will run and stop."""
    return (f"few-shot schedule for K = {k}: at most {s.epochs} epochs x {s.iterations_per_epoch} iterations "
            f"({s.steps_per_pass} per pass over the support set), warm-up {s.warmup_steps} steps then cosine; "
            f"early stop when the train loss's {s.window}-epoch moving average gains less than "
            f"{plateau_delta:g} in {s.patience} epochs; the model is the final checkpoint (no checkpoint is "
            f"chosen on the validation cases, the test set of a K-shot split)")


def diverged(network, train_outputs: list, is_ddp: bool) -> bool:
    """After an epoch whose mean train loss is not finite: whether training has diverged. Only if the
    trainable weights are no longer finite, or if no step of the epoch had a finite loss: under CUDA
    mixed precision nnU-Net's GradScaler skips a step whose gradients overflow and recovers, so one
    non-finite batch alone is no reason to stop."""
    import numpy as np
    import torch.distributed as dist
    if any(not torch.isfinite(p).all() for p in network.parameters() if p.requires_grad):
        return True  # DDP keeps the weights equal on every rank
    finite_steps = sum(bool(np.isfinite(o["loss"])) for o in train_outputs)
    if is_ddp:  # every rank gets here (the mean above is theirs together)
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, finite_steps)
        finite_steps = sum(counts)
    return finite_steps == 0


# --- what every trainer of ours (and the foundation's) sets up ------------------------------

def set_schedule(trainer, epochs: int, iterations: int, val_iterations: int) -> None:
    """The trainer's schedule; nnUNet_fseft_epochs / nnUNet_fseft_iters_per_epoch override it."""
    trainer.num_epochs = positive_int(EPOCHS, epochs)
    trainer.num_iterations_per_epoch = positive_int(ITERATIONS, iterations)
    trainer.num_val_iterations_per_epoch = min(val_iterations, trainer.num_iterations_per_epoch)


def adamw_poly(trainer):
    """AdamW over the trainable parameters with nnU-Net's polynomial decay."""
    params = [p for p in trainer.network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=trainer.initial_lr, weight_decay=trainer.weight_decay)
    return optimizer, PolyLRScheduler(optimizer, trainer.initial_lr, trainer.num_epochs)
