"""The benchmark's protocol: which runs (method x K x repeat, one fold each), in which order, with
which trainer and environment, and what it records about the machine."""
import os
import platform
from typing import List, Optional

from nnunet_fseft.errors import InputError


COLUMNS = ["method", "K", "repeat", "fold", "label", "dice", "sensitivity", "specificity", "wall_s",
           "peak_gpu_mib", "peak_host_mib", "trainable", "total", "adapter_bytes", "device", "machine", "versions"]
# per_case.csv: one row per run (and the zero-shot prediction) per held-out case per label or region
CASE_COLUMNS = ["method", "K", "repeat", "fold", "case", "label", "dice", "sensitivity", "specificity"]
# The Start row's name in reports: the untrained network every method starts from
STEP0 = "Start (step 0 of every method)"
# The foundation as it is on the target (K = 0): the paper's source-only row, one name everywhere
ZERO_SHOT = "zero-shot (source-only)"
# Methods that are no parameter-efficient fine-tuning: the reference rows of the report's comparisons
NOT_PEFT = ("FullFT", "TargetOnly", "Start")
# A zero-shot Dice below this on a label the foundation names: it names the organ but never learned it
# (a short foundation training can miss one), so that label is a novel organ in all but name.
UNLEARNED_DICE = 0.05


def machine() -> dict:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "gpu": gpu}


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("torch", "nnunetv2", "nnunet-fseft", "dynamic-network-architectures")}


def folds(ks: List[int], repeats: int, cases: list, test: int, seed: int = 0) -> list:
    from nnunet_fseft.datasets.kshot import kshot_splits
    return [s for k in ks for s in kshot_splits(cases, k, repeats, seed, test)]


def run_order(ks: List[int], repeats: int, methods: list) -> list:
    """(method, K, repeat, fold) of every run, K in the order asked (`-k 5 1` runs K = 5 first);
    fold numbers follow the K values sorted, as `folds` writes them, whatever that order."""
    by_size = sorted(set(ks))
    return [(m, k, r, by_size.index(k) * repeats + r) for k in dict.fromkeys(ks) for r in range(repeats)
            for m in methods]


def run_env(trainer_cls, device: str, held_out: str) -> dict:
    """What nnUNetv2_train and nnUNetv2_predict get for one run, on top of this environment: no
    compilation unless asked, single-process augmentation on CPU unless asked, and for a
    transductive method the held-out scans as its query volumes (nnUNet_fseft_query), i.e. the
    scans it is scored on, as the FSEFT paper adapts. nnU-Net's validation after training is skipped:
    it would segment the held-out scans that nnUNetv2_predict segments next."""
    from nnunet_fseft.environment import FINAL_VALIDATION, QUERY
    env = {"nnUNet_compile": os.environ.get("nnUNet_compile", "f"), FINAL_VALIDATION: "0"}
    if device == "cpu":
        env["nnUNet_n_proc_DA"] = os.environ.get("nnUNet_n_proc_DA", "0")
    if getattr(trainer_cls, "transductive", False):
        env[QUERY] = os.path.abspath(held_out)
    return env


def trainer_classes() -> dict:
    """What a benchmark can run, by trainer name: every method, `Start`, the network they all
    start from (no training: each method's step-0 row), and `TargetOnly`, the target trained alone
    from scratch with the same schedule (the paper's target-only row)."""
    from nnunet_fseft.trainers import METHODS, nnUNetTrainerFSEFT_Start, nnUNetTrainerFSEFT_TargetOnly
    return {**METHODS, "nnUNetTrainerFSEFT_Start": nnUNetTrainerFSEFT_Start,
            "nnUNetTrainerFSEFT_TargetOnly": nnUNetTrainerFSEFT_TargetOnly}


def is_peft(method: str) -> bool:
    """A parameter-efficient method, for the report's comparisons: every method but full fine-tuning,
    decoder fine-tuning (DecoderFT*), the target trained alone and the step-0 network (by name: a
    user's variant counts as PEFT unless its name is one of those)."""
    return method not in NOT_PEFT and not method.startswith("DecoderFT")


def method_trainers(methods: List[str]) -> dict:
    """Method name -> its trainer class: one of ours by its name without nnUNetTrainerFSEFT_, or a
    subclass of ours by its full class name, as nnU-Net finds it (a user's variant in a folder of
    nnUNet_extTrainer, say with other hyper-parameters: benchmarks/lr_sweep.py runs those)."""
    from nnunet_fseft.foundation.record import find_trainer
    from nnunet_fseft.trainers import nnUNetTrainerFSEFT
    ours = trainer_classes()
    found = {}
    for m in methods:
        cls = ours.get(f"nnUNetTrainerFSEFT_{m}")
        if cls is None:
            try:
                cls = find_trainer(m)
            except InputError:
                cls = None
        if cls is None or not issubclass(cls, nnUNetTrainerFSEFT):
            raise InputError(f"Unknown method '{m}'; choose from: "
                             f"{', '.join(t[len('nnUNetTrainerFSEFT_'):] for t in ours)}, or give the full class name "
                             f"of a subclass of nnUNetTrainerFSEFT that nnU-Net finds (nnUNet_extTrainer).")
        found[m] = cls
    return found


def unlearned_labels(zero: Optional[dict]) -> str:
    """'names X but does not segment it (zero-shot Dice 0.000, below 0.05)' for the labels the
    foundation knows by name whose zero-shot Dice is below UNLEARNED_DICE; '' when there are none."""
    low = {label: d for label, d in (zero or {}).items() if d < UNLEARNED_DICE}
    if not low:
        return ""
    return (f"names {', '.join(low)} but does not segment {'it' if len(low) == 1 else 'them'} "
            f"(zero-shot Dice {', '.join(f'{d:.3f}' for d in low.values())}, below {UNLEARNED_DICE})")
