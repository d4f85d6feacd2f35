"""Training on partially labelled data: which classes a case annotates, the loss, sampling, scoring.

A pooled dataset (`nnunet-fseft combine`) labels every organ only in some cases. Where a case's
source does not annotate an organ, its voxels are labelled background: "background" there means
"background or an organ this source does not label".

The loss (PartialLabelLoss) is nnU-Net's Dice + cross-entropy with that meaning:
- cross-entropy: the un-annotated classes are *merged with background* for that case, i.e. the
  probability of a background voxel is p(background) + p(un-annotated organs). This is the
  likelihood of what was observed, so it never pushes an un-annotated organ towards background,
  yet it keeps what the annotation does say: a voxel labelled liver is none of the other organs,
  annotated or not. Masking those classes out of the softmax would throw that away.
- Dice: the un-annotated classes are *masked out* for that case: they have no reference there,
  so their Dice is undefined, not zero.
With every class annotated both reduce exactly to nnU-Net's loss.
"""
import os
import shutil
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn

from nnunet_fseft.datasets.dataset_json import ANNOTATIONS_KEY, read_json
from nnunet_fseft.errors import InputError


def find_annotations(dataset_json: dict, dataset_name: str, preprocessed_folder: str) -> Optional[dict]:
    """The annotations file ({"sources": ..., "cases": ...}) that `combine` names in dataset.json, or
    None for a dataset it did not write. Looked for in the preprocessed folder, then in nnUNet_raw,
    and copied into the preprocessed folder, so later runs (--c, --val, another machine) find it
    without nnUNet_raw. Training a pooled dataset without it would be naive training, so that stops."""
    name = dataset_json.get(ANNOTATIONS_KEY)
    if name is None:
        return None
    raw = os.environ.get("nnUNet_raw")
    places = [preprocessed_folder] + ([os.path.join(raw, dataset_name)] if raw else [])
    for folder in places:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            annotations = read_json(path, "write it again with `nnunet-fseft combine`")
            _check_annotations(annotations, path)
            if folder != preprocessed_folder and os.path.isdir(preprocessed_folder):
                shutil.copy2(path, os.path.join(preprocessed_folder, name))
            return annotations
    raise InputError(f"{dataset_name} was pooled by nnunet-fseft combine but its {name} is in none of "
                     f"{places}; copy it from the pooled raw dataset into {preprocessed_folder}.")


def _check_annotations(annotations: dict, path: str) -> None:
    """Sampling and the loss work per source, so each case must annotate what its source does."""
    for case, a in annotations["cases"].items():
        source = annotations["sources"].get(a["source"])
        if source is None or sorted(a["annotated"]) != sorted(source["annotated"]):
            raise InputError(f"In {path} case {case} does not annotate what its source {a['source']} does; "
                             f"every case of a source must list the same classes (split the source otherwise).")


def annotated_mask(annotated: List[Iterable[int]], num_classes: int, device=None) -> torch.Tensor:
    """Bool (batch, classes): row b is True for background and each class case b annotates."""
    mask = torch.zeros(len(annotated), num_classes, dtype=torch.bool)
    mask[:, 0] = True
    for b, values in enumerate(annotated):
        mask[b, list(values)] = True
    return mask.to(device) if device is not None else mask


class PartialLabelLoss(nn.Module):
    """nnU-Net's DC_and_CE_loss (Dice without background, weights 1 and 1) for partial labels.

    forward(logits, target, annotated): logits (b, c, ...), target (b, 1, ...) label map,
    annotated bool (b, c) from `annotated_mask`. The trainer sets `annotated` for each batch
    instead, so nnU-Net's DeepSupervisionWrapper and train_step call it as they call their own."""

    def __init__(self, batch_dice: bool, smooth: float = 1e-5, ddp: bool = False):
        super().__init__()
        self.batch_dice, self.smooth, self.ddp = batch_dice, smooth, ddp
        self.annotated: Optional[torch.Tensor] = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: Optional[torch.Tensor] = None):
        if annotated is None:
            annotated = self.annotated
        return self.cross_entropy(logits, target, annotated) + self.dice(logits, target, annotated)

    @staticmethod
    def cross_entropy(logits, target, annotated):
        log_p = torch.log_softmax(logits.float(), 1)
        shape = (*annotated.shape, *([1] * (logits.ndim - 2)))
        merged = (~annotated).clone()
        merged[:, 0] = True  # background and every class this case does not annotate
        log_background = torch.logsumexp(log_p.masked_fill(~merged.view(shape), float("-inf")), 1)
        t = target[:, 0].long()
        log_label = log_p.gather(1, t[:, None])[:, 0]
        return -torch.where(t == 0, log_background, log_label).mean()

    def dice(self, logits, target, annotated):
        axes = tuple(range(2, logits.ndim))
        p = torch.softmax(logits.float(), 1)[:, 1:]
        with torch.no_grad():
            y = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, target.long(), 1)[:, 1:]
            m = annotated[:, 1:].float()
            sum_gt = y.sum(axes, dtype=torch.float32) * m
        intersect = (p * y).sum(axes, dtype=torch.float32) * m
        sum_pred = p.sum(axes, dtype=torch.float32) * m
        if self.batch_dice:
            if self.ddp:  # the classes annotated anywhere in the global batch, as nnU-Net sums over it
                from nnunetv2.utilities.ddp_allgather import AllGatherGrad
                intersect, sum_pred, sum_gt, m = (AllGatherGrad.apply(x).flatten(0, 1)
                                                  for x in (intersect, sum_pred, sum_gt, m))
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
            m = m.amax(0)
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        return -(dc * m).sum() / m.sum().clamp_min(1)


class SourceBalancedDataset:
    """nnU-Net's training dataset seen through its sources: `identifiers` are the source names, so
    nnU-Net's data loader draws a source uniformly, and `load_case(source)` then draws one of its
    cases uniformly (FSEFT's sampling: datasets first, then cases). Each DDP rank runs its own
    loader, so every rank's batches are balanced on their own. Draws use numpy's global generator,
    as nnU-Net's own case sampling does, so its worker seeding applies unchanged."""

    def __init__(self, dataset, source_of_case: Dict[str, str]):
        self.dataset = dataset
        self.cases: Dict[str, List[str]] = {}
        for case in dataset.identifiers:
            self.cases.setdefault(source_of_case[case], []).append(case)
        self.identifiers = sorted(self.cases)

    def load_case(self, source: str):
        cases = self.cases[source]
        return self.dataset.load_case(cases[np.random.randint(len(cases))])

    def __len__(self):
        return len(self.identifiers)

    def __getattr__(self, name):  # anything else nnU-Net asks of its dataset
        if name == "dataset":  # not set yet (unpickling in a data worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def annotated_summary(summary: dict, annotated_of_case: Dict[str, List[int]], file_ending: str) -> dict:
    """nnU-Net's summary.json with each case's un-annotated labels left out of the means: a case
    that does not annotate an organ says nothing about how well it is segmented."""
    per_case = []
    for case in summary["metric_per_case"]:
        name = os.path.basename(case["reference_file"])[:-len(file_ending)]
        keep = set(annotated_of_case[name]) if name in annotated_of_case else None
        metrics = {k: v for k, v in case["metrics"].items() if keep is None or int(k) in keep}
        per_case.append({**case, "metrics": metrics})
    means = {}
    for label in summary["mean"]:
        values = [c["metrics"][label] for c in per_case if label in c["metrics"]]
        means[label] = {m: float(np.nanmean([v[m] for v in values])) if values else float("nan")
                        for m in summary["mean"][label]}
    foreground = {m: float(np.nanmean([means[k][m] for k in means])) for m in summary["foreground_mean"]}
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground}
