"""The grouped head: the foundation's classifier kept whole, its classes the target does not have
grouped with background.

A target usually has only some of the foundation's classes. Copying the matched rows into a new
head of the target's size is not the foundation's prediction: a voxel the foundation gave to an
unmatched organ would be decided between background and a matched organ, two rows that never
competed. So the head keeps a row for every foundation class (plus one per label the foundation
does not know), and target channel t is the log-sum-exp of its group of rows: background's group
is the foundation's background and every unmatched class, a matched label's group is its own row.
Softmax over the grouped logits is then exactly the foundation's class probabilities summed per
target label, so at step 0 the adapted network predicts what `nnunet-fseft zeroshot` predicts
(which groups the same way).

`adopt` records the groups in the plans (`head_rows` of the foundation record), so that nnU-Net's
predictor, which builds the network from the plans alone, rebuilds the same head. The log-sum-exp is not
linear: `merge` turns a head whose groups are single rows back into a plain one and refuses the others.
"""
from typing import List, Optional

import torch
from torch import nn

from nnunet_fseft.datasets.dataset_json import has_regions, plain_labels
from nnunet_fseft.foundation.labels import match_labels


def head_groups(target_labels: dict, foundation_labels: dict) -> Optional[List[List[int]]]:
    """Per target channel, the rows of the grouped head it is the log-sum-exp of: rows 0..F-1 are
    the foundation's classes, F, F+1, ... the target labels it does not know. None for region-based
    label sets (sigmoid outputs, one channel per region), which are not grouped."""
    if has_regions(target_labels) or has_regions(foundation_labels):
        return None
    # nnU-Net's ignore label has no output channel
    width = max(plain_labels(foundation_labels).values()) + 1
    channels = max(plain_labels(target_labels).values()) + 1
    matched = {t: f for _, t, _, f in match_labels(target_labels, foundation_labels)}
    groups = [[0] + [f for f in range(1, width) if f not in matched.values()]]
    novel = width
    for t in range(1, channels):
        if t in matched:
            groups.append([matched[t]])
        else:
            groups.append([novel])
            novel += 1
    return groups


def recorded_head_rows(plans: dict, num_output_channels: int) -> Optional[List[List[int]]]:
    """The grouped head's rows per target channel that `adopt` recorded in the plans (None: a plain
    head, or no foundation recorded)."""
    from nnunet_fseft.errors import InputError
    from nnunet_fseft.foundation.record import recorded_foundation
    record = recorded_foundation(plans)
    groups = record.get("head_rows") if record is not None else None
    if groups is not None and len(groups) != num_output_channels:
        raise InputError(f"The plans group the foundation's head into {len(groups)} channels, but the dataset has "
                         f"{num_output_channels}: its labels changed after `nnunet-fseft adopt`; adopt the "
                         f"foundation again.")
    return groups


def width(groups: List[List[int]]) -> int:
    """Rows of the grouped head."""
    return 1 + max(r for g in groups for r in g)


# The logit of a channel no row feeds (an empty group): sigmoid(-30) = 1e-13, predicted nowhere. Small
# enough for nnU-Net's sliding window, which weighs each tile's logits by a Gaussian of peak 10 and sums
# the tiles (and mirrored passes) in float16, largest value 65504: -1e4 overflows there to -inf.
NOWHERE = -30.0


def group_logits(logits: torch.Tensor, groups: List[List[int]]) -> torch.Tensor:
    """(B, rows, ...) -> (B, len(groups), ...): each group's log-sum-exp; an empty group is NOWHERE
    (zeroshot's sigmoid channel of a region the foundation does not know)."""
    return torch.cat([torch.logsumexp(logits[:, g], 1, keepdim=True) if len(g) > 1 else logits[:, g] if g else
                      torch.full_like(logits[:, :1], NOWHERE) for g in groups], 1)


class _Grouped:
    """Mixed into a 1x1 conv of `width(groups)` outputs: the output is one channel per group."""
    label_rows: List[List[int]]  # per output channel, its rows (not `groups`: a conv has that)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_logits(super().forward(x), self.label_rows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grouped into {len(self.label_rows)} channels"


class GroupedConv2d(_Grouped, nn.Conv2d):
    pass


class GroupedConv3d(_Grouped, nn.Conv3d):
    pass


GROUPED = {nn.Conv2d: GroupedConv2d, nn.Conv3d: GroupedConv3d}


def group_head(conv: nn.Module, groups: List[List[int]]) -> nn.Module:
    """A grouped head with `conv`'s weights (its rows: width(groups)); state-dict keys stay the conv's."""
    if conv.out_channels != width(groups):
        raise ValueError(f"a head of {conv.out_channels} rows cannot be grouped into groups of {width(groups)} rows")
    grouped = GROUPED[type(conv)](conv.in_channels, conv.out_channels, conv.kernel_size, bias=conv.bias is not None)
    grouped.load_state_dict(conv.state_dict())
    grouped.label_rows = [list(g) for g in groups]
    return grouped.to(conv.weight.device, conv.weight.dtype)


def is_grouped(module: nn.Module) -> bool:
    return isinstance(module, _Grouped)


def ungroup(head: nn.Module) -> nn.Module:
    """The plain conv a grouped head of single-row groups is (its rows picked in channel order)."""
    if any(len(g) > 1 for g in head.label_rows):
        raise ValueError("a head that groups several rows into one channel has no plain equivalent")
    conv_type = next(c for c, f in GROUPED.items() if isinstance(head, f))
    plain = conv_type(head.in_channels, len(head.label_rows), head.kernel_size, bias=head.bias is not None).to(head.weight.device)
    rows = [g[0] for g in head.label_rows]
    with torch.no_grad():
        plain.weight.copy_(head.weight[rows])
        if head.bias is not None:
            plain.bias.copy_(head.bias[rows])
    return plain


def grouped_classes(network: nn.Module) -> List[int]:
    """The rows of foundation classes that some grouped head of `network` groups into another channel."""
    return sorted({r for m in network.modules() if is_grouped(m) for g in m.label_rows if len(g) > 1 for r in g[1:]})


def ungroup_all(network: nn.Module) -> nn.Module:
    """Every grouped head of single-row groups made a plain conv, in place (see `ungroup`)."""
    for name, module in list(network.named_modules()):
        if is_grouped(module):
            parent, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent) if parent else network, child, ungroup(module))
    return network


def group_seg_layers(network: nn.Module, groups: List[List[int]]) -> nn.Module:
    """Groups every segmentation head of an nnU-Net UNet (deep supervision included), in place."""
    layers = network.decoder.seg_layers
    for i, layer in enumerate(layers):
        layers[i] = group_head(layer, groups)
    return network


class GroupedOutput(nn.Module):
    """A foundation network whose output is grouped (zeroshot's network: any architecture); its
    state-dict keys are the network's own."""

    def __init__(self, network: nn.Module, groups: List[List[int]]):
        super().__init__()
        self.network, self.label_rows = network, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_logits(self.network(x), self.label_rows)

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict, assign)
