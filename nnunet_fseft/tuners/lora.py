"""LoRA for convolutions and linear layers, computed in weight space.

The convolution runs once with W + scale * (B @ A) reshaped to W's shape, instead of a
parallel low-rank branch: shared NOTES section 4 measured the parallel branch at 1.33x
the step time of full fine-tuning and this form at 0.97x. B starts at zero, so an
injected network computes exactly the foundation's function until it is trained.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_fseft.anatomy import anatomy, within
from nnunet_fseft.tuners import ADAPTER_TOKEN, inject

A_NAME, B_NAME = ADAPTER_TOKEN + "lora_A", ADAPTER_TOKEN + "lora_B"


def lora_weight(m: nn.Module) -> torch.Tensor:
    delta = getattr(m, B_NAME) @ getattr(m, A_NAME)
    return m.weight + m.fseft_lora_scale * delta.view_as(m.weight)


class LoRAConv3d(nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(x, lora_weight(self), self.bias)


class LoRAConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, lora_weight(self), self.bias)


def _transposed_forward(m, x, output_size, conv, dims):
    output_padding = m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, dims, m.dilation)
    return conv(x, lora_weight(m), m.bias, m.stride, m.padding, output_padding, m.groups, m.dilation)


class LoRAConvTranspose3d(nn.ConvTranspose3d):
    def forward(self, x, output_size=None):
        return _transposed_forward(self, x, output_size, F.conv_transpose3d, 3)


class LoRAConvTranspose2d(nn.ConvTranspose2d):
    def forward(self, x, output_size=None):
        return _transposed_forward(self, x, output_size, F.conv_transpose2d, 2)


class LoRALinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, lora_weight(self), self.bias)


LORA_CLASSES = {nn.Conv3d: LoRAConv3d, nn.Conv2d: LoRAConv2d,
                nn.ConvTranspose3d: LoRAConvTranspose3d, nn.ConvTranspose2d: LoRAConvTranspose2d,
                nn.Linear: LoRALinear}
PLAIN_CLASSES = {v: k for k, v in LORA_CLASSES.items()}


def add_lora(m: nn.Module, rank: int, alpha: float) -> None:
    """Turns a conv into its LoRA subclass in place (see tuners/__init__ for why in place)."""
    w = m.weight
    fan_in = w[0].numel()  # everything but the first dim (out for convs, in for transposed convs)
    a = torch.empty(rank, fan_in, device=w.device, dtype=w.dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    m.__class__ = LORA_CLASSES[type(m)]
    m.register_parameter(A_NAME, nn.Parameter(a))
    m.register_parameter(B_NAME, nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype)))
    m.fseft_lora_scale = alpha / rank


def inject_lora(network: nn.Module, rank: int = 8, alpha: float = 8.0):
    """LoRA on every conv and transposed conv of a conv U-Net, head excluded; on Primus, on the
    attention and MLP linear layers of its transformer blocks."""
    a = anatomy(network)

    def select(name, m):
        if a.transformer:
            return type(m) is nn.Linear and within(name, ["eva.blocks"])
        return type(m) in LORA_CLASSES and not within(name, a.head)
    return inject(network, select, lambda m: add_lora(m, rank, alpha))


def merge_lora(network: nn.Module) -> None:
    """Folds every LoRA update into its layer's weight; the layers become plain nnU-Net layers."""
    for m in network.modules():
        if type(m) in PLAIN_CLASSES:
            with torch.no_grad():
                m.weight.copy_(lora_weight(m))
            del m._parameters[A_NAME], m._parameters[B_NAME]
            del m.fseft_lora_scale
            m.__class__ = PLAIN_CLASSES[type(m)]
