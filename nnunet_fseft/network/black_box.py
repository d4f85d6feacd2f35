"""Black-box adaptation: the foundation is only queried for features, never opened or trained.

`FrozenFoundation` is the one narrow interface to the foundation: images in, its last decoder
features out (no gradient, eval mode), plus its own classifier for zero-shot starts. It is not
a submodule of the trained network, so none of its parameters is in the network's
`parameters()` or `state_dict()`: the optimiser, DDP and the saved checkpoint never see them,
and no backward pass runs through it. The checkpoint holds the adapter and the foundation's
sha256; the plans saved with it say which foundation file to query.

`BlackBoxNetwork` = frozen features -> adapter (LinearProbe or SpatialAdapter) -> head. It
takes images (online training, validation, nnUNetv2_predict) or, when `takes_features` is
set, features from the cache (`nnunet_fseft.training.feature_cache`).
"""
from typing import Callable, Optional

import torch
from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import anatomy


class FrozenFoundation:
    """The foundation as a function: images -> last decoder features. Takes the network over
    (its classifier is taken out of the decoder); its parameters never require gradients."""

    def __init__(self, network: nn.Module, sha256: str = ""):
        a = anatomy(network)
        if a.decoder_is_head:
            raise InputError(f"Black-box methods read the last decoder features of a conv U-Net; the "
                             f"{a.architecture} decoder is its head (rebuilt for every target), so use a PEFT method "
                             f"(e.g. nnUNetTrainerFSEFT_LoRA) on this foundation instead.")
        self.head = network.decoder.seg_layers[-1]  # the foundation's own classifier (zero-shot)
        network.decoder.seg_layers[-1] = nn.Identity()  # the decoder now returns its last features
        network.decoder.deep_supervision = False
        for p in list(network.parameters()) + list(self.head.parameters()):
            p.requires_grad_(False)
        self.network = network.eval()
        self.head.eval()
        self.channels = self.head.in_channels
        self.conv = type(self.head)  # Conv2d or Conv3d, for adapters of the same dimension
        self.sha256 = sha256

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The foundation's own prediction (its classes), for zero-shot checks."""
        with torch.no_grad():
            return self.head(self(images))

    def apply(self, fn: Callable) -> None:
        """Device and dtype moves of the network that holds it (`nn.Module._apply`)."""
        self.network._apply(fn)
        self.head._apply(fn)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters()) + sum(p.numel() for p in self.head.parameters())


class LinearProbe(nn.Module):
    """A 1x1(x1) head on the frozen features (FSEFT's linear probe)."""

    def __init__(self, conv: type, channels: int, num_classes: int):
        super().__init__()
        self.head = conv(channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class SpatialAdapter(nn.Module):
    """FSEFT's Spatial Adapter: x + conv3(relu(conv3(x))), then a 1x1(x1) head. The second conv
    starts at zero, so at step 0 it is the linear probe on the foundation's features."""

    def __init__(self, conv: type, channels: int, num_classes: int):
        super().__init__()
        self.conv1 = conv(channels, channels, 3, padding=1)
        self.conv2 = conv(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.head = conv(channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features + self.conv2(torch.relu(self.conv1(features))))


ADAPTERS = {"linear_probe": LinearProbe, "spatial_adapter": SpatialAdapter}


class BlackBoxNetwork(nn.Module):
    def __init__(self, foundation: FrozenFoundation, adapter: nn.Module):
        super().__init__()
        self.foundation = foundation  # a plain object, not a submodule (see the module docstring)
        self.adapter = adapter
        self.takes_features = False  # True while training on cached features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x if self.takes_features else self.foundation(x))

    def _apply(self, fn, *args, **kwargs):
        self.foundation.apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.foundation.network.eval()  # a black box: its norm layers never switch to training
        return self

    def get_extra_state(self):
        return {"foundation_sha256": self.foundation.sha256}

    def set_extra_state(self, state):
        saved = (state or {}).get("foundation_sha256")
        if saved and self.foundation.sha256 and saved != self.foundation.sha256:
            raise InputError(f"This adapter was trained on the foundation with sha256 {saved}, but the plans "
                             f"point to one with {self.foundation.sha256[:12]}…; it needs that very file: put the "
                             f"checkpoint with sha256 {saved} where the model folder's plans.json records its path "
                             f"(fseft_foundation.checkpoint), or train the adapter again.")


def build_black_box(foundation_network: nn.Module, adapter: str, num_classes: int, sha256: str = "") -> BlackBoxNetwork:
    if adapter not in ADAPTERS:
        raise InputError(f"Unknown black-box adapter '{adapter}'; known: {sorted(ADAPTERS)}.")
    frozen = FrozenFoundation(foundation_network, sha256)
    module = ADAPTERS[adapter](frozen.conv, frozen.channels, num_classes)
    return BlackBoxNetwork(frozen, module.to(next(foundation_network.parameters()).device))


def is_black_box(network: nn.Module) -> bool:
    return isinstance(network, BlackBoxNetwork)


def frozen_foundation(network: nn.Module) -> Optional[FrozenFoundation]:
    return network.foundation if is_black_box(network) else None
