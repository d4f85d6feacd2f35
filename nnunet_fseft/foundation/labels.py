"""Which target labels are classes the foundation already knows, by name.

Used by zero-shot head initialisation (every trainer) and by `nnunet-fseft zeroshot`.
Names are compared after normalisation: lower case, words split on spaces, hyphens, dots and
underscores, a side word (left/l/lt, right/r/rt) moved to the end, and organ synonyms
replaced by one canonical name. "Left Kidney", "kidney_L" and "l_kidney" are all
"kidney_left"; "lien" is "spleen". Labels given as regions (tuples) are never matched.
"""
import re
from typing import Dict, List, Tuple
from nnunet_fseft.datasets.dataset_json import plain_labels

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


def describe_matches(target: Dict[str, object], matches) -> str:
    """One log line: which labels start from the foundation's classes, and which do not."""
    matched = {m[0] for m in matches}
    unmatched = [n for n, v in plain_labels(target).items() if v != 0 and n not in matched]
    text = ", ".join(f"'{t}' ({tv}) <- foundation '{f}' ({fv})" for t, tv, f, fv in matches) or "none"
    return f"labels matched to foundation classes: {text}; new: {', '.join(repr(u) for u in unmatched) or 'none'}"
