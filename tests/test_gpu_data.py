"""The GPU data path's augmentation, run on CPU tensors: it reads nnU-Net's own training pipeline,
draws from the same ranges with the same probabilities, and moves images and labels as nnU-Net's
transforms do."""
import copy

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from scipy.stats import ks_2samp

from helpers import TRAIN_ENV, run
from nnunet_fseft.environment import gpu_data_enabled
from nnunet_fseft.errors import InputError
from nnunet_fseft.plans import PLANS_NAME
from nnunet_fseft.training.gpu_data.augmentation import DeviceAugmentation
from nnunet_fseft.training.gpu_data.intensity import (Brightness, Contrast, Gamma, GaussianBlur, GaussianNoise,
                                                      LowResolution)

PATCH = (24, 28, 32)
DS_SCALES = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
ROTATION = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)  # nnU-Net's 3d rotation range


def pipeline(dummy_2d=False, mask=False):
    """The training pipeline nnU-Net builds for a 3d configuration with two foreground labels."""
    return nnUNetTrainer.get_training_transforms(
        PATCH, ROTATION, DS_SCALES, (0, 1, 2), dummy_2d, use_mask_for_norm=[mask], is_cascaded=False,
        foreground_labels=[1, 2], regions=None, ignore_label=None)


def nnunet_transforms(p):
    """{type name: (transform, apply_probability)} of an nnU-Net pipeline."""
    out = {}
    for t in p.transforms:
        prob = 1.
        if isinstance(t, RandomTransform):
            t, prob = t.transform, t.apply_probability
        out.setdefault(type(t).__name__, []).append((t, prob))
    return out


def batch(b=2, shape=(34, 38, 42), seed=0):
    """A CT-like sample cut bigger than the patch (as nnU-Net's loader cuts it) with -1 padding at one side."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((b, 1, *shape), generator=g)
    seg = torch.zeros((b, 1, *shape), dtype=torch.int16)
    seg[:, :, 8:20, 10:25, 12:30] = 1
    seg[:, :, 18:28, 20:30, 5:15] = 2
    seg[:, :, :, :, :3] = -1
    image[:, :, :, :, :3] = 0
    return image, seg


def test_switch_reads_attribute_and_environment(monkeypatch):
    monkeypatch.delenv("nnUNet_fseft_gpu_data", raising=False)
    assert gpu_data_enabled(False) is False and gpu_data_enabled(True) is True
    monkeypatch.setenv("nnUNet_fseft_gpu_data", "1")
    assert gpu_data_enabled(False) is True
    monkeypatch.setenv("nnUNet_fseft_gpu_data", "0")
    assert gpu_data_enabled(True) is False
    monkeypatch.setenv("nnUNet_fseft_gpu_data", "")  # empty reads as unset
    assert gpu_data_enabled(True) is True and gpu_data_enabled(False) is False
    monkeypatch.setenv("nnUNet_fseft_gpu_data", "maybe")
    with pytest.raises(InputError, match="nnUNet_fseft_gpu_data must be 1 or 0"):
        gpu_data_enabled(False)


def test_reads_every_transform_of_nnunets_pipeline():
    p = pipeline()
    ops = DeviceAugmentation(p).ops
    assert [type(o).__name__ for o in ops] == [
        "Spatial", "GaussianNoise", "GaussianBlur", "Brightness", "Contrast", "LowResolution", "Gamma", "Gamma",
        "Mirror", "RemoveLabel", "DeepSupervisionTargets"]
    nn = nnunet_transforms(p)
    assert ops[0].t is nn["SpatialTransform"][0][0] and ops[0].patch_size == PATCH
    for op, name in [(ops[1], "GaussianNoiseTransform"), (ops[2], "GaussianBlurTransform"),
                     (ops[3], "MultiplicativeBrightnessTransform"), (ops[4], "ContrastTransform"),
                     (ops[5], "SimulateLowResolutionTransform")]:
        assert (op.t, op.p) == nn[name][0], name  # the very transform objects and probabilities nnU-Net uses
    assert [(o.t, o.p) for o in ops[6:8]] == nn["GammaTransform"]
    assert type(DeviceAugmentation(pipeline(mask=True)).ops[-3]).__name__ == "MaskImage"


def test_refuses_what_it_cannot_do_on_the_device():
    p = pipeline()
    p.transforms[0].p_elastic_deform = 0.2
    with pytest.raises(InputError, match="elastic deformation.*nnUNet_fseft_gpu_data=0"):
        DeviceAugmentation(p)
    regions = nnUNetTrainer.get_training_transforms(
        PATCH, ROTATION, DS_SCALES, (0, 1, 2), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1, 2], regions=[(1, 2), (2,)], ignore_label=None)
    with pytest.raises(InputError, match="ConvertSegmentationToRegionsTransform"):
        DeviceAugmentation(regions)


def test_spatial_parameters_come_from_nnunets_ranges():
    np.random.seed(0)
    op = DeviceAugmentation(pipeline()).ops[0]
    ours = op.draw(4000, 1, PATCH)
    t = nnunet_transforms(pipeline())["SpatialTransform"][0][0]
    rotated = [d for d in ours if d is not None and any(a != 0 for a in d[0])]
    scaled = [d for d in ours if d is not None and d[1][0] != 1]
    # p_rotation = p_scaling = 0.2, independent: 36 % of patches move
    assert abs(len(rotated) / 4000 - t.p_rotation) < 0.025 and abs(len(scaled) / 4000 - t.p_scaling) < 0.025
    assert abs(sum(d is not None for d in ours) / 4000 - 0.36) < 0.03
    angles = np.array([d[0] for d in rotated])
    assert angles.min() >= ROTATION[0] and angles.max() <= ROTATION[1] and angles.std() > 0.25
    scales = np.array([d[1] for d in scaled])
    assert (scales[:, 0] == scales[:, 1]).all() and (scales[:, 1] == scales[:, 2]).all()  # synchronised axes
    assert scales.min() >= 0.7 and scales.max() <= 1.4
    # ... and the same distribution as nnU-Net's own draws (its affine's scale = det^(1/3))
    np.random.seed(1)
    theirs = [t.get_parameters(image=torch.zeros((1, *PATCH)))["affine"] for _ in range(1500)]
    their_scales = [abs(np.linalg.det(a)) ** (1 / 3) for a in theirs if a is not None]
    our_scales = [abs(np.linalg.det(op.affine(*d))) ** (1 / 3) for d in ours if d is not None]
    assert ks_2samp(our_scales, their_scales).pvalue > 0.01


@pytest.mark.parametrize("op_type, nnunet_name, key, their_key", [
    (GaussianNoise, "GaussianNoiseTransform", "sigma", "sigmas"),
    (Brightness, "MultiplicativeBrightnessTransform", "multiplier", "multipliers"),
    (Contrast, "ContrastTransform", "factor", "multipliers"),
    (Gamma, "GammaTransform", "gamma", "gamma"),
    (LowResolution, "SimulateLowResolutionTransform", "scale", "scales"),
    (GaussianBlur, "GaussianBlurTransform", "sigma", "sigmas"),
])
def test_intensity_parameters_come_from_nnunets_ranges(op_type, nnunet_name, key, their_key):
    ops = [o for o in DeviceAugmentation(pipeline()).ops if isinstance(o, op_type)]
    op = ops[-1]  # the second gamma is the one without inversion
    np.random.seed(2)
    torch.manual_seed(2)
    n = 3000
    drawn = op.draw(n, 1, PATCH)
    values = np.asarray(drawn[key], dtype=float).reshape(n, -1)
    neutral = 0. if key == "sigma" else 1.
    applied = (values != neutral).any(1) if "on" not in drawn else drawn["on"].reshape(n)
    per_channel = getattr(op.t, "p_per_channel", 1)
    assert abs(applied.mean() - op.p * per_channel) < 0.03, (applied.mean(), op.p, per_channel)
    ours = values[applied].ravel()
    theirs = []
    for _ in range(600):
        params = op.t.get_parameters(image=torch.zeros((1, *PATCH)))
        v = params[their_key]
        if v is None or (hasattr(v, "__len__") and len(v) == 0):
            continue
        theirs.extend(np.asarray(v, dtype=float).ravel())
    theirs = np.array(theirs)
    if op_type is LowResolution:  # nnU-Net draws one scale for all axes (synchronize_axes)
        ours = values[applied].reshape(-1, 3)[:, 0]
        theirs = theirs.reshape(-1, 3)[:, 0]
    assert ours.min() >= theirs.min() - 0.05 and ours.max() <= theirs.max() + 0.05
    assert ks_2samp(ours, theirs).pvalue > 0.001, (ours.mean(), theirs.mean())


@pytest.mark.parametrize("op_type, settings", [
    (GaussianBlur, {"blur_sigma": (0.8, 0.8)}),
    (GaussianBlur, {"blur_sigma": lambda *_, dim: {1: 0.5, 2: 0.8, 3: 1.1}[dim]}),  # one sigma per axis
    (Brightness, {"multiplier_range": (1.2, 1.2)}),
    (Contrast, {"contrast_range": (1.3, 1.3)}),
    (Contrast, {"contrast_range": (0.7, 0.7)}),
    (Gamma, {"gamma": (1.4, 1.4), "p_invert_image": 1}),
    (Gamma, {"gamma": (0.8, 0.8), "p_invert_image": 0}),
    (LowResolution, {"scale": (0.6, 0.6)}),
])
def test_intensity_ops_change_images_as_nnunet(op_type, settings):
    name = {GaussianBlur: "GaussianBlurTransform", Brightness: "MultiplicativeBrightnessTransform",
            Contrast: "ContrastTransform", Gamma: "GammaTransform", LowResolution: "SimulateLowResolutionTransform"}
    t = copy.deepcopy(nnunet_transforms(pipeline())[name[op_type]][-1][0])
    t.p_per_channel = 1
    for k, v in settings.items():
        setattr(t, k, v)
    image = torch.nn.functional.avg_pool3d(batch(b=1)[0], 3, 1, 1)[..., :PATCH[0], :PATCH[1], :PATCH[2]] * 100
    np.random.seed(4)
    op = op_type(t, 1.)
    ours, _ = op.apply(image.clone(), None, op.draw(1, 1, PATCH))
    np.random.seed(4)
    theirs = t(image=image[0].clone())["image"]
    assert (ours[0] - theirs).abs().max() < 1e-3 * image.abs().max(), (ours[0] - theirs).abs().max()
    assert not torch.equal(ours, image)


def test_noise_has_the_drawn_strength():
    t = copy.deepcopy(nnunet_transforms(pipeline())["GaussianNoiseTransform"][0][0])
    t.noise_variance = (0.3, 0.3)
    op = GaussianNoise(t, 1.)
    image = torch.zeros((2, 1, *PATCH))
    out, _ = op.apply(image, None, op.draw(2, 1, PATCH))
    their_std = t(image=image[0].clone())["image"].std()
    assert abs(out.std() - 0.3) < 0.01 and abs(their_std - 0.3) < 0.01  # both use the drawn value as sigma


def _still(p):
    """nnU-Net's pipeline with every random transform switched off."""
    p = copy.deepcopy(p)
    spatial = next(t for t in p.transforms if type(t).__name__ == "SpatialTransform")
    spatial.p_rotation = spatial.p_scaling = 0
    for t in p.transforms:
        if isinstance(t, RandomTransform):
            t.apply_probability = 0
        if type(t).__name__ == "MirrorTransform":
            t.allowed_axes = ()
    return p


def _nnunet(p, image, seg):
    out = [p(image=image[i].clone(), segmentation=seg[i].clone()) for i in range(image.shape[0])]
    return torch.stack([o["image"] for o in out]), [torch.stack([o["segmentation"][k] for o in out])
                                                     for k in range(len(DS_SCALES))]


def test_without_random_transforms_it_equals_nnunet():
    image, seg = batch()
    p = _still(pipeline())
    ours_image, ours_seg = DeviceAugmentation(p)(image.clone(), seg.clone())
    theirs_image, theirs_seg = _nnunet(p, image, seg)
    assert ours_image.shape == theirs_image.shape == (2, 1, *PATCH)
    assert torch.equal(ours_image, theirs_image)
    assert [s.shape for s in ours_seg] == [s.shape for s in theirs_seg]
    for a, b in zip(ours_seg, theirs_seg):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("angle, scale", [(0.4, 1.0), (0.0, 1.3), (-0.3, 0.8)])
def test_rotation_and_scaling_move_image_and_labels_as_nnunet(angle, scale):
    image, seg = batch(b=1)
    image = torch.nn.functional.avg_pool3d(image, 5, 1, 2)  # smooth, so interpolation differences stay small
    p = _still(pipeline())
    s = p.transforms[0]
    s.p_rotation, s.rotation = (1, (angle, angle)) if angle else (0, s.rotation)
    s.p_scaling, s.scaling = (1, (scale, scale)) if scale != 1 else (0, s.scaling)
    ours_image, ours_seg = DeviceAugmentation(p)(image.clone(), seg.clone())
    theirs_image, theirs_seg = _nnunet(p, image, seg)
    assert (ours_image - theirs_image).abs().max() < 1e-4
    agree = (ours_seg[0] == theirs_seg[0]).float().mean()
    assert agree > 0.995, agree
    assert set(ours_seg[0].unique().tolist()) <= {0, 1, 2}  # the padding label -1 became background


def test_full_augmentation_runs_on_cpu_tensors():
    np.random.seed(3)
    torch.manual_seed(3)
    image, seg = batch(b=4)
    aug = DeviceAugmentation(pipeline())
    changed = 0
    for _ in range(5):
        out_image, targets = aug(image.clone(), seg.clone())
        assert out_image.shape == (4, 1, *PATCH) and out_image.dtype == torch.float32
        assert torch.isfinite(out_image).all()
        assert [t.shape[2:] for t in targets] == [(24, 28, 32), (12, 14, 16), (6, 7, 8)]
        assert all(t.dtype == torch.int16 and set(t.unique().tolist()) <= {0, 1, 2} for t in targets)
        assert (targets[0] == 1).any() and (targets[0] == 2).any()
        changed += int(not torch.equal(out_image, _nnunet(_still(pipeline()), image, seg)[0]))
    assert changed == 5  # mirroring alone changes 7 of 8 samples


def test_dummy_2d_moves_only_within_slices():
    image, seg = batch(b=1)
    p = _still(pipeline(dummy_2d=True))
    s = next(t for t in p.transforms if type(t).__name__ == "SpatialTransform")
    s.p_rotation, s.rotation = 1, (0.5, 0.5)
    # nnU-Net's dummy-2d loader cuts the first axis at the patch size already
    image, seg = image[:, :, 5:5 + PATCH[0]], seg[:, :, 5:5 + PATCH[0]]
    ours_image, ours_seg = DeviceAugmentation(p)(image.clone(), seg.clone())
    theirs_image, theirs_seg = _nnunet(p, image, seg)
    assert ours_image.shape == theirs_image.shape == (1, 1, *PATCH)
    assert (ours_image - theirs_image).abs().max() < 1e-4
    assert (ours_seg[0] == theirs_seg[0]).float().mean() > 0.995


def test_dummy_2d_with_every_transform_on():
    """After the in-plane spatial transform, the other ops see the 3D patch again, as in nnU-Net."""
    np.random.seed(5)
    p = pipeline(dummy_2d=True)
    for t in p.transforms:
        if isinstance(t, RandomTransform):
            t.apply_probability = 1
            t.transform.p_per_channel = 1 if hasattr(t.transform, "p_per_channel") else None
    aug = DeviceAugmentation(p)
    image, seg = batch(b=2)
    image, seg = image[:, :, 5:5 + PATCH[0]], seg[:, :, 5:5 + PATCH[0]]
    low_res = next(o for o in aug.ops if isinstance(o, LowResolution))
    scale = low_res.draw(2, 1, (PATCH[0],) + PATCH[1:])["scale"]
    assert scale.shape == (2, 1, 3) and (scale[..., 0] == 1).all() and (scale[..., 1:] < 1).all()
    blur = next(o for o in aug.ops if isinstance(o, GaussianBlur))
    assert (blur.draw(2, 1, PATCH)["sigma"] > 0).all()  # all three axes blurred
    out_image, targets = aug(image, seg)
    assert out_image.shape == (2, 1, *PATCH) and torch.isfinite(out_image).all()
    assert [t.shape[2:] for t in targets] == [(24, 28, 32), (12, 14, 16), (6, 7, 8)]


def test_training_on_the_gpu_data_path_through_nnunet(target, workspace):
    """nnUNetv2_train with nnUNet_fseft_gpu_data=1 (on CPU here): the support set is held by the
    device loader, and training and validation finish."""
    env = {**TRAIN_ENV, "nnUNet_fseft_gpu_data": "1", "nnUNet_fseft_epochs": "1"}
    # nnUNetv2_train is nnU-Net's command: the error is the last line of its traceback, before any training
    # (black-box methods on cached features keep their own path under the switch: test_blackbox.py)
    p = run(["nnUNetv2_train", target, "3d_fullres", "1", "-p", PLANS_NAME, "-tr", "nnUNetTrainerFSEFT_LoRA",
             "-device", "cpu"], env={**env, "nnUNet_fseft_gpu_data": "yes please"}, check=False)
    assert (p.returncode != 0 and "nnUNet_fseft_gpu_data must be 1 or 0" in p.stdout.strip().splitlines()[-1]
            and "Epoch 0" not in p.stdout)
    out = run(["nnUNetv2_train", target, "3d_fullres", "1", "-p", PLANS_NAME, "-tr", "nnUNetTrainerFSEFT_LoRA",
               "-device", "cpu"], env=env).stdout
    assert "GPU data path: 1 support cases held on cpu" in out
    fold = workspace / "nnUNet_results" / "Dataset501_SynthCTB" / "nnUNetTrainerFSEFT_LoRA__FSEFTPlans__3d_fullres" / "fold_1"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
