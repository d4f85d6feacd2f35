"""`nnunet-fseft demo --task brats`: the brain-tumour MRI loop on synthetic data, through the real commands.

PEFT-MedNeXt's setting in small: a foundation trained on one population (BraTS-2021-like) adapted
to a shifted one (BraTS-Africa-like: thicker slices, lower SNR, a stronger bias field, weaker
enhancement) from K labelled scans, against the foundation as it is and against training on those
K scans alone.

1. synthesise the source population (4 MRI channels, BraTS's regions) and the shifted target;
2. plan, preprocess and train a small region-based foundation on the source (nnUNetv2_train);
3. adopt it for the target and draw a K-shot split;
4. predict the target's test scans with the foundation itself (source-only), then fine-tune with the
   conv adapter (PEFT-MedNeXt's method), full fine-tuning, and the target alone from scratch;
5. score whole tumour, tumour core and enhancing tumour with nnU-Net's evaluator (Dice,
   sensitivity, specificity);
6. print a table and write results.json in the workdir.
Sized to finish in under 15 minutes on two CPU cores.
"""
import json
import os
import time
from typing import Optional

from nnunet_fseft.experiments.demo import Demo, check_demo_args
from nnunet_fseft.plans import PLANS_NAME

SOURCE_ID, TARGET_ID = 200, 201
SHAPE = 32
K = 5
TEST_CASES = 8
# (epochs, iterations per epoch), as in the CT demo: a 2-core laptop, or a few minutes of a GPU
SCHEDULES = {
    "cpu": {"foundation": (40, 20), "finetune": (15, 20)},
    "cuda": {"foundation": (100, 50), "finetune": (50, 50)},
}
# PEFT-MedNeXt's comparison: its adapter, full fine-tuning, and the target alone (same scans and budget)
METHODS = ["ConvAdapter", "FullFT", "TargetOnly"]
SOURCE_ONLY = "source-only (zero-shot)"


def run_brats_demo(workdir: str, device: str = "cpu") -> dict:
    check_demo_args(workdir, device)
    from nnunet_fseft.datasets.kshot import write_kshot_splits
    from nnunet_fseft.datasets.synth_brats import synth_brats_dataset
    from nnunet_fseft.plans.load import load_plans
    from nnunet_fseft.sharing.costs import method_costs
    from nnunet_fseft.experiments.benchmark.protocol import trainer_classes

    d = Demo(workdir, device)
    d.say(f"workdir {d.workdir}; nnU-Net output goes to {d.log}")
    d.say("1/6 synthesising the source population (BraTS-2021-like) and the shifted target (BraTS-Africa-like)")
    target = synth_brats_dataset(TARGET_ID, 12, seed=1, name="DemoBraTSTarget", population="target",
                                 num_test=TEST_CASES, shape=(SHAPE,) * 3)

    d.say("2/6 planning, preprocessing and training the region-based foundation on the source")
    foundation, foundation_time = train_brats_foundation(d, SOURCE_ID, "DemoBraTSSource")
    d.say(f"   foundation trained in {foundation_time:.0f} s")

    d.say(f"3/6 adopting the foundation for the target and drawing a {K}-shot split")
    d.adopt(foundation, TARGET_ID)
    write_kshot_splits(str(TARGET_ID), K, repeats=1, seed=0, test=2)
    plans, dataset_json = load_plans(str(TARGET_ID), PLANS_NAME)
    trainers = {m: f"nnUNetTrainerFSEFT_{m}" for m in METHODS}
    classes = trainer_classes()
    costs = {c["method"]: c for c in method_costs(plans, dataset_json, "3d_fullres",
                                                  [classes[t] for t in trainers.values()])}

    images, labels = os.path.join(target, "imagesTs"), os.path.join(target, "labelsTs")
    rows = []
    d.say(f"4/6 the foundation alone on the {TEST_CASES} target test scans ({SOURCE_ONLY})")
    pred = os.path.join(d.workdir, "predictions", "source_only")
    d.run(["nnUNetv2_predict_from_modelfolder", "-i", images, "-o", pred, "-m", foundation, "-f", "all",
           "-device", device, "--disable_tta"])
    rows.append(score(SOURCE_ONLY, 0, labels, pred, plans, dataset_json, 0, 0.0))
    for i, (method, trainer) in enumerate(trainers.items()):
        d.say(f"4/6 fine-tuning with {method} ({i + 1}/{len(METHODS)})")
        seconds = d.train(TARGET_ID, 0, PLANS_NAME, trainer, SCHEDULES[device]["finetune"])
        d.say(f"5/6 predicting the {TEST_CASES} target test scans with {method} and scoring them")
        pred = os.path.join(d.workdir, "predictions", method)
        d.run(["nnUNetv2_predict", "-i", images, "-o", pred, "-d", TARGET_ID, "-c", "3d_fullres", "-f", 0,
               "-p", PLANS_NAME, "-tr", trainer, "-device", device, "--disable_tta"])
        rows.append(score(method, K, labels, pred, plans, dataset_json, costs[trainer]["trainable"], seconds))

    regions = list(rows[0]["dice"])
    d.say(f"6/6 results (Dice per region on {TEST_CASES} target test scans; sensitivity and specificity "
          f"averaged over the regions)")
    short = {"whole tumor": "WT", "tumor core": "TC", "enhancing tumor": "ET"}
    print(f"\n{'method':<24} {'K':>2} " + " ".join(f"{short.get(r, r)[:6]:>6}" for r in regions) +
          f" {'mean':>6} {'sens':>6} {'spec':>6} {'trainable':>10} {'wall time':>10}")
    for r in rows:
        print(f"{r['method']:<24} {r['K']:>2} " + " ".join(f"{r['dice'][g]:>6.3f}" for g in regions) +
              f" {r['mean_dice']:>6.3f} {r['sensitivity']:>6.3f} {r['specificity']:>6.3f} "
              f"{r['trainable_parameters']:>10,} {r['train_seconds']:>9.0f}s")
    result = {"device": device, "task": "brats", "test_cases": TEST_CASES, "foundation_train_seconds":
              round(foundation_time, 1), "total_seconds": round(time.time() - d.t0, 1), "rows": rows}
    with open(os.path.join(d.workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nWrote {os.path.join(d.workdir, 'results.json')} ({result['total_seconds']:.0f} s in all)")
    return result


def train_brats_foundation(d: Demo, dataset_id: int, name: str, cases: int = 16, schedule=None,
                           arch: Optional[str] = None):
    """A small region-based foundation on `cases` source-population cases, planned, preprocessed and
    trained (nnUNetTrainerFSEFT_Pretrain, `schedule` (epochs, iterations) or the demo's) unless it is
    there already, with nnU-Net's network or the preset's size of `arch` (plans.presets.ARCHITECTURES);
    (model folder, seconds)."""
    from nnunet_fseft.datasets.synth_brats import synth_brats_dataset
    from nnunet_fseft.plans.presets import apply_preset, preset_plans_name
    preset = "cpu_tiny" if d.device == "cpu" else "cpu_small"
    plans_name = preset_plans_name("nnUNetPlans", arch, preset)
    folder = os.path.join(os.environ["nnUNet_results"], f"Dataset{dataset_id:03d}_{name}",
                          f"nnUNetTrainerFSEFT_Pretrain__{plans_name}__3d_fullres")
    if os.path.isfile(os.path.join(folder, "fold_all", "checkpoint_final.pth")):
        return folder, 0.0
    if not os.path.isdir(os.path.join(os.environ["nnUNet_raw"], f"Dataset{dataset_id:03d}_{name}")):
        synth_brats_dataset(dataset_id, cases, seed=0, name=name, population="source", shape=(SHAPE,) * 3)
    # planned again: a foundation of another network on the same scans, or an interrupted try
    d.run(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "2"])
    plans = apply_preset(str(dataset_id), preset, arch=arch)
    assert plans == plans_name, plans
    schedule = schedule or SCHEDULES[d.device]["foundation"]
    seconds = d.train(dataset_id, "all", plans, "nnUNetTrainerFSEFT_Pretrain", schedule)
    return folder, seconds


def score(method: str, k: int, labels: str, pred: str, plans: dict, dataset_json: dict, trainable: int = 0,
          seconds: float = 0.0) -> dict:
    """One table row: nnU-Net's evaluator on the predictions, per region and averaged over them."""
    import numpy as np
    from nnunet_fseft.experiments.benchmark.runs import evaluate
    per_region, _ = evaluate(labels, pred, plans, dataset_json)
    mean = {m: float(np.mean([v[m] for v in per_region.values()])) for m in ("dice", "sensitivity", "specificity")}
    return {"method": method, "K": k, "dice": {r: round(v["dice"], 4) for r, v in per_region.items()},
            "mean_dice": round(mean["dice"], 4), "sensitivity": round(mean["sensitivity"], 4),
            "specificity": round(mean["specificity"], 4), "trainable_parameters": trainable,
            "train_seconds": round(seconds, 1)}
