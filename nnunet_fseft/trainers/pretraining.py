"""Training a foundation: nnU-Net's own training shortened (`nnUNetTrainerFSEFT_Pretrain`, for the
demo and tests), and pre-training on pooled, partially labelled datasets (`nnunet-fseft combine`).

nnU-Net's own training, schedule and augmentation, with three changes read from the pooled
dataset's annotations.json (nnunet_fseft/training/partial_labels.py says why each is what it is):
- the loss counts, for each case, only the classes its source annotates;
- training batches are drawn source first, then case (FSEFT); each DDP rank draws its own;
- validation Dice counts a class only on cases that annotate it, online and in summary.json
  (nnU-Net's unmasked summary is kept as summary_all_labels.json).
Without annotations.json every case annotates every class, and this is nnU-Net's training, its loss
included (so a region-based dataset such as BraTS trains as nnU-Net trains it).
"""
import os
import shutil

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring

from nnunet_fseft.datasets.dataset_json import not_one_class_per_voxel
from nnunet_fseft.errors import InputError
from nnunet_fseft.training.partial_labels import (PartialLabelLoss, SourceBalancedDataset, annotated_mask,
                                                  annotated_summary, find_annotations)
from nnunet_fseft.training.schedule import adamw_poly, set_schedule


class nnUNetTrainerFSEFT_Pretrain(nnUNetTrainerNoMirroring):
    """nnU-Net's own training without mirroring (its 8-fold test-time mirroring dominates the
    final validation on a CPU) and with AdamW instead of SGD, which is too slow to start for a short
    schedule: on the demo's phantoms after 300 iterations SGD (lr 1e-2) still had pseudo-Dice 0
    for every organ, AdamW (3e-3) 0.90 for the liver.
    nnUNet_fseft_epochs / nnUNet_fseft_iters_per_epoch set the schedule."""
    learning_rate = 3e-3
    val_iterations_per_epoch = 10

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, self.num_epochs, self.num_iterations_per_epoch, self.val_iterations_per_epoch)
        self.initial_lr = self.learning_rate

    def configure_optimizers(self):
        return adamw_poly(self)


class nnUNetTrainerFSEFT_Foundation(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch)
        self.annotations = find_annotations(self.dataset_json, self.plans_manager.dataset_name,
                                            self.preprocessed_dataset_folder_base)
        if self.annotations is not None and not_one_class_per_voxel(self.label_manager):
            raise InputError(f"{type(self).__name__} trains a pooled dataset's partial labels, which need one class per "
                             f"voxel, and this dataset has {not_one_class_per_voxel(self.label_manager)}; pool "
                             f"plain-label datasets with `nnunet-fseft combine` instead.")
        # what each key annotates: case ids (validation) and source names (training draws sources)
        self.annotated_of = {}
        if self.annotations:
            self.annotated_of = {c: a["annotated"] for c, a in self.annotations["cases"].items()}
            self.annotated_of.update({s: a["annotated"] for s, a in self.annotations["sources"].items()})

    def on_train_start(self):
        if self.annotations is None:
            self.print_to_log_file("Not a dataset pooled by nnunet-fseft combine: every case annotates every "
                                   "class (nnU-Net's loss and sampling).")
        else:
            for source, a in self.annotations["sources"].items():
                names = [n for n, v in self.dataset_json["labels"].items() if v in a["annotated"]]
                self.print_to_log_file(f"{source} annotates {', '.join(names)}")
        super().on_train_start()

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.annotations is None:
            return dataset_tr, dataset_val
        unknown = sorted((set(dataset_tr.identifiers) | set(dataset_val.identifiers)) - set(self.annotations["cases"]))
        if unknown:
            raise InputError(f"Cases {unknown[:5]} are not in this dataset's annotations file (added after "
                             f"`nnunet-fseft combine`?); pool the source datasets again with combine.")
        source_of = {c: a["source"] for c, a in self.annotations["cases"].items()}
        return SourceBalancedDataset(dataset_tr, source_of), dataset_val

    def _build_loss(self):
        if self.annotations is None:  # nnU-Net's own (regions included: BCE + Dice on sigmoid outputs)
            return super()._build_loss()
        self.partial_loss = PartialLabelLoss(self.configuration_manager.batch_dice, ddp=self.is_ddp)
        if not self.enable_deep_supervision:
            return self.partial_loss
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


class nnUNetTrainerFSEFT_FoundationShort(nnUNetTrainerFSEFT_Foundation, nnUNetTrainerFSEFT_Pretrain):
    """The same, with nnUNetTrainerFSEFT_Pretrain's AdamW and no mirroring: for short schedules
    on small data (the tests and benchmarks/partial_labels.py)."""
