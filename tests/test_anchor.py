"""The zero-shot anchor (nnunet_fseft/training/anchor.py): its classes, its penalty, and its life in a trainer."""
import copy
import os

import pytest
import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_fseft.network.anatomy import anatomy
from nnunet_fseft.training.anchor import AnchoredLoss, ZeroShotAnchor, anchor_groups, merged_log_probs
from test_methods import adapted, outputs, perturb
from test_trainer_checks import lora_trainer, tiny_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def test_known_labels_are_held_each_on_its_own_and_the_rest_together():
    labels = {"background": 0, "liver": 1, "pancreas": 2, "spleen": 3}
    assert anchor_groups(labels, [0, 1, 3]) == [[0, 2], [1], [3]]
    assert anchor_groups(labels, [0]) is None  # only new organs: the foundation has no opinion to hold


def test_merged_probabilities_sum_within_groups():
    logits = torch.randn(2, 4, 3, 3, 3)
    p = torch.softmax(logits, 1)
    merged = merged_log_probs(logits, [[0, 2], [1], [3]]).exp()
    torch.testing.assert_close(merged[:, 0], p[:, 0] + p[:, 2])
    torch.testing.assert_close(merged.sum(1), torch.ones(2, 3, 3, 3))


def lora_anchor(weight=1.0):
    _, net, x = adapted("plain3d", "nnUNetTrainerFSEFT_LoRA")
    dice = MemoryEfficientSoftDiceLoss(batch_dice=True, do_bg=False, smooth=1e-5, ddp=False)
    return net, x, ZeroShotAnchor(net, [[0, 1], [2]], weight, dice, output_weights=(1.0, 0.0))


def start_segmentation(net, anchor, x):
    with torch.no_grad():
        return merged_log_probs(outputs(net, x)[0], anchor.groups).argmax(1)


def test_the_start_segmentation_is_the_start_networks_and_only_trained_parameters_learn_from_it():
    net, x, anchor = lora_anchor()
    start = copy.deepcopy(net)
    perturb(net)  # as if trained
    trained = {n: p.detach().clone() for n, p in net.named_parameters()}
    anchor.predict_start(net, x)
    assert all(torch.equal(p, trained[n]) for n, p in net.named_parameters())  # set back after the start's forward
    assert torch.equal(anchor._targets[0], start_segmentation(start, anchor, x))
    assert anchor._targets[1] is None  # an output of weight 0 is not scored
    penalty = anchor.penalty(outputs(net, x))
    penalty.backward()
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert anchor.penalty(outputs(net, x)) == 0.0  # no start segmentation for this batch (validation): no penalty


def test_training_on_the_penalty_alone_leads_back_to_the_start_segmentation():
    net, x, anchor = lora_anchor()
    start = start_segmentation(net, anchor, x)
    perturb(net)
    with torch.no_grad():
        net.get_submodule(anatomy(net).head[-1]).bias[2] += 3.0  # the moved network over-segments label 2
    before = (start_segmentation(net, anchor, x) == start).float().mean()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        anchor.predict_start(net, x)
        optimizer.zero_grad()
        anchor.penalty(outputs(net, x)).backward()
        optimizer.step()
    assert before < 0.9 and (start_segmentation(net, anchor, x) == start).float().mean() > before + 0.05


@pytest.mark.parametrize("left_out, ignore_label", [(-1, None), (3, 3)])
def test_the_voxels_the_label_loss_leaves_out_are_left_out(left_out, ignore_label):
    """-1: outside the volume in cached-feature patches; the ignore label: voxels nobody annotated."""
    net, x, anchor = lora_anchor()
    anchor.ignore_label = ignore_label
    perturb(net)
    labels = [torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 1, 8, 8, 8)]
    slab = [y.clone() for y in labels]
    for y in slab:
        y[:, :, 2:] = left_out  # only a slab is scored

    def penalty(y, output):
        anchor.predict_start(net, x)
        return anchor.penalty(output, y)

    output = outputs(net, x)
    other = [o.clone() for o in output]
    for o in other:
        o[:, :, 2:] = torch.randn_like(o[:, :, 2:])  # differs only where the slab's labels are left out
    assert penalty(labels, output) != penalty(labels, other)
    torch.testing.assert_close(penalty(slab, output), penalty(slab, other), atol=1e-6, rtol=0)


def test_where_scans_label_only_some_classes_the_labels_override_the_anchor():
    """Partial labels (a target extending its foundation): the anchor leaves out every labelled voxel, and
    the background voxels a scan's annotated foundation class covers at the start (the label says they are
    not that class); it holds the rest. Scan 0 annotates the known class 2, scan 1 only the new class 1."""
    net, x, anchor = lora_anchor()
    start = start_segmentation(net, anchor, x)  # 0: background or the new class, 1: the known class 2
    perturb(net)
    assert 0 < start.float().mean() < 1
    y = torch.zeros(2, 1, 16, 16, 16)
    y[:, :, 4:8] = 1  # the new class, labelled in both scans
    anchor.annotated = torch.tensor([[True, True, True], [True, True, False]])
    left_out = (y[:, 0] > 0) | ((start == 1) & torch.tensor([True, False])[:, None, None, None])
    assert left_out.any() and (~left_out).any()

    def penalty(output):
        anchor.predict_start(net, x)
        return anchor.penalty(output, [y, y[:, :, ::2, ::2, ::2]])

    output = outputs(net, x)
    noise = torch.randn_like(output[0])
    changed_left_out = [torch.where(left_out[:, None], noise, output[0]), output[1]]
    changed_held = [torch.where(left_out[:, None], output[0], noise), output[1]]
    torch.testing.assert_close(penalty(changed_left_out), penalty(output), atol=1e-6, rtol=0)
    assert abs(penalty(changed_held) - penalty(output)) > 1e-3
    anchor.annotated = None  # every class labelled everywhere: the anchor holds every voxel again
    assert abs(penalty(changed_left_out) - penalty(output)) > 1e-3


def test_the_start_forward_leaves_batchnorm_statistics_as_they_were():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.Conv3d(4, 3, 1))
    net[0].weight.requires_grad_(False)
    net.train()
    anchor = ZeroShotAnchor(net, [[0, 1], [2]], 1.0, MemoryEfficientSoftDiceLoss(do_bg=False, ddp=False))
    before = [b.clone() for b in net.buffers()]
    anchor.predict_start(net, torch.randn(2, 1, 8, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))


def trainer_at(tmp_path, monkeypatch, epoch: int):
    trainer = lora_trainer(tmp_path, monkeypatch, nan_foundation=False)
    trainer.known_labels = [0, 2]  # the foundation knows the spleen, not the liver
    trainer.do_split = lambda: (["case_0"], ["case_1"])  # K = 1
    trainer.current_epoch = epoch
    return trainer


def test_a_trainer_holds_the_known_labels_and_resumes_from_the_start_it_wrote(tmp_path, monkeypatch):
    trainer = trainer_at(tmp_path, monkeypatch, 0)
    trainer.start_anchor()
    assert isinstance(trainer.loss, AnchoredLoss) and trainer.anchor.groups == [[0, 1], [2]]
    assert trainer.anchor.weight == trainer.anchor_weight  # divided by K = 1
    assert trainer.anchor.output_weights == list(trainer.loss.loss.weight_factors)  # scored as the labels are
    start = [s.clone() for s in trainer.anchor.start]
    steps = [trainer.train_step(tiny_batch(i)) for i in range(2)]
    assert all(torch.isfinite(torch.as_tensor(s["loss"])) for s in steps)

    resumed = trainer_at(tmp_path, monkeypatch, 1)  # --c: the network has moved; the start is the file's
    with torch.no_grad():
        for p in resumed.network.parameters():
            p.add_(0.1)
    resumed.start_anchor()
    assert all(torch.equal(a, b) for a, b in zip(resumed.anchor.start, start))

    os.remove(trainer.anchor_file)  # a training begun before the anchor existed: --c continues it without one
    old = trainer_at(tmp_path, monkeypatch, 1)
    loss = old.loss
    old.start_anchor()
    assert old.anchor is None and old.loss is loss
    with open(old.log_file) as f:
        assert "zero_shot_anchor.pth is missing, so --c continues this training as it began, without one" in f.read()


@pytest.mark.parametrize("known, weight", [([0], 1.0), ([0, 1, 2], 0.0)])
def test_no_anchor_for_new_organs_only_or_a_weight_of_zero(known, weight, tmp_path, monkeypatch):
    trainer = trainer_at(tmp_path, monkeypatch, 0)
    trainer.known_labels, trainer.anchor_weight = known, weight
    loss = trainer.loss
    trainer.start_anchor()
    assert trainer.anchor is None and trainer.loss is loss


@pytest.mark.parametrize("known, weight", [([0], 1.0), ([0, 1, 2], 0.0)])
def test_an_extending_target_without_the_anchor_is_refused_before_training(known, weight, tmp_path, monkeypatch):
    """Its scans annotate only the new labels: without the anchor nothing would hold the foundation's classes."""
    from nnunet_fseft.errors import InputError
    from test_methods import one_sentence
    trainer = trainer_at(tmp_path, monkeypatch, 0)
    trainer.known_labels, trainer.anchor_weight = known, weight
    trainer.foundation = {"extends": True}
    with pytest.raises(InputError, match="would lose the foundation's classes") as e:
        trainer.start_anchor()
    assert one_sentence(str(e.value))
