"""The intensity device ops: nnU-Net's noise, blur, brightness, contrast, low-resolution and gamma
transforms, each drawing its parameters as batchgeneratorsv2 draws them."""
import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.helpers.scalar_type import sample_scalar

from nnunet_fseft.training.gpu_data.spatial import Unsupported


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

