"""Black-box methods, zero-shot head initialisation, `nnunet-fseft zeroshot` and transductive
inference through the real commands (units: test_blackbox.py)."""
import json
import os

import numpy as np
import pytest

from helpers import (BASE_TARGET_LABELS, FOUNDATION_TO_BASE_TARGET, PREDICT_ON_CPU, TRAIN_ENV_NO_VALIDATION, images, run,
                     segmentations)
from nnunet_fseft.foundation.record import read_checkpoint, sha256
from nnunet_fseft.plans import PLANS_NAME


def model_folder(workspace, dataset, trainer):
    return workspace / "nnUNet_results" / dataset / f"{trainer}__FSEFTPlans__3d_fullres"


def train(dataset, trainer, env=None, check=True):
    return run(["nnUNetv2_train", dataset, "3d_fullres", "0", "-p", PLANS_NAME, "-tr", trainer, "-device", "cpu"],
               env={**TRAIN_ENV_NO_VALIDATION, **(env or {})}, check=check)


def predict(dataset, trainer, images_folder, out):
    run(["nnUNetv2_predict", "-i", images_folder, "-o", out, "-d", dataset, "-c", "3d_fullres", "-f", "0",
         "-p", PLANS_NAME, "-tr", trainer, *PREDICT_ON_CPU])
    return segmentations(out)


def test_spatial_adapter_trains_on_cached_features_and_predicts(workspace, target, foundation, tmp_path):
    trainer = "nnUNetTrainerFSEFT_SpatialAdapter"
    foundation_file = foundation / "fold_all" / "checkpoint_final.pth"
    before = sha256(str(foundation_file))
    log = train(target, trainer).stdout
    assert "Caching the features of 1 support volumes: 8 channels" in log and "fp16 in memory" in log
    assert "foundation parameters queried, never trained" in log
    assert "head initialisation: labels matched to foundation classes: none; new: 'pancreas'" in log
    folder = model_folder(workspace, "Dataset501_SynthCTB", trainer)
    saved = read_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))["network_weights"]
    # the checkpoint holds the adapter and which foundation it needs, no foundation weight
    assert set(saved) == {"adapter.conv1.weight", "adapter.conv1.bias", "adapter.conv2.weight", "adapter.conv2.bias",
                          "adapter.head.weight", "adapter.head.bias", "_extra_state"}
    assert saved["_extra_state"]["foundation_sha256"] == before == sha256(str(foundation_file))
    assert not saved["adapter.conv2.weight"].eq(0).all()  # the zero-initialised conv learned
    assert not (folder / "fold_0" / "feature_cache").exists()
    segs = predict(target, trainer, images(workspace), tmp_path / "pred")
    assert all(set(np.unique(s)) <= {0, 1} for s in segs)
    # the adapter file holds the adapter alone; with the foundation it rebuilds the same model
    adapter = tmp_path / "adapter.safetensors"
    run(["nnunet-fseft", "export", folder, "-o", adapter, "-f", "0"])
    assert os.path.getsize(adapter) < 0.2 * os.path.getsize(foundation_file)
    imported = tmp_path / "imported" / f"{trainer}__FSEFTPlans__3d_fullres"
    run(["nnunet-fseft", "import", adapter, "--foundation", foundation, "-o", imported])
    run(["nnUNetv2_predict_from_modelfolder", "-i", images(workspace), "-o", tmp_path / "pred_imported", "-m",
         imported, "-f", "0", *PREDICT_ON_CPU])
    for got, want in zip(segmentations(tmp_path / "pred_imported"), segs):
        assert np.array_equal(got, want)
    merge = run(["nnunet-fseft", "merge", folder, "-o", tmp_path / "merged"], check=False)
    assert merge.returncode == 2 and "black-box adapter on the foundation's features" in merge.stdout
    assert not (tmp_path / "merged").exists()


def test_spatial_adapter_with_transductive_inference(workspace, base_target, tmp_path):
    trainer = "nnUNetTrainerFSEFT_SpatialAdapterTI"
    log = train(base_target, trainer).stdout
    assert ("head initialisation: labels matched to foundation classes: 'lien' (1) <- foundation 'spleen' (2), "
            "'Liver' (2) <- foundation 'liver' (1), 'Kidney_R' (3) <- foundation 'kidney_right' (4), "
            "'left kidney' (4) <- foundation 'kidney_left' (3); new: none") in log
    assert "Size prior (mm^3, from 1 support volumes): lien " in log
    # every label known: training is held to the zero-shot segmentation (nnunet_fseft/training/anchor.py)
    assert ("zero-shot anchor: the start's segmentation of 'lien', 'Liver', 'Kidney_R', 'left kidney' is one more "
            "annotation of each patch, weighted 1 (1 / K)") in log
    assert "Caching the features of 2 query volumes" in log
    hinges = [float(line.rsplit(":", 1)[1]) for line in log.splitlines() if "size hinge on query volumes" in line]
    assert len(hinges) == 2 and all(np.isfinite(hinges))
    raw = workspace / "nnUNet_raw" / "Dataset503_SynthBase"
    segs = predict(base_target, trainer, raw / "imagesTs", tmp_path / "pred")
    assert all(set(np.unique(s)) <= set(BASE_TARGET_LABELS.values()) for s in segs)


def test_transductive_inference_without_query_images_fails_before_training(workspace, base_target, tmp_path):
    empty = tmp_path / "no_queries"
    empty.mkdir()
    p = train(base_target, "nnUNetTrainerFSEFT_LinearProbeTI", env={"nnUNet_fseft_query": str(empty)}, check=False)
    assert p.returncode != 0
    assert ("Transductive inference needs unlabelled query images, but nnUNet_fseft_query "
            f"({empty}) holds no *_0000.nii.gz files") in p.stdout
    assert "Epoch 0" not in p.stdout


def test_online_features_train_through_nnunet(workspace, base_target, foundation):
    """Online: the frozen foundation computes features from nnU-Net's augmented images at every
    step; only the adapter learns, nothing is cached, and the checkpoint holds the adapter alone."""
    trainer = "nnUNetTrainerFSEFT_SpatialAdapterOnline"
    foundation_file = foundation / "fold_all" / "checkpoint_final.pth"
    before = sha256(str(foundation_file))
    log = train(base_target, trainer).stdout
    assert "features: online" in log and "Caching" not in log
    fold = model_folder(workspace, "Dataset503_SynthBase", trainer) / "fold_0"
    ckpt = read_checkpoint(str(fold / "checkpoint_final.pth"))
    assert ckpt["current_epoch"] == int(TRAIN_ENV_NO_VALIDATION["nnUNet_fseft_epochs"])
    assert all(np.isfinite(ckpt["logging"]["train_losses"]))
    saved = ckpt["network_weights"]
    assert {k for k in saved if not k.startswith("adapter.")} == {"_extra_state"}  # no foundation weight
    assert not saved["adapter.conv2.weight"].eq(0).all()  # the zero-initialised conv learned through the online path
    assert not any(p.name.startswith("feature_cache") for p in fold.iterdir())
    assert sha256(str(foundation_file)) == before


STEP0 = """
import sys, torch, numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunet_fseft.foundation.record import architecture_trainer, read_foundation
from nnunet_fseft.trainers import METHODS
pre, trainers = sys.argv[1], sys.argv[2:-1]
plans, dataset_json = load_json(pre + "/FSEFTPlans.json"), load_json(pre + "/dataset.json")
folder = pre + "/FSEFTPlans_3d_fullres"
cls = infer_dataset_class(folder)
case = cls(folder).identifiers[0]
image = torch.from_numpy(np.asarray(cls(folder).load_case(case)[0][:]))[None, :, :16, :16, :16].float()
for name in trainers:
    t = METHODS[name]({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    t.initialize()
    adapted = t.network.eval()
    record = t.foundation
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    reference = architecture_trainer(plans).build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1,
                                                                      len(record["labels"]), False)
    reference.load_state_dict(read_foundation(record)["network_weights"])
    with torch.no_grad():
        a, f = adapted(image), reference.eval()(image)
    a = a[0] if isinstance(a, (list, tuple)) else a
    channels = [int(c) for c in sys.argv[-1].split(",")]  # the foundation channel of each target channel
    f = f[:, channels]
    print(name, float((a - f).abs().max()), float(f.abs().max()), float((a.argmax(1) == f.argmax(1)).float().mean()))
"""


def test_head_initialisation_reproduces_the_foundation_at_step_0(workspace, base_target):
    """Every target label is a foundation class under another name and value: at step 0 the adapted
    model (adapters at zero, head rows from the foundation's) gives the foundation's logits, each
    in the channel of its target label."""
    pre = workspace / "nnUNet_preprocessed" / "Dataset503_SynthBase"
    to_foundation = {t: f for f, t in FOUNDATION_TO_BASE_TARGET.items()}
    channels = ",".join(str(to_foundation[t]) for t in range(len(to_foundation)))
    p = run(["python", "-c", STEP0, pre, "nnUNetTrainerFSEFT_LoRA", "nnUNetTrainerFSEFT_SpatialAdapter",
             "nnUNetTrainerFSEFT_FullFT", channels])
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("nnUNetTrainerFSEFT_")]
    assert len(rows) == 3, p.stdout[-3000:]
    for name, diff, scale, agree in rows:
        assert float(scale) > 0.1 and float(diff) < 1e-4 * max(1.0, float(scale)) and float(agree) == 1.0, rows


def test_zeroshot_scores_the_foundation_on_the_held_out_cases(workspace, base_target):
    p = run(["nnunet-fseft", "zeroshot", "-d", base_target, "--disable_tta"])
    out = workspace / "nnUNet_results" / "Dataset503_SynthBase" / "fseft_zeroshot__FSEFTPlans__3d_fullres"
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["mean"]) == ["1", "2", "3", "4"] and len(summary["metric_per_case"]) == 2
    for name in ("lien", "Liver", "Kidney_R", "left kidney"):
        line = next(line for line in p.stdout.splitlines() if line.strip().startswith(name))
        assert 0.0 <= float(line.split()[-1]) <= 1.0
    assert float(summary["mean"]["1"]["Dice"]) == pytest.approx(
        float(next(line for line in p.stdout.splitlines() if line.strip().startswith("lien")).split()[-1]), abs=1e-4)
    # predictions carry the target's label values: grouped channel i is the i-th matched label
    for raw, renamed in zip(segmentations(out / "folded_labels"), segmentations(out / "predictions")):
        assert np.array_equal(renamed, raw) and set(np.unique(raw)) <= {0, 1, 2, 3, 4}
    run(["nnunet-fseft", "zeroshot", "-d", base_target, "--disable_tta"])  # again: the first results are kept
    assert len([d for d in os.listdir(out.parent) if d.startswith(out.name + ".bak-")]) == 1


def test_zeroshot_needs_a_matching_label(target):
    p = run(["nnunet-fseft", "zeroshot", "-d", target], check=False)
    assert p.returncode == 2
    assert "No label of Dataset501_SynthCTB (pancreas) is a class the foundation knows" in p.stdout
