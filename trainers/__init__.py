"""The trainer classes nnU-Net finds by name (`nnUNetv2_train ... -tr NAME`).

Installed as `nnunet_fseft.trainers`; nnU-Net reaches them through the folder
`nnunet_fseft/nnunet_ext`, which the install adds to `nnUNet_extTrainer`.
"""
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT
from nnunet_fseft.trainers.peft import nnUNetTrainerFSEFT_FullFT, nnUNetTrainerFSEFT_LoRA
from nnunet_fseft.trainers.pretrain import nnUNetTrainerFSEFT_Pretrain

__all__ = ["nnUNetTrainerFSEFT", "nnUNetTrainerFSEFT_FullFT", "nnUNetTrainerFSEFT_LoRA",
           "nnUNetTrainerFSEFT_Pretrain"]
