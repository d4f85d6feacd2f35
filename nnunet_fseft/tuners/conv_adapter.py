"""Convolutional adapter of PEFT-MedNeXt: a MedNeXt block after, or beside, each encoder and
decoder stage of a conv U-Net.

Block: depthwise k^3 conv, GroupNorm (one group per channel, as MedNeXt), 1x1x1 expansion,
GELU, 1x1x1 compression (zero-initialised, so the adapted network starts as the foundation).
- after a stage (sequential): y + block(y) on the stage's output y;
- beside a stage (parallel): stage(x) + block(x), the depthwise conv taking the stage's stride
  and the compression its output channels, as the stage changes resolution and width.
"""
from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import conv_geometry
from nnunet_fseft.tuners import ADAPTER_TOKEN, Method, Site

BRANCH, PARALLEL_NAME = ADAPTER_TOKEN + "conv_adapter", ADAPTER_TOKEN + "conv_adapter_parallel"


class ConvAdapter(nn.Module):
    def forward(self, x):
        y = super().forward(x)
        return y + getattr(self, BRANCH)(x if getattr(self, PARALLEL_NAME) else y)


def sites(network: nn.Module, a) -> list:
    if a.transformer:
        raise InputError(f"The convolutional adapter goes after the conv stages of a U-Net; {a.architecture} "
                         f"has a transformer encoder: use LoRA or AdaptFormer for it.")
    return a.encoder_stages + a.decoder_stages


def mednext_block(site: Site, *, kernel_size: int, expansion: int, parallel: bool) -> dict:
    conv, cin, cout, stride = conv_geometry(site.module)
    if not parallel:  # the block sees the stage's output
        cin, stride = cout, 1
    hidden = expansion * cout
    compress = conv(hidden, cout, 1)
    nn.init.zeros_(compress.weight)
    nn.init.zeros_(compress.bias)
    block = nn.Sequential(conv(cin, cin, kernel_size, stride=stride, padding=kernel_size // 2, groups=cin),
                          nn.GroupNorm(cin, cin), conv(cin, hidden, 1), nn.GELU(), compress)
    return {BRANCH: block, PARALLEL_NAME: parallel}


METHOD = Method(sites, ConvAdapter, mednext_block)
