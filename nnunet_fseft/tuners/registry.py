"""Method name -> its `Method` (nnunet_fseft.tuners), injected and, where linear, merged by the one loop.

A trainer's `tuner` names one; the method's hyper-parameters are read from the trainer's class
attributes of the same names, the one place they are set."""
from typing import Optional

from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.tuners import Method, adaptformer, conv_adapter, inject, lora, med_adapter, merge

TUNERS = {
    "lora": lora.METHOD,
    "adaptformer": adaptformer.METHOD,
    "conv_adapter": conv_adapter.METHOD,
    "med_adapter": med_adapter.METHOD,
}


def method(name: str) -> Method:
    if name not in TUNERS:
        raise InputError(f"Unknown method '{name}'; set `tuner` to one of {sorted(TUNERS)}.")
    return TUNERS[name]


def tuner_hyperparameters(tuner: str, owner) -> dict:
    """The method's hyper-parameters, read from `owner`'s attributes of the same names; a missing one is an error."""
    names = method(tuner).hyperparameters
    missing = [n for n in names if not hasattr(owner, n)]
    if missing:
        who = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise InputError(f"{who} uses method '{tuner}' but sets no {', '.join(missing)}; set "
                         f"{' and '.join(f'`{n} = ...`' for n in missing)} on the class, or subclass the "
                         f"nnunet-fseft trainer of that method, which sets them.")
    return {n: getattr(owner, n) for n in names}


def apply_tuner(network: nn.Module, tuner: str, owner) -> list:
    return inject(network, method(tuner), **tuner_hyperparameters(tuner, owner))


def is_mergeable(tuner: Optional[str]) -> bool:
    return tuner is None or method(tuner).merge is not None


def merge_tuner(network: nn.Module, tuner: Optional[str]) -> None:
    """Merges the method's adapters into the network's own weights, in place."""
    if tuner is not None:
        merge(network, method(tuner))
