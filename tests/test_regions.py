"""Region-based label sets (BraTS's whole tumour / tumour core / enhancing tumour, sigmoid outputs)
on tiny networks: regions matched by name, the foundation's sigmoid rows copied (step 0 is its
prediction), new regions imprinted, the zero-shot anchor per region, and the input checks of adopt."""
import copy

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from networks import plain3d
from nnunet_fseft.datasets.dataset_json import has_regions, region_channels
from nnunet_fseft.errors import InputError
from nnunet_fseft.foundation.labels import match_outputs, match_regions
from nnunet_fseft.network.grouped_head import NOWHERE, group_logits
from nnunet_fseft.network.head_init import ABSENT_REGION_BIAS, head_rows, imprint_regions, label_crops, start_head
from nnunet_fseft.training.anchor import ZeroShotAnchor

pytestmark = pytest.mark.usefixtures("single_thread")

BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def test_region_channels_follow_nnunets_order():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    manager = LabelManager(BRATS, [1, 2, 3])
    channels = region_channels(BRATS)
    assert list(channels) == ["whole tumor", "tumor core", "enhancing tumor"]
    assert [v for _, v in channels.values()] == manager.foreground_regions
    assert [c for c, _ in channels.values()] == [0, 1, 2]
    # nnU-Net's rule: a label of one value in a list is not a region
    assert has_regions(BRATS) and not has_regions({"background": 0, "liver": [1]})


def test_regions_match_regions_by_name_and_never_plain_labels():
    foundation = {"background": 0, "Whole Tumour": [1, 2, 3], "TC": [2, 3], "ET": [3]}
    target = {"background": 0, "enhancing tumor": [3], "whole tumor": [1, 2, 3], "edema only": [1, 4]}
    assert match_regions(target, foundation) == [("enhancing tumor", 0, "ET", 2), ("whole tumor", 1, "Whole Tumour", 0)]
    assert match_outputs(target, foundation) == match_regions(target, foundation)
    plain = {"background": 0, "whole tumor": 1}
    assert match_outputs(plain, foundation) == [] and match_outputs(target, plain) == []


def test_head_rows_of_regions_copy_sigmoid_rows_without_a_background_row():
    rows, message = head_rows({"background": 0, "whole tumor": [1, 2], "cyst": [3, 4]}, BRATS)
    assert rows == [(0, 0)]  # the target's channel 0 from the foundation's channel 0; no background channel
    assert "'whole tumor' (0) <- foundation 'whole tumor' (0)" in message and "new: 'cyst'" in message
    rows, message = head_rows({"background": 0, "tumor": 1}, BRATS)
    assert rows == [] and "foundation uses regions" in message and "target plain labels" in message


def _tumour_volume(shape=(20, 20, 20)):
    """A bright blob (label 1) around a brighter core (label 2), as a preprocessed case."""
    rng = np.random.RandomState(0)
    image = rng.normal(0, 0.3, (1, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), dtype=np.int16)
    image[0, 4:14, 4:14, 4:14] += 1.5
    seg[0, 4:14, 4:14, 4:14] = 1
    image[0, 7:11, 7:11, 7:11] += 1.5
    seg[0, 7:11, 7:11, 7:11] = 2
    return image, seg


def _dice(a, b):
    return 2 * float((a & b).sum()) / max(1, float(a.sum() + b.sum()))


def test_new_regions_are_imprinted_and_an_absent_one_starts_predicted_nowhere():
    torch.manual_seed(0)
    net = plain3d()
    heads = list(net.decoder.seg_layers)
    image, seg = _tumour_volume()
    crops = label_crops(image, seg, (16, 16, 16))
    # channel 0: the whole blob (labels 1, 2); channel 1: the core (2); channel 2: label 3, in no support voxel
    found = imprint_regions(net, heads, crops, {0: (1, 2), 1: (2,), 2: (3,)})
    assert found[0][0] > found[1][0] > 0 and found[2] == (0, 0.0)
    assert all(float(h.bias[2].detach()) == ABSENT_REGION_BIAS and not h.weight[2].any() for h in heads)
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(i[None])[0] for i, _ in crops])
    labels = torch.cat([s for _, s in crops])
    blob, core = (labels >= 1) & (labels <= 2), labels == 2
    # an untrained network's features: the blob is found, with the Dice imprinting reported, and the absent
    # region nowhere (nnU-Net's fresh rows: about half the voxels)
    assert _dice(logits[:, 0] > 0, blob) == pytest.approx(found[0][1], abs=0.02) and found[0][1] > 0.5
    assert _dice(logits[:, 1] > 0, core) == pytest.approx(found[1][1], abs=0.02) and found[1][1] > 0.1
    assert not (logits[:, 2] > 0).any()


def test_matched_regions_start_as_the_foundations_sigmoid_outputs():
    """Step 0 = zero-shot on matched regions, exactly: their rows are the foundation's, and a sigmoid
    channel does not depend on the others (a new region imprinted beside them changes nothing)."""
    torch.manual_seed(0)
    foundation = plain3d().eval()
    net = copy.deepcopy(foundation)
    for h in net.decoder.seg_layers:
        torch.nn.init.normal_(h.weight)  # the new head before initialisation
    target = {"background": 0, "enhancing tumor": [3], "whole tumor": [1, 2, 3], "cyst": [4]}
    image, seg = _tumour_volume()
    heads = list(net.decoder.seg_layers)
    log = []
    known = start_head(net, heads, [(h.weight, h.bias) for h in foundation.decoder.seg_layers], target, BRATS,
                       lambda: label_crops(image, seg, (16, 16, 16)), log.append)
    assert known == [0, 1] and any("'cyst' (absent from the support set" in line for line in log)
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval()
    with torch.no_grad():
        mine, theirs = net(x)[0], foundation(x)[0]
    assert torch.equal(mine[:, 0], theirs[:, 2]) and torch.equal(mine[:, 1], theirs[:, 0])
    assert not (mine[:, 2] > 0).any()


def test_an_empty_group_is_a_channel_predicted_nowhere():
    logits = torch.randn(1, 3, 2, 2, 2)
    out = group_logits(logits, [[2], [], [0]])
    assert torch.equal(out[:, 0], logits[:, 2]) and torch.equal(out[:, 2], logits[:, 0])
    assert (out[:, 1] == NOWHERE).all() and torch.sigmoid(out[:, 1]).max() < 1e-6
    # nnU-Net's sliding window: logits x its Gaussian (peak 10), summed over tiles and 8 mirrored passes in float16
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    peak = float(compute_gaussian((16, 16, 16), value_scaling_factor=10, device=torch.device("cpu")).max())
    total = torch.zeros(1, dtype=torch.half)
    for _ in range(8 * 8):
        total += torch.tensor([NOWHERE * peak], dtype=torch.half)
    assert torch.isfinite(total).all()


def _region_anchor(net):
    dice = MemoryEfficientSoftDiceLoss(batch_dice=True, do_bg=True, smooth=1e-5, ddp=False)
    return ZeroShotAnchor(net, None, 1.0, dice, output_weights=(1.0, 0.0, 0.0), regions=[0, 2])


def test_the_region_anchor_holds_the_known_regions_to_the_starts_yes_or_no():
    torch.manual_seed(0)
    net = plain3d()
    for p in net.parameters():
        p.requires_grad_(False)
    head = net.decoder.seg_layers[-1]  # the full-resolution output's
    head.weight.requires_grad_(True)
    head.bias.requires_grad_(True)
    anchor = _region_anchor(net)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        start = net(x)[0][:, [0, 2]] > 0
        head.bias[0] += 4.0  # the moved network over-segments region 0
        head.bias[1] += 9.0  # and a region the anchor leaves free
    anchor.predict_start(net, x)
    assert torch.equal(anchor._targets[0].bool(), start) and anchor._targets[1] is None
    optimizer = torch.optim.Adam([head.weight, head.bias], lr=5e-2)
    before = float(((net(x)[0][:, [0, 2]] > 0) == start).float().mean())
    for _ in range(40):
        anchor.predict_start(net, x)
        optimizer.zero_grad()
        anchor.penalty(net(x)).backward()
        optimizer.step()
    with torch.no_grad():
        out = net(x)[0]
    after = float(((out[:, [0, 2]] > 0) == start).float().mean())
    assert before < 0.8 and after > before + 0.15, (before, after)
    assert float(head.bias.grad[1]) == 0.0  # the free region gets no gradient


def test_adopt_checks_channels_by_name():
    from nnunet_fseft.foundation.adopt import check_channels
    mri = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}}
    check_channels(mri, {"channel_names": {"0": "t1", "1": "T1CE", "2": "T2", "3": "flair"}}, "T")  # case only
    with pytest.raises(InputError, match=r"in another order .*number the target's image files"):
        check_channels(mri, {"channel_names": {"0": "T1ce", "1": "T1", "2": "T2", "3": "FLAIR"}}, "T")
    with pytest.raises(InputError, match=r"missing \['flair'\]"):
        check_channels(mri, {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2"}}, "T")


def test_labels_written_as_one_value_lists_are_plain_labels_everywhere():
    """nnU-Net reads "liver": [1] as label 1 (not a region): head rows, names in the log and the anchor agree."""
    from nnunet_fseft.datasets.dataset_json import plain_labels
    from nnunet_fseft.training.anchor import anchor_groups
    target = {"background": 0, "liver": [1], "pancreas": [2]}
    foundation = {"background": 0, "spleen": 1, "liver": [2]}
    assert not has_regions(target) and plain_labels(target) == {"background": 0, "liver": 1, "pancreas": 2}
    rows, message = head_rows(target, foundation)
    assert rows == [(0, 0), (1, 2)] and "new: 'pancreas'" in message
    assert anchor_groups(target, [0, 1]) == [[0, 2], [1]]
    torch.manual_seed(0)
    net = plain3d()
    for h in net.decoder.seg_layers:  # the target's 3 channels from a 3-class foundation
        assert h.out_channels == 3
    image, seg = _tumour_volume()
    log = []
    known = start_head(net, list(net.decoder.seg_layers), [(h.weight, h.bias) for h in plain3d().decoder.seg_layers],
                       target, foundation, lambda: label_crops(image, seg, (16, 16, 16)), log.append)
    assert known == [0, 1] and any("imprinted from the support set: 'pancreas'" in line for line in log)


def test_a_region_foundation_without_a_recorded_order_still_builds():
    from nnunet_fseft.foundation.record import foundation_label_manager
    from networks import plans_manager
    pm = plans_manager("plain3d")
    assert foundation_label_manager(pm, {"labels": BRATS}).num_segmentation_heads == 3
    assert foundation_label_manager(pm, {"labels": BRATS, "regions_class_order": [1, 2, 3]}).has_regions
    assert foundation_label_manager(pm, {"labels": {"background": 0, "a": 1}}).num_segmentation_heads == 2
