"""nnU-Net's training pipeline, transform by transform, as batched device ops (DeviceAugmentation),
with the label-side ops: image masking, label removal, deep-supervision targets."""
import torch
import torch.nn.functional as F

from nnunet_fseft.environment import GPU_DATA
from nnunet_fseft.errors import InputError
from nnunet_fseft.training.gpu_data.intensity import (Brightness, Contrast, Gamma, GaussianBlur, GaussianNoise,
                                                      LowResolution)
from nnunet_fseft.training.gpu_data.spatial import Mirror, Spatial, Unsupported


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
                                 f"train with CPU augmentation: gpu_data = False or {GPU_DATA}=0.") from None
        if not self.ops or not isinstance(self.ops[0], Spatial):
            raise InputError(f"The GPU data path needs nnU-Net's SpatialTransform first in the training pipeline; "
                             f"train with CPU augmentation: gpu_data = False or {GPU_DATA}=0.")

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

