"""Transductive inference with organ-size priors, as FSEFT's code does it (`TI_modules.py`;
docs/design.md, "What the papers do").

- Prior S per class: the mean over the K support labels of the volume (mm^3) of the class's largest
  connected component (stray islands of a label do not inflate it).
- Query volumes: the scans that will be predicted (nnUNet_fseft_query, else imagesTs). Their frozen
  features are cached average-pooled by 2 per axis, so that a whole CT's fit a 12 GB GPU; a pooled
  voxel counts 8 voxels of volume.
- Soft size S_hat: the sum of the adapter's foreground probabilities over a query volume.
- Hinge: relu(|S - S_hat| / max(S, S_hat) - g), margin g = 0.3, weight 0.1; zero inside the band.
- When: one extra optimiser step per epoch on the hinge over every query volume, once the learning
  rate's warm-up is over (the adapter first learns from the support set), not on every step.
"""
import os
from typing import List, Sequence

import numpy as np
import torch

POOL = 2  # query features are average-pooled by this factor per spatial axis


def largest_component_voxels(mask: np.ndarray) -> int:
    """Voxels in the largest connected component (26-connectivity in 3D) of a binary mask."""
    from scipy import ndimage
    labelled, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    return int(np.bincount(labelled.ravel())[1:].max()) if n else 0


def support_volumes(segmentations: Sequence[np.ndarray], num_classes: int, voxel_volume: float) -> np.ndarray:
    """(cases, foreground classes): the volume in mm^3 of each class's largest connected component
    in each preprocessed support label map."""
    return np.array([[largest_component_voxels(np.asarray(s) == c) * voxel_volume for c in range(1, num_classes)]
                     for s in segmentations], dtype=np.float64)


def size_prior(volumes: np.ndarray) -> np.ndarray:
    """volumes: (support cases, classes) in mm^3 -> the prior S per class: their mean."""
    return np.asarray(volumes, dtype=np.float64).mean(0)


def size_hinge(predicted: torch.Tensor, prior: torch.Tensor, margin: float) -> torch.Tensor:
    """relu(|S - S_hat| / max(S, S_hat) - g), averaged over the classes with a prior: zero inside
    the band, and its gradient pushes S_hat back into it. The relative error lies in [0, 1) whichever
    way it is off, so no organ weighs more for being large, nor a prediction for being far too large.
    Classes with S = 0 (absent from every support label) are left out."""
    present = prior > 0
    if not bool(present.any()):
        return predicted.sum() * 0
    p, s = predicted[present], prior[present]
    relative = (s - p).abs() / torch.maximum(s, p)
    return torch.relu(relative - margin).mean()


def soft_sizes(logits: torch.Tensor, voxel_volume: float) -> torch.Tensor:
    """Soft predicted size in mm^3 of every foreground class of one volume's logits (N, C, ...):
    N = 1 for a 3D volume, or its slices for a 2D network."""
    probabilities = torch.softmax(logits.float(), 1)[:, 1:]
    return probabilities.transpose(0, 1).reshape(probabilities.shape[1], -1).sum(1) * voxel_volume


def pooled(features: torch.Tensor) -> torch.Tensor:
    """(C, Z, Y, X) features average-pooled by POOL per axis (a partial window at an odd edge is
    averaged over what it holds)."""
    return torch.nn.functional.avg_pool3d(features[None].float(), POOL, ceil_mode=True)[0].to(features.dtype)


def query_images(dataset_name: str, file_ending: str) -> List[List[str]]:
    """Image files per query case: the folder named by nnUNet_fseft_query, else the dataset's imagesTs."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    from nnunet_fseft.environment import QUERY, query_folder, require_env
    from nnunet_fseft.errors import InputError
    folder = query_folder() or os.path.join(require_env("nnUNet_raw"), dataset_name, "imagesTs")
    source = QUERY if query_folder() else "the dataset's imagesTs"
    cases = create_lists_from_splitted_dataset_folder(folder, file_ending) if os.path.isdir(folder) else []
    if not cases:
        raise InputError(f"Transductive inference needs unlabelled query images, but {source} ({folder}) "
                         f"holds no *_0000{file_ending} files; put them there or point {QUERY} at a folder "
                         f"of them.")
    return cases


class SizePrior:
    """The size prior on the query volumes' pooled features: `step` takes FSEFT's extra optimiser
    step on weight x hinge, one query volume's backward at a time (a whole CT's activations at once
    would not fit)."""

    def __init__(self, queries: List[np.ndarray], prior: np.ndarray, voxel_volume: float, margin: float,
                 weight: float):
        self.queries = queries
        self.prior = torch.as_tensor(prior, dtype=torch.float32)
        self.pooled_voxel_volume = voxel_volume * POOL ** 3
        self.margin, self.weight = margin, weight

    def hinge(self, adapter: torch.nn.Module, features: np.ndarray) -> torch.Tensor:
        device = next(adapter.parameters()).device
        features = torch.from_numpy(np.asarray(features)).to(device, torch.float32)
        # (C, Z, Y, X): one 3D volume, or its Z slices for a 2D adapter
        batch = features.transpose(0, 1) if isinstance(adapter.head, torch.nn.Conv2d) else features[None]
        return size_hinge(soft_sizes(adapter(batch), self.pooled_voxel_volume), self.prior.to(device), self.margin)

    def step(self, adapter: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """One optimiser step on the mean hinge over the query volumes; returns that mean. Under DDP
        every rank holds every query volume and the same weights, so each takes the same step."""
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for features in self.queries:
            hinge = self.hinge(adapter, features) / len(self.queries)
            (self.weight * hinge).backward()
            total += float(hinge.detach())
        if total > 0:  # every size inside its band: no step (Adam's momentum alone would still move)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total
