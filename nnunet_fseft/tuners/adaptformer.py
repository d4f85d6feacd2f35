"""AdaptFormer: a scaled bottleneck beside each block, its up-projection zero-initialised.

block(x) + scale * up(relu(down(x))). On a transformer (Primus) it sits beside each block's
MLP and is made of linear layers; on a conv U-Net it sits beside each conv block (a
conv-norm-nonlinearity unit, or a residual block of ResEnc) and is made of 1x1x1 convs, the
down-projection taking the block's stride so that both paths meet at the same resolution.
On Primus the branch joins the MLP's output, so EVA's layer scale (gamma, 0.1 in nnU-Net's Primus
trainers) and drop-path apply to it too: its effective scale there is scale x gamma.
"""
from torch import nn

from nnunet_fseft.anatomy import anatomy, conv_geometry
from nnunet_fseft.tuners import ADAPTER_TOKEN, extend

BRANCH = ADAPTER_TOKEN + "adaptformer"


class AdaptFormer(nn.Module):
    def forward(self, x):
        return super().forward(x) + self.fseft_adaptformer_scale * getattr(self, BRANCH)(x)


def bottleneck(block: nn.Module, width: int, transformer: bool) -> nn.Sequential:
    if transformer:
        down, up = nn.Linear(block.fc2.out_features, width), nn.Linear(width, block.fc2.out_features)
    else:
        conv, cin, cout, stride = conv_geometry(block)
        down, up = conv(cin, width, 1, stride=stride), conv(width, cout, 1)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return nn.Sequential(down, nn.ReLU(), up)


def inject_adaptformer(network: nn.Module, bottleneck_width: int = 16, scale: float = 0.1):
    a = anatomy(network)
    modules = dict(network.named_modules())
    for name in a.blocks:
        block = modules[name]
        extend(block, AdaptFormer, BRANCH, bottleneck(block, bottleneck_width, a.transformer))
        block.fseft_adaptformer_scale = scale
    return a.blocks
