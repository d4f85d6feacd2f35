"""Swin-UNETR, as nnU-Net builds it from plans.

Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI Images",
BrainLes 2021 (arXiv 2201.01266); the backbone of FSEFT's foundation. The layers are MONAI's
(`monai.networks.nets.SwinUNETR`); this module arranges them as nnU-Net's U-Nets:
- `encoder` = the Swin transformer (patch embedding, four stages of windowed attention with patch
  merging): what FSEFT freezes and puts LoRA into (attention `qkv` and `proj`);
- `decoder` = everything convolutional: the residual blocks on the image and on each transformer
  resolution (`decoder.skips`), the five up blocks (`decoder.stages`) and a 1x1x1 conv head on each
  (`decoder.seg_layers`, full resolution last). MONAI's model has one head; the coarser four are added for
  nnU-Net's deep supervision, at the scales the plans' strides give.
The patch size must divide by 32 (`nnunet-fseft plans --arch swin-unetr` rounds it).
"""
import torch
from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.nets import Decoder, check_strides, require_monai


class SwinEncoder(nn.Module):
    def __init__(self, swin_vit: nn.Module, normalize: bool):
        super().__init__()
        self.swinViT, self.normalize = swin_vit, normalize

    def forward(self, x):
        return [x] + list(self.swinViT(x, self.normalize))  # the image, then 1/2 ... 1/32


class SwinDecoder(Decoder):
    def __init__(self, skips, stages, heads, deep_supervision: bool):
        super().__init__(stages, heads, deep_supervision)
        self.skips = nn.ModuleList(skips)

    def forward(self, hidden):
        image, h = hidden[0], hidden[1:]
        # MONAI's wiring: residual blocks on the image and on the 1/2, 1/4, 1/8 and 1/32 features; the 1/16
        # features go straight into the first up block
        skips = [self.skips[0](image), self.skips[1](h[0]), self.skips[2](h[1]), self.skips[3](h[2]), h[3]]
        x, features = self.skips[4](h[4]), []
        for stage, skip in zip(self.stages, reversed(skips)):
            x = stage(x, skip)
            features.append(x)
        return self.outputs(features)


class SwinUNETRNet(nn.Module):
    """Swin-UNETR with nnU-Net's constructor and U-Net anatomy.

    Args:
        input_channels: image channels (nnU-Net passes them).
        num_classes: output channels (nnU-Net passes them: labels, or regions for a sigmoid head).
        strides: the plans' `strides`, which must be [1, ...] then [2, ...] five times (patch embedding and
            four patch mergings).
        feature_size: channels of the first resolution, a multiple of 12 (48 in FSEFT and the paper).
        depths: Swin blocks per transformer stage ((2, 2, 2, 2) in the paper).
        num_heads: attention heads per transformer stage ((3, 6, 12, 24) in the paper).
        window_size: attention window, in tokens (7).
        norm_name: normalisation of the convolutional decoder ("instance").
        drop_rate, attn_drop_rate, dropout_path_rate: dropout after the embedding, in attention, and stochastic depth.
        use_v2: Swin-UNETR v2 (a residual conv block before each transformer stage).
        deep_supervision: also return the heads of the coarser decoder stages (nnU-Net toggles it).
        n_stages: len(strides); checked, for nnU-Net's plans.
    """

    def __init__(self, input_channels: int, num_classes: int, strides, feature_size: int = 48,
                 depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size: int = 7, norm_name: str = "instance",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, dropout_path_rate: float = 0.0,
                 use_v2: bool = False, deep_supervision: bool = False, n_stages: int = None):
        super().__init__()
        nets = require_monai()
        hint = "write its plans with `nnunet-fseft plans --arch swin-unetr`"
        dims = check_strides("Swin-UNETR", strides, 5, hint)
        if n_stages is not None and n_stages != len(strides):
            raise InputError(f"Swin-UNETR plans need n_stages {len(strides)} (one per stride); {hint}.")
        m = nets.SwinUNETR(in_channels=input_channels, out_channels=num_classes, feature_size=feature_size,
                           depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                           norm_name=norm_name, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                           dropout_path_rate=dropout_path_rate, spatial_dims=dims, use_v2=use_v2)
        self.encoder = SwinEncoder(m.swinViT, m.normalize)
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        widths = [8 * feature_size, 4 * feature_size, 2 * feature_size, feature_size, feature_size]
        heads = nn.ModuleList(conv(c, num_classes, 1) for c in widths)
        self.decoder = SwinDecoder([m.encoder1, m.encoder2, m.encoder3, m.encoder4, m.encoder10],
                                   [m.decoder5, m.decoder4, m.decoder3, m.decoder2, m.decoder1], heads,
                                   deep_supervision)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))
