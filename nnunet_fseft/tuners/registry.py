"""Method name -> injector. A trainer's `tuner` names one; its keyword arguments are read
from the trainer's class attributes of the same names."""
import inspect

from torch import nn

from nnunet_fseft.tuners.lora import inject_lora

TUNERS = {"lora": inject_lora}


def tuner_hyperparameters(tuner: str, owner) -> dict:
    """The injector's keyword arguments, taken from `owner`'s attributes of the same names."""
    params = list(inspect.signature(TUNERS[tuner]).parameters)[1:]
    return {p: getattr(owner, p) for p in params if hasattr(owner, p)}


def apply_tuner(network: nn.Module, tuner: str, owner) -> list:
    if tuner not in TUNERS:
        raise ValueError(f"Unknown method '{tuner}'; known methods: {sorted(TUNERS)}.")
    return TUNERS[tuner](network, **tuner_hyperparameters(tuner, owner))
