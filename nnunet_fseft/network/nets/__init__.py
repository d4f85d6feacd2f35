"""Networks nnU-Net builds from plans that are not in dynamic_network_architectures (one per module).

Each is a thin arrangement of MONAI's layers into nnU-Net's U-Net anatomy (`encoder`, `decoder.stages`,
`decoder.seg_layers`, `decoder.deep_supervision`), so nnU-Net's trainer, predictor and deep supervision and
every nnunet-fseft method see them as they see PlainConvUNet. MONAI is an extra: `pip install "nnunet-fseft[monai]"`.
"""
from torch import nn

from nnunet_fseft.errors import InputError


def require_monai():
    try:
        import monai.networks.nets  # noqa: F401
    except ImportError:
        raise InputError('These plans use a MONAI network (MedNeXt or Swin-UNETR) and MONAI is not installed; run '
                         'pip install "nnunet-fseft[monai]" (or pip install monai) in this environment.') from None
    return monai.networks.nets


def check_strides(network: str, strides, levels: int, hint: str) -> int:
    """The plans' strides must be the network's own ([1, ...] then [2, ...] at every level): nnU-Net derives the
    deep-supervision scales from them. Returns the number of spatial dimensions."""
    dims = len(strides[0]) if strides else 0
    expected = [[1] * dims] + [[2] * dims for _ in range(levels)]
    if dims not in (2, 3) or [list(s) for s in strides] != expected:
        raise InputError(f"{network} downsamples by 2 on every axis {levels} times, so its plans need strides "
                         f"{expected}, not {strides}; {hint}.")
    return dims


class Decoder(nn.Module):
    """nnU-Net's decoder contract, shared by the networks here: `stages[i]` runs at the i-th resolution from
    the bottom, `seg_layers[i]` is its head, and with `deep_supervision` the outputs come full resolution first
    (nnU-Net's `set_deep_supervision_enabled` sets the attribute). A network's decoder adds its own upsampling
    or skip blocks and a `forward` that ends in `self.outputs(features)`."""

    def __init__(self, stages, heads: nn.ModuleList, deep_supervision: bool):
        super().__init__()
        self.stages, self.seg_layers = nn.ModuleList(stages), heads
        self.deep_supervision = deep_supervision

    def outputs(self, features):
        """The heads on the stages' features (coarsest first): the full-resolution output, or all of them."""
        if not self.deep_supervision:
            return self.seg_layers[-1](features[-1])
        return [head(f) for head, f in zip(self.seg_layers, features)][::-1]
