"""The one freezing rule and the one parameter counter.

A method names the parameter groups it trains (class attribute `trainable` on the
trainer); everything else is frozen. Groups are recognised by parameter name, so the
rule also holds for a network rebuilt by the predictor.
"""
from typing import Callable, Dict, Iterable, Tuple

from torch import nn

from nnunet_fseft.tuners import is_adapter_parameter

# nnU-Net's segmentation head(s): one 1x1x1 conv per deep-supervision output.
HEAD_TOKEN = ".seg_layers."

PARAMETER_GROUPS: Dict[str, Callable[[str], bool]] = {
    "all": lambda name: True,
    "head": lambda name: HEAD_TOKEN in f".{name}",
    "adapters": is_adapter_parameter,
}


def is_head_parameter(name: str) -> bool:
    return PARAMETER_GROUPS["head"](name)


def freeze(network: nn.Module, trainable: Iterable[str]) -> None:
    """Sets requires_grad on exactly the parameters of the named groups."""
    unknown = [g for g in trainable if g not in PARAMETER_GROUPS]
    if unknown:
        raise ValueError(f"Unknown parameter group(s) {unknown}; known groups: {sorted(PARAMETER_GROUPS)}.")
    rules = [PARAMETER_GROUPS[g] for g in trainable]
    for name, p in network.named_parameters():
        p.requires_grad_(any(rule(name) for rule in rules))


def count_parameters(network: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in network.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
