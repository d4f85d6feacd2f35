"""Transductive inference with organ-size priors (FSEFT).

The K support labels give each class a size prior S (mean foreground volume in mm^3; with
K >= 5, support volumes further than one standard deviation from the median are dropped first).
On unlabelled query volumes the soft predicted size S_hat is pushed into [(1 - g) S, (1 + g) S]
by an L1 hinge, computed on whole-volume predictions from cached frozen features.
"""
import os
from typing import List, Sequence

import numpy as np
import torch

# Environment variable naming a folder of query images (nnU-Net's imagesTs layout).
QUERY_ENV = "nnUNet_fseft_query"


def size_prior(volumes: np.ndarray) -> np.ndarray:
    """volumes: (support cases, classes) foreground volumes in mm^3 -> the prior S per class."""
    volumes = np.asarray(volumes, dtype=np.float64)
    if volumes.shape[0] < 5:
        return volumes.mean(0)
    median, sd = np.median(volumes, 0), volumes.std(0)
    keep = np.abs(volumes - median) <= sd  # sd = 0 (all equal) keeps them all
    return np.array([volumes[keep[:, c], c].mean() if keep[:, c].any() else volumes[:, c].mean()
                     for c in range(volumes.shape[1])])


def size_hinge(predicted: torch.Tensor, prior: torch.Tensor, margin: float) -> torch.Tensor:
    """L1 hinge outside [(1 - g) S, (1 + g) S], relative to S so every organ weighs the same
    whatever its size: zero inside the band, and its gradient pushes S_hat back into it.
    Classes with S = 0 (absent from every support label) are left out."""
    present = prior > 0
    if not bool(present.any()):
        return predicted.sum() * 0
    p, s = predicted[present], prior[present]
    below = torch.relu((1 - margin) * s - p)
    above = torch.relu(p - (1 + margin) * s)
    return ((below + above) / s).mean()


def soft_sizes(logits: torch.Tensor, voxel_volume: float) -> torch.Tensor:
    """Soft predicted size in mm^3 of every foreground class of one volume's logits (N, C, ...):
    N = 1 for a 3D volume, or its slices for a 2D network."""
    probabilities = torch.softmax(logits.float(), 1)[:, 1:]
    return probabilities.transpose(0, 1).reshape(probabilities.shape[1], -1).sum(1) * voxel_volume


def support_volumes(segmentations: Sequence[np.ndarray], num_classes: int, voxel_volume: float) -> np.ndarray:
    """(cases, foreground classes) volumes in mm^3 of preprocessed label maps."""
    return np.array([[float((np.asarray(s) == c).sum()) * voxel_volume for c in range(1, num_classes)]
                     for s in segmentations])


def query_images(dataset_name: str, file_ending: str) -> List[List[str]]:
    """Image files per query case: the folder named by nnUNet_fseft_query, else the dataset's imagesTs."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    from nnunet_fseft.errors import InputError
    from nnunet_fseft.safety import require_env
    folder = os.environ.get(QUERY_ENV) or os.path.join(require_env("nnUNet_raw"), dataset_name, "imagesTs")
    source = QUERY_ENV if os.environ.get(QUERY_ENV) else "the dataset's imagesTs"
    cases = create_lists_from_splitted_dataset_folder(folder, file_ending) if os.path.isdir(folder) else []
    if not cases:
        raise InputError(f"Transductive inference needs unlabelled query images, but {source} ({folder}) "
                         f"holds no *_0000{file_ending} files; put them there or point {QUERY_ENV} at a folder "
                         f"of them.")
    return cases


class SizePriorLoss(torch.nn.Module):
    """nnU-Net's loss plus weight * size hinge on one query volume per training step (the next of
    a permutation drawn with `seed`, so the order is the same in every run)."""

    def __init__(self, loss: torch.nn.Module, adapter: torch.nn.Module, queries: List[np.ndarray],
                 prior: np.ndarray, voxel_volume: float, margin: float, weight: float, seed: int):
        super().__init__()
        self.loss = loss
        self.adapter = [adapter]  # not a submodule: the trainer owns it
        self.queries = queries
        self.prior = torch.as_tensor(prior, dtype=torch.float32)
        self.voxel_volume, self.margin, self.weight = voxel_volume, margin, weight
        self.order = np.random.RandomState(seed).permutation(len(queries)).tolist()
        self.step = 0
        self.active = False  # True during training epochs, off for validation
        self.last_hinge = 0.0

    def query_term(self) -> torch.Tensor:
        adapter = self.adapter[0]
        device = next(adapter.parameters()).device
        features = torch.from_numpy(np.asarray(self.queries[self.order[self.step % len(self.order)]]))
        self.step += 1
        # (C, Z, Y, X): one 3D volume, or its Z slices for a 2D adapter
        batch = features.transpose(0, 1) if isinstance(adapter.head, torch.nn.Conv2d) else features[None]
        logits = adapter(batch.to(device, torch.float32))
        hinge = size_hinge(soft_sizes(logits, self.voxel_volume), self.prior.to(device), self.margin)
        self.last_hinge = float(hinge.detach())
        return hinge

    def forward(self, output, target):
        base = self.loss(output, target)
        return base + self.weight * self.query_term() if self.active else base
