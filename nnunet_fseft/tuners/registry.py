"""Method name -> how it is injected and, where possible, folded back into plain weights.

A trainer's `tuner` names one; the injector's keyword arguments are read from the trainer's
class attributes of the same names."""
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from nnunet_fseft.tuners.adaptformer import inject_adaptformer
from nnunet_fseft.tuners.conv_adapter import inject_conv_adapter
from nnunet_fseft.tuners.lora import inject_lora, merge_lora
from nnunet_fseft.tuners.med_adapter import inject_med_adapter


@dataclass(frozen=True)
class Tuner:
    inject: Callable
    merge: Optional[Callable] = None  # None: its branches are non-linear and cannot be folded


TUNERS = {
    "lora": Tuner(inject_lora, merge_lora),
    "adaptformer": Tuner(inject_adaptformer),
    "conv_adapter": Tuner(inject_conv_adapter),
    "med_adapter": Tuner(inject_med_adapter),
}


def _tuner(name: str) -> Tuner:
    if name not in TUNERS:
        raise ValueError(f"Unknown method '{name}'; known methods: {sorted(TUNERS)}.")
    return TUNERS[name]


def tuner_hyperparameters(tuner: str, owner) -> dict:
    """The injector's keyword arguments, taken from `owner`'s attributes of the same names."""
    params = list(inspect.signature(_tuner(tuner).inject).parameters)[1:]
    return {p: getattr(owner, p) for p in params if hasattr(owner, p)}


def apply_tuner(network: nn.Module, tuner: str, owner) -> list:
    return _tuner(tuner).inject(network, **tuner_hyperparameters(tuner, owner))


def is_mergeable(tuner: Optional[str]) -> bool:
    return tuner is None or _tuner(tuner).merge is not None


def merge_tuner(network: nn.Module, tuner: Optional[str]) -> None:
    """Folds the method's adapters into the network's own weights, in place."""
    if tuner is not None:
        _tuner(tuner).merge(network)
