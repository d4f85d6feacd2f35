"""`nnunet-fseft zeroshot`: the foundation alone on the held-out set, for the target labels it
already knows by name: the K = 0 row of every results table.

The held-out cases are the validation cases of the K-shot splits (`nnunet-fseft kshot`; every
fold shares them). Prediction is nnU-Net's own (`nnUNetPredictor`, sliding window and test-time
mirroring of the foundation) with its classes grouped into the target's (nnunet_fseft/network/grouped_head.py:
the probabilities of the classes the target does not have are added to background's, so this is
exactly what an adapted network predicts at step 0), and nnU-Net's evaluator scores the matched
labels only. A region-based foundation and target (BraTS's whole tumour / core / enhancing) need no
grouping: each target region the foundation knows by name is its sigmoid channel, the others are
predicted nowhere, nnU-Net's `regions_class_order` makes the label map, and the matched regions
are scored.
"""
import os

import numpy as np

from nnunet_fseft.datasets.dataset_json import dataset_name, has_regions, read_json, region_channels
from nnunet_fseft.datasets.safe_write import keep_existing
from nnunet_fseft.environment import require_env
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.labels import match_outputs, mixed_outputs
from nnunet_fseft.foundation.record import build_foundation, recorded_foundation
from nnunet_fseft.network.grouped_head import GroupedOutput, head_groups
from nnunet_fseft.plans import PLANS_NAME

OUTPUT_PREFIX = "fseft_zeroshot"


def held_out_cases(name: str, fold: int) -> list:
    path = os.path.join(require_env("nnUNet_preprocessed"), name, "splits_final.json")
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist; draw the K-shot splits first with "
                         f"`nnunet-fseft kshot -d {name} -k K` (their held-out cases are what zeroshot scores).")
    splits = read_json(path, f"draw the splits again with `nnunet-fseft kshot -d {name} -k K`")
    if not 0 <= fold < len(splits):
        raise InputError(f"{path} has {len(splits)} folds; pass -f between 0 and {len(splits) - 1}.")
    return splits[fold]["val"]


def zeroshot(dataset: str, plans_name: str = PLANS_NAME, fold: int = 0, out: str = None, device: str = "cpu",
             mirroring: bool = True, num_processes: int = 2, reference: str = None):
    """Returns ({target label name: mean Dice over the held-out cases}, OUT); writes the predictions
    and nnU-Net's summary.json to OUT (default nnUNet_results/DATASET/fseft_zeroshot__PLANS__CONFIG).
    `reference`: a folder of the held-out cases' label maps to score against instead of labelsTr (a
    target that extends its foundation labels only its new structures there)."""
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from nnunet_fseft.plans.load import load_plans

    name = dataset_name(dataset)
    plans, dataset_json = load_plans(name, plans_name)
    record = recorded_foundation(plans)
    if record is None:
        raise InputError(f"Plans {plans_name} of {name} record no foundation; run `nnunet-fseft adopt` for {name} "
                         f"(or pass its plans with -p).")
    if record.get("extends") and reference is None:
        raise InputError(f"{name} extends its foundation (adopt --keep-foundation-labels), so its labelsTr holds only "
                         f"the new labels and would score the foundation's classes as missed; pass --reference with "
                         f"full label maps of the held-out cases.")
    regions = has_regions(dataset_json["labels"])
    mixed = mixed_outputs(dataset_json["labels"], record["labels"], name)
    if mixed:
        raise InputError(f"{mixed[0].upper()}{mixed[1:]}, which share no output to predict with; zero-shot needs "
                         f"both label sets written alike.")
    matches = match_outputs(dataset_json["labels"], record["labels"])
    if not matches:
        raise InputError(f"No label of {name} ({', '.join(n for n in dataset_json['labels'] if n != 'background')}) "
                         f"is a class the foundation knows ({', '.join(n for n in record['labels'] if n != 'background')}); "
                         f"zero-shot needs at least one (rename the label if it is the same structure).")
    cases = get_filenames_of_train_images_and_targets(os.path.join(require_env("nnUNet_raw"), name), dataset_json)
    held_out = held_out_cases(name, fold)
    missing = [c for c in held_out if c not in cases]
    if missing:
        raise InputError(f"Held-out case {missing[0]} of splits_final.json is not in {name}'s imagesTr; draw the "
                         f"splits again with `nnunet-fseft kshot`.")
    configuration = record["configuration"]
    out = out or os.path.join(require_env("nnUNet_results"), name, f"{OUTPUT_PREFIX}__{plans_name}__{configuration}")
    backup = keep_existing(out)  # an earlier run's results are kept, never overwritten
    if backup:
        print(f"Kept the previous zero-shot results as {backup}")

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    network, checkpoint = build_foundation(pm, cm, determine_num_input_channels(pm, cm, dataset_json), record)
    # The foundation's classes grouped into the matched labels (nnunet_fseft/network/grouped_head.py): background and
    # every unmatched class into channel 0, matched label i into channel i, as the adapted network's
    # head groups them at step 0
    if regions:  # target channel t: the foundation's channel of that region, or nowhere
        source = {t: [f] for _, t, _, f in matches}
        network = GroupedOutput(network, [source.get(t, []) for t in range(len(region_channels(dataset_json["labels"])))])
        folded_json = dataset_json
    else:
        groups = head_groups(dataset_json["labels"], record["labels"])
        channels = [0] + [t for _, t, _, _ in matches]
        network = GroupedOutput(network, [groups[t] for t in channels])
        folded_json = {**dataset_json, "labels": {"background": 0, **{n: i + 1 for i, (n, _, _, _) in enumerate(matches)}}}
    predictor = nnUNetPredictor(use_mirroring=mirroring, perform_everything_on_device=device != "cpu",
                                device=torch.device(device), allow_tqdm=False)
    predictor.manual_initialization(network, pm, cm, [checkpoint["network_weights"]], folded_json, record["trainer"],
                                    checkpoint.get("inference_allowed_mirroring_axes"))
    raw_out, final = os.path.join(out, "folded_labels"), os.path.join(out, "predictions")
    os.makedirs(raw_out)
    os.makedirs(final)
    predictor.predict_from_files_sequential([cases[c]["images"] for c in held_out],
                                            [os.path.join(raw_out, c) for c in held_out], False, True, None)

    ending = dataset_json["file_ending"]
    io = pm.image_reader_writer_class()
    if regions:  # already the target's label map (regions_class_order)
        os.rmdir(final)
        os.rename(raw_out, final)
        values = {n: v for n, (_, v) in region_channels(dataset_json["labels"]).items()}
        scored = [values[t_name] for t_name, _, _, _ in matches]
    else:
        lookup = np.array(channels, dtype=np.uint8)  # grouped channel -> target label
        for c in held_out:
            seg, properties = io.read_seg(os.path.join(raw_out, c + ending))
            io.write_seg(lookup[seg[0].astype(np.int64)], os.path.join(final, c + ending), properties)
        scored = [t for _, t, _, _ in matches]
    labels_folder = reference or os.path.dirname(cases[held_out[0]]["label"])
    summary = compute_metrics_on_folder(labels_folder, final, os.path.join(out, "summary.json"), io, ending, scored,
                                        ignore_label=pm.get_label_manager(dataset_json).ignore_label,
                                        num_processes=num_processes)
    means = {str(k): v for k, v in summary["mean"].items()}  # (nnU-Net writes a region as the string of its tuple)
    return {m[0]: float(means[str(key)]["Dice"]) for m, key in zip(matches, scored)}, out
