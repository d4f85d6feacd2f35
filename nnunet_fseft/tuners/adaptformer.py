"""AdaptFormer: a scaled bottleneck beside each block, its up-projection zero-initialised.

block(x) + scale * up(relu(down(x))). On a transformer (Primus, Swin-UNETR) it sits beside each
block's MLP and is made of linear layers; on a conv U-Net it sits beside each conv block (a
conv-norm-nonlinearity unit, or a residual block of ResEnc) and is made of 1x1x1 convs, the
down-projection taking the block's stride so that both paths meet at the same resolution.
On Primus the branch joins the MLP's output, so EVA's layer scale (gamma, 0.1 in nnU-Net's Primus
trainers) and drop-path apply to it too: its effective scale there is scale x gamma.
"""
from torch import nn

from nnunet_fseft.network.anatomy import conv_geometry, within
from nnunet_fseft.tuners import ADAPTER_TOKEN, Method, Site

BRANCH, SCALE_NAME = ADAPTER_TOKEN + "adaptformer", ADAPTER_TOKEN + "adaptformer_scale"


class AdaptFormer(nn.Module):
    def forward(self, x):
        return super().forward(x) + getattr(self, SCALE_NAME) * getattr(self, BRANCH)(x)


def sites(network: nn.Module, a) -> list:
    """Beside each encoder block, as in FSEFT (Primus's blocks are all its encoder)."""
    return [b for b in a.blocks if within(b, a.encoder)]


def bottleneck(site: Site, *, bottleneck_width: int, scale: float) -> dict:
    block = site.module
    if site.anatomy.transformer:
        width = [m for m in block.modules() if isinstance(m, nn.Linear)][-1].out_features  # the MLP's output
        down, up = nn.Linear(width, bottleneck_width), nn.Linear(bottleneck_width, width)
    else:
        conv, cin, cout, stride = conv_geometry(block)
        down, up = conv(cin, bottleneck_width, 1, stride=stride), conv(bottleneck_width, cout, 1)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return {BRANCH: nn.Sequential(down, nn.ReLU(), up), SCALE_NAME: scale}


METHOD = Method(sites, AdaptFormer, bottleneck)
