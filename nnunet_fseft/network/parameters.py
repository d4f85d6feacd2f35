"""The one freezing rule and the one parameter counter.

A method names the parameter groups it trains (class attribute `trainable` on the
trainer); everything else is frozen. Groups are found from the network's anatomy and
parameter names, so the same rule holds for the network the predictor rebuilds.
"""
from typing import Dict, Iterable, Set, Tuple

from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import anatomy, cancelled_biases, within
from nnunet_fseft.network.black_box import frozen_foundation
from nnunet_fseft.tuners import is_adapter_parameter

# Normalisation layers whose scale and shift AffineNorm trains (LayerNormNd: Primus's decoder).
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES) or type(m).__name__ == "LayerNormNd"


def parameter_groups(network: nn.Module) -> Dict[str, Set[str]]:
    """Group name -> names of the network's parameters in it (shared tensors under their first name)."""
    a = anatomy(network)
    names = [n for n, _ in network.named_parameters()]
    foundation = [n for n in names if not is_adapter_parameter(n)]
    module_of = {n: n.rsplit(".", 1)[0] for n in names}
    encoder = [n for n in foundation if within(module_of[n], a.encoder)]
    cancelled = cancelled_biases(network)
    norms = {name for name, m in network.named_modules() if _is_norm(m) and not is_adapter_parameter(name)}
    return {
        "all": set(names),
        "adapters": {n for n in names if is_adapter_parameter(n)},
        "head": {n for n in foundation if within(module_of[n], a.head)},
        "decoder": {n for n in foundation if within(module_of[n], a.decoder)},
        "last_stage": {n for n in foundation if within(module_of[n], a.last_stage)},
        # FSEFT's BitFit and affine-norm adapt the encoder; a conv bias that a norm cancels is left out
        "encoder_bias": {n for n in encoder if n.endswith(".bias") and n not in cancelled},
        "encoder_norm": {n for n in encoder if module_of[n] in norms},
    }


def freeze(network: nn.Module, trainable: Iterable[str]) -> None:
    """Sets requires_grad on exactly the parameters of the named groups."""
    trainable = list(trainable)
    groups = parameter_groups(network)
    unknown = [g for g in trainable if g not in groups]
    if unknown:
        raise InputError(f"Unknown parameter group(s) {unknown} in `trainable`; use groups from {list(groups)}.")
    chosen = set().union(*(groups[g] for g in trainable))
    for name, p in network.named_parameters():
        p.requires_grad_(name in chosen)


def count_parameters(network: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once. A black-box
    network's total includes the frozen foundation it queries (which is not its submodule)."""
    seen, trainable, total = set(), 0, 0
    for p in network.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    frozen = frozen_foundation(network)
    return trainable, total + (frozen.num_parameters() if frozen is not None else 0)
