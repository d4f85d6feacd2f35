"""The geometric device ops: nnU-Net's SpatialTransform (rotation, scaling, the crop to the final
patch) and MirrorTransform, on a whole batch on its device."""
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.helpers.scalar_type import sample_scalar
from batchgeneratorsv2.transforms.spatial.spatial import create_affine_matrix_2d, create_affine_matrix_3d


class Unsupported(ValueError):
    """A transform, or an option of one, that has no device op (the GPU data path refuses it)."""



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
        return crop_pad(x, start, self.patch_size, pad)

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

def crop_pad(x: torch.Tensor, start, size, value) -> torch.Tensor:
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
