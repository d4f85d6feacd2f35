"""The zero-shot anchor: few-shot training of an organ the foundation knows is held near its prediction.

Why: from one support scan every method ends at about the organ size that scan shows, whatever it
started from, so a support scan whose organ is smaller than usual takes a good zero-shot start below
itself (benchmarks/results/archive/fseft_synthetic_cpu_history.md, "K = 1 on a 60-epoch
foundation"). The anchor
makes the start's segmentation of each training patch one more annotation of it, scored as nnU-Net
scores the labels (cross-entropy + soft Dice, the same deep-supervision weights) and weighted 1 / K:
with one scan the foundation's opinion weighs as much as the label, with ten a tenth.

Classes: each target label the foundation knows on its own, and the rest (background with the labels
it does not know) as one class, as the foundation has no opinion on a new organ. A region-based
target (sigmoid outputs, one channel per region, BraTS's whole tumour / core / enhancing) is held
the way nnU-Net scores regions: per region the foundation knows, binary cross-entropy + soft Dice
against the start's yes/no of that region (its sigmoid above 0.5); the regions it does not know
are left free. The start's
segmentation comes from the same network on the same batch with its trained parameters set back to
their start values, so no second network is held; for a known label it is the zero-shot segmentation
(nnunet_fseft/network/grouped_head.py).
"""
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from nnunet_fseft.datasets.dataset_json import plain_labels, region_channels


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
    channels = sorted(plain_labels(labels).values())
    known = [c for c in channels if c in set(known) and c != 0]
    if not known:
        return None
    return [[c for c in channels if c not in known]] + [[c] for c in known]


class ZeroShotAnchor:
    """`weight` x sum over outputs of output_weights[i] x (cross-entropy + `dice`) against the start's
    segmentation. `dice` is nnU-Net's soft Dice loss without background (channel 0: the rest).
    With `regions` (sigmoid channels) instead of `groups`: binary cross-entropy + `dice` (then with
    background, as nnU-Net's region loss) on those channels against the start's sigmoid > 0.5."""

    def __init__(self, network: nn.Module, groups: Optional[List[List[int]]], weight: float, dice: nn.Module,
                 output_weights: Sequence[float] = (1.0,), start: Optional[List[torch.Tensor]] = None,
                 ignore_label: Optional[int] = None, regions: Optional[List[int]] = None):
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.buffers = list(network.buffers())  # BatchNorm's running statistics: the start's forward must not move them
        self.start = [p.detach().clone() for p in self.params] if start is None else start
        if [s.shape for s in self.start] != [p.shape for p in self.params]:
            raise ValueError("the anchor's start values do not match the network's trained parameters")
        self.groups = groups
        self.regions = regions
        self.weight = weight
        self.dice = dice
        self.output_weights = list(output_weights)
        self.ignore_label = ignore_label
        self._targets = None
        # (batch, target channels) bool, set per batch by a trainer whose scans label only some classes
        # (training/partial_labels.py): then the labels override the anchor (see penalty); None: every
        # class is labelled in every scan, and the anchor holds every voxel
        self.annotated: Optional[torch.Tensor] = None

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
        if self.regions is not None:
            self._targets = [(o[:, self.regions] > 0).float() if w else None
                             for o, w in zip(as_list(output), self.output_weights)]
            return
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
            if self.regions is not None:
                logits = o[:, self.regions].float()
                total = total + w * (F.binary_cross_entropy_with_logits(logits, t) + self.dice(torch.sigmoid(logits), t))
                continue
            log_p = merged_log_probs(o, self.groups)
            mask = None  # no data-dependent branch: no device sync per step
            if y is not None:
                mask = (y >= 0) if self.ignore_label is None else (y >= 0) & (y != self.ignore_label)
                if self.annotated is not None:
                    mask = mask & self._unlabelled(y, t)
                t = torch.where(mask[:, 0], t, -1)
            dice = self.dice(log_p.exp(), t.clamp(min=0)[:, None], loss_mask=None if mask is None else mask.float())
            total = total + w * (F.nll_loss(log_p, t, ignore_index=-1) + dice)
        return self.weight * total

    def _unlabelled(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Where partial labels leave the anchor a say: background voxels (label 0) whose start class is
        not one this scan annotates. A labelled voxel, and a background voxel the start calls an annotated
        class, are the labels' (they say what it is, or what it is not); (b, 1, ...) bool."""
        known = [g[0] for g in self.groups[1:]]
        annotated = torch.cat([torch.zeros_like(self.annotated[:, :1]), self.annotated[:, known]], 1)  # per group
        start_annotated = annotated.gather(1, t.flatten(1)).view_as(t)
        return ((y[:, 0] == 0) & ~start_annotated)[:, None]


class AnchoredLoss(nn.Module):
    """nnU-Net's loss plus the anchor's penalty, called as nnU-Net calls its own loss."""

    def __init__(self, loss: nn.Module, anchor: ZeroShotAnchor):
        super().__init__()
        self.loss = loss
        self.anchor = anchor

    def forward(self, output, target):
        return self.loss(output, target) + self.anchor.penalty(output, target)


# Beside the fold's checkpoints: the start's values of the trained parameters, for --c
ANCHOR_FILE = "zero_shot_anchor.pth"


def anchor_for_training(trainer) -> Tuple[Optional[ZeroShotAnchor], str]:
    """The zero-shot anchor of an nnUNetTrainerFSEFT's training and the log line about it. At epoch 0
    from the start (its file written for --c); on --c from the file that start wrote (the network
    has moved since). None where no target label (or region) is known to the foundation, and on
    --c of a training begun before the anchor existed (no file)."""
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunet_fseft.foundation.record import unwrap
    labels, manager = trainer.dataset_json["labels"], trainer.label_manager
    regions = None
    if trainer.current_epoch == 0:
        start, groups = None, None
        if manager.has_regions and manager.has_ignore_label:
            off = "regions with an ignore label leave no voxel mask for it"
        elif manager.has_regions:
            regions = list(trainer.known_labels) or None  # the sigmoid channels that start from the foundation's
            off = "no target region is one the foundation knows"
        else:
            groups = anchor_groups(labels, trainer.known_labels)
            off = "no target label is one the foundation knows"
    elif not os.path.isfile(trainer.anchor_file):  # a training started before the anchor existed
        groups, start = None, None
        off = f"{trainer.anchor_file} is missing, so --c continues this training as it began, without one"
    else:
        saved = torch.load(trainer.anchor_file, map_location=trainer.device, weights_only=True)
        groups, start, regions = saved["groups"], saved["start"], saved.get("regions")
        off = "as in the training this continues"
    anchor = None
    if groups or regions:  # scored as the labels are: nnU-Net's soft Dice and deep-supervision weights
        dice = MemoryEfficientSoftDiceLoss(batch_dice=trainer.configuration_manager.batch_dice, do_bg=bool(regions),
                                           smooth=1e-5, ddp=trainer.is_ddp)
        anchor = ZeroShotAnchor(unwrap(trainer.network), groups, trainer.anchor_weight / len(trainer.do_split()[0]),
                                dice, getattr(trainer.loss, "weight_factors", (1.0,)), start,
                                manager.ignore_label if manager.has_ignore_label else None, regions)
    if trainer.current_epoch == 0 and trainer.local_rank == 0:
        os.makedirs(trainer.output_folder, exist_ok=True)
        torch.save({"groups": groups, "regions": regions, "start": anchor.start if anchor else []}, trainer.anchor_file)
    if anchor is None:
        return None, f"zero-shot anchor: off, {off}"
    if regions:
        names = {c: n for n, (c, _) in region_channels(labels).items()}
        held = ", ".join(repr(names[c]) for c in regions)
        return anchor, (f"zero-shot anchor: the start's segmentation of the regions {held} is one more annotation of "
                        f"each patch (binary cross-entropy + Dice per region), weighted {anchor.weight:g} (1 / K)")
    names = {v: n for n, v in plain_labels(labels).items()}
    return anchor, (f"zero-shot anchor: the start's segmentation of {', '.join(repr(names[g[0]]) for g in groups[1:])} "
                    f"is one more annotation of each patch, weighted {anchor.weight:g} (1 / K)")
