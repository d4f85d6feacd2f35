"""Fine-tuning methods: each a name, the parameter groups it trains and its hyper-parameters."""
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT


class nnUNetTrainerFSEFT_FullFT(nnUNetTrainerFSEFT):
    """Full fine-tuning: every foundation weight and a new head. The FSEFT paper's lr 1e-4 is
    too slow for short schedules (README, Schedule)."""
    trainable = ("all",)
    learning_rate = 1e-3


class nnUNetTrainerFSEFT_LoRA(nnUNetTrainerFSEFT):
    """LoRA in weight space on every conv and transposed conv; a new head."""
    tuner = "lora"
    trainable = ("adapters", "head")
    rank = 8
    alpha = 8.0
    learning_rate = 1e-2  # 1e-3 collapsed to background on the demo task (README, Schedule)
