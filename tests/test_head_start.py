"""Head initialisation on tiny networks: label names matched across spellings, the foundation's rows
copied, and new labels imprinted from the support set."""
import numpy as np
import pytest
import torch
from torch import nn

from networks import plain2d, plain3d, resenc3d
from nnunet_fseft.foundation.labels import canonical, match_labels
from nnunet_fseft.network.head_init import head_rows, initialise_head


pytestmark = pytest.mark.usefixtures("single_thread")

def test_label_names_are_matched_across_spelling_sides_and_synonyms():
    assert canonical("Left Kidney") == canonical("kidney_L") == canonical("l-kidney") == "kidney_left"
    assert canonical("Kidney_R") == "kidney_right" and canonical("lien") == "spleen"
    assert canonical("portal vein") == "portal_vein_and_splenic_vein"
    assert canonical("left adrenal") == "adrenal_gland_left"
    foundation_labels = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "aorta": 5}
    target = {"background": 0, "Lien": 1, "pancreas": 2, "Right Kidney": 3, "left_kidney": 4, "brain": (1, 2)}
    assert match_labels(target, foundation_labels) == [("Lien", 1, "spleen", 2), ("Right Kidney", 3, "kidney_right", 4),
                                                       ("left_kidney", 4, "kidney_left", 3)]
    assert match_labels({"background": 0, "tumour": 1}, foundation_labels) == []


def test_head_rows_copy_matched_rows_and_leave_new_ones():
    rows, message = head_rows({"background": 0, "lien": 1, "pancreas": 2}, {"background": 0, "liver": 1, "spleen": 2})
    assert rows == [(0, 0), (1, 2)]  # (target channel, foundation channel)
    assert "'lien' (1) <- foundation 'spleen' (2)" in message and "new: 'pancreas'" in message
    assert head_rows({"background": 0, "x": 1}, {"background": 0, "liver": 1})[0] == [(0, 0)]  # background only
    # regions (sigmoid channels) are never a softmax label's start (tests/test_regions.py)
    assert head_rows({"background": 0, "liver": (1, 2)}, {"background": 0, "liver": 1})[0] == []
    torch.manual_seed(0)
    new, old = nn.Conv3d(4, 3, 1), nn.Conv3d(4, 3, 1)
    untouched = new.weight[2].detach().clone()
    initialise_head([new], [(old.weight, old.bias)], rows)
    assert torch.equal(new.weight[0], old.weight[0]) and torch.equal(new.weight[1], old.weight[2])
    assert torch.equal(new.bias[1], old.bias[2]) and torch.equal(new.weight[2], untouched)
    with pytest.raises(ValueError, match="takes 4 features but the new head takes 8"):
        initialise_head([nn.Conv3d(8, 3, 1)], [(old.weight, old.bias)], rows)


# --- the size prior and its hinge -------------------------------------------------------------


# --- imprinting: a start for labels the foundation does not know -------------------------------

def _organ_volume(shape=(20, 20, 20)):
    """A bright cube (label 1) and a dark slab (label 2) on noise, as a preprocessed case."""
    rng = np.random.RandomState(0)
    image = rng.normal(0, 0.3, (1, *shape)).astype(np.float32)
    seg = np.zeros((1, *shape), dtype=np.int16)
    image[0, 6:12, 6:12, 6:12] += 2.0
    seg[0, 6:12, 6:12, 6:12] = 1
    image[0, 15:18] -= 2.0
    seg[0, 15:18] = 2
    return image, seg


def _dice(a, b):
    return 2 * float((a & b).sum()) / max(1, float(a.sum() + b.sum()))


@pytest.mark.parametrize("factory", [plain3d, resenc3d, plain2d], ids=["plain3d", "resenc3d", "plain2d"])
def test_imprinted_labels_are_found_at_step_0(factory):
    """A random network's features already tell the organ from background; imprinting turns that into
    rows of the new head, so a label the foundation never saw is predicted before any training."""
    from nnunet_fseft.network.head_init import imprint, label_crops
    torch.manual_seed(0)
    net = factory()
    heads = list(net.decoder.seg_layers)
    image, seg = _organ_volume()
    patch = (16, 16) if factory is plain2d else (16, 16, 16)
    crops = label_crops(image, seg, patch)
    assert len(crops) == 2 and all(i.shape == (1, *patch) and s.shape == (1, *patch) for i, s in crops)
    def dice_at_step_0():
        net.eval()
        found = []
        for c, (crop_image, crop_seg) in zip((1, 2), crops):
            with torch.no_grad():
                found.append(_dice(net(crop_image[None])[0].argmax(1)[0] == c, crop_seg[0] == c))
        return found

    before, without = [h.weight.clone() for h in heads], dice_at_step_0()
    found = imprint(net, heads, crops, [1, 2])
    assert found[1][0] == sum(int((s == 1).sum()) for _, s in crops) > 0 and found[2][0] > 0
    assert 0 < found[1][1] <= 1 and 0 < found[2][1] <= 1  # the imprinted rows' Dice on the support voxels
    assert all(not torch.equal(b, h.weight) for b, h in zip(before, heads))  # deep-supervision heads too
    found = dice_at_step_0()
    # an untrained network's 4 features (quality with telling features: the tests below)
    assert found[0] > 0.2 and found[0] > without[0] + 0.1, (found, without)


class _TellingFeatures(nn.Module):
    """A 'foundation' whose last features are the intensity and its local mean, then a new head."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = nn.Conv3d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[0, 0, 1, 1, 1] = 1.0
            self.features.weight[1, 0] = 1 / 27
        self.head = nn.Conv3d(2, classes, 1)

    def forward(self, x):
        return self.head(self.features(x))


def test_imprinting_on_telling_features_finds_every_new_label():
    torch.manual_seed(0)
    net = _TellingFeatures(3)
    image, seg = _organ_volume()
    from nnunet_fseft.network.head_init import imprint, label_crops
    crops = label_crops(image, seg, (16, 16, 16))
    imprint(net, [net.head], crops, [1, 2])
    for c, (crop_image, crop_seg) in zip((1, 2), crops):
        with torch.no_grad():
            predicted = net(crop_image[None]).argmax(1)[0]
        assert _dice(predicted == c, crop_seg[0] == c) > 0.8, c


def test_imprinting_sets_the_bias_where_the_support_dice_is_best():
    """A small, faint organ: equal priors would mark far more voxels than it has; the bias set on the
    support's Dice marks about as many as it has."""
    from nnunet_fseft.network.head_init import imprint, label_crops
    rng = np.random.RandomState(1)
    image = rng.normal(0, 1.0, (1, 20, 20, 20)).astype(np.float32)
    seg = np.zeros((1, 20, 20, 20), dtype=np.int16)
    image[0, 8:11, 8:11, 8:11] += 1.5
    seg[0, 8:11, 8:11, 8:11] = 1
    torch.manual_seed(0)
    net = _TellingFeatures(2)
    crops = label_crops(image, seg, (20, 20, 20))
    imprint(net, [net.head], crops, [1])
    with torch.no_grad():
        predicted = net(crops[0][0][None]).argmax(1)[0] == 1
    assert 0.5 * 27 <= int(predicted.sum()) <= 3 * 27, int(predicted.sum())
    assert _dice(predicted, crops[0][1][0] == 1) > 0.5


def test_best_dice_threshold_takes_the_top_voxels_that_maximise_dice():
    from nnunet_fseft.network.head_init import best_dice_threshold
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert best_dice_threshold(scores, torch.tensor([1, 1, 0, 1, 0, 0]).bool()) == pytest.approx((1.5, 6 / 7))  # top 4
    assert best_dice_threshold(scores, torch.tensor([1, 0, 0, 0, 0, 0]).bool()) == (4.5, 1.0)
    assert best_dice_threshold(scores, torch.zeros(6).bool()) == (0.0, 0.0)


def test_a_crop_is_centred_on_the_labels_and_padded_where_the_volume_is_smaller():
    from nnunet_fseft.network.head_init import label_crops
    image, seg = _organ_volume((10, 30, 30))
    [(crop_image, crop_seg)] = label_crops(image, seg, (16, 16, 16))  # the slab lies outside: one label
    assert crop_seg.shape == (1, 16, 16, 16) and (crop_seg[:, 10:] == -1).all()  # padding is ignored
    assert int((crop_seg == 1).sum()) == 4 * 6 * 6  # the cube's slices inside the volume (6:10), whole in-plane
