"""What the trainer refuses or stops on before it trains wrongly: misspelt settings, missing
hyper-parameters, a non-finite loss; and the mirroring axes it takes from the foundation."""
import copy

import numpy as np
import pytest
import torch

from networks import plans_manager
from nnunet_fseft.errors import InputError
from nnunet_fseft.trainers import METHODS as ALL_METHODS
from nnunet_fseft.trainers.nnUNetTrainerFSEFT import nnUNetTrainerFSEFT
from nnunet_fseft.training.settings import check_settings
from test_methods import METHODS, one_sentence

# --- the trainer refuses, in one sentence, what would otherwise train wrongly -----------------

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
                "numTraining": 2, "file_ending": ".nii.gz"}


def test_a_misspelt_hyperparameter_stops_the_trainer_before_nnunet_sets_it_up(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))

    class nnUNetTrainerFSEFT_LoRA_Rank4(METHODS["nnUNetTrainerFSEFT_LoRA"]):
        rnak = 4

    plans = {**copy.deepcopy(plans_manager("plain").plans), "continue_training": False}
    with pytest.raises(InputError, match=r"nnUNetTrainerFSEFT_LoRA_Rank4 sets `rnak`.*did you mean `rank`") as e:
        nnUNetTrainerFSEFT_LoRA_Rank4(plans, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    assert one_sentence(str(e.value))
    assert list(tmp_path.iterdir()) == []  # refused before nnU-Net made its output folder


def test_own_attributes_and_overrides_are_not_taken_for_misspellings():
    class Overrides(METHODS["nnUNetTrainerFSEFT_LoRA"]):
        rank, learning_rate = 4, 3e-3  # known names
        _rnak = 4  # private: the user's own
        subject_list = ("a", "b")  # public, but close to no setting

    check_settings(Overrides)


def test_a_user_trainer_in_nnunets_own_variants_folder_is_still_checked():
    """nnU-Net's documented place for custom trainers is inside the nnunetv2 package: a class there is
    the user's, not ours."""
    class nnUNetTrainerFSEFT_LoRA_Mine(METHODS["nnUNetTrainerFSEFT_LoRA"]):
        rnak = 4

    nnUNetTrainerFSEFT_LoRA_Mine.__module__ = "nnunetv2.training.nnUNetTrainer.variants.my_trainer"
    with pytest.raises(InputError, match=r"nnUNetTrainerFSEFT_LoRA_Mine sets `rnak`.*did you mean `rank`"):
        check_settings(nnUNetTrainerFSEFT_LoRA_Mine)


def test_a_method_without_its_hyperparameters_is_refused_in_one_sentence():
    class LoRAFromScratch(nnUNetTrainerFSEFT):
        tuner = "lora"
        trainable = ("adapters", "head")
        rank = 4

    with pytest.raises(InputError, match=r"LoRAFromScratch uses method 'lora' but sets no alpha") as e:
        check_settings(LoRAFromScratch)
    assert one_sentence(str(e.value))


def lora_trainer(tmp_path, monkeypatch, nan_foundation: bool):
    """A LoRA trainer on the tiny plain network, ready for train_step (optionally with NaN foundation weights)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**copy.deepcopy(plans_manager("plain").plans), "continue_training": False}
    trainer = METHODS["nnUNetTrainerFSEFT_LoRA"](plans, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3)
    if nan_foundation:
        with torch.no_grad():
            for p in trainer.network.parameters():
                if not p.requires_grad:  # the foundation's weights
                    p.fill_(float("nan"))
    trainer.loss = trainer._build_loss()
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    return trainer


def tiny_batch(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"data": torch.randn(2, 1, 16, 16, 16),
            "target": [torch.randint(0, 3, (2, 1, 16, 16, 16)).float(), torch.randint(0, 3, (2, 1, 8, 8, 8)).float()]}


# what train_step returns for a step whose loss overflowed (under CUDA mixed precision nnU-Net's
# GradScaler then skips the optimizer step, so the weights stay as they were)
OVERFLOWED_STEP = {"loss": np.array(np.nan, dtype=np.float32)}


def test_a_non_finite_train_loss_stops_training_in_one_sentence(tmp_path, monkeypatch):
    """A corrupt foundation (NaN weights) gives a NaN loss and NaN updates: the epoch's end stops the training."""
    trainer = lora_trainer(tmp_path, monkeypatch, nan_foundation=True)
    step = trainer.train_step(tiny_batch(0))
    assert np.isnan(step["loss"])
    with pytest.raises(InputError, match=r"Training stopped at epoch 0: the train loss is nan.*learning_rate") as e:
        trainer.on_train_epoch_end([step, trainer.train_step(tiny_batch(1))])
    assert one_sentence(str(e.value))
    with open(trainer.log_file) as f:
        assert str(e.value) in f.read()  # the fold's log says why it ended


def test_an_epoch_without_one_finite_step_stops_even_with_finite_weights(tmp_path, monkeypatch):
    """Mixed precision on a NaN foundation: every step overflows and is skipped, the weights stay finite."""
    trainer = lora_trainer(tmp_path, monkeypatch, nan_foundation=True)
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters() if p.requires_grad)
    with pytest.raises(InputError, match=r"Training stopped at epoch 0: the train loss is nan"):
        trainer.on_train_epoch_end([OVERFLOWED_STEP, OVERFLOWED_STEP])


def test_one_overflowed_step_among_finite_ones_does_not_stop_training(tmp_path, monkeypatch):
    trainer = lora_trainer(tmp_path, monkeypatch, nan_foundation=False)
    steps = [trainer.train_step(tiny_batch(0)), OVERFLOWED_STEP, trainer.train_step(tiny_batch(1))]
    assert np.isfinite(steps[0]["loss"]) and np.isfinite(steps[2]["loss"])
    trainer.on_train_epoch_end(steps)
    assert np.isnan(trainer.logger.get_value("train_losses", step=0))  # the epoch's mean is NaN, yet it goes on
    with open(trainer.log_file) as f:
        assert "Training stopped" not in f.read()


@pytest.mark.parametrize("recorded, expected", [([0, 1, 2], (0, 1, 2)), (None, None), ("absent", (0, 1, 2))])
def test_adaptation_mirrors_along_the_axes_the_foundation_was_trained_to_mirror(recorded, expected, tmp_path,
                                                                               monkeypatch):
    """A foundation trained without mirroring tells left from right: its adaptation neither augments nor
    predicts mirrored. Plans from before adopt recorded the axes keep nnU-Net's default."""
    from nnunet_fseft.foundation.record import PLANS_KEY
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**copy.deepcopy(plans_manager("plain").plans), "continue_training": False}
    plans[PLANS_KEY] = {"configuration": "3d_fullres", "trainer": "nnUNetTrainer", "labels": {"background": 0}}
    if recorded != "absent":
        plans[PLANS_KEY]["mirror_axes"] = recorded
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
                    "file_ending": ".nii.gz"}
    trainer = ALL_METHODS["nnUNetTrainerFSEFT_LoRA"](plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3]
    assert mirror_axes == expected and trainer.inference_allowed_mirroring_axes == expected
