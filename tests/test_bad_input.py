"""Bad input stops a command with one sentence, before any long work, and writes nothing."""
import json
import os
import shutil

import pytest
import torch

from helpers import TRAIN_ENV, fails_with, run
from nnunet_fseft.errors import InputError
from nnunet_fseft.plans import PLANS_NAME


def test_k_larger_than_dataset(target):
    fails_with(["nnunet-fseft", "kshot", "-d", target, "-k", "5", "--test", "2"], "fewer than K + test = 5 + 2")


def test_foundation_folder_missing(target, tmp_path):
    fails_with(["nnunet-fseft", "adopt", "--foundation", tmp_path / "nope__nnUNetPlans__3d_fullres",
                "-d", target, "--plans-name", "Other"], "does not exist")


def test_foundation_folder_without_checkpoint(foundation, target, tmp_path):
    empty = tmp_path / foundation.name
    empty.mkdir()
    for f in ("plans.json", "dataset.json"):
        shutil.copy(foundation / f, empty / f)
    fails_with(["nnunet-fseft", "adopt", "--foundation", empty, "-d", target, "--plans-name", "Other"],
               "holds no fold_all/checkpoint_final.pth")


def test_foundation_checkpoint_that_is_not_a_checkpoint(foundation, target, tmp_path):
    fake = tmp_path / foundation.name
    shutil.copytree(foundation, fake)
    torch.save({"something": "else"}, fake / "fold_all" / "checkpoint_final.pth")
    fails_with(["nnunet-fseft", "adopt", "--foundation", fake, "-d", target, "--plans-name", "Other"],
               "is not an nnU-Net checkpoint")


def test_pickled_code_is_refused(foundation, target, tmp_path):
    fake = tmp_path / foundation.name
    shutil.copytree(foundation, fake)
    torch.save({"network_weights": {}, "payload": os.system}, fake / "fold_all" / "checkpoint_final.pth")
    fails_with(["nnunet-fseft", "adopt", "--foundation", fake, "-d", target, "--plans-name", "Other"],
               "is not a readable nnU-Net checkpoint")


def test_mismatched_channels_stop_before_preprocessing(workspace, foundation):
    raw = workspace / "nnUNet_raw"
    src, dst = raw / "Dataset501_SynthCTB", raw / "Dataset502_TwoChannels"
    shutil.copytree(src, dst)
    ds = json.load(open(dst / "dataset.json"))
    ds["channel_names"] = {"0": "CT", "1": "PET"}
    json.dump(ds, open(dst / "dataset.json", "w"))
    fails_with(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", "502"], "input channels")
    assert not (workspace / "nnUNet_preprocessed" / "Dataset502_TwoChannels").exists()


def test_unknown_dataset(foundation):
    fails_with(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", "777"], "Dataset 777 does not exist")


def test_adopt_never_replaces_a_users_plans(workspace, foundation, target):
    plans = workspace / "nnUNet_preprocessed" / "Dataset501_SynthCTB" / "MyPlans.json"
    plans.write_text('{"mine": true}')
    fails_with(["nnunet-fseft", "adopt", "--foundation", foundation, "-d", target, "--plans-name", "MyPlans"],
               "did not write")
    assert json.loads(plans.read_text()) == {"mine": True}


def test_missing_environment_variable(target):
    fails_with(["nnunet-fseft", "kshot", "-d", target, "-k", "1"], "The environment variable nnUNet_raw is not set",
               env={"nnUNet_raw": None})


def test_bad_schedule_override(target):
    p = run(["nnUNetv2_train", target, "3d_fullres", "0", "-p", PLANS_NAME, "-tr", "nnUNetTrainerFSEFT_LoRA",
             "-device", "cpu"], env={**TRAIN_ENV, "nnUNet_fseft_epochs": "ten"}, check=False)
    assert p.returncode != 0 and "nnUNet_fseft_epochs must be a positive whole number" in p.stdout


def test_foundation_whose_weights_do_not_fit_its_plans(workspace, foundation, target, tmp_path):
    fake = tmp_path / foundation.name
    shutil.copytree(foundation, fake)
    plans = json.load(open(fake / "plans.json"))
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] *= 2
    json.dump(plans, open(fake / "plans.json", "w"))
    fails_with(["nnunet-fseft", "adopt", "--foundation", fake, "-d", target, "--plans-name", "Other"],
               "do not fit the network")
    assert not (workspace / "nnUNet_preprocessed" / "Dataset501_SynthCTB" / "Other.json").exists()


def test_only_nnunets_own_trainer_refusals_are_input_errors(tmp_path, monkeypatch):
    """A trainer that does not exist is the user's input; an error raised while nnU-Net imports a
    user's trainer module is a bug in that file and keeps its own type and traceback."""
    from nnunet_fseft.foundation.record import find_trainer
    folder = tmp_path / "my_trainers"
    folder.mkdir()
    monkeypatch.setenv("nnUNet_extTrainer", str(folder))
    (folder / "fine.py").write_text("class NotATrainer:\n    pass\n")
    with pytest.raises(InputError, match="Trainer nnUNetTrainerNoSuch cannot be found; install the package"):
        find_trainer("nnUNetTrainerNoSuch")
    with pytest.raises(InputError, match="NotATrainer is not an nnU-Net trainer"):
        find_trainer("NotATrainer")
    (folder / "broken.py").write_text("raise RuntimeError('a bug in my trainer file')\n")
    with pytest.raises(RuntimeError, match="a bug in my trainer file") as info:
        find_trainer("nnUNetTrainerNoSuch")
    assert not isinstance(info.value, InputError)
    (folder / "broken.py").write_text("assert False, 'my own check'\n")
    with pytest.raises(AssertionError, match="my own check"):
        find_trainer("nnUNetTrainerNoSuch")


def test_foundation_changed_since_adopt(foundation):
    """Adopting again helps a new training only: a trained model (a black-box one reads its foundation
    at every prediction) needs that very file back, so the sentence names its sha256 and path."""
    from nnunet_fseft.foundation.record import load_foundation
    path = str(foundation / "fold_all" / "checkpoint_final.pth")
    record = {"checkpoint": path, "sha256": "0" * 64}
    with pytest.raises(InputError, match="changed since `nnunet-fseft adopt`") as info:
        load_foundation(torch.nn.Conv3d(1, 1, 1), record)
    assert f"put the foundation checkpoint with sha256 {'0' * 64} back at {path}" in str(info.value)
    with pytest.raises(InputError, match="recorded is missing; put the foundation checkpoint with sha256"):
        load_foundation(torch.nn.Conv3d(1, 1, 1), {**record, "checkpoint": path + ".moved"})


# --- params, export, import, merge: checked in-process (the CLI's one-line wrapping is tested above) ---

def test_export_and_merge_refuse_a_model_not_trained_by_a_method(foundation, tmp_path):
    from nnunet_fseft.sharing.adapter_file import export_adapter
    from nnunet_fseft.sharing.merge import merge_model
    with pytest.raises(InputError, match="not an nnunet-fseft method"):
        export_adapter(str(foundation), str(tmp_path / "a.safetensors"), fold="all")
    with pytest.raises(InputError, match="not an nnunet-fseft method"):
        merge_model(str(foundation), str(tmp_path / "merged"))
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "merged").exists()


def test_export_names_the_checkpoints_there_are(foundation, tmp_path):
    from nnunet_fseft.sharing.adapter_file import export_adapter
    with pytest.raises(InputError, match="available: .*fold_all/checkpoint_final.pth"):
        export_adapter(str(foundation), str(tmp_path / "a.safetensors"), fold="3")


def test_import_refuses_files_that_are_not_adapter_files(foundation, tmp_path):
    from safetensors.torch import save_file
    from nnunet_fseft.sharing.adapter_file import import_adapter
    with pytest.raises(InputError, match="does not exist"):
        import_adapter(str(tmp_path / "none.safetensors"), str(foundation), str(tmp_path / "out"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a safetensors file"):
        import_adapter(str(tmp_path / "junk.safetensors"), str(foundation), str(tmp_path / "out"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="not an nnunet-fseft adapter file"):
        import_adapter(str(tmp_path / "plain.safetensors"), str(foundation), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_params_names_the_plans_there_are(target):
    fails_with(["nnunet-fseft", "params", "-d", target, "-p", "NoSuchPlans"], "available: FSEFTPlans")
