"""Plain nnU-Net training of a (small) foundation, with the FSEFT schedule overrides."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_fseft.trainers.nnUNetTrainerFSEFT import env_int


class nnUNetTrainerFSEFT_Pretrain(nnUNetTrainer):
    """nnU-Net's own training; nnUNet_fseft_epochs / nnUNet_fseft_iters_per_epoch shorten it
    (used by the demo and tests to make a tiny foundation)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = env_int("nnUNet_fseft_epochs", self.num_epochs)
        self.num_iterations_per_epoch = env_int("nnUNet_fseft_iters_per_epoch", self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = min(self.num_val_iterations_per_epoch, self.num_iterations_per_epoch)
