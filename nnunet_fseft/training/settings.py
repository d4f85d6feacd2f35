"""A trainer's settings: its public class attributes, checked before any work so that a misspelt
hyper-parameter (`rnak = 4`) stops the training instead of training silently with the default."""
import difflib

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_fseft.errors import InputError
from nnunet_fseft.tuners.registry import method, tuner_hyperparameters


def is_setting(name: str, value) -> bool:
    """A public class attribute holding a value (a hyper-parameter), not a method or property."""
    return not name.startswith("_") and not callable(value) and not hasattr(value, "__get__")


def is_ours(cls: type) -> bool:
    """A class of nnunet-fseft, or nnUNetTrainer and its bases; not a user's class, wherever it lives
    (nnU-Net's documented place for custom trainers is inside the nnunetv2 package)."""
    return cls.__module__.startswith("nnunet_fseft.") or cls in nnUNetTrainer.__mro__


def check_settings(cls: type) -> None:
    """Refuses a user's subclass that misspells a setting, and a method whose hyper-parameters are
    not all set.

    A setting that a user's class defines, that none of our classes above it defines, and that is
    close to a name they do define (or to a hyper-parameter of its method) is a misspelling; other
    new names are the user's own and are left alone."""
    known = {n for c in cls.__mro__ if is_ours(c) for n, v in vars(c).items() if is_setting(n, v)}
    if cls.tuner is not None:
        known |= set(method(cls.tuner).hyperparameters)
    for c in cls.__mro__:
        if is_ours(c):
            continue
        for name, value in vars(c).items():
            if not is_setting(name, value) or name in known:
                continue
            close = difflib.get_close_matches(name, known, n=1)
            if close:
                raise InputError(f"{c.__name__} sets `{name}`, which no nnunet-fseft trainer reads (did you mean "
                                 f"`{close[0]}`?); rename it, or start it with an underscore if it is your own.")
    if cls.tuner is not None:
        tuner_hyperparameters(cls.tuner, cls)
