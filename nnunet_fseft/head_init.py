"""Zero-shot head initialisation: a target label the foundation already knows starts from the
foundation's classifier row for it (FSEFT), so training starts from the foundation's prediction
of that organ instead of from nothing. The background row starts from the foundation's too."""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_fseft.errors import InputError
from nnunet_fseft.labels import describe_matches, match_labels


def head_rows(target_labels: dict, foundation_labels: dict) -> Tuple[List[Tuple[int, int]], str]:
    """(target channel, foundation channel) pairs to copy, background first, and a log line.

    Channels are label values: nnU-Net's softmax output has one channel per consecutive label.
    Region-based label sets (sigmoid outputs, one channel per region) are left alone."""
    for labels, whose in ((target_labels, "target"), (foundation_labels, "foundation")):
        if any(not isinstance(v, int) for v in labels.values()):
            return [], f"head initialisation skipped: the {whose} uses regions, whose channels are not labels"
    matches = match_labels(target_labels, foundation_labels)
    rows = [(0, 0)] + [(t, f) for _, t, _, f in matches] if matches else []
    return rows, "head initialisation: " + describe_matches(target_labels, matches)


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
