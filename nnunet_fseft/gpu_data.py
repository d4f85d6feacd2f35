"""Few-shot data path on the GPU: `gpu_data = True` on a trainer, or nnUNet_fseft_gpu_data=1.

With K <= 10 the preprocessed support set fits in GPU memory, so it is loaded onto the device
once, and patches are cut and augmented there, a batch at a time: training no longer waits on
CPU workers. What is sampled stays nnU-Net's:
- cases and patch locations: `nnUNetDataLoader`'s own `get_indices` and `get_bbox` (foreground
  oversampling included); only the crop runs on the device;
- augmentation: the pipeline the trainer's `get_training_transforms` builds is read transform
  by transform, and each is replaced by a batched device op that draws its parameters from that
  transform's own ranges and probabilities (batchgeneratorsv2's `sample_scalar` and numpy's
  global generator, as nnU-Net's workers do) and applies them with torch ops on the batch's device.
  batchgeneratorsv2's transforms themselves cannot run there: SpatialTransform builds its grid
  on the CPU and reads label values through numpy.
A transform without a device op (cascade, regions, elastic deformation...) is refused before
training starts. CPU augmentation stays the default and the fallback.
"""
import os
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.helpers.scalar_type import sample_scalar
from batchgeneratorsv2.transforms.spatial.spatial import create_affine_matrix_2d, create_affine_matrix_3d
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_fseft.errors import InputError

ENV = "nnUNet_fseft_gpu_data"


def gpu_data_enabled(default: bool) -> bool:
    """The trainer's `gpu_data` attribute, unless nnUNet_fseft_gpu_data says otherwise."""
    value = os.environ.get(ENV)
    if value is None:
        return default
    if value.strip().lower() in ("1", "t", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "f", "false", "no", "off", ""):
        return False
    raise InputError(f"{ENV} must be 1 or 0, got '{value}'; fix or unset it.")


class Unsupported(ValueError):
    pass


class ChannelOp:
    """An intensity transform applied per sample with the RandomTransform's probability `p`,
    then per channel with the transform's own `p_per_channel`."""

    def __init__(self, t, p):
        self.t, self.p = t, p

    def _on(self, b: int, c: int) -> np.ndarray:
        applied = np.random.uniform(size=b) < self.p
        return (np.random.uniform(size=(b, c)) < self.t.p_per_channel) & applied[:, None]

    def _values(self, scalar, b: int, c: int) -> np.ndarray:
        """[B, C] draws of one of the transform's RandomScalars, one for all channels if it synchronises them."""
        v = np.array([[sample_scalar(scalar, image=None, channel=k) for k in range(c)] for _ in range(b)], dtype=float)
        if self.t.synchronize_channels:
            v[:] = v[:, :1]
        return v


# ----------------------------------------------------------------------------------------------
# Device ops. Each has draw(b, c, spatial) -> parameters (host numpy, drawn as nnU-Net's transform
# draws them) and apply(image, seg, params) on [B, C, *S] image / [B, 1, *S] int16 segmentation.
# `p` is the RandomTransform's apply_probability around nnU-Net's transform (1 where there is none).
# ----------------------------------------------------------------------------------------------

class Spatial:
    """SpatialTransform: rotation / scaling about the centre of the larger sampled patch, cut to
    the final patch size; images interpolated, labels by interpolated one-hot scores (ties go to
    the nearest neighbour), outside the image padded as nnU-Net's transform pads."""

    def __init__(self, t, dummy_2d: bool):
        if t.p_elastic_deform > 0 or t.random_crop:
            raise Unsupported("elastic deformation and random crops")
        if t.mode_seg not in ("bilinear", "nearest") or t.mode_image not in ("bilinear", "nearest"):
            raise Unsupported(f"interpolation modes {t.mode_image}/{t.mode_seg}")
        if t.padding_mode_image not in ("zeros", "constant") or t.border_mode_seg not in ("zeros", "constant"):
            raise Unsupported(f"padding modes {t.padding_mode_image}/{t.border_mode_seg}")
        self.t, self.dummy_2d = t, dummy_2d
        self.patch_size = tuple(int(i) for i in t.patch_size)
        self.pad_image = float(t.padding_value_image) if t.padding_mode_image == "constant" else 0.
        self.pad_seg = int(t.padding_value_seg) if t.border_mode_seg == "constant" else 0
        self._base_grid = {}

    def draw(self, b: int, c: int, spatial) -> List[Optional[tuple]]:
        """Per sample (rotation angles, scale factors), or None where nothing moves."""
        t, dim = self.t, len(self.patch_size)
        drawn = []
        for _ in range(b):
            rotate, scale = np.random.uniform() < t.p_rotation, np.random.uniform() < t.p_scaling
            angles = [0.] * dim
            if rotate:
                angles = [sample_scalar(t.rotation, image=None, dim=i) for i in range(dim)]
                angles = [a if t.p_rot_per_axis >= 1 or np.random.uniform() <= t.p_rot_per_axis else 0. for a in angles]
            scales = [1.] * dim
            if scale:
                if np.random.uniform() <= t.p_synchronize_scaling_across_axes:
                    scales = [sample_scalar(t.scaling, image=None, dim=None)] * dim
                else:
                    scales = [sample_scalar(t.scaling, image=None, dim=i) for i in range(dim)]
            drawn.append((angles, scales) if rotate or scale else None)
        return drawn

    def affine(self, angles, scales) -> np.ndarray:
        return (create_affine_matrix_3d(angles, scales) if len(self.patch_size) == 3
                else create_affine_matrix_2d(angles[-1], scales))

    def _grid(self, affine: np.ndarray, shape, device) -> torch.Tensor:
        # offsets of the output voxels from the patch centre, moved by the affine, in grid_sample's
        # [-1, 1] units of the input (align_corners=False: the input spans shape voxels)
        if device not in self._base_grid:  # the same for every sample and step
            axes = [torch.linspace((1 - s) / 2, (s - 1) / 2, s, device=device) for s in self.patch_size]
            self._base_grid[device] = torch.stack(torch.meshgrid(axes, indexing="ij"), -1)
        grid = self._base_grid[device] @ torch.as_tensor(affine.T, dtype=torch.float32, device=device)
        grid = grid / torch.as_tensor([s / 2 for s in shape], dtype=torch.float32, device=device)
        return grid.flip(-1)[None]

    def _crop(self, x: torch.Tensor, pad) -> torch.Tensor:
        """Centre crop without interpolation (what nnU-Net does when nothing is rotated or scaled)."""
        shape = x.shape[-len(self.patch_size):]
        start = [s // 2 - p // 2 for s, p in zip(shape, self.patch_size)]
        return _crop_pad(x, start, self.patch_size, pad)

    def _seg(self, seg: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        # seg: [Cs, *S] int16 -> [Cs, *patch]; interpolated one-hot scores of every label present
        # plus the padding label (weight 1 - sum outside the image); the nearest label breaks ties.
        labels = torch.unique(seg)
        labels = torch.unique(torch.cat([labels, labels.new_tensor([self.pad_seg])]))
        onehot = (seg[:, None] == labels.view(1, -1, *[1] * (seg.ndim - 1))).float()
        onehot = onehot.reshape(1, -1, *seg.shape[1:])
        mode = self.t.mode_seg
        scores = F.grid_sample(onehot, grid, mode=mode, padding_mode="zeros",
                               align_corners=self.t.align_corners).reshape(seg.shape[0], len(labels), *self.patch_size)
        pad_index = int((labels == self.pad_seg).nonzero()[0])
        scores[:, pad_index] += 1 - scores.sum(1)
        nearest = F.grid_sample(seg[None].float() - self.pad_seg, grid, mode="nearest", padding_mode="zeros",
                                align_corners=self.t.align_corners)[0] + self.pad_seg
        scores += 1e-3 * (nearest[:, None] == labels.view(1, -1, *[1] * len(self.patch_size)))
        return labels[scores.argmax(1)].to(seg.dtype)

    def apply(self, image, seg, drawn):
        out_image, out_seg = [], []
        for i, moved in enumerate(drawn):
            x, s = image[i], seg[i]
            if self.dummy_2d:  # nnU-Net's Convert3DTo2DTransform: the first axis joins the channels
                x, s = x.reshape(-1, *x.shape[2:]), s.reshape(-1, *s.shape[2:])
            if moved is None:
                x, s = self._crop(x, self.pad_image), self._crop(s, self.pad_seg)
            else:
                grid = self._grid(self.affine(*moved), x.shape[1:], x.device)
                x = F.grid_sample(x[None] - self.pad_image, grid, mode=self.t.mode_image, padding_mode="zeros",
                                  align_corners=self.t.align_corners)[0] + self.pad_image
                s = self._seg(s, grid)
            if self.dummy_2d:
                x = x.reshape(image.shape[1], -1, *x.shape[1:])
                s = s.reshape(seg.shape[1], -1, *s.shape[1:])
            out_image.append(x)
            out_seg.append(s)
        return torch.stack(out_image), torch.stack(out_seg)


class GaussianNoise(ChannelOp):
    def draw(self, b, c, spatial):
        # batchgeneratorsv2 uses the drawn "variance" as the standard deviation
        return {"sigma": np.where(self._on(b, c), self._values(self.t.noise_variance, b, c), 0.)}

    def apply(self, image, seg, params):
        sigma = _column(params["sigma"], image)
        return image + torch.randn_like(image) * sigma, seg


class GaussianBlur(ChannelOp):
    def __init__(self, t, p):
        if t.synchronize_channels or t.synchronize_axes:
            raise Unsupported("synchronised Gaussian blur")
        super().__init__(t, p)

    def draw(self, b, c, spatial):
        on = self._on(b, c)
        dims = len(spatial)
        sigma = np.array([[[sample_scalar(self.t.blur_sigma, None, dim=d + 1) for d in range(dims)]
                           for _ in range(c)] for _ in range(b)])
        return {"sigma": np.where(on[..., None], sigma, 0.)}

    def apply(self, image, seg, params):
        sigma = params["sigma"]  # [B, C, dims], host
        if not (sigma > 0).any():
            return image, seg
        b, c = image.shape[:2]
        x = image.reshape(1, b * c, *image.shape[2:])
        for d in range(sigma.shape[-1]):
            x = _blur_axis(x, sigma[..., d].reshape(-1), d)
        return x.reshape(image.shape), seg


def _blur_axis(x: torch.Tensor, sigma_host: np.ndarray, axis: int, truncate: float = 6) -> torch.Tensor:
    """One separable Gaussian pass along a spatial axis, a sigma per channel (0: unchanged)."""
    # each channel's kernel is as long as nnU-Net's for its sigma (odd, about truncate * sigma);
    # the shared kernel is as long as the longest, zero beyond a channel's own length
    own_half = [_kernel_size(float(v), truncate) // 2 for v in sigma_host]
    half = max(1, max(own_half))
    own_half = torch.as_tensor(own_half, device=x.device)
    sigma = torch.as_tensor(sigma_host, dtype=torch.float32, device=x.device)
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-6)[:, None]) ** 2)
    kernel = kernel * (offsets[None].abs() <= own_half[:, None])
    kernel = torch.where(sigma[:, None] > 0, kernel, (offsets[None] == 0).float())
    kernel = kernel / kernel.sum(1, keepdim=True)
    dims = x.ndim - 2
    shape = [x.shape[1], 1] + [1] * dims
    shape[2 + axis] = kernel.shape[1]
    pad = [0, 0] * dims
    pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = half
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    mode = "reflect" if half < x.shape[2 + axis] else "replicate"  # reflect, as nnU-Net's blur, where it can
    return conv(F.pad(x, pad, mode=mode), kernel.reshape(shape), groups=x.shape[1])


def _kernel_size(sigma: float, truncate: float) -> int:
    """The odd number nearest to sigma * truncate + 0.5, as batchgeneratorsv2 sizes its Gaussian."""
    n = sigma * truncate + 0.5
    r = round(n)
    return r if r % 2 == 1 else (r + 1 if n - r >= 0 else r - 1)


def _column(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """[B, C] host values as a [B, C, 1, ...] tensor on the batch's device."""
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return t.reshape(*t.shape, *[1] * (like.ndim - 2))


class Brightness(ChannelOp):
    def draw(self, b, c, spatial):
        return {"multiplier": np.where(self._on(b, c), self._values(self.t.multiplier_range, b, c), 1.)}

    def apply(self, image, seg, params):
        return image * _column(params["multiplier"], image), seg


def _spatial_stats(image: torch.Tensor):
    flat = image.flatten(2)
    shape = (*image.shape[:2], *[1] * (image.ndim - 2))
    return flat.mean(-1).view(shape), flat.amin(-1).view(shape), flat.amax(-1).view(shape), flat.std(-1).view(shape)


class Contrast(ChannelOp):
    def draw(self, b, c, spatial):
        on = self._on(b, c)
        return {"on": on, "factor": np.where(on, self._values(self.t.contrast_range, b, c), 1.)}

    def apply(self, image, seg, params):
        if not params["on"].any():
            return image, seg
        mean, low, high, _ = _spatial_stats(image)
        out = (image - mean) * _column(params["factor"], image) + mean
        if self.t.preserve_range:
            out = torch.minimum(torch.maximum(out, low), high)
        return torch.where(_column(params["on"], image).bool(), out, image), seg


class LowResolution(ChannelOp):
    def __init__(self, t, p):
        if t.allowed_channels is not None or t.synchronize_channels:
            raise Unsupported("low-resolution simulation on chosen or synchronised channels")
        super().__init__(t, p)

    def draw(self, b, c, spatial):
        on = self._on(b, c)
        dims = len(spatial)
        scale = np.ones((b, c, dims))
        for i, k in zip(*np.nonzero(on)):
            scale[i, k] = ([sample_scalar(self.t.scale, image=None, channel=k, dim=None)] * dims if self.t.synchronize_axes
                           else [sample_scalar(self.t.scale, image=None, channel=k, dim=d) for d in range(dims)])
            if self.t.ignore_axes is not None:
                scale[i, k, list(self.t.ignore_axes)] = 1
        return {"on": on, "scale": scale}

    def apply(self, image, seg, params):
        spatial = image.shape[2:]
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
        image = image.clone()
        for i, k in zip(*np.nonzero(params["on"])):  # shapes differ per channel: no batching
            small = [round(s * f) for s, f in zip(spatial, params["scale"][i, k])]
            down = F.interpolate(image[i, k][None, None], small, mode="nearest-exact")
            image[i, k] = F.interpolate(down, spatial, mode=mode)[0, 0]
        return image, seg


class Gamma(ChannelOp):
    def draw(self, b, c, spatial):
        return {"on": self._on(b, c), "gamma": self._values(self.t.gamma, b, c), "invert": np.random.uniform(size=(b, c)) < self.t.p_invert_image,
                "retain": np.random.uniform(size=(b, c)) < self.t.p_retain_stats}

    def apply(self, image, seg, params):
        if not params["on"].any():
            return image, seg
        sign = _column(np.where(params["invert"], -1., 1.), image)
        x = image * sign
        mean, low, high, std = _spatial_stats(x)
        span = high - low
        y = ((x - low) / span.clamp_min(1e-7)) ** _column(params["gamma"], image) * span + low
        new_mean, _, _, new_std = _spatial_stats(y)
        retained = (y - new_mean) * (std / new_std.clamp_min(1e-7)) + mean
        y = torch.where(_column(params["retain"], image).bool(), retained, y) * sign
        return torch.where(_column(params["on"], image).bool(), y, image), seg


class Mirror:
    def __init__(self, t, p):
        self.t, self.p = t, p

    def draw(self, b, c, spatial):
        return [[a for a in self.t.allowed_axes if np.random.uniform() < 0.5] for _ in range(b)]

    def apply(self, image, seg, axes):
        image, seg = image.clone(), seg.clone()
        for i, a in enumerate(axes):
            if a:
                image[i] = torch.flip(image[i], [d + 1 for d in a])
                seg[i] = torch.flip(seg[i], [d + 1 for d in a])
        return image, seg


class MaskImage:
    def __init__(self, t, p):
        self.t = t

    def draw(self, b, c, spatial):
        return None

    def apply(self, image, seg, _):
        outside = seg[:, self.t.channel_idx_in_seg:self.t.channel_idx_in_seg + 1] < 0
        image = image.clone()
        for a in self.t.apply_to_channels:
            image[:, a:a + 1] = torch.where(outside, torch.full_like(image[:, a:a + 1], self.t.set_outside_to),
                                            image[:, a:a + 1])
        return image, seg


class RemoveLabel:
    def __init__(self, t, p):
        if t.segmentation_channels is not None:
            raise Unsupported("label removal on chosen channels")
        self.t = t

    def draw(self, b, c, spatial):
        return None

    def apply(self, image, seg, _):
        return image, torch.where(seg == self.t.label_value, torch.full_like(seg, self.t.set_to), seg)


class DeepSupervisionTargets:
    def __init__(self, t, p):
        self.t = t

    def draw(self, b, c, spatial):
        return None

    def apply(self, image, seg, _):
        targets = []
        for s in self.t.ds_scales:
            s = s if isinstance(s, (tuple, list)) else [s] * (seg.ndim - 2)
            if all(i == 1 for i in s):
                targets.append(seg)
            else:
                size = [round(i * j) for i, j in zip(seg.shape[2:], s)]
                targets.append(F.interpolate(seg.float(), size, mode="nearest-exact").to(seg.dtype))
        return image, targets


OPS = {"GaussianNoiseTransform": GaussianNoise, "GaussianBlurTransform": GaussianBlur,
       "MultiplicativeBrightnessTransform": Brightness, "ContrastTransform": Contrast,
       "SimulateLowResolutionTransform": LowResolution, "GammaTransform": Gamma, "MirrorTransform": Mirror,
       "MaskImageTransform": MaskImage, "RemoveLabelTransform": RemoveLabel,
       "DownsampleSegForDSTransform": DeepSupervisionTargets}


class DeviceAugmentation:
    """nnU-Net's training pipeline (a ComposeTransforms) as batched ops on the batch's device."""

    def __init__(self, pipeline):
        from batchgeneratorsv2.transforms.utils.random import RandomTransform
        transforms = list(pipeline.transforms)
        self.dummy_2d = any(type(t).__name__ == "Convert3DTo2DTransform" for t in transforms)
        self.ops = []
        for t in transforms:
            p = 1.
            if isinstance(t, RandomTransform):
                t, p = t.transform, t.apply_probability
            name = type(t).__name__
            if name in ("Convert3DTo2DTransform", "Convert2DTo3DTransform"):
                continue
            try:
                if name == "SpatialTransform":
                    self.ops.append(Spatial(t, self.dummy_2d))
                elif name in OPS:
                    self.ops.append(OPS[name](t, p))
                else:
                    raise Unsupported(name)
            except Unsupported as e:
                raise InputError(f"The GPU data path has no device version of this trainer's augmentation ({e}); "
                                 f"train with CPU augmentation: gpu_data = False or {ENV}=0.") from None
        if not self.ops or not isinstance(self.ops[0], Spatial):
            raise InputError(f"The GPU data path needs nnU-Net's SpatialTransform first in the training pipeline; "
                             f"train with CPU augmentation: gpu_data = False or {ENV}=0.")

    def draw(self, b: int, c: int, first_axis: int = 0) -> list:
        """Every op's parameters for a batch of b samples with c channels (host, numpy).
        The ops after the spatial one see the final patch; under dummy-2D that is the 2D patch
        behind the sampled first axis (nnU-Net's Convert2DTo3DTransform restores it)."""
        spatial = ((first_axis,) if self.dummy_2d else ()) + self.ops[0].patch_size
        return [op.draw(b, c, spatial) for op in self.ops]

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, seg: torch.Tensor):
        params = self.draw(image.shape[0], image.shape[1], image.shape[2])
        for op, p in zip(self.ops, params):
            image, seg = op.apply(image, seg, p)
        return image, seg


def _crop_pad(x: torch.Tensor, start, size, value) -> torch.Tensor:
    """x[..., start:start + size] over the trailing axes, padded with value outside x."""
    dims = len(size)
    out = torch.full((*x.shape[:-dims], *size), value, dtype=x.dtype, device=x.device)
    src, dst = [], []
    for s, n, length in zip(start, size, x.shape[-dims:]):
        lo, hi = max(s, 0), min(s + n, length)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(..., *dst)] = x[(..., *src)]
    return out


class DeviceSupportLoader(nnUNetDataLoader):
    """nnU-Net's training loader with every case held on `device`: the same case and patch draws,
    the crop and the augmentation on the device. Returns the batch already there."""

    def __init__(self, dataset, batch_size, patch_size, final_patch_size, label_manager, device,
                 augmentation: DeviceAugmentation, **kwargs):
        super().__init__(dataset, batch_size, patch_size, final_patch_size, label_manager, **kwargs)
        self.augmentation = augmentation
        cases = [dataset.load_case(key) for key in dataset.identifiers]  # arrays stay on disk until read
        if any(seg_prev is not None for _, _, seg_prev, _ in cases):
            raise InputError("The GPU data path does not serve cascades (previous-stage segmentations); "
                             f"train with CPU augmentation: gpu_data = False or {ENV}=0.")
        self.nbytes = sum(int(np.prod(d.shape)) * 4 + int(np.prod(s.shape)) * 2 for d, s, _, _ in cases)
        too_big = support_too_big(self.nbytes, device)
        if too_big:
            raise InputError(f"The GPU data path cannot hold this support set: {too_big}; train with CPU "
                             f"augmentation: gpu_data = False or {ENV}=0.")
        self.cases: Dict[str, tuple] = {
            key: (torch.from_numpy(np.ascontiguousarray(data[:])).float().to(device),
                  torch.from_numpy(np.ascontiguousarray(seg[:])).to(torch.int16).to(device),
                  properties["class_locations"])
            for key, (data, seg, _, properties) in zip(dataset.identifiers, cases)}

    def generate_train_batch(self):
        keys = self.get_indices()
        images, segs = [], []
        for j, key in enumerate(keys):
            data, seg, class_locations = self.cases[key]
            lbs, _ = self.get_bbox(np.array(data.shape[1:]), self.get_do_oversample(j), class_locations)
            images.append(_crop_pad(data, lbs, self.patch_size, 0.))
            segs.append(_crop_pad(seg, lbs, self.patch_size, -1))
        image, seg = torch.stack(images), torch.stack(segs)
        if self.patch_size_was_2d:
            image, seg = image[:, :, 0], seg[:, :, 0]
        image, target = self.augmentation(image, seg)
        return {"data": image.contiguous(), "target": target, "keys": keys}


def support_too_big(nbytes: int, device: torch.device) -> Optional[str]:
    """Why the support set would not fit comfortably on the device, or None."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > 0.25 * free:
        return (f"the support set needs {nbytes / 2 ** 30:.2f} GiB, more than a quarter of the "
                f"{free / 2 ** 30:.2f} GiB free on {device}")
    return None


def device_dataloaders(trainer):
    """What nnUNetTrainer.get_dataloaders returns, with the training loader on the trainer's device:
    the same patch sizes, transform pipeline, oversampling and validation loader as nnU-Net's."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    patch_size = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    labels = trainer.label_manager
    regions = labels.foreground_regions if labels.has_regions else None
    pipeline = trainer.get_training_transforms(
        patch_size, rotation, scales, mirror_axes, dummy_2d,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=trainer.is_cascaded,
        foreground_labels=labels.foreground_labels, regions=regions, ignore_label=labels.ignore_label)
    augmentation = DeviceAugmentation(pipeline)
    val_transforms = trainer.get_validation_transforms(scales, is_cascaded=trainer.is_cascaded,
                                                       foreground_labels=labels.foreground_labels,
                                                       regions=regions, ignore_label=labels.ignore_label)
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    oversampling = dict(oversample_foreground_percent=trainer.oversample_foreground_percent,
                        probabilistic_oversampling=trainer.probabilistic_oversampling)
    dl_tr = DeviceSupportLoader(dataset_tr, trainer.batch_size, initial_patch_size, patch_size, labels,
                                trainer.device, augmentation, **oversampling)
    trainer.print_to_log_file(f"GPU data path: {len(dl_tr.cases)} support cases held on {trainer.device} "
                              f"({dl_tr.nbytes / 2 ** 20:.1f} MB); patches cut and augmented there")
    dl_val = nnUNetDataLoader(dataset_val, trainer.batch_size, patch_size, patch_size, labels,
                              transforms=val_transforms, **oversampling)
    processes = get_allowed_n_proc_DA()
    train = SingleThreadedAugmenter(dl_tr, None)
    val = SingleThreadedAugmenter(dl_val, None) if processes == 0 else NonDetMultiThreadedAugmenter(
        data_loader=dl_val, transform=None, num_processes=max(1, processes // 2),
        num_cached=max(3, processes // 4), seeds=None, pin_memory=trainer.device.type == "cuda", wait_time=0.002)
    next(train)
    next(val)
    return train, val
