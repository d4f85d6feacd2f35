"""Convolutional adapter of PEFT-MedNeXt: a MedNeXt block after, or beside, each encoder and
decoder stage of a conv U-Net.

Block: depthwise k^3 conv, GroupNorm (one group per channel, as MedNeXt), 1x1x1 expansion,
GELU, 1x1x1 compression (zero-initialised, so the adapted network starts as the foundation).
- after a stage (sequential): y + block(y) on the stage's output y;
- beside a stage (parallel): stage(x) + block(x), the depthwise conv taking the stage's stride
  and the compression its output channels, as the stage changes resolution and width.
"""
from torch import nn

from nnunet_fseft.anatomy import anatomy, conv_geometry
from nnunet_fseft.tuners import ADAPTER_TOKEN, extend

BRANCH = ADAPTER_TOKEN + "conv_adapter"


class ConvAdapterAfter(nn.Module):
    def forward(self, x):
        y = super().forward(x)
        return y + getattr(self, BRANCH)(y)


class ConvAdapterBeside(nn.Module):
    def forward(self, x):
        return super().forward(x) + getattr(self, BRANCH)(x)


def mednext_block(conv, cin: int, cout: int, stride, kernel_size: int, expansion: int) -> nn.Sequential:
    hidden = expansion * cout
    compress = conv(hidden, cout, 1)
    nn.init.zeros_(compress.weight)
    nn.init.zeros_(compress.bias)
    return nn.Sequential(conv(cin, cin, kernel_size, stride=stride, padding=kernel_size // 2, groups=cin),
                         nn.GroupNorm(cin, cin), conv(cin, hidden, 1), nn.GELU(), compress)


def inject_conv_adapter(network: nn.Module, kernel_size: int = 3, expansion: int = 1, parallel: bool = False):
    a = anatomy(network)
    if a.transformer:
        raise ValueError(f"The convolutional adapter goes after the conv stages of a U-Net; {a.architecture} "
                         f"has a transformer encoder: use LoRA or AdaptFormer for it.")
    modules = dict(network.named_modules())
    sites = a.encoder_stages + a.decoder_stages
    for name in sites:
        stage = modules[name]
        conv, cin, cout, stride = conv_geometry(stage)
        if parallel:
            block = mednext_block(conv, cin, cout, stride, kernel_size, expansion)
        else:
            block = mednext_block(conv, cout, cout, 1, kernel_size, expansion)
        extend(stage, ConvAdapterBeside if parallel else ConvAdapterAfter, BRANCH, block)
    return sites
