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

from nnunet_fseft.datasets.dataset_json import ANNOTATIONS_KEY, not_one_class_per_voxel, read_json
from nnunet_fseft.errors import InputError


def find_annotations(dataset_json: dict, dataset_name: str, preprocessed_folder: str) -> Optional[dict]:
    """The annotations file ({"sources": ..., "cases": ...}) that dataset.json names (written by `combine`, or
    by `adopt --keep-foundation-labels`), or None for a dataset without one. Looked for in nnUNet_raw, where
    those commands write it (so a later adopt's is the one read), then in the preprocessed folder, where it
    is copied, so later runs (--c, --val, another machine) find it without nnUNet_raw. Training such a
    dataset without it would be naive training, so that stops."""
    name = dataset_json.get(ANNOTATIONS_KEY)
    if name is None:
        return None
    raw = os.environ.get("nnUNet_raw")
    places = ([os.path.join(raw, dataset_name)] if raw else []) + ([preprocessed_folder] if preprocessed_folder else [])
    for folder in places:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            annotations = read_json(path, "write it again with the command that wrote it")
            check_annotations(annotations, path)
            if folder != preprocessed_folder and preprocessed_folder and os.path.isdir(preprocessed_folder):
                shutil.copy2(path, os.path.join(preprocessed_folder, name))
            return annotations
    raise InputError(f"{dataset_name}'s dataset.json names the annotations file {name} (written by `nnunet-fseft "
                     f"combine` or `adopt --keep-foundation-labels`), which is in none of {places}; copy it from the "
                     f"raw dataset into {preprocessed_folder}, or write it again with the command that wrote it.")


def check_annotations(annotations: dict, path: str) -> None:
    """The file's form ({"sources": {name: {"annotated": [...]}}, "cases": {case: {"source", "annotated"}}}),
    and each case annotating what its source does: sampling and the loss work per source."""
    def listed(x):
        return isinstance(x, dict) and isinstance(x.get("annotated"), list)
    if not (isinstance(annotations, dict) and isinstance(annotations.get("sources"), dict)
            and isinstance(annotations.get("cases"), dict) and all(map(listed, annotations["sources"].values()))
            and all(listed(a) and "source" in a for a in annotations["cases"].values())):
        raise InputError(f"{path} is not an annotations file as `nnunet-fseft combine` writes it ({{\"sources\": "
                         f"{{NAME: {{\"annotated\": [...]}}}}, \"cases\": {{CASE: {{\"source\": NAME, \"annotated\": "
                         f"[...]}}}}}}); write it in that form.")
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

    forward(logits, target, annotated): logits (b, c, ...), target (b, 1, ...) label map (voxels labelled
    -1, outside the volume, are left out), annotated bool (b, c) from `annotated_mask`. The trainer sets `annotated` for each batch
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
        inside = t >= 0  # -1: outside the volume in a black-box method's cached-feature patches
        log_label = log_p.gather(1, t.clamp(min=0)[:, None])[:, 0]
        nll = -torch.where(t == 0, log_background, log_label)
        return torch.where(inside, nll, 0).sum() / inside.sum().clamp_min(1)

    def dice(self, logits, target, annotated):
        axes = tuple(range(2, logits.ndim))
        inside = (target >= 0).float()
        p = torch.softmax(logits.float(), 1)[:, 1:] * inside
        with torch.no_grad():
            y = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, target.long().clamp(min=0), 1)[:, 1:]
            y = y * inside
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


class PartialLabelTraining:
    """What an nnU-Net trainer changes for a dataset whose dataset.json names an annotations file
    (a pooled foundation dataset, or a target whose scans label only some classes): the loss counts
    each case's annotated classes only (PartialLabelLoss), and validation Dice, online and in
    summary.json, counts a class only on cases that annotate it (nnU-Net's unmasked summary is kept as
    summary_all_labels.json). Without an annotations file every case annotates every class and this
    is nnU-Net's training, its loss included. Mixed in before nnU-Net's trainer (MRO), so the
    trainer's own overrides wrap these."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.annotations = find_annotations(self.dataset_json, self.plans_manager.dataset_name,
                                            self.preprocessed_dataset_folder_base)
        if self.annotations is not None and not_one_class_per_voxel(self.label_manager):
            raise InputError(f"{type(self).__name__} trains partial labels (this dataset names an annotations file), "
                             f"which need one class per voxel, and this dataset has "
                             f"{not_one_class_per_voxel(self.label_manager)}; remove '{ANNOTATIONS_KEY}' from its "
                             f"dataset.json if every case is fully labelled, or pool plain-label datasets with "
                             f"`nnunet-fseft combine`.")
        # what each key annotates: case ids (validation) and source names (a foundation's training draws sources)
        self.annotated_of = {}
        if self.annotations:
            self.annotated_of = {c: a["annotated"] for c, a in self.annotations["cases"].items()}
            self.annotated_of.update({s: a["annotated"] for s, a in self.annotations["sources"].items()})

    def on_train_start(self):
        for source, a in (self.annotations or {}).get("sources", {}).items():
            names = [n for n, v in self.dataset_json["labels"].items() if v in a["annotated"]]
            self.print_to_log_file(f"{source} annotates {', '.join(names)}")
        super().on_train_start()

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.annotations is not None:
            unknown = sorted((set(dataset_tr.identifiers) | set(dataset_val.identifiers)) - set(self.annotations["cases"]))
            if unknown:
                raise InputError(f"Cases {unknown[:5]} are not in this dataset's annotations file (added after it was "
                                 f"written?); write it again: pool the sources with combine, or adopt with "
                                 f"--keep-foundation-labels again.")
        return dataset_tr, dataset_val

    def _build_loss(self):
        if self.annotations is None:  # nnU-Net's own (regions included: BCE + Dice on sigmoid outputs)
            return super()._build_loss()
        self.partial_loss = PartialLabelLoss(self.configuration_manager.batch_dice, ddp=self.is_ddp)
        if not self.enable_deep_supervision:
            return self.partial_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        weights = [1 / 2 ** i for i in range(len(self._get_deep_supervision_scales()))]
        weights[-1] = 1e-6 if self.is_ddp else 0  # as nnU-Net: the lowest output is unused (DDP needs a weight)
        return DeepSupervisionWrapper(self.partial_loss, [w / sum(weights) for w in weights])

    def _annotated(self, keys):
        """Sets the loss's per-case class mask for this batch and returns it."""
        every = range(1, self.label_manager.num_segmentation_heads)
        mask = annotated_mask([self.annotated_of.get(k, every) for k in keys],
                              self.label_manager.num_segmentation_heads, self.device)
        self.partial_loss.annotated = mask
        return mask

    def train_step(self, batch: dict) -> dict:
        if self.annotations is not None:
            self._annotated(batch["keys"])
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's pseudo-Dice, with a class's tp/fp/fn counted only in cases that annotate it."""
        if self.annotations is None:
            return super().validation_step(batch)
        from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
        from nnunetv2.utilities.helpers import dummy_context
        mask = self._annotated(batch["keys"]).float()
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            loss = self.loss(output, target)
        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        onehot = torch.zeros_like(output, dtype=torch.float16).scatter_(1, output.argmax(1)[:, None], 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=list(range(2, output.ndim)))
        hard = [(x * mask).sum(0)[1:].detach().cpu().numpy() for x in (tp, fp, fn)]
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": hard[0], "fp_hard": hard[1], "fn_hard": hard[2]}

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        summary = os.path.join(self.output_folder, "validation", "summary.json")
        if self.local_rank != 0 or self.annotations is None or not os.path.isfile(summary):
            return
        import json
        from nnunetv2.evaluation.evaluate_predictions import save_summary_json
        with open(summary) as f:
            result = annotated_summary(json.load(f), self.annotated_of, self.dataset_json["file_ending"])
        shutil.copy2(summary, os.path.join(self.output_folder, "validation", "summary_all_labels.json"))
        save_summary_json(result, summary)
        unscored = [label for label, m in result["mean"].items() if m["Dice"] != m["Dice"]]
        if unscored:
            self.print_to_log_file(f"No validation case annotates label(s) {unscored}: they are left out of the mean.")
        self.print_to_log_file(f"Mean validation Dice over the cases that annotate each class: "
                               f"{result['foreground_mean']['Dice']} (summary.json; nnU-Net's, which scores "
                               f"un-annotated organs as background, is summary_all_labels.json)",
                               also_print_to_console=True)
