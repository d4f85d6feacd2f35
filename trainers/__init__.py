"""The trainer classes nnU-Net finds by name (`nnUNetv2_train ... -tr NAME`).

Installed as `nnunet_fseft.trainers`; nnU-Net reaches them through the folder
`nnunet_fseft/nnunet_ext`, which the install adds to `nnUNet_extTrainer`.
"""
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT
from nnunet_fseft.trainers.peft import (nnUNetTrainerFSEFT_AdaptFormer, nnUNetTrainerFSEFT_AdaptFormer_DecoderFT,
                                        nnUNetTrainerFSEFT_AffineNorm, nnUNetTrainerFSEFT_BitFit,
                                        nnUNetTrainerFSEFT_BitFit_DecoderFT, nnUNetTrainerFSEFT_ConvAdapter,
                                        nnUNetTrainerFSEFT_ConvAdapterParallel, nnUNetTrainerFSEFT_DecoderFT,
                                        nnUNetTrainerFSEFT_FTLast, nnUNetTrainerFSEFT_FullFT,
                                        nnUNetTrainerFSEFT_LinearProbe, nnUNetTrainerFSEFT_LinearProbeTI,
                                        nnUNetTrainerFSEFT_LoRA, nnUNetTrainerFSEFT_LoRA_DecoderFT,
                                        nnUNetTrainerFSEFT_MedAdapter, nnUNetTrainerFSEFT_MedAdapter_DecoderFT,
                                        nnUNetTrainerFSEFT_SpatialAdapter, nnUNetTrainerFSEFT_SpatialAdapterOnline,
                                        nnUNetTrainerFSEFT_SpatialAdapterTI)
from nnunet_fseft.trainers.foundation import nnUNetTrainerFSEFT_Foundation, nnUNetTrainerFSEFT_FoundationShort
from nnunet_fseft.trainers.pretrain import nnUNetTrainerFSEFT_Pretrain

# Every fine-tuning method, by trainer name (`nnunet-fseft params` lists them in this order).
METHODS = {t.__name__: t for t in (
    nnUNetTrainerFSEFT_FullFT, nnUNetTrainerFSEFT_DecoderFT, nnUNetTrainerFSEFT_FTLast,
    nnUNetTrainerFSEFT_BitFit, nnUNetTrainerFSEFT_AffineNorm, nnUNetTrainerFSEFT_LoRA,
    nnUNetTrainerFSEFT_AdaptFormer, nnUNetTrainerFSEFT_ConvAdapter, nnUNetTrainerFSEFT_ConvAdapterParallel,
    nnUNetTrainerFSEFT_MedAdapter, nnUNetTrainerFSEFT_LoRA_DecoderFT, nnUNetTrainerFSEFT_AdaptFormer_DecoderFT,
    nnUNetTrainerFSEFT_BitFit_DecoderFT, nnUNetTrainerFSEFT_MedAdapter_DecoderFT,
    nnUNetTrainerFSEFT_LinearProbe, nnUNetTrainerFSEFT_SpatialAdapter, nnUNetTrainerFSEFT_SpatialAdapterOnline,
    nnUNetTrainerFSEFT_LinearProbeTI, nnUNetTrainerFSEFT_SpatialAdapterTI)}

__all__ = ["nnUNetTrainerFSEFT", "nnUNetTrainerFSEFT_Pretrain", "nnUNetTrainerFSEFT_Foundation",
           "nnUNetTrainerFSEFT_FoundationShort", *METHODS]
