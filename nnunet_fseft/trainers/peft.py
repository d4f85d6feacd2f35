"""Fine-tuning methods: each a name, the parameter groups it trains and its hyper-parameters.

Groups (nnunet_fseft.network.parameters): all, adapters, head, decoder, last_stage, encoder_bias, encoder_norm.
PEFT adapts the encoder, as in FSEFT; the decoder is frozen unless a `_DecoderFT` variant tunes it whole.
Learning rates: benchmarks/lr_sweep.py at the trainers' own schedule, K = 1, on a base-organ and a
novel-organ task (benchmarks/results/lr_sweep_cpu.md). Per family, the rate with the best mean Dice
over both tasks among those that kept the base organ within 0.01 of zero-shot (do no harm first).
Unswept methods take their family's rate; `DecoderFT_lr1e3` is the named exception for a novel organ with one scan.
The rates were swept before the zero-shot anchor (nnunet_fseft/training/anchor.py), which every method now has for the
labels the foundation knows; they were not swept again with it.
"""
from nnunet_fseft.trainers.blackbox import nnUNetTrainerFSEFT_BlackBox
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT


# --- baselines ------------------------------------------------------------------------------

class nnUNetTrainerFSEFT_FullFT(nnUNetTrainerFSEFT):
    """Full fine-tuning: every foundation weight and a new head, at the FSEFT paper's 1e-4."""
    trainable = ("all",)
    learning_rate = 1e-4  # 1e-3 took the base organ 0.03 below zero-shot (lr sweep)


class nnUNetTrainerFSEFT_DecoderFT(nnUNetTrainerFSEFT):
    """Encoder frozen; decoder and head fine-tuned."""
    trainable = ("decoder", "head")
    learning_rate = 1e-4  # 1e-3 helped the novel organ (0.56 vs 0.50) but cost the base one 0.035


class nnUNetTrainerFSEFT_DecoderFT_lr1e3(nnUNetTrainerFSEFT_DecoderFT):
    """For an organ the foundation does not know: a novel organ starts near Dice 0 and needs the larger
    step (benchmark pancreas, K = 1, two foundations: 0.56 and 0.36 at 1e-3 vs 0.50 and 0.06 at 1e-4),
    which costs a known organ 0.02-0.03 (benchmarks/results/lr_sweep_cpu.md). With five scans the default
    rate wins (K = 5, one repeat: 0.729 at 1e-4 vs 0.689;
    benchmarks/results/archive/fseft_synthetic_cpu_history.md)."""
    learning_rate = 1e-3


class nnUNetTrainerFSEFT_FTLast(nnUNetTrainerFSEFT):
    """Only the last decoder stage and the head."""
    trainable = ("last_stage", "head")
    learning_rate = 3e-3  # not swept


# --- parameter-efficient --------------------------------------------------------------------

class nnUNetTrainerFSEFT_BitFit(nnUNetTrainerFSEFT):
    """The encoder's bias terms (those a norm does not cancel) and the head."""
    trainable = ("encoder_bias", "head")
    learning_rate = 1e-3  # 1e-2 lost 0.04 on the base organ; no rate learned the novel one


class nnUNetTrainerFSEFT_AffineNorm(nnUNetTrainerFSEFT):
    """Scale and shift of the encoder's normalisation layers, and the head."""
    trainable = ("encoder_norm", "head")
    learning_rate = 1e-3  # BitFit's family


class nnUNetTrainerFSEFT_LoRA(nnUNetTrainerFSEFT):
    """LoRA in weight space on every encoder conv (Primus: attention and MLP linears)."""
    tuner = "lora"
    trainable = ("adapters", "head")
    rank = 8
    alpha = 8.0
    learning_rate = 3e-3  # novel organ 0.17 at 1e-3, 0.40 here; 1e-2 (0.51) took the base organ 0.012 below zero-shot


class nnUNetTrainerFSEFT_AdaptFormer(nnUNetTrainerFSEFT):
    """A bottleneck of 16 beside each encoder block, scaled by 0.1 (FSEFT's setting)."""
    tuner = "adaptformer"
    trainable = ("adapters", "head")
    bottleneck_width = 16
    scale = 0.1
    learning_rate = 3e-3  # LoRA's family


class nnUNetTrainerFSEFT_ConvAdapter(nnUNetTrainerFSEFT):
    """PEFT-MedNeXt's adapter after each encoder and decoder stage."""
    tuner = "conv_adapter"
    trainable = ("adapters", "head")
    kernel_size = 3
    expansion = 1  # 2 would exceed 5% of the default 3d_fullres network (`nnunet-fseft params`)
    parallel = False
    learning_rate = 3e-3  # LoRA's family


class nnUNetTrainerFSEFT_ConvAdapterParallel(nnUNetTrainerFSEFT_ConvAdapter):
    """PEFT-MedNeXt's adapter beside each encoder and decoder stage."""
    parallel = True


class nnUNetTrainerFSEFT_MedAdapter(nnUNetTrainerFSEFT):
    """Med-Tuning's Med-Adapter after each encoder stage; the paper also tunes the decoder
    (nnUNetTrainerFSEFT_MedAdapter_DecoderFT)."""
    tuner = "med_adapter"
    trainable = ("adapters", "head")
    reduction = 6
    kernel_sizes = (3, 5, 7)
    slice_bins = 8
    learning_rate = 3e-3  # LoRA's family


# --- decoder tuning with a PEFT encoder: the FSEFT paper's best for novel structures ---------

class nnUNetTrainerFSEFT_LoRA_DecoderFT(nnUNetTrainerFSEFT_LoRA):
    trainable = ("adapters", "decoder", "head")
    learning_rate = 1e-4  # 3e-4 and 1e-3 helped the novel organ (0.56) but cost the base one


class nnUNetTrainerFSEFT_AdaptFormer_DecoderFT(nnUNetTrainerFSEFT_AdaptFormer):
    trainable = ("adapters", "decoder", "head")
    learning_rate = 1e-4  # LoRA_DecoderFT's family


class nnUNetTrainerFSEFT_BitFit_DecoderFT(nnUNetTrainerFSEFT_BitFit):
    trainable = ("encoder_bias", "decoder", "head")
    learning_rate = 1e-4  # LoRA_DecoderFT's family


class nnUNetTrainerFSEFT_MedAdapter_DecoderFT(nnUNetTrainerFSEFT_MedAdapter):
    trainable = ("adapters", "decoder", "head")
    learning_rate = 1e-4  # LoRA_DecoderFT's family


# --- black-box: the foundation is only queried for features (nnunet_fseft/trainers/blackbox.py) -----------

class nnUNetTrainerFSEFT_LinearProbe(nnUNetTrainerFSEFT_BlackBox):
    """A 1x1x1 head on the frozen foundation's last decoder features."""
    adapter = "linear_probe"
    learning_rate = 1e-2  # 1e-3 to 1e-2 within 0.002 on the base organ; 1e-2 the least far from 0 on the novel


class nnUNetTrainerFSEFT_SpatialAdapter(nnUNetTrainerFSEFT_BlackBox):
    """FSEFT's Spatial Adapter, x + conv3(relu(conv3(x))) with the second conv at zero, then a head."""
    adapter = "spatial_adapter"
    # 1e-2 overfit one support scan within 300 steps (train loss -0.93) with logits so large on held-out
    # scans that nnUNetv2_predict's fp16 sliding-window sum overflowed ("Encountered inf"); in the sweep
    # no rate kept the base organ within 0.01 of zero-shot, 3e-4 had the best mean over both tasks
    learning_rate = 3e-4


class nnUNetTrainerFSEFT_SpatialAdapterOnline(nnUNetTrainerFSEFT_SpatialAdapter):
    """The Spatial Adapter on features computed per batch from nnU-Net's augmented images
    (its intensity augmentations too), instead of the cache."""
    features = "online"


class nnUNetTrainerFSEFT_LinearProbeTI(nnUNetTrainerFSEFT_LinearProbe):
    """The linear probe with transductive inference: organ-size priors on unlabelled query volumes."""
    transductive = True


class nnUNetTrainerFSEFT_SpatialAdapterTI(nnUNetTrainerFSEFT_SpatialAdapter):
    """The Spatial Adapter with transductive inference: organ-size priors on unlabelled query volumes."""
    transductive = True
