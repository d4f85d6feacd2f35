"""The trainer classes nnU-Net finds by name (`nnUNetv2_train ... -tr NAME`).

nnU-Net reaches them through the folder `nnunet_fseft/nnunet_ext`, which the install adds to
`nnUNet_extTrainer`. nnUNetTrainerFSEFT.py is the base every method shares, peft.py and
blackbox.py the methods, pretraining.py the foundation's own training, start.py the benchmark's
reference rows (step 0, and the target trained alone).
"""
from nnunet_fseft.trainers import peft
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT
from nnunet_fseft.trainers.peft import *  # noqa: F401,F403 -- every method class, listed in METHODS below
from nnunet_fseft.trainers.pretraining import (nnUNetTrainerFSEFT_Foundation, nnUNetTrainerFSEFT_FoundationShort,
                                               nnUNetTrainerFSEFT_Pretrain)
from nnunet_fseft.trainers.start import nnUNetTrainerFSEFT_Start, nnUNetTrainerFSEFT_TargetOnly

# Every fine-tuning method, by trainer name: the classes nnunet_fseft/trainers/peft.py defines, in the order it
# defines them (`nnunet-fseft params` lists them in this order).
METHODS = {name: cls for name, cls in vars(peft).items()
           if isinstance(cls, type) and issubclass(cls, nnUNetTrainerFSEFT) and cls.__module__ == peft.__name__}

__all__ = ["nnUNetTrainerFSEFT", "nnUNetTrainerFSEFT_Pretrain", "nnUNetTrainerFSEFT_Start", "nnUNetTrainerFSEFT_TargetOnly",
           "nnUNetTrainerFSEFT_Foundation",
           "nnUNetTrainerFSEFT_FoundationShort", *METHODS]
