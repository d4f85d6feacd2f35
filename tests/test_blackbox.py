"""Black-box adapters, the feature cache and the size prior, on tiny networks and synthetic arrays
(end to end: test_blackbox_e2e.py)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from networks import plain2d, plain3d, plans_manager, primus, resenc3d
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.record import PLANS_KEY
from nnunet_fseft.network.black_box import LinearProbe, build_black_box
from nnunet_fseft.network.parameters import count_parameters
from nnunet_fseft.training.feature_cache import FeatureDataset, FeatureStore, sliding_window_features
from nnunet_fseft.training.transductive import SizePrior, pooled, size_hinge, size_prior, soft_sizes, support_volumes


pytestmark = pytest.mark.usefixtures("single_thread")


def foundation(factory=plain3d, seed=0):
    torch.manual_seed(seed)
    return factory()


def _randomise(module, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


# --- the black box ----------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", ["linear_probe", "spatial_adapter"])
@pytest.mark.parametrize("factory", [plain3d, resenc3d, plain2d])
def test_no_foundation_parameter_learns_or_gets_a_gradient(factory, adapter):
    net = foundation(factory)
    before = copy.deepcopy(net.state_dict())
    bb = build_black_box(net, adapter, 2)
    _randomise(bb.adapter)  # as if trained, so every adapter tensor gets a gradient
    frozen = list(bb.foundation.network.parameters()) + list(bb.foundation.head.parameters())
    assert all(not p.requires_grad for p in frozen)
    assert not {id(p) for p in frozen} & {id(p) for p in bb.parameters()}  # never reachable by an optimiser
    assert all(k.startswith("adapter.") or k == "_extra_state" for k in bb.state_dict())
    x = torch.randn((2, 1, 32, 32) if factory is plain2d else (2, 1, 16, 16, 16))
    optimiser = torch.optim.AdamW(bb.parameters(), lr=1e-2, weight_decay=0)
    adapter_before = copy.deepcopy(bb.adapter.state_dict())
    bb.train()
    assert not bb.foundation.network.training  # its norm layers stay in eval mode
    for _ in range(3):
        optimiser.zero_grad()
        bb(x).square().mean().backward()
        optimiser.step()
    assert all(p.grad is None for p in frozen)
    after = bb.foundation.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)  # decoder.seg_layers.N is now the Identity
    head = [k for k in before if k.startswith("decoder.seg_layers.") and k not in after]
    assert head and all(torch.equal(before[k], bb.foundation.head.state_dict()[k.rsplit(".", 1)[1]])
                        for k in head if k.startswith(f"decoder.seg_layers.{len(net.decoder.seg_layers) - 1}."))
    assert all(not torch.equal(v, bb.adapter.state_dict()[k]) for k, v in adapter_before.items())


def test_counts_include_the_queried_foundation():
    net = foundation()
    total_foundation = sum(p.numel() for p in net.parameters())
    c = net.decoder.seg_layers[-1].in_channels
    bb = build_black_box(net, "spatial_adapter", 2)
    adapter = 2 * (c * c * 27 + c) + 2 * c + 2
    assert count_parameters(bb) == (adapter, adapter + total_foundation)


def test_spatial_adapter_starts_as_the_linear_probe_and_the_foundation_head_gives_its_logits():
    net = foundation()
    x = torch.randn(1, 1, 16, 16, 16)
    net.decoder.deep_supervision = False
    expected = net.eval()(x)
    bb = build_black_box(net, "spatial_adapter", 3)
    with torch.no_grad():
        bb.adapter.head.load_state_dict(bb.foundation.head.state_dict())
    assert torch.allclose(bb.eval()(x), expected, atol=1e-5)
    assert torch.allclose(bb.foundation.logits(x), expected, atol=1e-5)


def test_primus_is_refused_in_one_sentence():
    with pytest.raises(InputError, match=r"^Black-box methods read the last decoder features of a conv U-Net[^\n]*\.$"):
        build_black_box(primus(), "linear_probe", 2)


def test_a_checkpoint_from_another_foundation_is_refused():
    a = build_black_box(foundation(), "linear_probe", 2, sha256="a" * 64)
    b = build_black_box(foundation(), "linear_probe", 2, sha256="b" * 64)
    # retraining or adopting again does not bring that foundation back: the sentence names the file it needs
    with pytest.raises(InputError, match=f"trained on the foundation with sha256 {'a' * 64}.*put the checkpoint "
                                         f"with sha256 {'a' * 64} where the model folder's plans.json records"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(build_black_box(foundation(), "linear_probe", 2, sha256="b" * 64).state_dict())


# --- the feature cache ------------------------------------------------------------------------

def test_cached_features_of_one_tile_equal_the_online_features():
    bb = build_black_box(foundation(), "linear_probe", 2)
    image = torch.randn(1, 16, 16, 16)
    cached = sliding_window_features(bb.foundation, bb.foundation.channels, image, (16, 16, 16), torch.device("cpu"))
    online = bb.foundation(image[None])[0]
    assert cached.dtype == torch.float16 and cached.shape == online.shape
    assert torch.allclose(cached.float(), online, atol=2e-2, rtol=1e-2)


def test_a_linear_head_on_cached_features_gives_nnunets_sliding_window_logits():
    """Tiles, steps and Gaussian blending are nnU-Net's own: a 1x1x1 head commutes with the blending,
    so the foundation's head on the cached features is what nnUNetPredictor gives for its logits."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    net = foundation()
    pm = plans_manager("plain")
    cm = pm.get_configuration("3d_fullres")
    image = torch.randn(1, 23, 30, 37)  # several overlapping 16^3 tiles, and padding on no axis
    reference = copy.deepcopy(net)
    reference.decoder.deep_supervision = False
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.manual_initialization(reference.eval(), pm, cm, None, {"labels": {"background": 0, "a": 1, "b": 2}},
                                    "nnUNetTrainer", None)
    expected = predictor.predict_sliding_window_return_logits(image).float()
    bb = build_black_box(net, "linear_probe", 3)
    cached = sliding_window_features(bb.foundation, bb.foundation.channels, image, (16, 16, 16), torch.device("cpu"))
    logits = bb.foundation.head(cached.float()[None])[0]
    assert logits.shape == expected.shape
    # away from the volume's corners, where nnU-Net's fp16 blending keeps almost no precision
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert torch.allclose(logits[inner], expected[inner], atol=3e-2, rtol=2e-2), (logits - expected)[inner].abs().max()


def test_small_volumes_are_padded_to_the_patch_and_cropped_back():
    bb = build_black_box(foundation(), "linear_probe", 2)
    image = torch.randn(1, 9, 16, 12)
    cached = sliding_window_features(bb.foundation, bb.foundation.channels, image, (16, 16, 16), torch.device("cpu"))
    assert cached.shape == (bb.foundation.channels, 9, 16, 12)


def test_2d_networks_cache_slice_by_slice():
    bb = build_black_box(foundation(plain2d), "linear_probe", 2)
    image = torch.randn(1, 3, 32, 32)
    cached = sliding_window_features(bb.foundation, bb.foundation.channels, image, (32, 32), torch.device("cpu"))
    online = bb.foundation(image.transpose(0, 1))  # the 3 slices as a batch
    assert torch.allclose(cached.float(), online.transpose(0, 1), atol=2e-2, rtol=1e-2)


class _Cases:
    """nnU-Net's dataset interface over arrays (what the preprocessed dataset gives)."""

    def __init__(self, segs):
        self.segs = segs
        self.identifiers = sorted(segs)

    def load_case(self, k):
        seg = self.segs[k]
        locations = {c: np.argwhere(seg == c)[::7] for c in (1,)}
        return None, seg, None, {"class_locations": locations}


@pytest.mark.parametrize("on_disk", [False, True])
def test_spatial_augmentation_moves_cached_features_and_labels_together(tmp_path, on_disk):
    """Features that encode their own label (one-hot) must still agree with the label after
    nnU-Net's data loader has cropped, rotated, scaled and mirrored them."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_fseft.trainers.blackbox import spatial_only
    rng = np.random.default_rng(0)
    segs = {}
    for k in ("a", "b"):
        seg = np.zeros((1, 24, 24, 24), dtype=np.int16)
        c = rng.integers(6, 18, 3)
        zz, yy, xx = np.mgrid[:24, :24, :24]
        seg[0][(zz - c[0]) ** 2 / 25 + (yy - c[1]) ** 2 / 16 + (xx - c[2]) ** 2 / 9 <= 1] = 1
        segs[k] = seg
    store = FeatureStore(str(tmp_path / "cache") if on_disk else "")
    for k, seg in segs.items():
        store.put(k, torch.from_numpy(np.concatenate([seg == 0, seg == 1]).astype(np.float32)))
    transforms = nnUNetTrainer.get_training_transforms(
        (16, 16, 16), (-np.pi, np.pi), None, (0, 1, 2), False, use_mask_for_norm=[False])
    n_before = len(transforms.transforms)
    transforms = spatial_only(transforms, -1)
    kinds = [type(t).__name__ for t in transforms.transforms]
    assert kinds == ["SpatialTransform", "MirrorTransform"] and n_before > len(kinds)
    lm = plans_manager("plain").get_label_manager({"labels": {"background": 0, "organ": 1}})
    loader = nnUNetDataLoader(FeatureDataset(_Cases(segs), store), 4, (24, 24, 24), (16, 16, 16), lm,
                              oversample_foreground_percent=1.0, transforms=transforms)
    agree, with_foreground = [], 0
    for _ in range(5):
        batch = loader.generate_train_batch()
        assert batch["data"].shape == (4, 2, 16, 16, 16)
        predicted, target = batch["data"].argmax(1), batch["target"][:, 0]
        inside = target >= 0  # -1: rotated in from outside the crop, where the features are 0
        agree.append((predicted == target)[inside].float().mean().item())
        with_foreground += int((batch["target"] == 1).any())
    assert min(agree) > 0.97, agree  # trilinear features vs nearest labels differ only on borders
    assert with_foreground == 5  # foreground oversampling reads the labels' locations
    store.clear()
    assert not (tmp_path / "cache").exists()


# --- label matching and head initialisation ---------------------------------------------------


def test_size_prior_is_the_mean_volume_of_each_labels_largest_component():
    segs = []
    for n in (10, 20, 30):  # class 1: n voxels in a row, plus a stray island of 3; class 2: 5 voxels
        s = np.zeros((8, 8, 8), dtype=np.int16)
        s.flat[:n] = 1
        s[7, 7, 5:8] = 1
        s[3, 3, :5] = 2
        segs.append(s)
    volumes = support_volumes(segs, 3, voxel_volume=2.0)
    assert volumes.tolist() == [[20, 10], [40, 10], [60, 10]]  # the islands are left out
    assert size_prior(volumes).tolist() == [40, 10]
    assert support_volumes([np.zeros((4, 4, 4), np.int16)], 2, 1.0).tolist() == [[0]]  # absent: 0


def test_size_hinge_is_the_relative_error_beyond_the_margin():
    prior = torch.tensor([100.0, 50.0])
    for inside in ([70.0, 35.0], [100.0, 50.0], [140.0, 70.0]):  # |S - S_hat| / max(S, S_hat) <= 0.3
        assert size_hinge(torch.tensor(inside), prior, 0.3).item() == 0.0
    small = torch.tensor([50.0, 50.0], requires_grad=True)
    loss = size_hinge(small, prior, 0.3)
    loss.backward()
    assert loss.item() == pytest.approx((50 / 100 - 0.3) / 2)
    assert small.grad[0] < 0 and small.grad[1] == 0  # gradient descent grows the too-small organ
    large = torch.tensor([1000.0, 50.0], requires_grad=True)
    hinge = size_hinge(large, prior, 0.3)
    hinge.backward()
    assert hinge.item() == pytest.approx((900 / 1000 - 0.3) / 2) and hinge.item() < 0.5  # bounded, however large
    assert large.grad[0] > 0  # and shrinks the too-large one
    absent = torch.tensor([5.0, 50.0], requires_grad=True)
    assert size_hinge(absent, torch.tensor([0.0, 50.0]), 0.3).item() == 0.0  # S = 0: no prior


def test_query_features_are_pooled_by_two_and_keep_their_volume():
    features = torch.rand(3, 5, 8, 7, dtype=torch.float16)
    small = pooled(features)
    assert small.shape == (3, 3, 4, 4) and small.dtype == torch.float16
    assert torch.allclose(small[:, :2, :, :3].float(), features[:, :4, :, :6].float()
                          .reshape(3, 2, 2, 4, 2, 3, 2).mean((2, 4, 6)), atol=1e-3)


def test_the_size_step_moves_a_too_small_organ_and_none_inside_its_band():
    torch.manual_seed(0)
    adapter = LinearProbe(nn.Conv3d, 4, 2)
    with torch.no_grad():
        adapter.head.bias.copy_(torch.tensor([3.0, -3.0]))  # almost nothing predicted as the organ
    query = torch.randn(4, 6, 6, 6).numpy()
    optimizer = torch.optim.SGD(adapter.parameters(), lr=1.0)
    size = lambda: float(soft_sizes(adapter(torch.from_numpy(query)[None]), 8.0)[0])
    prior = SizePrior([query], np.array([0.5 * 216 * 8.0]), voxel_volume=1.0, margin=0.3, weight=1.0)
    before = size()
    hinge = prior.step(adapter, optimizer)
    assert hinge > 0 and size() > before  # a pooled voxel is 8 voxels of volume 1
    inside = SizePrior([query], np.array([size()]), voxel_volume=1.0, margin=0.3, weight=1.0)
    weights = [p.detach().clone() for p in adapter.parameters()]
    momentum = torch.optim.AdamW(adapter.parameters(), lr=1.0)
    assert inside.step(adapter, momentum) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(weights, adapter.parameters()))


def test_soft_sizes_count_probability_mass_in_mm3():
    logits = torch.full((1, 2, 4, 4, 4), -20.0)
    logits[0, 0] = 20.0
    logits[0, 1, :2] = 40.0  # half the voxels are class 1
    assert soft_sizes(logits, 1.5).tolist() == pytest.approx([32 * 1.5], rel=1e-4)


def _black_box_plans():
    plans = {**copy.deepcopy(plans_manager("plain").plans), "continue_training": False}
    plans[PLANS_KEY] = {"configuration": "3d_fullres", "trainer": "nnUNetTrainer", "checkpoint": "unused.pth",
                        "labels": {"background": 0, "organ": 1}}
    return plans


def test_cached_feature_patches_leave_what_lies_outside_the_volume_to_the_loss_to_ignore(tmp_path, monkeypatch):
    """A case smaller than the patch: nnU-Net pads it with features of 0 (never the foundation's
    features) and label -1, which now stays -1 (not background), and the black-box loss ignores it."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_fseft.trainers.blackbox import spatial_only
    seg = np.zeros((1, 10, 10, 10), dtype=np.int16)
    seg[0, 3:7, 3:7, 3:7] = 1
    store = FeatureStore("")
    store.put("a", torch.from_numpy(np.concatenate([seg == 0, seg == 1]).astype(np.float32) + 1))
    transforms = spatial_only(nnUNetTrainer.get_training_transforms(
        (16, 16, 16), (-np.pi, np.pi), None, (0, 1, 2), False, use_mask_for_norm=[False]), -1)
    lm = plans_manager("plain").get_label_manager({"labels": {"background": 0, "organ": 1}})
    loader = nnUNetDataLoader(FeatureDataset(_Cases({"a": seg}), store), 2, (16, 16, 16), (16, 16, 16), lm,
                              oversample_foreground_percent=1.0, transforms=transforms)
    batch = loader.generate_train_batch()
    # inside, the features sum to 3 (one-hot + 1); trilinear sampling blends the two on the borders
    total, target = batch["data"].sum(1), batch["target"][:, 0]
    outside, inside = total.abs() < 1e-3, (total - 3).abs() < 1e-3
    assert outside.float().mean() > 0.3 and inside.float().mean() > 0.05
    assert (target[outside] == -1).all() and (target[inside] >= 0).all()

    from nnunet_fseft.trainers import nnUNetTrainerFSEFT_LinearProbe
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    trainer = nnUNetTrainerFSEFT_LinearProbe(_black_box_plans(), "3d_fullres", 0,
                                             {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                              "numTraining": 2, "file_ending": ".nii.gz"}, torch.device("cpu"))
    loss = trainer._build_loss()
    logits = torch.randn(2, 2, 16, 16, 16)
    changed = torch.where(outside[:, None], torch.full_like(logits, 5.0), logits)  # any logits outside
    assert torch.isfinite(loss(logits, target[:, None])) and torch.equal(loss(logits, target[:, None]),
                                                                           loss(changed, target[:, None]))


def test_the_gpu_data_switch_leaves_cached_feature_methods_on_their_own_path(tmp_path, monkeypatch):
    """nnUNet_fseft_gpu_data=1 is one switch for every method of a session (a benchmark): a method
    that trains on cached features keeps its CPU path, one on online features takes the GPU path,
    and a class that itself asks for the GPU path on cached features is refused in one sentence."""
    from nnunet_fseft.trainers import nnUNetTrainerFSEFT_LinearProbe, nnUNetTrainerFSEFT_SpatialAdapterOnline
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_fseft_gpu_data", "1")

    def make(cls):
        return cls(_black_box_plans(), "3d_fullres", 0, {"channel_names": {"0": "CT"}, "labels": {"background": 0,
                   "organ": 1}, "numTraining": 2, "file_ending": ".nii.gz"}, torch.device("cpu"))
    cached = make(nnUNetTrainerFSEFT_LinearProbe)
    assert cached.gpu_data is False
    assert "does not apply to nnUNetTrainerFSEFT_LinearProbe" in open(cached.log_file).read()
    assert make(nnUNetTrainerFSEFT_SpatialAdapterOnline).gpu_data is True

    class AsksForIt(nnUNetTrainerFSEFT_LinearProbe):
        gpu_data = True
    monkeypatch.delenv("nnUNet_fseft_gpu_data")
    with pytest.raises(InputError, match=r"^AsksForIt sets gpu_data = True but trains on cached features[^\n]*\.$"):
        make(AsksForIt)
