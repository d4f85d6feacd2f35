"""The folded head: the foundation's classifier kept whole, its classes the target does not have
folded into background.

A target usually has only some of the foundation's classes. Copying the matched rows into a new
head of the target's size is not the foundation's prediction: a voxel the foundation gave to an
unmatched organ would be decided between background and a matched organ, two rows that never
competed. So the head keeps a row for every foundation class (plus one per label the foundation
does not know), and target channel t is the log-sum-exp of its group of rows: background's group
is the foundation's background and every unmatched class, a matched label's group is its own row.
Softmax over the folded logits is then exactly the foundation's class probabilities summed per
target label, so at step 0 the adapted network predicts what `nnunet-fseft zeroshot` predicts
(which folds the same way).

`adopt` records the groups in the plans (`head_rows` of the foundation record), so that nnU-Net's
predictor, which builds the network from the plans alone, rebuilds the same head. The fold is not
linear: `merge` turns a head whose groups are single rows back into a plain one and refuses the others.
"""
from typing import List, Optional

import torch
from torch import nn

from nnunet_fseft.labels import match_labels


def fold_groups(target_labels: dict, foundation_labels: dict) -> Optional[List[List[int]]]:
    """Per target channel, the rows of the folded head it is the log-sum-exp of: rows 0..F-1 are
    the foundation's classes, F, F+1, ... the target labels it does not know. None for region-based
    label sets (sigmoid outputs, one channel per region), which are not folded."""
    if any(not isinstance(v, int) for v in (*target_labels.values(), *foundation_labels.values())):
        return None
    # nnU-Net's ignore label has no output channel
    width = max(v for n, v in foundation_labels.items() if n != "ignore") + 1
    channels = max(v for n, v in target_labels.items() if n != "ignore") + 1
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


def width(groups: List[List[int]]) -> int:
    """Rows of the folded head."""
    return 1 + max(r for g in groups for r in g)


def fold_logits(logits: torch.Tensor, groups: List[List[int]]) -> torch.Tensor:
    """(B, rows, ...) -> (B, len(groups), ...): each group's log-sum-exp."""
    return torch.cat([torch.logsumexp(logits[:, g], 1, keepdim=True) if len(g) > 1 else logits[:, g]
                      for g in groups], 1)


class _Fold:
    """Mixed into a 1x1 conv of `width(groups)` outputs: the output is one channel per group."""
    label_rows: List[List[int]]  # per output channel, its rows (not `groups`: a conv has that)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fold_logits(super().forward(x), self.label_rows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded into {len(self.label_rows)} channels"


class FoldedConv2d(_Fold, nn.Conv2d):
    pass


class FoldedConv3d(_Fold, nn.Conv3d):
    pass


FOLDED = {nn.Conv2d: FoldedConv2d, nn.Conv3d: FoldedConv3d}


def fold(conv: nn.Module, groups: List[List[int]]) -> nn.Module:
    """A folded head with `conv`'s weights (its rows: width(groups)); state-dict keys stay the conv's."""
    if conv.out_channels != width(groups):
        raise ValueError(f"a head of {conv.out_channels} rows cannot fold into groups of {width(groups)} rows")
    folded = FOLDED[type(conv)](conv.in_channels, conv.out_channels, conv.kernel_size, bias=conv.bias is not None)
    folded.load_state_dict(conv.state_dict())
    folded.label_rows = [list(g) for g in groups]
    return folded.to(conv.weight.device, conv.weight.dtype)


def is_folded(module: nn.Module) -> bool:
    return isinstance(module, _Fold)


def unfold(head: nn.Module) -> nn.Module:
    """The plain conv a folded head of single-row groups is (its rows picked in channel order)."""
    if any(len(g) > 1 for g in head.label_rows):
        raise ValueError("a head that folds several rows into one channel has no plain equivalent")
    conv_type = next(c for c, f in FOLDED.items() if isinstance(head, f))
    plain = conv_type(head.in_channels, len(head.label_rows), head.kernel_size, bias=head.bias is not None).to(head.weight.device)
    rows = [g[0] for g in head.label_rows]
    with torch.no_grad():
        plain.weight.copy_(head.weight[rows])
        if head.bias is not None:
            plain.bias.copy_(head.bias[rows])
    return plain


def folded_classes(network: nn.Module) -> List[int]:
    """The rows of foundation classes that some folded head of `network` folds into another channel."""
    return sorted({r for m in network.modules() if is_folded(m) for g in m.label_rows if len(g) > 1 for r in g[1:]})


def unfold_all(network: nn.Module) -> nn.Module:
    """Every folded head of single-row groups made a plain conv, in place (see `unfold`)."""
    for name, module in list(network.named_modules()):
        if is_folded(module):
            parent, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent) if parent else network, child, unfold(module))
    return network


def fold_seg_layers(network: nn.Module, groups: List[List[int]]) -> nn.Module:
    """Folds every segmentation head of an nnU-Net UNet (deep supervision included), in place."""
    layers = network.decoder.seg_layers
    for i, layer in enumerate(layers):
        layers[i] = fold(layer, groups)
    return network


class FoldedOutput(nn.Module):
    """A foundation network whose output is folded (zeroshot's network: any architecture); its
    state-dict keys are the network's own."""

    def __init__(self, network: nn.Module, groups: List[List[int]]):
        super().__init__()
        self.network, self.label_rows = network, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fold_logits(self.network(x), self.label_rows)

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict, assign)
