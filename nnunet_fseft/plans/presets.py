"""Plans variants beside a dataset's nnU-Net plans: a narrower network (presets, plans/*.json) and
another architecture (MedNeXt, Swin-UNETR), with the same preprocessing.

A variant keeps the source plans' `data_identifier`, so it reuses the data nnU-Net already
preprocessed: only the network changes (and, for another architecture, the patch size it can divide).
"""
import os
from importlib import resources
from typing import Optional

from nnunet_fseft.datasets.dataset_json import dataset_name, read_json
from nnunet_fseft.datasets.safe_write import save_json_kept
from nnunet_fseft.environment import require_env
from nnunet_fseft.errors import InputError
from nnunet_fseft.plans.load import check_plans_name


def _mednext(size: str) -> dict:
    from nnunet_fseft.network.nets.mednext import SIZES
    return dict(network="nnunet_fseft.network.nets.mednext.MedNeXtUNet", levels=4, preset_key="mednext",
                kwargs=dict(features_base=32, kernel_size=3, residual=True, **SIZES[size]))


# --arch name -> the network class, its number of 2x downsamplings, and its published size (MONAI's defaults)
ARCHITECTURES = {
    "mednext-s": lambda: _mednext("S"),
    "mednext-b": lambda: _mednext("B"),
    "mednext-m": lambda: _mednext("M"),
    "mednext-l": lambda: _mednext("L"),
    "swin-unetr": lambda: dict(network="nnunet_fseft.network.nets.swin_unetr.SwinUNETRNet", levels=5,
                               preset_key="swin-unetr",
                               kwargs=dict(feature_size=48, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24],
                                           window_size=7, norm_name="instance", use_v2=False)),
}


def preset(name: str) -> dict:
    files = resources.files("nnunet_fseft.plans")
    known = sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))
    if name not in known:
        raise InputError(f"Unknown plans preset '{name}'; known presets: {', '.join(known)}.")
    with resources.as_file(files / f"{name}.json") as path:
        return read_json(str(path), "reinstall nnunet-fseft (its plans presets are damaged)")


def divisible_patch(patch, levels: int):
    """Each axis rounded to the nearest multiple of 2^levels, and at least two of them (so the bottom of
    the network has more than one voxel per axis: instance norm needs that in training)."""
    step = 2 ** levels
    return [max(2 * step, int(round(p / step)) * step) for p in patch]


def preset_plans_name(source_plans: str, arch: Optional[str], preset_name: Optional[str]) -> str:
    """The plans identifier apply_preset writes: `{source_plans}[_{arch}][_{preset_name}]`."""
    return "_".join([source_plans] + [n for n in (arch, preset_name) if n])


def apply_preset(dataset: str, preset_name: Optional[str], source_plans: str = "nnUNetPlans",
                 configuration: str = "3d_fullres", arch: Optional[str] = None) -> str:
    """Writes plans `{source_plans}[_{arch}][_{preset_name}]` beside the source plans; returns its plans name.
    `arch` sets every configuration's network (its patch size rounded for it); `preset_name` narrows it."""
    if arch is not None and arch not in ARCHITECTURES:
        raise InputError(f"Unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}.")
    if arch is None and preset_name is None:
        raise InputError("Nothing to change: pass --arch, --preset or both.")
    check_plans_name(source_plans)
    p = preset(preset_name) if preset_name else {}
    folder = os.path.join(require_env("nnUNet_preprocessed"), dataset_name(dataset))
    src = os.path.join(folder, source_plans + ".json")
    if not os.path.isfile(src):
        raise InputError(f"Plans {src} do not exist; run nnUNetv2_plan_and_preprocess for the dataset first.")
    plans = read_json(src, "run nnUNetv2_plan_and_preprocess for the dataset again")
    if configuration not in plans["configurations"]:
        raise InputError(f"Plans {src} have no configuration '{configuration}'; they have "
                         f"{', '.join(plans['configurations'])}.")
    if arch is None:
        arch_kwargs = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
        arch_kwargs["features_per_stage"] = [min(p["features_base"] * 2 ** i, p["features_max"])
                                             for i in range(arch_kwargs["n_stages"])]
    else:
        spec = ARCHITECTURES[arch]()
        kwargs = dict(spec["kwargs"], **p.get(spec["preset_key"], {}))
        for c in plans["configurations"].values():
            if "architecture" not in c:
                continue  # inherits its network from the configuration it names
            c["patch_size"] = divisible_patch(c.get("patch_size") or plans["configurations"][configuration]
                                              ["patch_size"], spec["levels"])
            dims = len(c["patch_size"])
            strides = [[1] * dims] + [[2] * dims for _ in range(spec["levels"])]
            c["architecture"] = {"network_class_name": spec["network"],
                                 "arch_kwargs": dict(kwargs, strides=strides, n_stages=len(strides)),
                                 "_kw_requires_import": []}
    plans["plans_name"] = preset_plans_name(source_plans, arch, preset_name)
    save_json_kept(plans, os.path.join(folder, plans["plans_name"] + ".json"))
    return plans["plans_name"]
