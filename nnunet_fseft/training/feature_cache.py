"""Features of whole volumes from the frozen foundation, computed once.

A black-box adapter never changes the foundation, so the features of the K support volumes
(and of the transductive query volumes) can be computed once, with nnU-Net's own sliding
window (its tile steps and Gaussian weighting, fp16 accumulation), and training then draws
patches from them. `FeatureDataset` presents the cache to nnU-Net's own data loader as a
dataset whose "image" is the features, so patch sampling (foreground oversampling included)
and the spatial augmentation run unchanged on features and labels together.
"""
import contextlib
import os
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window


@torch.no_grad()
def sliding_window_features(features: Callable, channels: int, image: torch.Tensor, patch_size: Sequence[int],
                            device: torch.device, step: float = 0.5) -> torch.Tensor:
    """Features of a whole preprocessed image (C, Z, Y, X) as a (channels, Z, Y, X) fp16 CPU tensor.

    Tiles, steps and Gaussian weights are nnU-Net's (`nnUNetPredictor`), so a linear head on these
    features gives what nnU-Net's sliding window gives for the foundation's logits. A 2D patch
    size runs the 2D window over every slice, as nnU-Net does for 2d configurations.
    Unlike nnU-Net, the blending runs in fp32 (one volume at a time, twice the stored size): the
    Gaussian falls to 6e-8 at a tile's corners, where fp16 products keep one or two significant bits."""
    patch = tuple(int(p) for p in patch_size)
    if len(patch) == 2 and image.ndim == 4:
        return torch.stack([_window(features, channels, image[:, z], patch, device, step)
                            for z in range(image.shape[1])], dim=1)
    return _window(features, channels, image, patch, device, step)


def _window(features: Callable, channels: int, image: torch.Tensor, patch: tuple, device: torch.device,
            step: float) -> torch.Tensor:
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    data, unpad = pad_nd_image(image, patch, "constant", {"value": 0}, True, None)
    spatial = data.shape[1:]
    out = torch.zeros((channels, *spatial), dtype=torch.float32)
    weight = torch.zeros(spatial, dtype=torch.float32)
    gaussian = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=torch.device("cpu"))
    steps = compute_steps_for_sliding_window(spatial, patch, step)
    for start in np.array(np.meshgrid(*steps, indexing="ij")).reshape(len(patch), -1).T:
        region = tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch))
        tile = data[(slice(None), *region)][None].to(device, torch.float32)
        with torch.autocast(device.type) if device.type == "cuda" else contextlib.nullcontext():
            f = features(tile)[0]
        out[(slice(None), *region)] += f.float().cpu() * gaussian
        weight[region] += gaussian
    out /= weight
    return out[(slice(None), *unpad[1:])].half()


def cache_bytes(channels: int, shapes: List[Sequence[int]]) -> int:
    """Size of the fp16 features of volumes with these spatial shapes."""
    return int(sum(2 * channels * np.prod(s) for s in shapes))


class FeatureStore:
    """Features by case identifier, in memory or as .npy files read back memory-mapped (so data
    loader workers share them through the page cache instead of copies)."""

    def __init__(self, folder: str = ""):
        self.folder = folder  # '' keeps features in memory
        self._memory: Dict[str, np.ndarray] = {}
        if folder:
            os.makedirs(folder, exist_ok=True)

    def put(self, key: str, features: torch.Tensor) -> None:
        array = features.numpy().astype(np.float16, copy=False)
        if self.folder:
            np.save(os.path.join(self.folder, key + ".npy"), array)
        else:
            self._memory[key] = array

    def get(self, key: str) -> np.ndarray:
        if self.folder:
            return np.load(os.path.join(self.folder, key + ".npy"), mmap_mode="r")
        return self._memory[key]

    def clear(self) -> None:
        if self.folder and os.path.isdir(self.folder):
            for f in os.listdir(self.folder):
                if f.endswith(".npy"):
                    os.remove(os.path.join(self.folder, f))
            os.rmdir(self.folder)
        self._memory.clear()


class FeatureDataset:
    """nnU-Net's dataset interface (`identifiers`, `load_case`) over cached features: the
    labels and properties (foreground locations for oversampling) come from the preprocessed case."""

    def __init__(self, dataset, store: FeatureStore):
        self.dataset = dataset
        self.store = store
        self.identifiers = dataset.identifiers

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def load_case(self, identifier):
        _, seg, seg_prev, properties = self.dataset.load_case(identifier)
        return self.store.get(identifier), seg, seg_prev, properties
