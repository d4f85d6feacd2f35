"""`nnunet-fseft adopt --keep-foundation-labels`: a target that adds structures to its foundation.

The adapted model outputs every foundation class and the target's new labels, from scans annotated
only for what the target names. The target numbers its labels in the union (`labels.extend_labels`):
the foundation's classes keep their values, new labels take the next ones. adopt then writes into the
target's raw dataset.json (the user's file kept as a backup) the union of labels, which nnU-Net's
integrity check and preprocessing read there, and an annotations file in `combine`'s format that says
which classes the scans annotate, so every trainer counts only those in the loss
(training/partial_labels.py) and the zero-shot anchor holds the foundation's other classes.
"""
import os
from typing import Dict, List, Tuple

from nnunet_fseft.datasets.dataset_json import ANNOTATIONS_KEY, plain_labels
from nnunet_fseft.datasets.safe_write import save_json_kept
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.labels import extend_labels

# In the target's raw dataset.json: the labels the user wrote, before adopt put the union in their place
EXTENDS_KEY = "fseft_extends"
ANNOTATIONS = "annotations.json"
SOURCE = "target"


def own_labels(target_json: dict, foundation_json: dict, name: str) -> dict:
    """The labels the user wrote for the target: after an earlier extending adopt, the recorded ones
    (the raw dataset.json then holds the union that adopt wrote, which must not have been edited since)."""
    if EXTENDS_KEY not in target_json:
        return target_json["labels"]
    earlier = target_json[EXTENDS_KEY]
    if target_json["labels"] != extend_labels(earlier["labels"], earlier["foundation_labels"], name)[0]:
        raise InputError(f"{name}'s dataset.json labels changed since an extending adopt wrote the union there; "
                         f"write your labels into the dataset.json.bak-* it kept (the labels you wrote), put that "
                         f"back as dataset.json and adopt again.")
    return earlier["labels"]


def extended_target(raw_folder: str, target_json: dict, foundation_json: dict, name: str) -> Tuple[dict, dict]:
    """(dataset.json with the union of labels, annotations) of a target that extends its foundation.
    Checks, before anything is written, that each scan holds only the values the target names and
    that a foundation class the target names is labelled in every scan (or the user's annotations
    file says which scans annotate it)."""
    if "ignore" in target_json["labels"]:
        raise InputError(f"{name} has an 'ignore' label, and extending a foundation from sparse annotations is not "
                         f"supported yet; fill its labels, or adopt without --keep-foundation-labels.")
    labels = own_labels(target_json, foundation_json, name)
    union, annotated = extend_labels(labels, foundation_json["labels"], name)
    presence = label_presence(raw_folder, target_json)
    names = {v: n for n, v in plain_labels(union).items()}
    for case, values in presence.items():
        unnamed = sorted(v for v in values if v not in annotated and v != 0)
        if unnamed:
            raise InputError(f"{name}'s scan {case} holds label value(s) {unnamed} ("
                             f"{', '.join(repr(names.get(v, 'no label')) for v in unnamed)}), which its dataset.json "
                             f"does not name; add them to its labels or fix the label file.")
    # the user's own annotations file: any file but the one an earlier extending adopt wrote
    user_file = target_json.get(ANNOTATIONS_KEY)
    if user_file == ANNOTATIONS and not target_json.get(EXTENDS_KEY, {"user_annotations": True})["user_annotations"]:
        user_file = None
    if user_file:
        annotations = _user_annotations(os.path.join(raw_folder, user_file), presence, union, name)
    else:
        _refuse_partly_labelled(presence, labels, foundation_json["labels"], annotated, name)
        annotations = {"sources": {SOURCE: {"annotated": annotated}},
                       "cases": {c: {"source": SOURCE, "annotated": annotated} for c in sorted(presence)}}
    extended = {**target_json, "labels": union, ANNOTATIONS_KEY: user_file or ANNOTATIONS,
                EXTENDS_KEY: {"labels": labels, "foundation_labels": foundation_json["labels"],
                              "user_annotations": bool(user_file)}}
    return extended, annotations


def label_presence(raw_folder: str, dataset_json: dict) -> Dict[str, List[int]]:
    """Case id -> the label values its label file holds."""
    import numpy as np
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    cases = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)
    if not cases:
        raise InputError(f"{raw_folder} has no training cases in imagesTr; add at least one labelled case.")
    rw = determine_reader_writer_from_dataset_json(dataset_json, next(iter(cases.values()))["images"][0],
                                                   allow_nonmatching_filename=True, verbose=False)()
    return {case: [int(v) for v in np.unique(rw.read_seg(f["label"])[0])] for case, f in sorted(cases.items())}


def _refuse_partly_labelled(presence: Dict[str, List[int]], labels: dict, foundation_labels: dict,
                            annotated: List[int], name: str) -> None:
    """A foundation class the target names but labels in only some scans would be taught as background
    in the others: the user must say which scans annotate it."""
    foundation_values = set(plain_labels(foundation_labels).values())
    names = {v: n for n, v in plain_labels(labels).items()}
    for value in annotated:
        if value not in foundation_values:
            continue
        missing = [c for c, values in presence.items() if value not in values]
        if len(missing) == len(presence):  # named, yet labelled nowhere: it would be taught as absent everywhere
            raise InputError(f"{name} names the foundation's class '{names[value]}' ({value}) but no scan labels it; "
                             f"leave it out of dataset.json (the foundation's classes are kept without naming them), "
                             f"or label it.")
        if missing:
            raise InputError(f"{name} labels the foundation's class '{names[value]}' ({value}) in some scans but not in "
                             f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; list which scans annotate "
                             f"it in an annotations file named by '{ANNOTATIONS_KEY}' in its dataset.json (the format "
                             f"`nnunet-fseft combine` writes), or label it in every scan.")


def _user_annotations(path: str, presence: Dict[str, List[int]], union: dict, name: str) -> dict:
    from nnunet_fseft.datasets.dataset_json import read_json
    from nnunet_fseft.training.partial_labels import check_annotations
    if not os.path.isfile(path):
        raise InputError(f"{name}'s dataset.json names the annotations file {path}, which does not exist; write it "
                         f"(the format `nnunet-fseft combine` writes) or remove '{ANNOTATIONS_KEY}'.")
    annotations = read_json(path, "write it again in the format `nnunet-fseft combine` writes")
    check_annotations(annotations, path)
    values = set(plain_labels(union).values())
    for case in presence:
        a = annotations["cases"].get(case)
        if a is None:
            raise InputError(f"{path} does not list the scan {case}; list every training scan and the classes it "
                             f"annotates.")
        unknown = sorted(set(a["annotated"]) - values)
        undeclared = sorted(v for v in presence[case] if v and v not in a["annotated"])
        if unknown or undeclared:
            what = " and ".join(x for x in (f"{unknown} are no label of the extended target" if unknown else "",
                                             f"its label file also holds {undeclared}" if undeclared else "") if x)
            raise InputError(f"{path} says scan {case} annotates {a['annotated']}, but {what}; fix the file.")
    return annotations


def write_extended(raw_folder: str, extended: dict, annotations: dict, written: list) -> None:
    """Writes the union dataset.json and the annotations file into the raw folder (a different file
    there is kept as a backup first), appending to `written` what `restore` needs to undo each write
    (as it goes, so a failure half-way is undone too)."""
    for path, content in ((os.path.join(raw_folder, "dataset.json"), extended),
                          (os.path.join(raw_folder, extended[ANNOTATIONS_KEY]), annotations)):
        before = open(path).read() if os.path.isfile(path) else None
        written.append((path, before, ""))
        written[-1] = (path, before, save_json_kept(content, path))


def restore(written: List[Tuple[str, str, str]]) -> None:
    """Puts back what `write_extended` replaced and removes its backups: an adopt that fails later
    leaves the raw folder as it was."""
    for path, before, backup in written:
        if before is None:
            if os.path.isfile(path):
                os.remove(path)
        else:
            with open(path, "w") as f:
                f.write(before)
        if backup and os.path.isfile(backup):
            os.remove(backup)


def describe(extended: dict, annotations: dict) -> str:
    """One line for adopt's output: what the model will output and what the scans annotate."""
    names = {v: n for n, v in plain_labels(extended["labels"]).items()}
    kept = set(plain_labels(extended[EXTENDS_KEY]["foundation_labels"]).values())
    sources = "; ".join(f"{'the scans' if s == SOURCE else s} annotate {', '.join(names[v] for v in a['annotated'])}"
                        for s, a in annotations["sources"].items())
    return (f"Extending the foundation: the model outputs its {len(kept) - 1} classes and the new "
            f"{', '.join(repr(n) for v, n in names.items() if v not in kept)}; {sources} (the foundation's own "
            f"start holds the rest)")
