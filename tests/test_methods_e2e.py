"""The other methods through the real commands: train and predict with AdaptFormer, ConvAdapter and
Med-Adapter; `params`; an adapter file exported, imported and predicted; a merged model predicted by
nnU-Net with this plugin unimportable."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from helpers import PREDICT_ON_CPU, TRAIN_ENV_NO_VALIDATION, WITHOUT_PLUGIN, images, run, segmentations
from networks import plans_manager
from nnunet_fseft.foundation.record import read_checkpoint
from nnunet_fseft.plans import PLANS_NAME
from nnunet_fseft.tuners import is_adapter_parameter

COMBO = "nnUNetTrainerFSEFT_LoRA_DecoderFT"  # mergeable, and a decoder-tuning combination


def results(workspace, trainer):
    return workspace / "nnUNet_results" / "Dataset501_SynthCTB" / f"{trainer}__FSEFTPlans__3d_fullres"


def train(target, trainer, fold="0"):
    return run(["nnUNetv2_train", target, "3d_fullres", fold, "-p", PLANS_NAME, "-tr", trainer, "-device", "cpu"],
               env=TRAIN_ENV_NO_VALIDATION)


def predict_folder(workspace, model_folder, out, fold="0", env=None):
    run(["nnUNetv2_predict_from_modelfolder", "-i", images(workspace), "-o", out, "-m", model_folder,
         "-f", fold, *PREDICT_ON_CPU], env=env)
    return segmentations(out)


@pytest.mark.parametrize("trainer", ["nnUNetTrainerFSEFT_AdaptFormer", "nnUNetTrainerFSEFT_ConvAdapter",
                                     "nnUNetTrainerFSEFT_MedAdapter"])
def test_train_and_predict(trainer, workspace, target, foundation, tmp_path):
    log = train(target, trainer).stdout
    assert "Loaded foundation" in log and f"{trainer}: training " in log
    ckpt = read_checkpoint(str(results(workspace, trainer) / "fold_0" / "checkpoint_final.pth"))["network_weights"]
    original = read_checkpoint(str(foundation / "fold_all" / "checkpoint_final.pth"))["network_weights"]
    adapters = [k for k in ckpt if is_adapter_parameter(k)]
    assert adapters and all(k not in original for k in adapters)
    for k in ckpt:  # the foundation itself is frozen
        if not is_adapter_parameter(k) and ".seg_layers." not in k:
            assert (ckpt[k] == original[k]).all(), k
    run(["nnUNetv2_predict", "-i", images(workspace), "-o", tmp_path, "-d", target, "-c", "3d_fullres", "-f", "0",
         "-p", PLANS_NAME, "-tr", trainer, *PREDICT_ON_CPU])
    assert all(set(np.unique(s)) <= {0, 1} for s in segmentations(tmp_path))


def test_params_lists_every_method_without_training(target):
    out = run(["nnunet-fseft", "params", "-d", target]).stdout
    from nnunet_fseft.trainers import METHODS
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("nnUNetTrainerFSEFT_")}
    assert set(rows) == set(METHODS)
    full, lora = rows["nnUNetTrainerFSEFT_FullFT"], rows["nnUNetTrainerFSEFT_LoRA"]
    assert full[1] == full[2] and full[3] == "100.00%"
    assert int(lora[1].replace(",", "")) < int(lora[2].replace(",", ""))
    out = run(["nnunet-fseft", "params", "-d", target, "-tr", "nnUNetTrainerFSEFT_BitFit"]).stdout
    assert "nnUNetTrainerFSEFT_BitFit" in out and "nnUNetTrainerFSEFT_LoRA" not in out


@pytest.fixture(scope="module")
def combo(workspace, target, tmp_path_factory):
    train(target, COMBO)
    out = tmp_path_factory.mktemp("combo_pred")
    return results(workspace, COMBO), predict_folder(workspace, results(workspace, COMBO), out)


def test_export_import_round_trip_predicts_the_same(combo, foundation, workspace, tmp_path):
    folder, want = combo
    adapter = tmp_path / "pancreas.safetensors"
    run(["nnunet-fseft", "export", folder, "-o", adapter, "-f", "0"])
    full = os.path.getsize(folder / "fold_0" / "checkpoint_final.pth")
    assert adapter.is_file() and (tmp_path / "pancreas.safetensors.json").is_file()
    assert os.path.getsize(adapter) < full
    with open(adapter, "rb") as f:
        assert b"nnunet_fseft" in f.read(1 << 16)  # the JSON header travels inside the file

    imported = tmp_path / "imported" / f"{COMBO}__FSEFTPlans__3d_fullres"
    run(["nnunet-fseft", "import", adapter, "--foundation", foundation, "-o", imported])
    got = predict_folder(workspace, imported, tmp_path / "pred")
    for g, w in zip(got, want):
        assert np.array_equal(g, w)

    # an installation whose method has other hyper-parameters is refused
    from safetensors.torch import save_file
    from nnunet_fseft.sharing.adapter_file import METADATA_KEY, import_adapter, read_adapter
    tensors, info = read_adapter(str(adapter))
    info["settings"]["rank"] = 4
    save_file(tensors, str(tmp_path / "rank4.safetensors"), metadata={METADATA_KEY: json.dumps(info)})
    with pytest.raises(ValueError, match="settings"):
        import_adapter(str(tmp_path / "rank4.safetensors"), str(foundation), str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()

    # a foundation other than the one it was trained on is refused
    other = tmp_path / "other" / foundation.name
    (other / "fold_all").mkdir(parents=True)
    for f in ("plans.json", "dataset.json"):
        (other / f).write_bytes((foundation / f).read_bytes())
    (other / "fold_all" / "checkpoint_final.pth").write_bytes(
        (foundation / "fold_all" / "checkpoint_final.pth").read_bytes() + b"\0")
    p = run(["nnunet-fseft", "import", adapter, "--foundation", other, "-o", tmp_path / "x"], check=False)
    assert p.returncode == 2 and "sha256" in p.stdout and "Traceback" not in p.stdout


PLAIN_HEAD = """
from nnunet_fseft.trainers import nnUNetTrainerFSEFT_LoRA_DecoderFT


class nnUNetTrainerFSEFT_LoRA_DecoderFT_PlainHead(nnUNetTrainerFSEFT_LoRA_DecoderFT):
    group_unmatched = False
"""


def test_merged_model_runs_on_nnunet_alone_with_the_same_segmentation(combo, workspace, target, tmp_path):
    folder, _ = combo  # its head groups the foundation's four organs with background: no plain equivalent
    p = run(["nnunet-fseft", "merge", folder, "-o", tmp_path / "refused"], check=False)
    assert p.returncode == 2 and "groups the foundation's 'liver', 'spleen'" in p.stdout and "Traceback" not in p.stdout
    assert not (tmp_path / "refused").exists()
    (tmp_path / "plain_head.py").write_text(PLAIN_HEAD)  # the way out the refusal names
    trainer = "nnUNetTrainerFSEFT_LoRA_DecoderFT_PlainHead"
    env = {**TRAIN_ENV_NO_VALIDATION,
           "nnUNet_extTrainer": os.pathsep.join([str(tmp_path), os.environ.get("nnUNet_extTrainer", "")])}
    run(["nnUNetv2_train", target, "3d_fullres", "0", "-p", PLANS_NAME, "-tr", trainer, "-device", "cpu"], env=env)
    folder = results(workspace, trainer)
    want = predict_folder(workspace, folder, tmp_path / "want", env=env)
    merged = tmp_path / "nnUNetTrainer__FSEFTPlans__3d_fullres"
    run(["nnunet-fseft", "merge", folder, "-o", merged], env=env)
    ckpt = read_checkpoint(str(merged / "fold_0" / "checkpoint_final.pth"))
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    assert not any(is_adapter_parameter(k) for k in ckpt["network_weights"])
    script = tmp_path / "predict_without_plugin.py"
    script.write_text(WITHOUT_PLUGIN)
    run([sys.executable, script, "-i", images(workspace), "-o", tmp_path / "pred", "-m", merged, "-f", "0",
         *PREDICT_ON_CPU])
    for g, w in zip(segmentations(tmp_path / "pred"), want):
        assert (g == w).mean() > 0.9999


def test_merge_refuses_non_linear_adapters_in_one_sentence(workspace, target, tmp_path):
    folder = results(workspace, "nnUNetTrainerFSEFT_AdaptFormer")
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        train(target, "nnUNetTrainerFSEFT_AdaptFormer")
    p = run(["nnunet-fseft", "merge", folder, "-o", tmp_path / "m"], check=False)
    assert p.returncode == 2 and "cannot be merged" in p.stdout and "Traceback" not in p.stdout
    assert not (tmp_path / "m").exists()


MISSPELT = """from nnunet_fseft.trainers import nnUNetTrainerFSEFT_LoRA


class nnUNetTrainerFSEFT_LoRA_Rank4(nnUNetTrainerFSEFT_LoRA):
    rnak = 4
"""


def test_a_misspelt_hyperparameter_in_a_users_trainer_stops_nnunet_training_at_start(workspace, tmp_path):
    """A user's trainer folder on nnUNet_extTrainer; plans and dataset.json are all nnUNetv2_train
    reads before it makes the trainer, so nothing is preprocessed and nothing may be trained."""
    dataset = "Dataset990_Misspelt"
    folder = workspace / "nnUNet_preprocessed" / dataset
    folder.mkdir()
    (folder / "FSEFTPlans.json").write_text(json.dumps({**plans_manager("plain").plans, "dataset_name": dataset}))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                     "numTraining": 2, "file_ending": ".nii.gz"}))
    (tmp_path / "my_trainers.py").write_text(MISSPELT)
    env = {"nnUNet_extTrainer": os.pathsep.join([str(tmp_path), os.environ.get("nnUNet_extTrainer", "")]),
           "PYTHONUNBUFFERED": "1"}  # the traceback's last line is then the output's last line
    p = run(["nnUNetv2_train", "990", "3d_fullres", "0", "-p", PLANS_NAME, "-tr", "nnUNetTrainerFSEFT_LoRA_Rank4",
             "-device", "cpu"], env={**TRAIN_ENV_NO_VALIDATION, **env}, check=False)
    assert p.returncode != 0
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("nnunet_fseft.errors.InputError: nnUNetTrainerFSEFT_LoRA_Rank4 sets `rnak`"), \
        p.stdout[-3000:]
    assert "did you mean `rank`?" in last
    assert not (workspace / "nnUNet_results" / dataset).exists()  # stopped before nnU-Net's set-up


def test_a_foundation_with_nan_weights_stops_nnunet_training_in_one_sentence(workspace, target, foundation, tmp_path):
    """-pretrained_weights bypasses adopt's finiteness check: the first epoch's end stops the training."""
    checkpoint = read_checkpoint(str(foundation / "fold_all" / "checkpoint_final.pth"))
    name = next(k for k in checkpoint["network_weights"] if k.startswith("encoder") and k.endswith("weight"))
    checkpoint["network_weights"][name].view(-1)[:5] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pth")
    env = {**TRAIN_ENV_NO_VALIDATION, "nnUNet_fseft_epochs": "1", "nnUNet_fseft_iters_per_epoch": "2",
           "nnUNet_results": str(tmp_path / "results"),  # the shared results folder stays as it is
           "PYTHONUNBUFFERED": "1"}  # the traceback's last line is then the output's last line
    p = run(["nnUNetv2_train", target, "3d_fullres", "0", "-p", PLANS_NAME, "-tr", "nnUNetTrainerFSEFT_LoRA",
             "-device", "cpu", "-pretrained_weights", tmp_path / "nan.pth"], env=env, check=False)
    assert p.returncode != 0
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("nnunet_fseft.errors.InputError: Training stopped at epoch 0: the train loss is nan"), \
        p.stdout[-3000:]
    assert "check the foundation's checkpoint" in last and last.endswith(".")
    assert not list((tmp_path / "results").rglob("checkpoint_final.pth"))
