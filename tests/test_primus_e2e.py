"""A Primus foundation (nnU-Net's transformer, built by nnU-Net's own nnUNet_Primus_S_Trainer) through
adopt, nnUNetv2_train with LoRA, nnUNetv2_predict and merge; a conv-only method refused in one sentence.

The foundation is Primus-S with its initial weights written as an nnU-Net checkpoint: training one
for real takes nnU-Net's 1000-epoch schedule, and what is tested here is the plumbing."""
import json

import pytest
import torch

from helpers import PREDICT_ON_CPU, TRAIN_ENV_NO_VALIDATION, WITHOUT_PLUGIN, images, run, segmentations
from nnunet_fseft.foundation.record import read_checkpoint

PRIMUS = "nnUNet_Primus_S_Trainer"


@pytest.fixture(scope="module")
def primus_target(workspace, foundation, target):
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_S_Trainer
    from nnunet_fseft.sharing.model_folder import build_network, write_model
    plans = json.load(open(foundation / "plans.json"))
    dataset_json = json.load(open(foundation / "dataset.json"))
    torch.manual_seed(0)
    network = build_network(nnUNet_Primus_S_Trainer, plans, dataset_json, "3d_fullres")
    folder = workspace / "nnUNet_results" / "Dataset100_SynthCTA" / f"{PRIMUS}__{plans['plans_name']}__3d_fullres"
    write_model(str(folder), "all", "checkpoint_final.pth", plans, dataset_json, PRIMUS, "3d_fullres",
                network.state_dict(), (0, 1, 2))
    run(["nnunet-fseft", "adopt", "--foundation", folder, "-d", target, "--plans-name", "PrimusPlans"])
    return target


def results(workspace, trainer):
    return workspace / "nnUNet_results" / "Dataset501_SynthCTB" / f"{trainer}__PrimusPlans__3d_fullres"


def test_lora_on_primus_trains_predicts_and_merges_into_a_primus_model(primus_target, workspace, tmp_path):
    trainer = "nnUNetTrainerFSEFT_LoRA"
    log = run(["nnUNetv2_train", primus_target, "3d_fullres", "0", "-p", "PrimusPlans", "-tr", trainer,
               "-device", "cpu"], env=TRAIN_ENV_NO_VALIDATION).stdout
    assert "Loaded foundation" in log
    weights = read_checkpoint(str(results(workspace, trainer) / "fold_0" / "checkpoint_final.pth"))["network_weights"]
    assert any(k.startswith("eva.blocks.0.attn.q_proj.fseft_lora_") for k in weights)
    run(["nnUNetv2_predict", "-i", images(workspace), "-o", tmp_path / "adapted", "-d", primus_target, "-c",
         "3d_fullres", "-f", "0", "-p", "PrimusPlans", "-tr", trainer, *PREDICT_ON_CPU])
    want = segmentations(tmp_path / "adapted")

    merged = tmp_path / f"{PRIMUS}__PrimusPlans__3d_fullres"
    run(["nnunet-fseft", "merge", results(workspace, trainer), "-o", merged])
    assert read_checkpoint(str(merged / "fold_0" / "checkpoint_final.pth"))["trainer_name"] == PRIMUS
    script = tmp_path / "predict_without_plugin.py"
    script.write_text(WITHOUT_PLUGIN)
    run(["python", script, "-i", images(workspace), "-o", tmp_path / "merged", "-m", merged, "-f", "0",
         *PREDICT_ON_CPU])
    for g, w in zip(segmentations(tmp_path / "merged"), want):
        assert (g == w).mean() > 0.9999


def test_conv_adapter_on_primus_is_refused_before_training(primus_target):
    p = run(["nnUNetv2_train", primus_target, "3d_fullres", "0", "-p", "PrimusPlans", "-tr",
             "nnUNetTrainerFSEFT_ConvAdapter", "-device", "cpu"], env=TRAIN_ENV_NO_VALIDATION, check=False)
    assert p.returncode != 0 and "transformer encoder: use LoRA or AdaptFormer" in p.stdout
    assert "Epoch 0" not in p.stdout
