"""Partial-label pre-training, in process: the loss, the per-rank sampler, the masked summary, label pooling."""
import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_fseft.datasets.combine import unify_labels
from nnunet_fseft.errors import InputError
from nnunet_fseft.training.partial_labels import (PartialLabelLoss, SourceBalancedDataset, annotated_mask,
                                                  annotated_summary, find_annotations)


def nnunet_loss(batch_dice):
    """nnU-Net's loss exactly as nnUNetTrainer._build_loss makes it for plain labels."""
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def batch(seed=0, b=2, c=4, shape=(6, 7, 5)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *shape, generator=g) * 2
    target = torch.randint(0, c, (b, 1, *shape), generator=g).float()
    return logits, target


@pytest.mark.parametrize("batch_dice", [False, True])
def test_the_loss_is_nnunets_when_every_class_is_annotated(batch_dice):
    logits, target = batch()
    every = annotated_mask([[1, 2, 3]] * 2, 4)
    ours = PartialLabelLoss(batch_dice)(logits, target, every)
    theirs = nnunet_loss(batch_dice)(logits, target)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)
    # and with deep supervision, as the trainer wraps it
    outputs = [logits, logits[:, :, ::2, ::2, ::2]]
    targets = [target, target[:, :, ::2, ::2, ::2]]
    ours_ds = PartialLabelLoss(batch_dice)
    ours_ds.annotated = every
    ours = DeepSupervisionWrapper(ours_ds, [0.6, 0.4])(outputs, targets)
    theirs = DeepSupervisionWrapper(nnunet_loss(batch_dice), [0.6, 0.4])(outputs, targets)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_voxels_outside_the_volume_are_left_out(batch_dice):
    """-1 (outside the volume, in a black-box method's cached-feature patches): with every class annotated
    the loss is nnU-Net's with ignore label -1, whatever the logits there."""
    logits, target = batch(seed=3)
    target[:, :, :2] = -1
    every = annotated_mask([[1, 2, 3]] * 2, 4)
    theirs = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                            weight_ce=1, weight_dice=1, ignore_label=-1,
                            dice_class=MemoryEfficientSoftDiceLoss)(logits, target)
    ours = PartialLabelLoss(batch_dice)(logits, target, every)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)
    changed = logits.clone()
    changed[:, :, :2] = 100 * torch.randn_like(changed[:, :, :2])
    assert torch.allclose(PartialLabelLoss(batch_dice)(changed, target, every), ours, atol=1e-6)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_an_unannotated_class_is_not_pushed_towards_background(batch_dice):
    """Case 0 does not annotate class 2 (its label map has only 0, 1, 3); case 1 annotates everything,
    so class 2's Dice is live in the batch. On case 0's background voxels, moving probability from
    background to class 2 while keeping their sum must not change the loss (its derivative along
    that move is 0). nnU-Net's loss does push there: the same derivative is clearly positive."""
    logits, target = batch(seed=1)
    target[0][target[0] == 2] = 0
    annotated = annotated_mask([[1, 3], [1, 2, 3]], 4)

    def derivative_along_background_to_class2(loss_fn):
        x = logits.clone().requires_grad_(True)
        loss_fn(x).backward()
        p = torch.softmax(logits, 1)[0]
        background = target[0, 0] == 0
        # d(z_bg, z_2) = (-p_2, p_0) keeps e^z_bg + e^z_2, so p_bg + p_2, fixed: mass moves from bg to 2
        d = (-x.grad[0, 0] * p[2] + x.grad[0, 2] * p[0])[background]
        return d.sum().item(), d.abs().max().item()

    ours = derivative_along_background_to_class2(lambda x: PartialLabelLoss(batch_dice)(x, target, annotated))
    theirs = derivative_along_background_to_class2(lambda x: nnunet_loss(batch_dice)(x, target))
    assert abs(ours[0]) < 1e-7 and ours[1] < 1e-8, ours
    assert theirs[0] > 1e-4, theirs  # the test can fail: nnU-Net's loss penalises class 2 there


def test_annotated_classes_are_still_learnt_from_a_partially_labelled_case():
    logits, target = batch(seed=2, b=1)
    annotated = annotated_mask([[1]], 4)
    target[target > 1] = 0
    x = logits.clone().requires_grad_(True)
    PartialLabelLoss(False)(x, target, annotated).backward()
    organ = target[0, 0] == 1
    assert (x.grad[0, 1][organ] < 0).all()  # descent raises the annotated organ where it is labelled
    # and lowers the other classes there, annotated or not: a liver voxel is no kidney either
    assert (x.grad[0, 2][organ] > 0).all() and (x.grad[0, 3][organ] > 0).all()


class Cases:
    """Stands in for nnU-Net's preprocessed dataset: identifiers, and load_case giving a small volume."""

    def __init__(self, identifiers):
        self.identifiers = list(identifiers)
        self.loaded = []

    def load_case(self, key):
        self.loaded.append(key)
        data = np.zeros((1, 8, 8, 8), dtype=np.float32)
        seg = np.zeros((1, 8, 8, 8), dtype=np.int16)
        return data, seg, None, {"class_locations": {1: np.zeros((0, 4), dtype=int)}}


def test_each_rank_draws_sources_first_then_cases():
    """nnU-Net's own data loader, built per rank as under -num_gpus 2 (each with its share of the
    batch), over a pool of 12 cases of one source and 2 of another: each rank's draws are balanced
    over the two sources, and uniform over each source's cases."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    big, small = [f"A_{i:02d}" for i in range(12)], ["B_00", "B_01"]
    source_of = {**{c: "A" for c in big}, **{c: "B" for c in small}}
    labels = LabelManager({"background": 0, "organ": 1}, regions_class_order=None)
    for rank in (0, 1):
        np.random.seed(rank)  # each rank is its own process with its own generator
        cases = Cases(big + small)
        loader = nnUNetDataLoader(SourceBalancedDataset(cases, source_of), 1, (8, 8, 8), (8, 8, 8), labels)
        keys = [k for _ in range(2000) for k in loader.generate_train_batch()["keys"]]
        share_b = keys.count("B") / len(keys)
        assert abs(share_b - 0.5) < 0.04, share_b  # uniform over cases would give 2/14 = 0.14
        drawn = {c: cases.loaded.count(c) for c in big}
        assert min(drawn.values()) > 0.5 * len(keys) / 2 / 12, drawn
        assert abs(cases.loaded.count("B_00") / keys.count("B") - 0.5) < 0.06


def test_the_summary_counts_a_class_only_where_it_is_annotated():
    def case(name, dice1, dice2):
        return {"reference_file": f"/gt/{name}.nii.gz", "prediction_file": f"/p/{name}.nii.gz",
                "metrics": {"1": {"Dice": dice1, "IoU": dice1}, "2": {"Dice": dice2, "IoU": dice2}}}
    summary = {"metric_per_case": [case("a", 0.8, 0.0), case("b", 0.0, 0.6)],
               "mean": {"1": {"Dice": 0.4, "IoU": 0.4}, "2": {"Dice": 0.3, "IoU": 0.3}},
               "foreground_mean": {"Dice": 0.35, "IoU": 0.35}}
    out = annotated_summary(summary, {"a": [1], "b": [2]}, ".nii.gz")
    assert out["mean"]["1"]["Dice"] == pytest.approx(0.8) and out["mean"]["2"]["Dice"] == pytest.approx(0.6)
    assert out["foreground_mean"]["Dice"] == pytest.approx(0.7)
    assert list(out["metric_per_case"][0]["metrics"]) == ["1"]


def test_label_names_pool_by_meaning():
    sources = {"D1": {"Liver": 1, "lien": 2}, "D2": {"spleen": 1, "Kidney_L": 2, "right kidney": 3}}
    unified, lut = unify_labels(sources, {})
    assert unified == {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
    assert lut == {"D1": {1: 1, 2: 2}, "D2": {1: 2, 2: 3, 3: 4}}
    # a source that joins the kidneys pools once the map says the sides are one class
    sources["D3"] = {"kidneys": 1}
    with pytest.raises(ValueError, match="kidney_left and kidney_right apart"):
        unify_labels(sources, {})
    unified, lut = unify_labels(sources, {"kidney_left": "kidney", "kidney_right": "kidney"})
    assert unified == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
    assert lut["D2"] == {1: 2, 2: 3, 3: 3} and lut["D3"] == {1: 3}
    with pytest.raises(ValueError, match="both mean 'spleen'"):
        unify_labels({"D1": {"lien": 1, "Spleen": 2}}, {})
    with pytest.raises(ValueError, match="which no source dataset labels"):
        unify_labels({"D1": {"liver": 1}}, {"pancreas": "pancreas"})


def _ddp_rank(rank, world, init_file, logits, target, annotated, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x = logits[rank:rank + 1].clone().requires_grad_(True)
    loss = PartialLabelLoss(batch_dice=True, ddp=True)(x, target[rank:rank + 1], annotated[rank:rank + 1])
    loss.backward()
    out[rank] = (loss.item(), x.grad.clone())
    dist.destroy_process_group()


def test_under_ddp_batch_dice_sees_the_global_batch(tmp_path):
    """Two gloo ranks with one case each (one not annotating class 2) give the loss and gradients of
    one process with both cases, as nnU-Net's own batch Dice does under -num_gpus."""
    import torch.multiprocessing as mp
    logits, target = batch(seed=3)
    target[0][target[0] == 2] = 0
    annotated = annotated_mask([[1, 3], [1, 2, 3]], 4)
    x = logits.clone().requires_grad_(True)
    PartialLabelLoss(batch_dice=True)(x, target, annotated).backward()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), logits, target, annotated, out), nprocs=2)
    # nnU-Net's DDP averages the ranks' gradients, and each rank's CE is its own batch's mean
    for rank in (0, 1):
        assert torch.allclose(out[rank][1] / 2, x.grad[rank:rank + 1], atol=1e-6)


def test_a_pooled_dataset_needs_consistent_annotations(tmp_path, monkeypatch):
    import json
    monkeypatch.delenv("nnUNet_raw", raising=False)
    marked = {"fseft_annotations": "annotations.json"}
    assert find_annotations({}, "Dataset1_X", str(tmp_path)) is None  # not pooled: plain nnU-Net training
    with pytest.raises(InputError, match="names the annotations file annotations.json"):
        find_annotations(marked, "Dataset1_X", str(tmp_path))
    annotations = {"sources": {"A": {"annotated": [1, 2]}},
                   "cases": {"A_0": {"source": "A", "annotated": [1, 2]}, "A_1": {"source": "A", "annotated": [1]}}}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(InputError, match="case A_1 does not annotate what its source A does"):
        find_annotations(marked, "Dataset1_X", str(tmp_path))


def test_a_target_whose_scans_label_only_some_classes_trains_with_the_partial_label_loss(tmp_path, monkeypatch):
    """Every method's trainer (here LoRA) on a target whose dataset.json names an annotations file:
    each case's loss counts only the classes it annotates (the masks follow the batch's keys), a
    transductive method refuses (its size prior would read a left-out organ as absent), and without
    the file the loss is nnU-Net's."""
    import copy
    import json
    from networks import plans_manager
    from nnunet_fseft.trainers import METHODS
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    raw = tmp_path / "raw" / "Dataset999_Tiny"
    raw.mkdir(parents=True)
    annotations = {"sources": {"liver only": {"annotated": [1]}, "both": {"annotated": [1, 2]}},
                   "cases": {"a": {"source": "liver only", "annotated": [1]}, "b": {"source": "both", "annotated": [1, 2]}}}
    (raw / "annotations.json").write_text(json.dumps(annotations))
    labels = {"background": 0, "liver": 1, "spleen": 2}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz",
                    "fseft_annotations": "annotations.json"}
    plans = {**copy.deepcopy(plans_manager("plain").plans), "continue_training": False}

    def trainer(method, meta):
        t = METHODS[method](copy.deepcopy(plans), "3d_fullres", 0, meta, torch.device("cpu"))
        t.network = t.build_network_architecture(t.plans_manager, t.configuration_manager, 1, 3)
        t.loss = t._build_loss()
        t.optimizer, t.lr_scheduler = t.configure_optimizers()
        return t

    lora = trainer("nnUNetTrainerFSEFT_LoRA", dataset_json)
    assert isinstance(lora.loss, DeepSupervisionWrapper) and isinstance(lora.loss.loss, PartialLabelLoss)
    torch.manual_seed(0)
    data = torch.randn(2, 1, 16, 16, 16)
    target = [torch.randint(0, 3, (2, 1, 16, 16, 16)).float(), torch.randint(0, 3, (2, 1, 8, 8, 8)).float()]
    for keys in (["a", "b"], ["b", "a"]):
        step = lora.train_step({"data": data, "target": target, "keys": keys})
        assert np.isfinite(step["loss"])
        assert lora.partial_loss.annotated.tolist() == [[True, True, k == "b"] for k in keys]
    with pytest.raises(InputError, match="size priors need every class labelled in every support scan"):
        METHODS["nnUNetTrainerFSEFT_LinearProbeTI"](copy.deepcopy(plans), "3d_fullres", 0, dataset_json,
                                                    torch.device("cpu"))
    plain = trainer("nnUNetTrainerFSEFT_LoRA", {k: v for k, v in dataset_json.items() if k != "fseft_annotations"})
    assert not isinstance(plain.loss.loss, PartialLabelLoss)
