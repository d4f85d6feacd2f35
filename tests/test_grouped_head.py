"""The grouped head (nnunet_fseft/network/grouped_head.py): the foundation's classes the target lacks grouped into
background, so that an adapted network predicts at step 0 exactly what zeroshot predicts."""
import copy

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from networks import plans_manager
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.record import PLANS_KEY, foundation_weights
from nnunet_fseft.network.anatomy import anatomy
from nnunet_fseft.network.grouped_head import (GroupedOutput, group_head, group_logits, grouped_classes, head_groups,
                                               is_grouped, ungroup, ungroup_all)
from nnunet_fseft.trainers import METHODS

FOUNDATION = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
# spleen and the left kidney under other names and values; liver and right kidney are not target labels
TARGET = {"background": 0, "left kidney": 1, "Spleen": 2}

pytestmark = pytest.mark.usefixtures("single_thread")


def test_groups_put_unmatched_classes_with_background_and_give_new_labels_new_rows():
    assert head_groups(TARGET, FOUNDATION) == [[0, 1, 4], [3], [2]]
    assert head_groups({"background": 0, "pancreas": 1, "lien": 2}, FOUNDATION) == [[0, 1, 3, 4], [5], [2]]
    assert head_groups({**TARGET, "ignore": 3}, FOUNDATION) == [[0, 1, 4], [3], [2]]  # no channel for ignore
    assert head_groups({"background": 0, "liver": (1, 2)}, FOUNDATION) is None  # regions: not grouped


def test_folded_softmax_is_the_foundations_softmax_summed_per_target_label():
    logits = torch.randn(2, 5, 4, 4, 4) * 5
    groups = head_groups(TARGET, FOUNDATION)
    grouped = torch.softmax(group_logits(logits, groups), 1)
    p = torch.softmax(logits, 1)
    assert torch.allclose(grouped, torch.stack([p[:, g].sum(1) for g in groups], 1), atol=1e-6)


def test_a_folded_head_keeps_the_convs_keys_and_unfolds_only_when_every_group_is_one_row():
    conv = nn.Conv3d(4, 5, 1)
    head = group_head(conv, head_groups(TARGET, FOUNDATION))
    assert is_grouped(head) and set(head.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 4, 3, 3, 3)
    assert torch.equal(head(x), group_logits(conv(x), head.label_rows))
    with pytest.raises(ValueError):
        ungroup(head)
    permuted = group_head(conv, [[0], [3], [2], [1], [4]])  # every class a target label, under other values
    assert torch.allclose(ungroup(permuted)(x), permuted(x), atol=1e-6)
    net = nn.Sequential(nn.Identity(), permuted)
    assert grouped_classes(net) == [] and not any(is_grouped(m) for m in ungroup_all(net).modules())
    assert grouped_classes(nn.Sequential(head)) == [1, 4]


def adapted_and_foundation(arch: str, method: str, tmp_path):
    """A method's network for TARGET, started as its trainer starts it from a random foundation."""
    pm = plans_manager(arch)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    foundation = nnUNetTrainer.build_network_architecture(pm, cm, 1, len(FOUNDATION), True)
    plans = {**copy.deepcopy(pm.plans), "continue_training": False}
    plans[PLANS_KEY] = {"configuration": "3d_fullres", "trainer": "nnUNetTrainer", "labels": FOUNDATION,
                        "head_rows": head_groups(TARGET, FOUNDATION)}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": TARGET, "numTraining": 2, "file_ending": ".nii.gz"}
    trainer = METHODS[method](plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, len(TARGET))
    network.load_state_dict(foundation_weights(network, foundation.state_dict(), "foundation"), strict=False)
    heads = [foundation.get_submodule(h) for h in anatomy(foundation).head]
    trainer.initialise_head(network, [(h.weight, h.bias) for h in heads])
    return network, foundation, trainer


@pytest.mark.parametrize("arch", ["plain", "resenc"])
@pytest.mark.parametrize("method", ["nnUNetTrainerFSEFT_LoRA", "nnUNetTrainerFSEFT_BitFit", "nnUNetTrainerFSEFT_FullFT"])
def test_step_0_is_the_folded_zero_shot_prediction(arch, method, tmp_path, monkeypatch):
    """zeroshot's network (the foundation, its output grouped) and the adapted one at step 0 agree
    bit for bit, though two of the foundation's four organs are not target labels."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    network, foundation, trainer = adapted_and_foundation(arch, method, tmp_path)
    foundation.decoder.deep_supervision = False
    zero_shot = GroupedOutput(foundation, head_groups(TARGET, FOUNDATION)).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        adapted, reference = network.eval()(x)[0], zero_shot(x)
    assert adapted.shape[1] == len(TARGET) and torch.allclose(adapted, reference, atol=1e-5)
    assert torch.equal(adapted.argmax(1), reference.argmax(1))
    # without the grouping the old start differs: the unmatched organs' voxels go to a matched one or background
    plain = torch.cat([foundation(x)[:, [0]], foundation(x)[:, [3, 2]]], 1)
    assert not torch.equal(plain.argmax(1), reference.argmax(1))


def test_merge_refuses_a_head_that_folds_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    network, _, _ = adapted_and_foundation("plain", "nnUNetTrainerFSEFT_LoRA", tmp_path)
    assert grouped_classes(network) == [1, 4]  # liver and right kidney, in every deep-supervision head
