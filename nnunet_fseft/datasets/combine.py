"""`nnunet-fseft combine`: pool several partially labelled raw nnU-Net datasets into one.

The pooled dataset has one label set, built from label names (`labels.canonical`, and a
label-map file for anything else), and beside its dataset.json an `annotations.json` that says
which classes each case's source annotates: the partial-label trainer
(`nnUNetTrainerFSEFT_Foundation`) reads it, plain nnU-Net ignores it.

Names, channels, ids and files are checked before anything is written; label values are checked
as each file is remapped. The pooled dataset is written to a temporary folder renamed only when
complete, so an error leaves nothing, and the sources are only read.
"""
import json
import os
import shutil
from typing import Dict, List, Optional

from nnunet_fseft.datasets.dataset_json import (ANNOTATIONS, ANNOTATIONS_KEY, channels, dataset_name, has_regions,
                                                plain_foreground, read_dataset_json, read_json)
from nnunet_fseft.environment import require_env
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.labels import canonical


def read_label_map(path: Optional[str]) -> Dict[str, str]:
    """{canonical source name: unified name} from a JSON object {"source name": "unified name"}."""
    if not path:
        return {}
    if not os.path.isfile(path):
        raise InputError(f"Label map {path} does not exist; pass a JSON file such as "
                         f'{{"kidney_left": "kidney", "kidney_right": "kidney"}}.')
    mapping = read_json(path, 'a label map is a JSON object {"source name": "unified name"}')
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise InputError(f'Label map {path} must be a JSON object {{"source name": "unified name"}} of strings.')
    return {canonical(k): canonical(v) for k, v in mapping.items()}


def _source_labels(name: str, dataset_json: dict) -> Dict[str, int]:
    """The source's foreground labels, name -> value; regions and ignore labels are refused."""
    labels = dataset_json["labels"]
    if has_regions(labels):
        raise InputError(f"{name} defines regions (labels with several values); combine pools plain labels "
                         f"only, so convert its dataset.json to one value per label first.")
    if "ignore" in labels:
        raise InputError(f"{name} has an 'ignore' label; combine cannot pool sparse annotations, so fill "
                         f"or remove its ignore label first.")
    return plain_foreground(labels)


def unify_labels(sources: Dict[str, Dict[str, int]], label_map: Dict[str, str]):
    """(unified labels {name: value}, {source: {source value: unified value}}).

    A source name becomes the label map's name, else its canonical form (so 'lien' and 'Spleen'
    are one class). Refused: a label-map entry no source has; two labels of one source that become
    one class without the label map saying so; a joined organ ('kidney') beside its sides."""
    all_names = {canonical(n) for labels in sources.values() for n in labels}
    unused = sorted(set(label_map) - all_names)
    if unused:
        raise InputError(f"The label map names {unused}, which no source dataset labels; fix the names "
                         f"(labels in the sources: {sorted(all_names)}).")
    unified, lut = {"background": 0}, {}
    for source, labels in sources.items():
        lut[source], seen = {}, {}
        for name, value in sorted(labels.items(), key=lambda kv: kv[1]):
            key = canonical(name)
            target = label_map.get(key, key)
            if target in seen and key not in label_map:
                raise InputError(f"{source} labels both '{seen[target]}' and '{name}', which both mean "
                                 f"'{target}'; merge them in the source or map them in a --label-map file.")
            seen[target] = name
            if target == "background":
                lut[source][value] = 0
                continue
            lut[source][value] = unified.setdefault(target, len(unified))
    for name in unified:
        sides = [f"{name}_left", f"{name}_right"]
        if any(s in unified for s in sides):
            joined = [s for s, labels in sources.items() if any(lut[s][v] == unified[name] for v in labels.values())]
            split = [s for s, labels in sources.items()
                     if any(lut[s][v] in [unified.get(x) for x in sides] for v in labels.values())]
            raise InputError(f"'{name}' means both sides in {', '.join(joined)} but {', '.join(split)} label "
                             f"{' and '.join(sides)} apart; join them with a --label-map file "
                             f'{{"{sides[0]}": "{name}", "{sides[1]}": "{name}"}}.')
    return unified, lut


def combine(datasets: List[str], target_id: int, name: Optional[str] = None, label_map: Optional[str] = None,
            copy: bool = False, num_processes: int = 2) -> str:
    """Writes $nnUNet_raw/DatasetXXX_NAME (imagesTr, labelsTr, dataset.json, annotations.json); returns its path."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    raw = require_env("nnUNet_raw")
    names = [dataset_name(d) for d in datasets]
    if len(set(names)) != len(names):
        raise InputError(f"A dataset is listed twice ({' '.join(map(str, datasets))}); list each source once.")
    if not 1 <= int(target_id) <= 999:
        raise InputError(f"Dataset id {target_id} is out of range; pick an unused id between 1 and 999.")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # nnU-Net finds an id in any of them
        folder = os.environ.get(var)
        clash = [d for d in os.listdir(folder) if d.startswith(f"Dataset{int(target_id):03d}_")] \
            if folder and os.path.isdir(folder) else []
        if clash:
            raise InputError(f"Dataset id {target_id} is already used by {os.path.join(folder, clash[0])}; "
                             f"pick another id for the pooled dataset.")
    name = name or "Combined"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"Dataset name {name!r} may only contain letters, digits, '_' and '-'.")

    jsons = {n: read_dataset_json(os.path.join(raw, n, "dataset.json")) for n in names}
    first = names[0]
    for n in names[1:]:
        if channels(jsons[n]) != channels(jsons[first]):
            raise InputError(f"{n} has input channels {channels(jsons[n])} but {first} has "
                             f"{channels(jsons[first])}; only datasets of the same channels and modalities pool.")
        if jsons[n]["file_ending"] != jsons[first]["file_ending"]:
            raise InputError(f"{n} stores {jsons[n]['file_ending']} files but {first} stores "
                             f"{jsons[first]['file_ending']}; convert one of them so both use one file ending.")
    sources = {n: _source_labels(n, jsons[n]) for n in names}
    unified, lut = unify_labels(sources, read_label_map(label_map))
    cases = {n: get_filenames_of_train_images_and_targets(os.path.join(raw, n), jsons[n]) for n in names}
    for n in names:
        if not cases[n]:
            raise InputError(f"{n} has no training cases in imagesTr; check its dataset.json and file ending.")
        missing = [p for f in cases[n].values() for p in [*f["images"], f["label"]] if not os.path.isfile(p)]
        if missing:
            more = f" and {len(missing) - 1} other files" if len(missing) > 1 else ""
            raise InputError(f"{n} lacks {missing[0]}{more}; every training image needs its label file.")

    final = os.path.join(raw, f"Dataset{int(target_id):03d}_{name}")
    tmp = os.path.join(raw, f".tmp_Dataset{int(target_id):03d}_{name}_{os.getpid()}")
    try:
        _write(tmp, names, jsons, cases, unified, lut, name, copy, num_processes)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write(folder, names, jsons, cases, unified, lut, name, copy, num_processes):
    from multiprocessing import Pool
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    ending = jsons[names[0]]["file_ending"]
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub))
    annotations, jobs = {"sources": {}, "cases": {}}, []
    for n in names:
        prefix = n.split("_")[0]  # DatasetXXX: case names stay unique across sources
        annotated = sorted(set(v for v in lut[n].values() if v != 0))
        annotations["sources"][n] = {"annotated": annotated, "label_values": {str(k): v for k, v in lut[n].items()}}
        files = cases[n]
        rw = determine_reader_writer_from_dataset_json(jsons[n], files[next(iter(files))]["images"][0], verbose=False)
        for case, f in sorted(files.items()):
            new_case = f"{prefix}_{case}"
            for c, image in enumerate(f["images"]):
                dst = os.path.join(folder, "imagesTr", f"{new_case}_{c:04d}{ending}")
                if copy:
                    shutil.copy2(image, dst)
                else:
                    os.symlink(os.path.abspath(image), dst)
            jobs.append((rw, f["label"], os.path.join(folder, "labelsTr", new_case + ending), lut[n], n))
            annotations["cases"][new_case] = {"source": n, "annotated": annotated}
    if num_processes > 1:
        with Pool(num_processes) as pool:
            pool.starmap(_remap_label, jobs)
    else:
        for job in jobs:
            _remap_label(*job)
    meta = {"channel_names": jsons[names[0]].get("channel_names", jsons[names[0]].get("modality")),
            "labels": unified, "numTraining": len(annotations["cases"]), "file_ending": ending, "name": name,
            ANNOTATIONS_KEY: ANNOTATIONS,
            "description": f"Pooled by nnunet-fseft combine from {', '.join(names)}; each source annotates "
                           f"only some labels, listed per case in {ANNOTATIONS}."}
    if "overwrite_image_reader_writer" in jsons[names[0]]:
        meta["overwrite_image_reader_writer"] = jsons[names[0]]["overwrite_image_reader_writer"]
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(folder, ANNOTATIONS), "w") as f:
        json.dump(annotations, f, indent=1)


def _remap_label(reader_writer, source: str, destination: str, lut: Dict[int, int], dataset: str) -> None:
    """One label file in the unified values, written with the source's reader/writer and geometry."""
    import numpy as np
    rw = reader_writer()
    seg, props = rw.read_seg(source)
    values = np.unique(seg)
    if not np.all(values == np.rint(values)):
        raise InputError(f"{source} holds non-integer values such as {values[values != np.rint(values)][0]}; "
                         f"a label map holds whole numbers (was it resampled with interpolation?).")
    unknown = [int(v) for v in values if v != 0 and int(v) not in lut]
    if unknown:
        raise InputError(f"{source} holds label value(s) {unknown} that {dataset}'s dataset.json does not "
                         f"name; add them to its labels or fix the file.")
    table = np.zeros(max([0, *lut]) + 1, dtype=np.uint8 if max(lut.values(), default=0) < 256 else np.uint16)
    for value, new in lut.items():
        table[value] = new
    rw.write_seg(table[seg[0].astype(np.int32)], destination, props)
