"""Plans presets (plans/*.json): the same preprocessing, a different network width.

A preset plans file keeps the source plans' `data_identifier`, so it reuses the data
nnU-Net already preprocessed: only the network changes, not the inputs.
"""
import os
from importlib import resources

from nnunet_fseft.datasets.dataset_json import dataset_name, read_json
from nnunet_fseft.datasets.safe_write import save_json_kept
from nnunet_fseft.environment import require_env
from nnunet_fseft.errors import InputError


def preset(name: str) -> dict:
    files = resources.files("nnunet_fseft.plans")
    known = sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))
    if name not in known:
        raise InputError(f"Unknown plans preset '{name}'; known presets: {', '.join(known)}.")
    with resources.as_file(files / f"{name}.json") as path:
        return read_json(str(path), "reinstall nnunet-fseft (its plans presets are damaged)")


def apply_preset(dataset: str, preset_name: str, source_plans: str = "nnUNetPlans",
                 configuration: str = "3d_fullres") -> str:
    """Writes plans `{source_plans}_{preset_name}` beside the source plans; returns its plans name."""
    p = preset(preset_name)
    folder = os.path.join(require_env("nnUNet_preprocessed"), dataset_name(dataset))
    src = os.path.join(folder, source_plans + ".json")
    if not os.path.isfile(src):
        raise InputError(f"Plans {src} do not exist; run nnUNetv2_plan_and_preprocess for the dataset first.")
    plans = read_json(src, "run nnUNetv2_plan_and_preprocess for the dataset again")
    arch = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(p["features_base"] * 2 ** i, p["features_max"])
                                  for i in range(arch["n_stages"])]
    plans["plans_name"] = f"{source_plans}_{preset_name}"
    save_json_kept(plans, os.path.join(folder, plans["plans_name"] + ".json"))
    return plans["plans_name"]
