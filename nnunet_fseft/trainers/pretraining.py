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
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring

from nnunet_fseft.training.partial_labels import PartialLabelTraining, SourceBalancedDataset
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


class nnUNetTrainerFSEFT_Foundation(PartialLabelTraining, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_schedule(self, self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch)

    def on_train_start(self):
        if self.annotations is None:
            self.print_to_log_file("Not a dataset pooled by nnunet-fseft combine: every case annotates every "
                                   "class (nnU-Net's loss and sampling).")
        super().on_train_start()

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.annotations is None:
            return dataset_tr, dataset_val
        source_of = {c: a["source"] for c, a in self.annotations["cases"].items()}
        return SourceBalancedDataset(dataset_tr, source_of), dataset_val


class nnUNetTrainerFSEFT_FoundationShort(nnUNetTrainerFSEFT_Foundation, nnUNetTrainerFSEFT_Pretrain):
    """The same, with nnUNetTrainerFSEFT_Pretrain's AdamW and no mirroring: for short schedules
    on small data (the tests and benchmarks/partial_labels.py)."""
