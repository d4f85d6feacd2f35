"""Fine-tuning methods: each a name, the parameter groups it trains and its hyper-parameters."""
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT


class nnUNetTrainerFSEFT_FullFT(nnUNetTrainerFSEFT):
    """Full fine-tuning: every foundation weight and a new head (FSEFT paper: AdamW, lr 1e-4)."""
    trainable = ("all",)
    learning_rate = 1e-4


class nnUNetTrainerFSEFT_LoRA(nnUNetTrainerFSEFT):
    """LoRA in weight space on every conv and transposed conv; a new head."""
    tuner = "lora"
    trainable = ("adapters", "head")
    rank = 8
    alpha = 8.0
    learning_rate = 1e-3
