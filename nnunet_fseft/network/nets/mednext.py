"""MedNeXt, as nnU-Net builds it from plans.

Roy et al., "MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image Segmentation", MICCAI 2023
(arXiv 2303.09975). The blocks are MONAI's (`monai.networks.nets.MedNeXt`: depthwise k^3 conv, GroupNorm,
1x1x1 expansion, GELU, 1x1x1 compression, residual; strided MedNeXt blocks to go down and up); this module
only arranges them the way nnU-Net's U-Nets are arranged:
- `encoder.stages[0]` = stem + first blocks, `encoder.stages[i]` = down block + blocks, the last one the
  bottleneck: 4 + 1 stages for the published sizes;
- `decoder.transpconvs[i]` = up block, `decoder.stages[i]` = blocks after the skip is added, and
  `decoder.seg_layers[i]` a 1x1x1 conv head on each decoder stage, full resolution last.
MONAI's heads (1x1x1 transposed convs, one on the bottleneck too) are replaced by 1x1x1 convs on the
decoder stages only: the same function, and the deep-supervision outputs nnU-Net derives from the plans.
"""
from typing import Sequence

import torch
from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.nets import Decoder, check_strides, require_monai

# create_mednext's published sizes (MONAI), without the kernel size, which the plans choose (3 or 5)
SIZES = {
    "S": dict(encoder_expansion=[2, 2, 2, 2], decoder_expansion=[2, 2, 2, 2], bottleneck_expansion=2,
              blocks_down=[2, 2, 2, 2], blocks_bottleneck=2, blocks_up=[2, 2, 2, 2]),
    "B": dict(encoder_expansion=[2, 3, 4, 4], decoder_expansion=[4, 4, 3, 2], bottleneck_expansion=4,
              blocks_down=[2, 2, 2, 2], blocks_bottleneck=2, blocks_up=[2, 2, 2, 2]),
    "M": dict(encoder_expansion=[2, 3, 4, 4], decoder_expansion=[4, 4, 3, 2], bottleneck_expansion=4,
              blocks_down=[3, 4, 4, 4], blocks_bottleneck=4, blocks_up=[4, 4, 4, 3]),
    "L": dict(encoder_expansion=[3, 4, 8, 8], decoder_expansion=[8, 8, 4, 3], bottleneck_expansion=8,
              blocks_down=[3, 4, 8, 8], blocks_bottleneck=8, blocks_up=[8, 8, 4, 3]),
}


class MedNeXtStage(nn.Module):
    """One resolution of a MedNeXt: an entry (stem, down or nothing) and its blocks."""

    def __init__(self, entry: nn.Module, blocks: nn.Sequential):
        super().__init__()
        self.entry, self.blocks = entry, blocks

    def forward(self, x):
        return self.blocks(self.entry(x))


class MedNeXtEncoder(nn.Module):
    def __init__(self, stages: Sequence[MedNeXtStage]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class MedNeXtDecoder(Decoder):
    def __init__(self, up_blocks, stages, heads, deep_supervision: bool):
        super().__init__(stages, heads, deep_supervision)
        self.transpconvs = nn.ModuleList(up_blocks)

    def forward(self, skips):
        x, features = skips[-1], []
        for i, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(up(x) + skips[-(i + 2)])  # MedNeXt adds its skips (nnU-Net's U-Nets concatenate them)
            features.append(x)
        return self.outputs(features)


class MedNeXtUNet(nn.Module):
    """MedNeXt with nnU-Net's constructor and U-Net anatomy.

    Args:
        input_channels: image channels (nnU-Net passes them).
        num_classes: output channels (nnU-Net passes them: labels, or regions for a sigmoid head).
        strides: the plans' `strides`, which must be [1, ...] then [2, ...] once per down block.
        features_base: channels of the first stage (MedNeXt's `init_filters`, 32 in the paper); doubles per stage.
        kernel_size: the depthwise kernel (3 or 5 in the paper).
        encoder_expansion, decoder_expansion: expansion ratio of each encoder / decoder stage's blocks.
        bottleneck_expansion: expansion ratio of the bottleneck blocks.
        blocks_down, blocks_up: MedNeXt blocks per encoder / decoder stage; blocks_bottleneck: in the bottleneck.
        residual: residual connections in the blocks and the down and up blocks (True in the published sizes).
        deep_supervision: also return the heads of the coarser decoder stages (nnU-Net toggles it).
        n_stages: encoder stages, bottleneck included (len(blocks_down) + 1); checked, for nnU-Net's plans.
    """

    def __init__(self, input_channels: int, num_classes: int, strides, features_base: int = 32,
                 kernel_size: int = 3, encoder_expansion=(2, 2, 2, 2), decoder_expansion=(2, 2, 2, 2),
                 bottleneck_expansion: int = 2, blocks_down=(2, 2, 2, 2), blocks_bottleneck: int = 2,
                 blocks_up=(2, 2, 2, 2), residual: bool = True, deep_supervision: bool = False, n_stages: int = None):
        super().__init__()
        nets = require_monai()
        hint = "write its plans with `nnunet-fseft plans --arch mednext-s`"
        dims = check_strides("MedNeXt", strides, len(blocks_down), hint)
        if n_stages is not None and n_stages != len(blocks_down) + 1 or len(blocks_up) != len(blocks_down):
            raise InputError(f"MedNeXt plans with {len(blocks_down)} down and {len(blocks_up)} up stages need "
                             f"n_stages {len(blocks_down) + 1} and as many up as down stages; {hint}.")
        m = nets.MedNeXt(spatial_dims=dims, init_filters=features_base, in_channels=input_channels,
                         out_channels=num_classes, encoder_expansion_ratio=list(encoder_expansion),
                         decoder_expansion_ratio=list(decoder_expansion),
                         bottleneck_expansion_ratio=bottleneck_expansion, kernel_size=kernel_size,
                         deep_supervision=False, use_residual_connection=residual, blocks_down=list(blocks_down),
                         blocks_bottleneck=blocks_bottleneck, blocks_up=list(blocks_up))
        entries = [m.stem] + list(m.down_blocks)
        blocks = list(m.enc_stages) + [m.bottleneck]
        self.encoder = MedNeXtEncoder([MedNeXtStage(e, b) for e, b in zip(entries, blocks)])
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        n = len(blocks_up)
        heads = nn.ModuleList(conv(features_base * 2 ** (n - 1 - i), num_classes, 1) for i in range(n))
        self.decoder = MedNeXtDecoder(m.up_blocks, [MedNeXtStage(nn.Identity(), s) for s in m.dec_stages], heads,
                                      deep_supervision)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))

