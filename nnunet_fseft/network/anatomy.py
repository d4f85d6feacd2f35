"""Where things are in the networks nnU-Net builds: head, decoder, stages, blocks.

Methods and the freezing rule ask this module instead of knowing each architecture:
- conv U-Nets (`PlainConvUNet`, `ResidualEncoderUNet`, 2D or 3D): an encoder with conv
  stages, a `UNetDecoder` whose `seg_layers` are the head(s);
- `Primus` (nnU-Net's transformer): patch embedding, EVA blocks, and a `PatchDecode` that sizes
  every one of its layers from the number of classes, so the whole of it is the head: new for
  each target, and trained by every method;
- MONAI's MedNeXt and Swin-UNETR as `nnunet_fseft.network.nets` arranges them: MedNeXt is a conv U-Net
  (its stages hold MedNeXt blocks); Swin-UNETR a transformer encoder with a conv U-Net decoder.
"""
from dataclasses import dataclass
from typing import List, Set, Tuple

from torch import nn

from nnunet_fseft.errors import InputError

MEDNEXT_BLOCKS = ("MedNeXtBlock", "MedNeXtDownBlock", "MedNeXtUpBlock")  # MONAI's (told by name: monai is an extra)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class Anatomy:
    architecture: str            # class name of the network, for messages
    transformer: bool            # True for Primus and Swin-UNETR: the encoder is attention blocks, not conv stages
    decoder_is_head: bool        # True for Primus: its decoder is sized by the classes, new for every target
    head: List[str]              # module names of the segmentation head(s): what depends on the classes
    encoder: List[str]           # module-name prefixes of the encoder: where FSEFT puts PEFT
    decoder: List[str]           # module-name prefixes of the decoder, head included
    last_stage: List[str]        # module names of the last decoder stage, head excluded
    encoder_stages: List[str]    # conv stages of the encoder, in forward order ([] for Primus)
    decoder_stages: List[str]    # conv stages of the decoder, in forward order ([] for Primus)
    blocks: List[str]            # the blocks AdaptFormer sits beside (conv blocks, or a transformer's MLPs)
    attention: List[str] = ()    # a transformer's linear layers that LoRA adapts


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def anatomy(network: nn.Module) -> Anatomy:
    kind = type(network).__name__
    decoder = getattr(network, "decoder", None)
    if hasattr(getattr(network, "encoder", None), "stages") and hasattr(decoder, "seg_layers"):
        n = len(decoder.stages)
        encoder_stages = [_inside_sequential(network, f"encoder.stages.{i}") for i in range(len(network.encoder.stages))]
        decoder_stages = [_inside_sequential(network, f"decoder.stages.{i}") for i in range(n)]
        return Anatomy(kind, False, False,
                       head=[f"decoder.seg_layers.{i}" for i in range(len(decoder.seg_layers))],
                       encoder=["encoder"],
                       decoder=["decoder.stages", "decoder.transpconvs", "decoder.seg_layers"],
                       last_stage=[f"decoder.stages.{n - 1}", f"decoder.transpconvs.{n - 1}"],
                       encoder_stages=encoder_stages, decoder_stages=decoder_stages,
                       blocks=_conv_blocks(network, ["encoder"] + decoder_stages))
    if hasattr(network, "eva") and hasattr(network, "up_projection"):
        return Anatomy(kind, True, True, head=["up_projection"], encoder=["down_projection", "eva"],
                       decoder=["up_projection"], last_stage=[],
                       encoder_stages=[], decoder_stages=[],
                       blocks=[f"eva.blocks.{i}.mlp" for i in range(len(network.eva.blocks))],
                       attention=[n for n, m in network.named_modules()
                                  if type(m) is nn.Linear and within(n, ["eva.blocks"])])
    if hasattr(getattr(network, "encoder", None), "swinViT") and hasattr(decoder, "seg_layers"):
        # FSEFT's LoRA goes on the attention projections; AdaptFormer beside each Swin block's MLP
        modules = list(network.named_modules())
        return Anatomy(kind, True, False,
                       head=[f"decoder.seg_layers.{i}" for i in range(len(decoder.seg_layers))],
                       encoder=["encoder"], decoder=["decoder"],
                       last_stage=[f"decoder.stages.{len(decoder.stages) - 1}", "decoder.skips.0"],
                       encoder_stages=[], decoder_stages=[],
                       blocks=[n for n, m in modules if type(m).__name__ == "MLPBlock" and within(n, ["encoder"])],
                       attention=[n for n, m in modules if type(m) is nn.Linear and within(n, ["encoder"])
                                  and n.rsplit(".", 1)[-1] in ("qkv", "proj")])
    raise InputError(f"nnunet-fseft does not know the {kind} architecture; it supports PlainConvUNet, "
                     f"ResidualEncoderUNet and Primus as nnU-Net builds them from plans, and MedNeXt and "
                     f"Swin-UNETR from `nnunet-fseft plans --arch`.")


def cancelled_biases(network: nn.Module) -> Set[str]:
    """Parameter names of the conv biases that cannot change the network's output: those of a conv
    whose output goes straight into a norm that subtracts each channel's mean (InstanceNorm,
    BatchNorm), as in every conv block nnU-Net builds. BitFit trains only the other biases."""
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
    mean_free = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)
    cancelled = set()
    for name, m in network.named_modules():
        ops = list(getattr(m, "all_modules", []))  # conv, [dropout], [norm], [nonlin], in forward order
        if (isinstance(m, ConvDropoutNormReLU) and len(ops) > 1 and ops[0] is m.conv
                and isinstance(ops[1], mean_free) and m.conv.bias is not None):
            cancelled.add(f"{name}.conv.bias")
        norm = getattr(m, "norm", None)  # a MedNeXt block: conv1 -> GroupNorm with one group per channel
        if (type(m).__name__.startswith("MedNeXt") and isinstance(norm, nn.GroupNorm)
                and norm.num_groups == norm.num_channels and m.conv1.bias is not None):
            cancelled.add(f"{name}.conv1.bias")
    return cancelled


def head_names(network: nn.Module) -> Set[str]:
    """State-dict keys of the head (replaced for every target, so never taken from a foundation)."""
    heads = anatomy(network).head
    return {k for k in network.state_dict() if within(k.rsplit(".", 1)[0], heads)}


def _inside_sequential(network: nn.Module, name: str) -> str:
    """PlainConvEncoder wraps each stage in a one-element nn.Sequential; an nn.Sequential runs
    every child it holds, so an adapter must live in the stage inside it instead."""
    m = network.get_submodule(name)
    while isinstance(m, nn.Sequential) and len(m) == 1:
        name, m = name + ".0", m[0]
    if isinstance(m, nn.Sequential):
        raise InputError(f"Stage {name} of {type(network).__name__} is a sequence of several modules "
                         f"(a pooling stage?); nnunet-fseft cannot place a stage adapter there.")
    return name


def _conv_blocks(network: nn.Module, prefixes: List[str]) -> List[str]:
    """The outermost conv blocks (ConvDropoutNormReLU, BasicBlockD, BottleneckD, MedNeXt's blocks) under
    `prefixes`; a residual block's own convs and skip projection belong to it."""
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
    blocks = []
    for name, m in network.named_modules():
        is_block = isinstance(m, (ConvDropoutNormReLU, BasicBlockD, BottleneckD)) or type(m).__name__ in MEDNEXT_BLOCKS
        if (is_block and within(name, prefixes)
                and not within(name, blocks)):
            blocks.append(name)
    return blocks


def conv_geometry(module: nn.Module) -> Tuple[type, int, int, Tuple[int, ...]]:
    """(conv type, input channels, output channels, total stride) of a conv block or stage.

    Its convs in forward order, residual skip projections (ResEnc's `skip`, MedNeXt's `res_conv`) left out:
    they run beside the main path."""
    convs = [m for name, m in module.named_modules()
             if isinstance(m, CONV_TYPES) and ".skip" not in f".{name}" and ".res_conv" not in f".{name}"
             and "fseft_" not in name]
    if not convs:
        raise InputError(f"{type(module).__name__} holds no convolution for a conv adapter to fit; use a method that "
                         f"does not need one here, such as LoRA or BitFit.")
    stride = [1] * (convs[0].weight.dim() - 2)
    for c in convs:
        stride = [s * t for s, t in zip(stride, c.stride)]
    conv_type = nn.Conv3d if isinstance(convs[0], (nn.Conv3d, nn.ConvTranspose3d)) else nn.Conv2d
    return conv_type, convs[0].in_channels, convs[-1].out_channels, tuple(stride)
