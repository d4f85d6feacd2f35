"""Every environment variable nnunet-fseft reads, and the one reader of each.

nnU-Net's own folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) are required by name;
our variables override a trainer's class attributes for a whole session."""
import os
from typing import Optional

from nnunet_fseft.errors import InputError

EPOCHS = "nnUNet_fseft_epochs"  # a trainer's number of epochs
ITERATIONS = "nnUNet_fseft_iters_per_epoch"  # and of iterations per epoch
GPU_DATA = "nnUNet_fseft_gpu_data"  # 1 / 0: the support set on the training device, or nnU-Net's CPU path
QUERY = "nnUNet_fseft_query"  # folder of unlabelled query images for transductive inference
# 0: the methods' trainers (not the foundation trainers) skip nnU-Net's validation after training
# (`nnunet-fseft benchmark` predicts and scores the same held-out scans itself, with nnUNetv2_predict)
FINAL_VALIDATION = "nnUNet_fseft_final_validation"
# CPU threads of one training: nnU-Net gives a CPU training every core, so trainings side by side
# on one machine (a benchmark's local jobs) would fight over them
THREADS = "nnUNet_fseft_threads"


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise InputError(f"The environment variable {name} is not set; export it to the folder nnU-Net uses "
                         f"for it (see nnU-Net's documentation/setting_up_paths.md).")
    return value


def positive_int(name: str, default: int) -> int:
    """The whole number > 0 in variable `name`, or `default` where it is unset."""
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit() or int(value) < 1:
        raise InputError(f"{name} must be a positive whole number, got '{value}'; unset it or set it to e.g. 10.")
    return int(value)


def epochs_overridden() -> bool:
    """nnUNet_fseft_epochs is set: the training length is fixed, not derived from K."""
    return os.environ.get(EPOCHS) is not None


def schedule_overrides() -> dict:
    """The schedule overrides set (as text), None where a trainer keeps its own: what a benchmark
    records as its schedule."""
    return {"epochs": os.environ.get(EPOCHS) or None, "iterations_per_epoch": os.environ.get(ITERATIONS) or None}


def switch(name: str, default: bool) -> bool:
    """The on / off variable `name` (1 or 0, or true / false ...), or `default` where it is unset or
    empty (`VAR=` in a job script clears a variable; it must not turn a default-on step off)."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    if value.strip().lower() in ("1", "t", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "f", "false", "no", "off"):
        return False
    raise InputError(f"{name} must be 1 or 0, got '{value}'; fix or unset it.")


def gpu_data_enabled(default: bool) -> bool:
    """The trainer's `gpu_data` attribute, unless nnUNet_fseft_gpu_data says otherwise."""
    return switch(GPU_DATA, default)


def final_validation_enabled() -> bool:
    """nnU-Net's validation after training runs, unless nnUNet_fseft_final_validation is 0."""
    return switch(FINAL_VALIDATION, True)


def query_folder() -> Optional[str]:
    """The folder nnUNet_fseft_query names, or None where it is unset or empty."""
    return os.environ.get(QUERY) or None


def cpu_threads() -> Optional[int]:
    """The number of CPU threads nnUNet_fseft_threads asks a training for, or None where it is unset."""
    return positive_int(THREADS, 0) or None
