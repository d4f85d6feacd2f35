"""The BraTS-like generator: seeded cases, skull-stripped anatomy, nested tumour labels, MRI contrasts,
a source -> target shift in the expected directions, and datasets nnU-Net accepts."""
import json
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_fseft.cli import main
from nnunet_fseft.datasets.synth_brats import _ID, _case, _thick_slices, brats_case_arrays, synth_brats_dataset
from nnunet_fseft.errors import InputError
from helpers import nnunet_folders

POPULATIONS = ("source", "target")
T1, T1CE, T2, FLAIR = range(4)
SEEDS = range(20)


def cases(population, seeds=SEEDS, shape=(32, 32, 32)):
    """(channels, label, owner) of each seed's case."""
    return [(im, lab, own) for im, lab, _, own in (_case(s, population, shape) for s in seeds)]


@pytest.fixture(scope="module")
def drawn():
    return {p: cases(p) for p in POPULATIONS}


def test_same_seed_same_case_other_seed_or_population_another(drawn):
    channels, label, spacing = brats_case_arrays(3, "source")
    assert channels.shape == (4, 32, 32, 32) and channels.dtype == np.float32
    assert label.shape == (32, 32, 32) and label.dtype == np.uint8
    assert len(spacing) == 3 and all(0.9 < s < 1.1 for s in spacing)
    again = brats_case_arrays(3, "source")
    assert np.array_equal(channels, again[0]) and np.array_equal(label, again[1]) and spacing == again[2]
    for other in (brats_case_arrays(4, "source"), brats_case_arrays(3, "target")):
        assert not np.array_equal(label, other[1]) and not np.allclose(channels, other[0])


def test_skull_stripped_zero_outside_the_brain_in_every_channel(drawn):
    for population in POPULATIONS:
        for im, lab, own in drawn[population]:
            brain = own > 0
            assert 0.15 < brain.mean() < 0.5  # a brain in its field of view, not an empty or full box
            assert (im[:, ~brain] == 0).all() and (im >= 0).all()
            assert (im[:, brain] > 0).mean() > 0.99
            assert not (lab > 0)[~brain].any()


def test_labels_nested_core_inside_edema_necrosis_inside_rim(drawn):
    edema_around_core, rim_around_necrosis = [], []
    for population in POPULATIONS:
        for im, lab, own in drawn[population]:
            assert set(np.unique(lab)) <= {0, 1, 2, 3}
            wt, core = lab > 0, lab >= 2
            assert core.any() and (lab == 1).sum() > core.sum() / 2  # an edema halo, not a bare core
            # The voxels just outside the core are mostly edema (the rest: the midline or the brain's edge).
            shell = ndimage.binary_dilation(core) & ~core & (own > 0)
            edema_around_core.append((lab[shell] == 1).mean())
            necrosis = own == _ID["necrosis"]
            if necrosis.sum() >= 3:  # ... and those just outside the necrosis mostly enhancing rim
                shell = ndimage.binary_dilation(necrosis) & ~necrosis
                rim_around_necrosis.append((lab[shell] == 3).mean())
            # One hemisphere: no tumour voxel more than 2 voxels past the midline (the brain is a little off-centre).
            columns = np.nonzero(wt)[2]
            assert (columns < 18).all() or (columns >= 14).all()
    assert np.median(edema_around_core) > 0.7 and min(edema_around_core) > 0.3
    assert len(rim_around_necrosis) > 20 and np.median(rim_around_necrosis) > 0.7


def _mean(image, mask):
    return float(image[mask].mean())


def test_mri_contrasts(drawn):
    """Every case of both populations; the source's contrasts are also strong. On the target (weak enhancement,
    blur, bias) the enhancing tumour is brighter on T1ce than necrosis and normal brain on average."""
    for population in POPULATIONS:
        strong = population == "source"
        enhancement = []
        for im, lab, own in drawn[population]:
            normal = (own > 0) & (lab == 0) & (own != _ID["csf"])
            csf, wm, gm = own == _ID["csf"], own == _ID["wm"], own == _ID["gm"]
            assert _mean(im[FLAIR], lab == 1) > (1.4 if strong else 1.05) * _mean(im[FLAIR], normal)
            assert _mean(im[T2], csf) > (2.0 if strong else 1.05) * _mean(im[T2], wm)
            assert _mean(im[T1], wm) > 1.2 * _mean(im[T1], gm) and _mean(im[T1], csf) < _mean(im[T1], gm)
            assert _mean(im[T1CE], csf) < _mean(im[T1CE], gm)
            assert _mean(im[FLAIR], csf) < _mean(im[FLAIR], normal)
            assert _mean(im[T1], lab == 1) < _mean(im[T1], wm)  # edema a little dark on T1
            enh, normal_t1ce = _mean(im[T1CE], lab == 3), _mean(im[T1CE], normal)
            necrosis = _mean(im[T1CE], lab == 2) if (lab == 2).any() else np.nan
            if strong:
                assert enh > 1.3 * normal_t1ce and not enh < 2 * necrosis
            enhancement.append((enh / normal_t1ce, enh / necrosis))
        assert (np.nanmean(enhancement, axis=0) > 1.1).all(), population


def _noise(im, own):
    """Mean over channels of the residual from the 6-neighbour mean inside white matter, relative to its signal:
    about the noise sd over the signal (1/SNR), as white matter is nearly flat at that scale."""
    wm = ndimage.binary_erosion(own == _ID["wm"])
    k = np.zeros((3, 3, 3))
    k[[0, 2, 1, 1, 1, 1], [1, 1, 0, 2, 1, 1], [1, 1, 1, 1, 0, 2]] = 1 / 6
    return np.mean([np.std((c - ndimage.convolve(c, k))[wm]) / c[wm].mean() for c in im])


def test_target_is_noisier_with_larger_tumours_and_weaker_enhancement(drawn):
    def stats(population):
        rows = []
        for im, lab, own in drawn[population]:
            normal = (own > 0) & (lab == 0) & (own != _ID["csf"])
            rows.append((_noise(im, own), (lab > 0).sum(), _mean(im[T1CE], lab == 3) / _mean(im[T1CE], normal)))
        return np.mean(rows, axis=0)
    (noise_s, volume_s, enhancement_s), (noise_t, volume_t, enhancement_t) = stats("source"), stats("target")
    assert noise_t > 1.5 * noise_s
    assert volume_t > 1.3 * volume_s
    assert enhancement_t < 0.85 * enhancement_s


def test_thick_slices_blur_through_plane_only():
    """The target's thick slices: an axial edge is spread over more slices, an in-plane edge stays sharp."""
    volume = np.zeros((1, 32, 8, 8), dtype=np.float32)
    volume[:, 16:] = 100.0
    volume[:, :, :, 4:] += 50.0
    thick = _thick_slices(volume, 3.0, 0.5)
    assert thick.shape == volume.shape and np.allclose(thick[:, :, :, 4:] - thick[:, :, :, :4], 50.0)
    profile = thick[0, :, 0, 0]
    assert np.all(np.diff(profile) >= -1e-4) and abs(profile[0]) < 1e-3 and abs(profile[-1] - 100) < 1e-3
    assert ((profile > 5) & (profile < 95)).sum() >= 3  # the step now spans at least 3 slices (it spanned none)
    assert np.array_equal(_thick_slices(volume, 1.0, 0.5), volume)


def test_every_region_is_drawn_at_32_cubed():
    for population in POPULATIONS:
        labels = [brats_case_arrays(s, population)[1] for s in range(100, 150)]
        assert all((lab > 0).any() for lab in labels)
        all_three = [(lab > 0).any() and (lab >= 2).any() and (lab == 3).any() for lab in labels]
        assert np.mean(all_three) >= 0.9, population


def test_a_32_cubed_case_is_fast():
    brats_case_arrays(0, "target")
    times = []
    for seed in range(5):
        start = time.perf_counter()
        brats_case_arrays(seed, "target")
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.2


EXPECTED_JSON = {
    "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3],
    "numTraining": 2, "numTest": 1, "file_ending": ".nii.gz", "name": "SynthBraTSTarget",
}


def test_written_dataset_passes_nnunets_integrity_check(tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    nnunet_folders(tmp_path, monkeypatch)
    folder = synth_brats_dataset(720, 2, seed=1, population="target", num_test=1)
    assert folder == str(tmp_path / "nnUNet_raw" / "Dataset720_SynthBraTSTarget")
    assert os.listdir(tmp_path / "nnUNet_raw") == ["Dataset720_SynthBraTSTarget"]  # no temporary folder left
    verify_dataset_integrity(folder, num_processes=1)
    with open(os.path.join(folder, "dataset.json")) as f:
        meta = json.load(f)
    description = meta.pop("description")
    assert meta == EXPECTED_JSON and "target" in description and "BraTS-Africa" in description
    assert sorted(os.listdir(os.path.join(folder, "imagesTs"))) == [f"SynthBraTSTarget_002_{c:04d}.nii.gz" for c in range(4)]
    assert os.listdir(os.path.join(folder, "labelsTs")) == ["SynthBraTSTarget_002.nii.gz"]
    # The files hold the generator's arrays: case i is seed * 100003 + i, images written as float32.
    channels, label, spacing = brats_case_arrays(1 * 100003 + 1, "target")
    for c in range(4):
        img = sitk.ReadImage(os.path.join(folder, "imagesTr", f"SynthBraTSTarget_001_{c:04d}.nii.gz"))
        assert img.GetPixelID() == sitk.sitkFloat32 and np.array_equal(sitk.GetArrayFromImage(img), channels[c])
        assert np.allclose(img.GetSpacing(), spacing[::-1])
    lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", "SynthBraTSTarget_001.nii.gz")))
    assert np.array_equal(lab, label)


@pytest.mark.parametrize("kwargs, message", [
    (dict(population="africa"), "Unknown population 'africa'"),
    (dict(shape=(8, 32, 32)), "is too small"),
    (dict(name="bad name"), "may only contain letters"),
])
def test_bad_arguments_are_one_sentence(tmp_path, monkeypatch, kwargs, message):
    nnunet_folders(tmp_path, monkeypatch)
    with pytest.raises(InputError, match=message):
        synth_brats_dataset(720, 1, **kwargs)
    assert os.listdir(tmp_path / "nnUNet_raw") == []


def test_cli_brats_writes_four_channels_and_ct_stays_as_it_was(tmp_path, monkeypatch):
    nnunet_folders(tmp_path, monkeypatch)
    raw = tmp_path / "nnUNet_raw"
    main(["synth", "--task", "brats", "-d", "721", "--cases", "1", "--scanner", "B"])
    images = sorted(os.listdir(raw / "Dataset721_SynthBraTSTarget" / "imagesTr"))
    assert images == [f"SynthBraTSTarget_000_{c:04d}.nii.gz" for c in range(4)]
    assert sitk.ReadImage(str(raw / "Dataset721_SynthBraTSTarget" / "imagesTr" / images[0])).GetSize() == (32, 32, 32)
    main(["synth", "--task", "brats", "-d", "723", "--cases", "1", "--shape", "24", "32", "32"])
    image = sitk.ReadImage(str(raw / "Dataset723_SynthBraTSSource" / "imagesTr" / "SynthBraTSSource_000_0003.nii.gz"))
    assert image.GetSize() == (32, 32, 24)
    # CT, the default task: one channel, the four default organs, 48^3.
    main(["synth", "-d", "722", "--cases", "1"])
    ct = raw / "Dataset722_SynthCTA"
    assert os.listdir(ct / "imagesTr") == ["SynthCTA_000_0000.nii.gz"]
    assert sitk.ReadImage(str(ct / "imagesTr" / "SynthCTA_000_0000.nii.gz")).GetSize() == (48, 48, 48)
    assert json.loads((ct / "dataset.json").read_text())["labels"] == {
        "background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}


def test_cli_refuses_organs_with_brats(tmp_path, monkeypatch, capsys):
    nnunet_folders(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as info:
        main(["synth", "--task", "brats", "-d", "724", "--cases", "1", "--organs", "liver"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "nnunet-fseft synth: error: --organs applies to --task ct only" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "nnUNet_raw") == []
