"""Head initialisation: a target label the foundation already knows starts from the foundation's
classifier row for it (FSEFT), so training starts from the foundation's prediction of that organ
instead of from nothing; the background row starts from the foundation's too (and a grouped head,
nnunet_fseft/network/grouped_head.py, keeps every foundation row, so that step 0 is the zero-shot prediction). A label it does not
know starts from the support set itself (weight imprinting, `imprint`), so that a novel organ is
found at step 0 and training refines it rather than discovers it."""
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnunet_fseft.datasets.dataset_json import has_regions, plain_foreground, plain_labels, region_channels
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.labels import describe_matches, match_labels, match_outputs, mixed_outputs
from nnunet_fseft.network.anatomy import anatomy
from nnunet_fseft.network.grouped_head import is_grouped

# Below this Dice of an imprinted label on the support voxels, its foundation features barely
# separate it (the benchmark's synthetic pancreas: 0.06 to 0.13, and a linear probe ends below 0.1)
WEAK_IMPRINT = 0.3


def head_rows(target_labels: dict, foundation_labels: dict) -> Tuple[List[Tuple[int, int]], str]:
    """(target channel, foundation channel) pairs to copy and a log line.

    A softmax head (plain labels) has one channel per consecutive label value, background first,
    which is always copied. A sigmoid head (regions) has one channel per region and no background:
    the matched regions' rows are copied, and each is its own yes/no, so step 0 is the foundation's
    prediction of those regions whatever the other channels hold. Plain labels on a region
    foundation (or the reverse) share no channel: the head is new."""
    mixed = mixed_outputs(target_labels, foundation_labels)
    if mixed:
        return [], f"head initialisation: a new head, as {mixed}; write both label sets alike for a zero-shot start"
    matched = match_outputs(target_labels, foundation_labels)
    # background always: with no label matched it is still the foundation's background (and an
    # imprinted row is relative to it)
    rows = ([] if has_regions(target_labels) else [(0, 0)]) + [(t, f) for _, t, _, f in matched]
    return rows, "head initialisation: " + describe_matches(target_labels, matched)


@torch.no_grad()
def initialise_head(heads: Sequence[nn.Module], foundation_heads: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                    rows: List[Tuple[int, int]]) -> None:
    """Copies the foundation's rows into each new head conv (deep-supervision heads each from their own)."""
    for head, (weight, bias) in zip(heads, foundation_heads):
        if head.weight.shape[1:] != weight.shape[1:]:
            raise InputError(f"The foundation's head takes {weight.shape[1]} features but the new head takes "
                             f"{head.weight.shape[1]}; train with the plans `nnunet-fseft adopt` wrote for this foundation.")
        for t, f in rows:
            head.weight[t].copy_(weight[f])
            if head.bias is not None and bias is not None:
                head.bias[t].copy_(bias[f])


def label_crops(image: np.ndarray, seg: np.ndarray, patch: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """One patch of `patch` size centred on each label present (on the volume's centre if none is),
    padded with 0 and label -1 (ignored) where the volume is smaller. A 2D patch of a 3D volume is
    the slice through that centre."""
    present = [c for c in np.unique(seg) if c > 0]
    centres = [np.argwhere(seg[0] == c).mean(0).round().astype(int) for c in present] or [np.array(seg.shape[1:]) // 2]
    return [_crop(image, seg, patch, centre) for centre in centres]


def _crop(image: np.ndarray, seg: np.ndarray, patch: Sequence[int], centre: np.ndarray):
    if len(patch) == seg.ndim - 2:
        image, seg, centre = image[:, centre[0]], seg[:, centre[0]], centre[1:]
    out_image = np.zeros((image.shape[0], *patch), dtype=np.float32)
    out_seg = np.full((1, *patch), -1, dtype=np.int16)
    src, dst = [], []
    for c, p, n in zip(centre, patch, seg.shape[1:]):
        start = int(min(max(c - p // 2, 0), max(n - p, 0)))
        length = min(p, n)
        src.append(slice(start, start + length))
        dst.append(slice(0, length))
    out_image[(slice(None), *dst)] = image[(slice(None), *src)]
    out_seg[(slice(None), *dst)] = seg[(slice(None), *src)]
    return torch.from_numpy(out_image), torch.from_numpy(out_seg.astype(np.int64))


@torch.no_grad()
def imprint(network: nn.Module, heads: Sequence[nn.Module], patches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
            labels: Sequence[int], rows: Optional[dict] = None) -> dict:
    """Weight imprinting for labels the foundation does not know, from the head's input features on
    the support voxels: a linear discriminant (class means, one covariance shared by the classes)
    between background and these labels. Label c's row becomes the background row plus the
    discriminant's difference, so at step 0 c wins over background where the support set's features
    are likelier under c, and the labels compete among themselves the same way. The discriminant's
    bias is then moved to where it gives the best Dice on the support voxels themselves
    (`best_dice_threshold`): with the voxel frequencies as priors a small organ (27 of 32,768
    support voxels in the tests' scans) is predicted nowhere, with equal priors a quarter of the
    volume (the benchmark's synthetic pancreas: Dice 0.03 on held-out scans, 0.06 to 0.09 with the
    bias set on the support).
    Returns {label: (support voxels it was imprinted from, the Dice of its imprinted row on them)},
    at the finest head's resolution ((0, 0.0): absent, its row left as is). A low Dice says that the
    foundation's last features barely tell the label from background (see the trainer's log line).

    `patches`: (image (C, *patch), label (1, *patch), -1 = ignore) pairs; one forward each, every head
    (deep supervision) at once, labels taken nearest-neighbour to each head's resolution. `rows`:
    label -> its head row (default the label itself; a grouped head has other rows, nnunet_fseft/network/grouped_head.py)."""
    rows = rows or {}
    captured, segs = _head_inputs(network, heads, patches)
    found = {c: (0, 0.0) for c in labels}
    for head in heads:
        if len(captured[id(head)]) != len(segs):
            continue  # this head did not run (deep supervision off)
        features, targets = [], []
        for f, seg in zip(captured[id(head)], segs):
            seg = _at(seg, f)
            keep = (seg == 0) | torch.isin(seg, torch.tensor(list(labels), device=seg.device))
            features.append(f[0].flatten(1)[:, keep].T.double())
            targets.append(seg[keep])
        features, targets = torch.cat(features), torch.cat(targets)
        classes = [c for c in (0, *labels) if (targets == c).any()]
        if 0 not in classes or len(classes) < 2:
            continue
        w, b = _discriminant(features, targets, classes)
        for i, c in enumerate(classes[1:], start=1):
            r = rows.get(c, c)
            direction = w[i] - w[0]
            threshold, dice = best_dice_threshold(features @ direction + float(b[i] - b[0]), targets == c)
            offset = float(b[i] - b[0]) - threshold
            if head is heads[-1]:
                found[c] = (int((targets == c).sum()), dice)
            head.weight[r].copy_(head.weight[0] + direction.view(head.weight.shape[1:]).to(head.weight.dtype))
            if head.bias is not None:
                head.bias[r] = head.bias[0] + offset
    return found


# The bias of a region row that cannot be imprinted (the region is absent from the support set):
# sigmoid(-6) = 0.25 %, so the region starts predicted nowhere. nnU-Net's fresh row (bias 0, small
# random weights) predicts it in about half the voxels, and `regions_class_order` then paints those
# with the region's label over every other region.
ABSENT_REGION_BIAS = -6.0


@torch.no_grad()
def imprint_regions(network: nn.Module, heads: Sequence[nn.Module], patches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                    regions: dict, ignore_label: Optional[int] = None) -> dict:
    """Weight imprinting for the regions of a sigmoid head that the foundation does not know
    (`regions`: head channel -> the label values the region is made of): channel r's row becomes
    the discriminant between the region's support voxels and all the others (as in `imprint`, but
    with no background row to be relative to: each sigmoid channel is its own yes/no), its bias
    set to where it gives the best Dice on the support voxels, so at step 0 the logit is positive
    where the support's features look like the region. A region absent from the support patches
    starts predicted nowhere (ABSENT_REGION_BIAS). Voxels of `ignore_label` (unannotated) and the
    padding (-1) count for neither side. A head without a bias cannot hold the threshold and is
    left as it is. Returns {channel: (support voxels, Dice)} at the finest head's resolution."""
    captured, segs = _head_inputs(network, heads, patches)
    found = {r: (0, 0.0) for r in regions}
    for head in heads:
        if len(captured[id(head)]) != len(segs) or head.bias is None:
            continue
        features, labels = [], []
        for f, seg in zip(captured[id(head)], segs):
            seg = _at(seg, f)
            keep = (seg >= 0) if ignore_label is None else (seg >= 0) & (seg != ignore_label)
            features.append(f[0].flatten(1)[:, keep].T.double())
            labels.append(seg[keep])
        features, labels = torch.cat(features), torch.cat(labels)
        for r, values in regions.items():
            inside = torch.isin(labels, torch.tensor(list(values), device=labels.device)).long()
            if not 0 < int(inside.sum()) < len(inside):
                head.weight[r].zero_()
                head.bias[r] = ABSENT_REGION_BIAS
                continue
            w, b = _discriminant(features, inside, [0, 1])
            direction = w[1] - w[0]
            threshold, dice = best_dice_threshold(features @ direction + float(b[1] - b[0]), inside == 1)
            head.weight[r].copy_(direction.view(head.weight.shape[1:]).to(head.weight.dtype))
            head.bias[r] = float(b[1] - b[0]) - threshold
            if head is heads[-1]:
                found[r] = (int(inside.sum()), dice)
    return found


def _head_inputs(network: nn.Module, heads: Sequence[nn.Module], patches) -> Tuple[dict, list]:
    """Every head's input features on each patch (one forward per patch, eval mode), by id(head),
    and the patches' labels as (1, 1, *patch) float tensors on the heads' device."""
    captured = {id(h): [] for h in heads}
    hooks = [h.register_forward_hook(lambda m, i, o: captured[id(m)].append(i[0].detach().float())) for h in heads]
    was_training = network.training
    network.eval()
    device = next(p.device for p in heads[0].parameters())
    segs = []
    try:
        for image, seg in patches:
            network(image[None].to(device))
            segs.append(seg[None].float().to(device))
    finally:
        for h in hooks:
            h.remove()
        network.train(was_training)
    return captured, segs


def _at(seg: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The label patch nearest-neighbour at the features' resolution, flattened."""
    return nn.functional.interpolate(seg, size=features.shape[2:], mode="nearest")[0, 0].long().flatten()


def _discriminant(features: torch.Tensor, targets: torch.Tensor, classes: list):
    """Linear discriminant of `classes` (class means, one shared covariance, equal priors): (w, b)
    with w[i] = Sigma^-1 mu_i and b[i] = -mu_i' Sigma^-1 mu_i / 2."""
    means = torch.stack([features[targets == c].mean(0) for c in classes])
    row_of = torch.zeros(max(classes) + 1, dtype=torch.long, device=targets.device)
    row_of[torch.tensor(classes, device=targets.device)] = torch.arange(len(classes), device=targets.device)
    centred = features - means[row_of[targets]]  # each voxel's features minus its class mean
    covariance = centred.T @ centred / max(1, len(features) - len(classes))
    covariance += 1e-3 * covariance.diagonal().mean().clamp_min(1e-12) * torch.eye(len(covariance), dtype=covariance.dtype,
                                                                               device=covariance.device)
    w = torch.linalg.solve(covariance, means.T).T  # (classes, C): Sigma^-1 mu_c
    b = -0.5 * (w * means).sum(1)  # equal priors (see `imprint`)
    return w, b


def best_dice_threshold(scores: torch.Tensor, positive: torch.Tensor) -> Tuple[float, float]:
    """(t, its Dice): the threshold t for which `scores > t` has the best Dice against `positive`
    (both 1-D). The voxels are ranked by score and the top k taken for the k with the best
    2 TP_k / (k + P); t lies halfway between the k-th and the next score. (0, 0) if no voxel is positive."""
    n_pos = int(positive.sum())
    if n_pos == 0 or len(scores) == 0:
        return 0.0, 0.0
    order = torch.argsort(scores, descending=True)
    ranked = scores[order]
    true_pos = torch.cumsum(positive[order].double(), 0)
    dice = 2 * true_pos / (torch.arange(1, len(scores) + 1, device=scores.device) + n_pos)
    k = int(torch.argmax(dice))
    threshold = float(ranked[k] + ranked[k + 1]) / 2 if k + 1 < len(ranked) else float(ranked[k]) - 1.0
    return threshold, float(dice[k])


def start_head(network: nn.Module, heads: Sequence[nn.Module], foundation_heads: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]],
               labels: dict, foundation_labels: dict, support_patches: Callable[[], list], log: Callable[[str], None],
               frozen_decoder: Optional[str] = None) -> List[int]:
    """A trainer's new head(s) `heads` of `network`: the foundation's rows (`foundation_heads`, one
    (weight, bias) per head) for the target `labels` it knows by name, imprinted from the support set
    (`support_patches()`, read only if needed) for the others; each step said through `log`.
    `frozen_decoder`: the trainer's name where it leaves the decoder frozen (a novel label its
    features barely separate gets a warning). Returns the target channels that start from the foundation."""
    rows, message = head_rows(labels, foundation_labels)
    log(message)
    known = {t for t, _ in rows}
    # output channels the foundation does not know: plain label values, or a sigmoid head's region channels
    channels = range(len(region_channels(labels))) if has_regions(labels) else plain_foreground(labels).values()
    novel = [c for c in channels if c not in known]
    new_rows = {c: c for c in novel}
    if rows and is_grouped(heads[0]):  # the whole foundation head, then the labels it does not know
        groups = heads[0].label_rows
        rows = [(f, f) for f in range(len(foundation_heads[0][0]))]
        new_rows = {c: groups[c][0] for c in novel}
        grouped = [f for f in groups[0] if f != 0]
        names = {v: n for n, v in plain_labels(foundation_labels).items()}
        log("head initialisation: the foundation's " + (
            ", ".join(f"'{names[f]}'" for f in grouped) + " grouped with background" if grouped else
            "classes are all target labels") + " (log-sum-exp: step 0 is the zero-shot prediction)")
    if rows:
        initialise_head(heads, foundation_heads, rows)
    if novel and has_regions(labels):
        regions = {c: (name, values) for name, (c, values) in region_channels(labels).items() if c in novel}
        found = imprint_regions(network, heads, support_patches(), {c: v for c, (_, v) in regions.items()},
                                labels.get("ignore"))
        names = {c: name for c, (name, _) in regions.items()}
    elif novel:
        found = imprint(network, heads, support_patches(), novel, new_rows)
        names = {v: n for n, v in plain_labels(labels).items()}
    if novel:
        log("head initialisation: imprinted from the support set: " + ", ".join(
            f"'{names[c]}' ({n:,} voxels, Dice {d:.2f} on them)" if n else
            f"'{names[c]}' (absent from the support set: not imprinted)" for c, (n, d) in found.items()))
        weak = [names[c] for c, (n, d) in found.items() if n and d < WEAK_IMPRINT]
        if weak and frozen_decoder:
            log(f"Warning: the foundation's last features barely tell {', '.join(map(repr, weak))} from background "
                f"(imprinted Dice below {WEAK_IMPRINT} on the support itself); {frozen_decoder} leaves the "
                f"decoder frozen and may not learn it: a method that tunes the decoder (e.g. "
                f"nnUNetTrainerFSEFT_LoRA_DecoderFT) can.")
    return sorted(known)


def pretrained_head(network: nn.Module, checkpoint: dict) -> Tuple[list, Optional[dict]]:
    """The head tensors, as (weight, bias) per head of `network`, of an nnU-Net checkpoint given to
    -pretrained_weights, and the labels of its dataset.json; ([], labels) where it records no labels or
    no head of this network (or the network is Primus, whose decoder is new for every target)."""
    labels = (checkpoint.get("init_args") or {}).get("dataset_json", {}).get("labels")
    a = anatomy(network)
    weights = checkpoint["network_weights"]
    if not labels or a.decoder_is_head or any(f"{h}.weight" not in weights for h in a.head):
        return [], labels
    return [(weights[f"{h}.weight"], weights.get(f"{h}.bias")) for h in a.head], labels


def ungrouped_on_pretrained_route(labels: dict, foundation_labels: dict) -> str:
    """On the -pretrained_weights route the head keeps the target's width, so the foundation's classes
    the target lacks are not grouped with background: step 0 is the zero-shot prediction where the
    target has every class of the foundation, an approximation otherwise. The log line that says
    so, or '' where nothing is left out."""
    matched = {f for _, _, f, _ in match_labels(labels, foundation_labels)}
    unmatched = set(plain_foreground(foundation_labels)) - matched
    if not unmatched:
        return ""
    return (f"head initialisation: the foundation's {', '.join(sorted(map(repr, unmatched)))} are not grouped with "
            f"background on the -pretrained_weights route, so step 0 only approximates the zero-shot prediction; "
            f"`nnunet-fseft adopt` groups them")
