"""The zero-shot anchor: few-shot training of an organ the foundation knows is held near its prediction.

Why: from one support scan every method ends at about the organ size that scan shows, whatever it
started from, so a support scan whose organ is smaller than usual takes a good zero-shot start below
itself (benchmarks/results/fseft_synthetic_cpu.md, "K = 1 on a 60-epoch foundation"). The anchor
makes the start's segmentation of each training patch one more annotation of it, scored as nnU-Net
scores the labels (cross-entropy + soft Dice, the same deep-supervision weights) and weighted 1 / K:
with one scan the foundation's opinion weighs as much as the label, with ten a tenth.

Classes: each target label the foundation knows on its own, and the rest (background with the labels
it does not know) as one class, as the foundation has no opinion on a new organ. The start's
segmentation comes from the same network on the same batch with its trained parameters set back to
their start values, so no second network is held; for a known label it is the zero-shot segmentation
(nnunet_fseft/fold.py).
"""
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def as_list(output) -> list:
    """A network's outputs, full resolution first, with or without deep supervision."""
    return list(output) if isinstance(output, (list, tuple)) else [output]


def merged_log_probs(logits: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Log-probabilities of the softmax over channels, summed within each group of channels."""
    log_p = F.log_softmax(logits.float(), 1)
    return torch.stack([torch.logsumexp(log_p[:, list(g)], 1) for g in groups], 1)


def anchor_groups(labels: dict, known: Sequence[int]) -> Optional[List[List[int]]]:
    """Channel groups of the anchor: background with the labels the foundation does not know, then
    each known label; None where no target label is known (nothing to hold)."""
    channels = sorted(v for n, v in labels.items() if isinstance(v, int) and n != "ignore")
    known = [c for c in channels if c in set(known) and c != 0]
    if not known:
        return None
    return [[c for c in channels if c not in known]] + [[c] for c in known]


class ZeroShotAnchor:
    """`weight` x sum over outputs of output_weights[i] x (cross-entropy + `dice`) against the start's
    segmentation. `dice` is nnU-Net's soft Dice loss without background (channel 0: the rest)."""

    def __init__(self, network: nn.Module, groups: List[List[int]], weight: float, dice: nn.Module,
                 output_weights: Sequence[float] = (1.0,), start: Optional[List[torch.Tensor]] = None,
                 ignore_label: Optional[int] = None):
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.buffers = list(network.buffers())  # BatchNorm's running statistics: the start's forward must not move them
        self.start = [p.detach().clone() for p in self.params] if start is None else start
        if [s.shape for s in self.start] != [p.shape for p in self.params]:
            raise ValueError("the anchor's start values do not match the network's trained parameters")
        self.groups = groups
        self.weight = weight
        self.dice = dice
        self.output_weights = list(output_weights)
        self.ignore_label = ignore_label
        self._targets = None

    @torch.no_grad()
    def predict_start(self, forward: Callable, data: torch.Tensor) -> None:
        """The start's segmentation of this batch (every output used), for the next `penalty`."""
        current = [p.detach().clone() for p in self.params]
        buffers = [b.clone() for b in self.buffers]
        for p, s in zip(self.params, self.start):
            p.copy_(s)
        try:
            output = forward(data)
        finally:
            for p, c in zip(self.params, current):
                p.copy_(c)
            for b, c in zip(self.buffers, buffers):
                b.copy_(c)
        self._targets = [merged_log_probs(o, self.groups).argmax(1) if w else None
                         for o, w in zip(as_list(output), self.output_weights)]

    def penalty(self, output, labels=None) -> torch.Tensor:
        """The loss against the start's segmentation of the batch `predict_start` saw; 0 without one
        (validation batches). The voxels the label loss leaves out are left out: those labelled
        -1 (outside the volume, in a black-box method's cached-feature patches) or `ignore_label`."""
        targets, self._targets = self._targets, None
        if targets is None:
            return 0.0
        labels = as_list(labels) if labels is not None else [None] * len(targets)
        total = 0.0
        for o, t, w, y in zip(as_list(output), targets, self.output_weights, labels):
            if not w:
                continue
            log_p = merged_log_probs(o, self.groups)
            mask = None  # no data-dependent branch: no device sync per step
            if y is not None:
                mask = (y >= 0) if self.ignore_label is None else (y >= 0) & (y != self.ignore_label)
                t = torch.where(mask[:, 0], t, -1)
            dice = self.dice(log_p.exp(), t.clamp(min=0)[:, None], loss_mask=None if mask is None else mask.float())
            total = total + w * (F.nll_loss(log_p, t, ignore_index=-1) + dice)
        return self.weight * total


class AnchoredLoss(nn.Module):
    """nnU-Net's loss plus the anchor's penalty, called as nnU-Net calls its own loss."""

    def __init__(self, loss: nn.Module, anchor: ZeroShotAnchor):
        super().__init__()
        self.loss = loss
        self.anchor = anchor

    def forward(self, output, target):
        return self.loss(output, target) + self.anchor.penalty(output, target)
