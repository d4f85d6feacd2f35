"""Plans in nnUNet_preprocessed: their names, and reading a dataset's plans back.

Read by `params`, `zeroshot` and `benchmark`, written by `adopt`; none of them imports another
command for it."""
import os
import re
from typing import Tuple

from nnunet_fseft.datasets.dataset_json import read_dataset_json, read_json
from nnunet_fseft.errors import InputError

_PLANS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


def check_plans_name(name: str) -> str:
    """A plans name names a file beside the dataset's other plans: never a path."""
    if not _PLANS_NAME.fullmatch(str(name)):
        raise InputError(f"Plans name '{name}' is not a name (it may hold only letters, digits, '_' and '-', and "
                         f"no path separator or '..'); pass e.g. FSEFTPlans.")
    return name


def load_plans(dataset: str, plans_name: str) -> Tuple[dict, dict]:
    """The preprocessed plans and dataset.json of a dataset given by id or name."""
    from nnunet_fseft.environment import require_env
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    check_plans_name(plans_name)
    preprocessed = require_env("nnUNet_preprocessed")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise InputError(f"Dataset {dataset} is not in nnUNet_preprocessed ({preprocessed}); adopt or "
                         f"plan it first.") from None
    plans_file = os.path.join(preprocessed, name, plans_name + ".json")
    if not os.path.isdir(os.path.join(preprocessed, name)):
        raise InputError(f"{name} has not been preprocessed (no {os.path.join(preprocessed, name)}); run "
                         f"`nnunet-fseft adopt` or nnUNetv2_plan_and_preprocess for it first.")
    if not os.path.isfile(plans_file):
        have = sorted(f[:-5] for f in os.listdir(os.path.join(preprocessed, name))
                      if "Plans" in f and f.endswith(".json") and not f.startswith("."))
        raise InputError(f"{name} has no plans {plans_name} in nnUNet_preprocessed; available: "
                         f"{', '.join(have) or 'none'} (pass one with -p).")
    plans = read_json(plans_file, "write it again with `nnunet-fseft adopt` or nnUNetv2_plan_and_preprocess")
    return plans, read_dataset_json(os.path.join(preprocessed, name, "dataset.json"))
