"""Which target labels are classes the foundation already knows, by name.

Used by zero-shot head initialisation (every trainer) and by `nnunet-fseft zeroshot`.
Names are compared after normalisation: lower case, words split on spaces, hyphens, dots and
underscores, a side word (left/l/lt, right/r/rt) moved to the end, and organ synonyms
replaced by one canonical name. "Left Kidney", "kidney_L" and "l_kidney" are all
"kidney_left"; "lien" is "spleen"; BraTS's "whole tumour" and "WT" are "whole_tumor".
Plain labels match plain labels (`match_labels`), regions match regions (`match_regions`): a
region's channel is a sigmoid, a label's a softmax class, and neither is the other's start.
"""
import re
from typing import Dict, List, Tuple
from nnunet_fseft.datasets.dataset_json import has_regions, plain_labels, region_channels

# canonical name <- other names for it (after lower-casing and joining words with "_")
SYNONYMS = {
    "spleen": ["lien"],
    "liver": ["hepar"],
    "kidney": ["renal", "kidneys"],
    "gallbladder": ["gall_bladder", "gb"],
    "esophagus": ["oesophagus"],
    "stomach": ["gaster"],
    "aorta": ["abdominal_aorta"],
    "inferior_vena_cava": ["ivc", "vena_cava_inferior", "postcava"],
    "portal_vein_and_splenic_vein": ["portal_vein", "portal_and_splenic_vein", "portal_splenic_vein"],
    "adrenal_gland": ["adrenal", "suprarenal_gland"],
    "urinary_bladder": ["bladder"],
    "lung": ["lungs"],
    "background": ["bg", "bkg"],
    # BraTS's regions, as nnU-Net's BraTS conversion names them, and their short names
    "whole_tumor": ["whole_tumour", "wt", "complete_tumor", "complete_tumour"],
    "tumor_core": ["tumour_core", "tc"],
    "enhancing_tumor": ["enhancing_tumour", "et", "enhancing"],
}
_CANONICAL = {alias: name for name, aliases in SYNONYMS.items() for alias in aliases}
_SIDES = {"left": "left", "l": "left", "lt": "left", "right": "right", "r": "right", "rt": "right"}


def canonical(name: str) -> str:
    """The comparable form of a label name, e.g. 'Left Kidney' -> 'kidney_left'."""
    words = [w for w in re.split(r"[\s_\-.]+", str(name).strip().lower()) if w]
    sides = [_SIDES[w] for w in words if w in _SIDES]
    organ = "_".join(w for w in words if w not in _SIDES)
    organ = _CANONICAL.get(organ, organ)
    if len(sides) != 1 or not organ:  # no side, or an ambiguous one: keep the words as they are
        return _CANONICAL.get("_".join(words), "_".join(words))
    return f"{organ}_{sides[0]}"


def match_labels(target: Dict[str, object], foundation: Dict[str, object]) -> List[Tuple[str, int, str, int]]:
    """(target name, target value, foundation name, foundation value) for every target foreground
    label whose canonical name is a foundation class, in target-value order."""
    known = {}
    for name, value in plain_labels(foundation).items():
        if value != 0:
            known.setdefault(canonical(name), (name, value))
    matches = []
    for name, value in sorted(plain_labels(target).items(), key=lambda kv: kv[1]):
        if value != 0 and canonical(name) in known:
            matches.append((name, value, *known[canonical(name)]))
    return matches


def match_regions(target: Dict[str, object], foundation: Dict[str, object]) -> List[Tuple[str, int, str, int]]:
    """(target name, target channel, foundation name, foundation channel) for every target region
    whose canonical name is a foundation region, in channel order; [] unless both label sets are
    region-based. The channels are the sigmoid head's (`region_channels`)."""
    if not (has_regions(target) and has_regions(foundation)):
        return []
    known = {}
    for name, (channel, _) in region_channels(foundation).items():
        known.setdefault(canonical(name), (name, channel))
    return [(name, channel, *known[canonical(name)]) for name, (channel, _) in region_channels(target).items()
            if canonical(name) in known]


def mixed_outputs(target: Dict[str, object], foundation: Dict[str, object], target_name: str = "the target") -> str:
    """'' where both label sets are regions or both plain labels; otherwise what differs, e.g. "the
    foundation uses regions (sigmoid outputs) and the target plain labels (softmax)": no output of
    one is a start for the other."""
    if has_regions(target) == has_regions(foundation):
        return ""
    regions, plain = (target_name, "the foundation") if has_regions(target) else ("the foundation", target_name)
    return f"{regions} uses regions (sigmoid outputs) and {plain} plain labels (softmax)"


def match_outputs(target: Dict[str, object], foundation: Dict[str, object]) -> List[Tuple[str, int, str, int]]:
    """The target's labels or regions the foundation knows: `match_regions` for region-based label
    sets, `match_labels` otherwise; the second and fourth fields are output channels either way."""
    if has_regions(target):
        return match_regions(target, foundation)
    return [] if has_regions(foundation) else match_labels(target, foundation)


def describe_matches(target: Dict[str, object], matches) -> str:
    """One log line: which labels (or regions) start from the foundation's, and which do not."""
    matched = {m[0] for m in matches}
    names = region_channels(target) if has_regions(target) else {n: v for n, v in plain_labels(target).items() if v}
    unmatched = [n for n in names if n not in matched]
    text = ", ".join(f"'{t}' ({tv}) <- foundation '{f}' ({fv})" for t, tv, f, fv in matches) or "none"
    what = "regions (sigmoid channels) matched to foundation regions" if has_regions(target) else \
        "labels matched to foundation classes"
    return f"{what}: {text}; new: {', '.join(repr(u) for u in unmatched) or 'none'}"


def extend_labels(target: Dict[str, object], foundation: Dict[str, object], target_name: str = "the target"):
    """The labels of a target that extends its foundation (`adopt --keep-foundation-labels`): every
    foundation class at its own value, then the target's new labels; returns (union, annotated values).

    The target numbers its labels in that union: a label named as a foundation class (by canonical
    name) annotates that class and must have its value; every other label is new and takes the values
    after the foundation's, in order, with none left out (nnU-Net needs consecutive values)."""
    from nnunet_fseft.errors import InputError
    if has_regions(target) or has_regions(foundation):
        raise InputError(f"Extending a region-based foundation or target is not supported yet; adopt {target_name} "
                         f"without --keep-foundation-labels to adapt its regions.")
    known = {}
    for name, value in plain_labels(foundation).items():
        if value != 0:
            known.setdefault(canonical(name), (name, value))
    first = max(plain_labels(foundation).values()) + 1
    union = dict(sorted(plain_labels(foundation).items(), key=lambda kv: kv[1]))
    annotated, new = [], []
    for name, value in sorted(plain_labels(target).items(), key=lambda kv: kv[1]):
        if value == 0:
            continue
        if canonical(name) in known:
            f_name, f_value = known[canonical(name)]
            if value != f_value:
                raise InputError(f"{target_name} labels '{name}' as {value}, but it is the foundation's '{f_name}' "
                                 f"({f_value}), not a new label; give it the value {f_value} to annotate that class, "
                                 f"or adopt without --keep-foundation-labels to adapt it alone.")
            annotated.append(value)
            continue
        if value < first:
            f_name = next(n for n, v in union.items() if v == value)
            raise InputError(f"{target_name}'s new label '{name}' has the value {value}, which is the foundation's "
                             f"'{f_name}'; number new labels from {first} on (the foundation keeps 0-{first - 1}), "
                             f"in dataset.json and in the label files.")
        new.append((name, value))
    expected = list(range(first, first + len(new)))
    if [v for _, v in new] != expected:
        raise InputError(f"{target_name}'s new labels {[n for n, _ in new]} have the values {[v for _, v in new]}; "
                         f"give them {expected} (after the foundation's 0-{first - 1}, none left out), in "
                         f"dataset.json and in the label files.")
    if not new:
        raise InputError(f"{target_name} names no label the foundation lacks, so there is nothing to extend it "
                         f"with; adopt it without --keep-foundation-labels to adapt the foundation's classes.")
    union.update(dict(new))
    return union, sorted(annotated + expected)
