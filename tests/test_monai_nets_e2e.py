"""MONAI's MedNeXt and Swin-UNETR as nnU-Net networks: plans written by `nnunet-fseft plans --arch`, a
foundation (MedNeXt: pre-trained a few iterations by nnUNetv2_train; Swin-UNETR: its initial weights), adopt,
the papers' methods on each (MedNeXt: LoRA and PEFT-MedNeXt's conv adapter; Swin-UNETR: FSEFT's LoRA on
attention), nnUNetv2_predict, nnU-Net's evaluation; on MedNeXt also export / import, merge and --c (none
of which depends on the network beyond its plans). A method that cannot apply is refused before training.
Kept lean: CI's 40 minutes."""
import json
import os

import pytest

from helpers import FOUNDATION_ID, PREDICT_ON_CPU, TRAIN_ENV, TRAIN_ENV_NO_VALIDATION, images, run, segmentations
from nnunet_fseft.foundation.record import read_checkpoint

PRETRAIN = "nnUNetTrainerFSEFT_Pretrain"
# A few iterations: what is tested is the plumbing, not what the foundation learns
PRETRAIN_ENV = {**TRAIN_ENV, "nnUNet_fseft_epochs": "1", "nnUNet_fseft_iters_per_epoch": "2"}
# nnU-Net with our network classes importable but none of our trainers (what a merged folder needs)
WITHOUT_TRAINERS = """
import os, sys
if __name__ == "__main__":
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if "nnunet_fseft" not in p)
    import nnunetv2.utilities.find_class_by_name as find
    real = find.recursive_find_python_class
    def no_fseft_trainer(folder, name, *args, **kwargs):
        assert not name.startswith("nnUNetTrainerFSEFT"), name
        return real(folder, name, *args, **kwargs)
    find.recursive_find_python_class = no_fseft_trainer
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder
    sys.argv = ["nnUNetv2_predict_from_modelfolder"] + sys.argv[1:]
    predict_entry_point_modelfolder()
"""


# The target's novel organ makes a head that groups the foundation's organs, which no plain head holds
# (merge refuses it); the way out that refusal names
PLAIN_HEAD = """
from nnunet_fseft.trainers import nnUNetTrainerFSEFT_LoRA


class nnUNetTrainerFSEFT_LoRA_PlainHead(nnUNetTrainerFSEFT_LoRA):
    group_unmatched = False
"""
LORA = "nnUNetTrainerFSEFT_LoRA_PlainHead"


@pytest.fixture(scope="module")
def plain_head_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain_head")
    (folder / "plain_head.py").write_text(PLAIN_HEAD)
    return {"nnUNet_extTrainer": os.pathsep.join([str(folder), os.environ.get("nnUNet_extTrainer", "")])}


def adopted(workspace, foundation, target, arch: str, plans: str, pretrain: bool = True):
    """Plans for `arch` beside the session foundation's, a foundation pre-trained on them (or, without
    `pretrain`, the network's initial weights written as the foundation's checkpoint, as the Primus test
    does: pre-training is tested on MedNeXt, and costs CI most on Swin-UNETR's 64^3 patch), adopted by
    the target as `plans`; returns the foundation's results folder."""
    out = run(["nnunet-fseft", "plans", "-d", FOUNDATION_ID, "--arch", arch, "--preset", "cpu_tiny"]).stdout
    name = f"nnUNetPlans_{arch}_cpu_tiny"
    assert f"wrote plans {name}" in out
    folder = workspace / "nnUNet_results" / "Dataset100_SynthCTA" / f"{PRETRAIN}__{name}__3d_fullres"
    if pretrain:
        run(["nnUNetv2_train", FOUNDATION_ID, "3d_fullres", "all", "-p", name, "-tr", PRETRAIN, "-device", "cpu"],
            env=PRETRAIN_ENV)
    else:
        import torch
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunet_fseft.sharing.model_folder import build_network, write_model
        preprocessed = workspace / "nnUNet_preprocessed" / "Dataset100_SynthCTA"
        plans_json = json.loads((preprocessed / f"{name}.json").read_text())
        dataset_json = json.loads((preprocessed / "dataset.json").read_text())
        torch.manual_seed(0)
        network = build_network(nnUNetTrainer, plans_json, dataset_json, "3d_fullres")
        write_model(str(folder), "all", "checkpoint_final.pth", plans_json, dataset_json, PRETRAIN, "3d_fullres",
                    network.state_dict(), None)
    run(["nnunet-fseft", "adopt", "--foundation", folder, "-d", target, "-p", plans])
    return folder


def results(workspace, trainer, plans):
    return workspace / "nnUNet_results" / "Dataset501_SynthCTB" / f"{trainer}__{plans}__3d_fullres"


def train(target, trainer, plans, env, extra=()):
    return run(["nnUNetv2_train", target, "3d_fullres", "0", "-p", plans, "-tr", trainer, "-device", "cpu",
                *extra], env={**TRAIN_ENV_NO_VALIDATION, **env}).stdout


def predict(workspace, target, trainer, plans, out, env):
    run(["nnUNetv2_predict", "-i", images(workspace), "-o", out, "-d", target, "-c", "3d_fullres", "-f", "0",
         "-p", plans, "-tr", trainer, *PREDICT_ON_CPU], env=env)
    return segmentations(out)


def predict_merged(workspace, merged, tmp_path):
    script = tmp_path / "predict_without_trainers.py"
    script.write_text(WITHOUT_TRAINERS)
    run(["python", script, "-i", images(workspace), "-o", tmp_path / "merged_pred", "-m", merged, "-f", "0",
         *PREDICT_ON_CPU])
    return segmentations(tmp_path / "merged_pred")


def evaluated(workspace, predictions):
    """nnU-Net's own evaluator on the predictions of the target's test scans."""
    labels = workspace / "nnUNet_raw" / "Dataset501_SynthCTB" / "labelsTs"
    run(["nnUNetv2_evaluate_simple", labels, predictions, "-l", "1", "-np", "1"])
    return json.loads((predictions / "summary.json").read_text())["foreground_mean"]["Dice"]


def adapter_keys(folder, token):
    weights = read_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))["network_weights"]
    return {k.rsplit(".", 1)[0] for k in weights if token in k}


def test_mednext_with_lora_and_the_conv_adapter(workspace, foundation, target, plain_head_env, tmp_path):
    plans = "MedNeXtPlans"
    mednext = adopted(workspace, foundation, target, "mednext-s", plans)

    lora, env = LORA, plain_head_env
    assert "Loaded foundation" in train(target, lora, plans, env)
    sites = adapter_keys(results(workspace, lora, plans), "fseft_lora_A")
    assert "encoder.stages.0.blocks.0.conv1" in sites  # the depthwise conv of a MedNeXt block
    assert all(s.startswith("encoder.") for s in sites)  # the encoder only, as FSEFT
    want = predict(workspace, target, lora, plans, tmp_path / "lora", env)
    assert 0.0 <= evaluated(workspace, tmp_path / "lora") <= 1.0
    merged = tmp_path / f"nnUNetTrainer__{plans}__3d_fullres"
    run(["nnunet-fseft", "merge", results(workspace, lora, plans), "-o", merged], env=env)
    assert read_checkpoint(str(merged / "fold_0" / "checkpoint_final.pth"))["trainer_name"] == "nnUNetTrainer"
    for g, w in zip(predict_merged(workspace, merged, tmp_path), want):
        assert (g == w).mean() > 0.9999

    # PEFT-MedNeXt: a MedNeXt block after each of the network's 9 stages (5 encoder, 4 decoder)
    adapter = "nnUNetTrainerFSEFT_ConvAdapter"
    train(target, adapter, plans, {})
    folder = results(workspace, adapter, plans)
    stages = {s.split(".fseft_")[0] for s in adapter_keys(folder, "fseft_conv_adapter")}
    assert stages == {f"encoder.stages.{i}" for i in range(5)} | {f"decoder.stages.{i}" for i in range(4)}
    run(["nnunet-fseft", "export", folder, "-o", tmp_path / "a.safetensors", "-f", "0"])
    imported = tmp_path / "imported" / folder.name
    run(["nnunet-fseft", "import", tmp_path / "a.safetensors", "--foundation", mednext, "-o", imported])
    # the same weights, so the same segmentations (nnU-Net rebuilds the network from the same plans)
    got = read_checkpoint(str(imported / "fold_0" / "checkpoint_final.pth"))["network_weights"]
    trained = read_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))["network_weights"]
    assert got.keys() == trained.keys() and all(got[k].equal(trained[k]) for k in got)

    # --c continues the LoRA training from its checkpoint: adapters and all
    before = read_checkpoint(str(results(workspace, lora, plans) / "fold_0" / "checkpoint_final.pth"))
    log = train(target, lora, plans, {**env, "nnUNet_fseft_epochs": "3"}, extra=["--c"])
    assert "Loaded foundation" not in log
    after = read_checkpoint(str(results(workspace, lora, plans) / "fold_0" / "checkpoint_final.pth"))
    assert after["current_epoch"] == 3
    assert after["logging"]["train_losses"][:2] == before["logging"]["train_losses"][:2]


def test_swin_unetr_with_lora_on_attention(workspace, foundation, target, tmp_path):
    plans = "SwinPlans"
    adopted(workspace, foundation, target, "swin-unetr", plans, pretrain=False)
    p = run(["nnUNetv2_train", target, "3d_fullres", "0", "-p", plans, "-tr", "nnUNetTrainerFSEFT_ConvAdapter",
             "-device", "cpu"], env=TRAIN_ENV_NO_VALIDATION, check=False)
    assert p.returncode != 0 and "transformer encoder: use LoRA or AdaptFormer" in p.stdout
    assert "Epoch 0" not in p.stdout

    lora, env = "nnUNetTrainerFSEFT_LoRA", {}
    assert "Loaded foundation" in train(target, lora, plans, env)
    sites = adapter_keys(results(workspace, lora, plans), "fseft_lora_A")
    assert "encoder.swinViT.layers1.0.blocks.0.attn.qkv" in sites
    assert {s.rsplit(".", 1)[-1] for s in sites} == {"qkv", "proj"}  # FSEFT: the attention projections only
    predict(workspace, target, lora, plans, tmp_path / "lora", env)
    assert 0.0 <= evaluated(workspace, tmp_path / "lora") <= 1.0  # merge is the same for every network: see MedNeXt
