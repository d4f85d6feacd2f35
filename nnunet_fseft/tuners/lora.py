"""LoRA for convolutions and linear layers, computed in weight space.

The convolution runs once with W + scale * (B @ A) reshaped to W's shape, instead of a
parallel low-rank branch: on an H100 the parallel branch took 1.33x the step time of full
fine-tuning and this form 0.97x (docs/design.md, "Measured costs"). B starts at zero, so an
injected network computes exactly the foundation's function until it is trained.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_fseft.network.anatomy import within
from nnunet_fseft.tuners import ADAPTER_TOKEN, Method, Site, adapted_class

A_NAME, B_NAME, SCALE_NAME = ADAPTER_TOKEN + "lora_A", ADAPTER_TOKEN + "lora_B", ADAPTER_TOKEN + "lora_scale"
TARGETS = (nn.Conv3d, nn.Conv2d, nn.ConvTranspose3d, nn.ConvTranspose2d, nn.Linear)
_TRANSPOSED = {3: F.conv_transpose3d, 2: F.conv_transpose2d}


def lora_weight(m: nn.Module) -> torch.Tensor:
    delta = getattr(m, B_NAME) @ getattr(m, A_NAME)
    return m.weight + getattr(m, SCALE_NAME) * delta.view_as(m.weight)


class LoRA(nn.Module):
    """A conv, transposed conv or linear layer that runs with its LoRA weight."""

    def forward(self, x, output_size=None):
        weight = lora_weight(self)
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, self.bias)
        if isinstance(self, (nn.ConvTranspose3d, nn.ConvTranspose2d)):
            dims = weight.dim() - 2
            output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                                  dims, self.dilation)
            return _TRANSPOSED[dims](x, weight, self.bias, self.stride, self.padding, output_padding, self.groups,
                                     self.dilation)
        return self._conv_forward(x, weight, self.bias)


# module-level names, so that an adapted layer pickles (the loop makes the same classes)
LoRAConv3d, LoRAConv2d, LoRAConvTranspose3d, LoRAConvTranspose2d, LoRALinear = (adapted_class(LoRA, t)
                                                                                for t in TARGETS)


def sites(network: nn.Module, a) -> list:
    """Every conv of a conv U-Net's encoder (MedNeXt's depthwise ones included); on a transformer, the
    linear layers its anatomy names (Primus: attention and MLP; Swin-UNETR: attention qkv and proj, as FSEFT).
    The encoder, as in FSEFT: the decoder is frozen, or tuned whole by the `_DecoderFT` variants, which then
    need no low-rank factors there."""
    if a.transformer:
        return list(a.attention)
    return [n for n, m in network.named_modules() if type(m) in TARGETS and within(n, a.encoder)]


def low_rank_factors(site: Site, *, rank: int, alpha: float) -> dict:
    w = site.module.weight
    fan_in = w[0].numel()  # everything but the first dim (out for convs, in for transposed convs)
    a = torch.empty(rank, fan_in, device=w.device, dtype=w.dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return {A_NAME: nn.Parameter(a),
            B_NAME: nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype)),
            SCALE_NAME: alpha / rank}


@torch.no_grad()
def merge(m: nn.Module) -> None:
    m.weight.copy_(lora_weight(m))


METHOD = Method(sites, LoRA, low_rank_factors, merge)
