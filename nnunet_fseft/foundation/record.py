"""The foundation a target dataset was adopted with: where its record lives, and how its
weights are read and checked against a network before they are loaded."""
import functools
import hashlib
import os
import pickle
import sys
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from nnunet_fseft.datasets.dataset_json import has_regions, region_channels
from nnunet_fseft.errors import InputError
from nnunet_fseft.network.anatomy import head_names
from nnunet_fseft.runner import quiet
from nnunet_fseft.tuners import is_adapter_parameter

# `nnunet-fseft adopt` writes this key into the plans; nnU-Net ignores keys it does not know.
PLANS_KEY = "fseft_foundation"
# How nnunetv2.utilities.find_objects.recursive_find_trainer_class_by_name says that no trainer
# has the name, and that the class of that name is not a trainer.
TRAINER_NOT_FOUND = "Could not find requested nnunet trainer"
TRAINER_NOT_A_TRAINER = "must inherit from 'nnUNetTrainer'"


def recorded_foundation(plans: dict) -> Optional[dict]:
    return plans.get(PLANS_KEY)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# nnU-Net checkpoints also hold training logs and init args; these are the only
# non-tensor types in them, so they are all weights_only=True needs to allow.
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core
_SAFE_GLOBALS = [_NUMPY_CORE.multiarray.scalar, np.dtype, np.float64, np.float32, np.int64,
                 type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]


def read_checkpoint(path: str) -> dict:
    """Reads an nnU-Net checkpoint onto the CPU without running pickled code."""
    if not os.path.isfile(path):
        raise InputError(f"Foundation checkpoint {path} does not exist; check the model folder, "
                         f"fold and --checkpoint given to `nnunet-fseft adopt`.")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path} is not a readable nnU-Net checkpoint ({first}); "
                         f"point --foundation at an nnU-Net results folder trained with nnUNetv2_train.") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise InputError(f"{path} is not an nnU-Net checkpoint (it has no 'network_weights'); "
                         f"point --foundation at an nnU-Net results folder trained with nnUNetv2_train.")
    return ckpt


def foundation_weights(network: nn.Module, weights: Dict[str, torch.Tensor],
                       source: str) -> Dict[str, torch.Tensor]:
    """The foundation tensors to load: every tensor of the network but adapters and head.

    Raises one sentence naming the first tensor whose name or shape does not match."""
    hint = ("the plans do not match the foundation: train with the plans `nnunet-fseft adopt` wrote "
            "for it, or adopt the foundation again")
    network_state = network.state_dict()
    head = head_names(network)
    for k, v in network_state.items():
        if is_adapter_parameter(k) or k in head:
            continue
        if k not in weights:
            raise InputError(f"Foundation {source} has no tensor '{k}' that the network needs; {hint}.")
        if tuple(weights[k].shape) != tuple(v.shape):
            raise InputError(f"Tensor '{k}' has shape {tuple(weights[k].shape)} in foundation {source} but "
                             f"{tuple(v.shape)} in the network; {hint}.")
    for k in weights:
        if k not in network_state and k not in head:
            raise InputError(f"Foundation {source} has a tensor '{k}' that the network lacks; {hint}.")
    return {k: v for k, v in weights.items() if k not in head}


def read_foundation(record: dict) -> dict:
    """The recorded foundation's checkpoint (weights with the head, mirroring axes), after checking
    it is the very file that was adopted: repeats and methods must all start from the same weights."""
    path, recorded = record["checkpoint"], record["sha256"]
    # A model trained on the foundation needs that very file: adopting another one helps only a new training.
    fix = (f"put the foundation checkpoint with sha256 {recorded} back at {path} (a model trained on it needs "
           f"that very file), or, to train anew on another file, run `nnunet-fseft adopt` again")
    if not os.path.isfile(path):
        raise InputError(f"The foundation checkpoint {path} that `nnunet-fseft adopt` recorded is missing; {fix}.")
    found = sha256(path)
    if found != recorded:
        raise InputError(f"Foundation {path} changed since `nnunet-fseft adopt` recorded it (its sha256 is now "
                         f"{found[:12]}…); {fix}.")
    return read_checkpoint(path)


def build_foundation(plans_manager, configuration_manager, num_input_channels: int, record: dict):
    """(the foundation's own network, its classes' head included, weights loaded; its checkpoint),
    built as the plans describe it: what black-box methods query and zeroshot predicts with."""
    checkpoint = read_foundation(record)
    classes = foundation_label_manager(plans_manager, record).num_segmentation_heads
    network = architecture_trainer(plans_manager.plans).build_network_architecture(
        plans_manager, configuration_manager, num_input_channels, classes, False)
    network.load_state_dict(checkpoint["network_weights"])
    return network, checkpoint


def foundation_label_manager(plans_manager, record: dict):
    """nnU-Net's label manager of the foundation's own labels (regions: sigmoid channels, one per region).
    Records written before regions_class_order was kept give each region's channel number instead:
    the channel count, all this is used for, is the same."""
    labels = record["labels"]
    order = record.get("regions_class_order")
    if order is None and has_regions(labels):
        order = list(range(1, len(region_channels(labels)) + 1))
    return plans_manager.get_label_manager({"labels": labels, "regions_class_order": order})


def load_foundation(network: nn.Module, record: dict) -> Dict[str, torch.Tensor]:
    """Loads the recorded foundation into a (possibly adapted) unwrapped network, head excluded;
    returns all its weights (the head's are the zero-shot start of a new head)."""
    weights = read_foundation(record)["network_weights"]
    network.load_state_dict(foundation_weights(network, weights, record["checkpoint"]), strict=False)
    return weights


def load_foundation_weights(network: nn.Module, path: str) -> None:
    """Loads a checked foundation checkpoint into an unwrapped network: everything but adapters and head."""
    weights = read_checkpoint(path)["network_weights"]
    network.load_state_dict(foundation_weights(network, weights, path), strict=False)


def find_trainer(name: str):
    """nnU-Net's trainer class of that name (nnunetv2 and the nnUNet_extTrainer folders), quietly."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        with quiet():  # it prints every module it inspects
            return recursive_find_trainer_class_by_name(name)
    # Only nnU-Net's own two refusals are the user's input; anything else (an error raised while a
    # trainer module is imported, a bug in a user's trainer file) keeps its traceback.
    except RuntimeError as e:
        if not str(e).startswith(TRAINER_NOT_FOUND):
            raise
        raise InputError(f"Trainer {name} cannot be found; install the package that defines it "
                         f"(or add its folder to nnUNet_extTrainer).") from None
    except AssertionError as e:
        if TRAINER_NOT_A_TRAINER not in str(e):
            raise
        raise InputError(f"{name} is not an nnU-Net trainer (it does not inherit from nnUNetTrainer); "
                         f"pass the name of a trainer class.") from None


def architecture_trainer(plans: dict):
    """The nnU-Net trainer class whose `build_network_architecture` builds the foundation's
    (plain) network: the trainer that trained it when that one builds its own architecture
    (nnU-Net's Primus trainers), otherwise nnUNetTrainer, which builds the network the plans describe."""
    record = recorded_foundation(plans)
    return _architecture_trainer(record["trainer"] if record else "nnUNetTrainer")


@functools.lru_cache(maxsize=None)
def _architecture_trainer(name: str):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    if name == "nnUNetTrainer":
        return nnUNetTrainer
    trainer = find_trainer(name)
    own = next((c for c in trainer.__mro__ if "build_network_architecture" in vars(c)), nnUNetTrainer)
    # our own trainers build the plans' network too (with adapters); the plain one is nnU-Net's
    return nnUNetTrainer if own.__module__.startswith("nnunet_fseft") else own


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside nnU-Net's DDP and torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(network, DistributedDataParallel):
        network = network.module
    return network._orig_mod if isinstance(network, OptimizedModule) else network


def pretrained_weights_argument() -> Optional[str]:
    """The file given to -pretrained_weights on nnU-Net's command line, or None: nnU-Net gives the
    trainer no other sign of it (argparse also accepts unambiguous abbreviations such as
    -pretrained, and FLAG=VALUE)."""
    for i, arg in enumerate(sys.argv):
        flag, eq, value = arg.partition("=")
        if len(flag) > 3 and "-pretrained_weights".startswith(flag):
            return value if eq else (sys.argv[i + 1] if i + 1 < len(sys.argv) else "")
    return None
