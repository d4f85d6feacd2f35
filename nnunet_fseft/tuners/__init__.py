"""The one injection mechanism behind every method (one module per method beside it).

Adapters are added *in place*: a module is turned into its adapted subclass and
keeps its own parameters under their own names. That matters for nnU-Net networks:
- aliases stay consistent: `ConvDropoutNormReLU.conv` is also `all_modules[0]`, and
  `PlainConvUNet.decoder.encoder` is the encoder; replacing one attribute would leave
  the old module in the forward path, adapting in place changes every alias at once;
- the foundation's state-dict keys are unchanged, so a foundation checkpoint loads
  into an adapted network and adapter parameters are recognisable by name alone.
"""
from typing import Callable, List

from torch import nn

# Every adapter parameter name contains this token; nothing in nnU-Net's networks does.
ADAPTER_TOKEN = "fseft_"


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_TOKEN in name


def inject(network: nn.Module, select: Callable[[str, nn.Module], bool],
           adapt: Callable[[nn.Module], None]) -> List[str]:
    """Calls `adapt(module)` once on every distinct module that `select(name, module)` accepts.

    `named_modules()` visits each module object once, whatever its number of aliases,
    so nothing is adapted twice. Returns the names of the adapted modules.
    """
    chosen = [(name, m) for name, m in network.named_modules() if select(name, m)]
    for _, m in chosen:
        adapt(m)
    return [name for name, _ in chosen]


_EXTENDED = {}


def extend(module: nn.Module, mixin: type, branch_name: str, branch: nn.Module) -> None:
    """Turns `module` into an instance of a subclass of its own class with `mixin` first in
    the method order, in place (so every alias sees it; see above), and adds `branch` to it.
    The mixin's `forward` calls `super().forward` for the module's own computation."""
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        # nn.Sequential runs every child it holds: the branch would run as a layer
        raise TypeError(f"cannot add an adapter branch to a {type(module).__name__}")
    base = type(module)
    cls = _EXTENDED.get((mixin, base))
    if cls is None:
        cls = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
        _EXTENDED[(mixin, base)] = cls
    module.__class__ = cls
    module.add_module(branch_name, branch.to(next(module.parameters()).device))
