"""Synthetic BraTS-like brain-tumour MRI written as raw nnU-Net v2 datasets.

Four channels in the order nnU-Net's BraTS-2021 conversion writes them (T1, T1ce, T2, FLAIR) and its
labels (0 background, 1 edema, 2 necrosis / non-enhancing core, 3 enhancing tumour), trained as
nnU-Net's regions: whole tumour (1, 2, 3), tumour core (2, 3) and enhancing tumour (3).
Two populations model the BraTS-2021 -> BraTS-Africa shift: "source" (good SNR, sharp, a mild bias
field, strong contrast enhancement) and "target" (thick slices, blur, low SNR, a strong bias field,
weak enhancement, incomplete CSF suppression on FLAIR, larger tumours). Both are stored on the same
near-1 mm grid, as BraTS distributes both collections resampled to one atlas grid: the target's thicker
slices show as through-plane blur, not as another spacing.

Built for tests and demos on a small CPU: a 32^3 case takes about 15 ms, and the output depends only on
(seed, population, shape). Arrays are ordered (z, y, x) as in synth.py: x = left -> right,
y = anterior -> posterior, z = inferior -> superior, coordinates normalised to [-1, 1] on every axis.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunet_fseft.datasets.synth import _check_shape, _inside, _raw_folder, _smooth_field, _write_dataset
from nnunet_fseft.errors import InputError

CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
# Region definitions as nnU-Net's BraTS example writes them: each region is the set of label values it contains.
LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
POPULATIONS = ("source", "target")

# Voxel owners. The label of each owner is in _LABEL_OF; non-enhancing solid core is labelled 2 like necrosis.
_OWNERS = ("background", "wm", "gm", "csf", "edema", "necrosis", "enhancing", "nonenhancing")
_ID = {n: i for i, n in enumerate(_OWNERS)}
_LABEL_OF = np.array([0, 0, 0, 0, 1, 2, 3, 2], dtype=np.uint8)
# Texture sd per owner, relative to its intensity: tumour tissue is more heterogeneous than normal brain.
_TEXTURE = np.array([0, 0.04, 0.05, 0.03, 0.07, 0.10, 0.09, 0.08], dtype=np.float32)

# Mean intensity per owner and channel (T1, T1ce, T2, FLAIR), in arbitrary MR units. The enhancing tumour's
# T1ce is set per case from its unenhanced T1 and the population's enhancement gain (see _contrast).
# Source (3 T-like): white matter brighter than grey on T1, CSF dark on T1/T1ce and suppressed on FLAIR.
_SOURCE = {
    "wm":           (700, 680, 330, 420),
    "gm":           (480, 470, 520, 560),
    "csf":          (180, 170, 950, 110),
    "edema":        (470, 460, 780, 860),
    "necrosis":     (280, 260, 760, 500),
    "enhancing":    (520, None, 620, 660),
    "nonenhancing": (420, 440, 700, 760),
}
# Target (older, lower-field scanners): less grey/white contrast on T1, CSF only partly suppressed on FLAIR,
# edema and tumour less conspicuous on FLAIR and T2.
_TARGET = {
    "wm":           (640, 620, 340, 470),
    "gm":           (500, 490, 500, 540),
    "csf":          (220, 210, 900, 300),
    "edema":        (520, 510, 740, 700),
    "necrosis":     (320, 300, 720, 540),
    "enhancing":    (540, None, 600, 640),
    "nonenhancing": (470, 480, 680, 680),
}
_ENHANCED_T1CE = 980  # the enhancing tumour's T1ce at full gain (source), from its unenhanced T1 value upwards

# Populations. edema: whole-tumour radius range (normalised units); gain: contrast-enhancement gain;
# blur: in-plane Gaussian sigma (voxels at 32^3, scaled with the shape); slice: axial slice thickness range
# (voxels at 32^3; 1 = no thick slices); noise: Rician sd range relative to the mean brain signal;
# bias: sd of the log bias field.
_POPULATION = {
    "source": dict(table=_SOURCE, edema=(0.20, 0.38), gain=(0.9, 1.1), blur=0.4, slice=(1.0, 1.0),
                   noise=(0.015, 0.03), bias=(0.03, 0.08)),
    "target": dict(table=_TARGET, edema=(0.26, 0.46), gain=(0.35, 0.6), blur=0.6, slice=(2.0, 3.0),
                   noise=(0.045, 0.07), bias=(0.12, 0.22)),
}
_SEED_TAG = 0xB2A75  # keeps these random streams apart from synth.py's CT phantoms of the same seed


def _check_population(population: str) -> None:
    if population not in _POPULATION:
        raise InputError(f"Unknown population {population!r}; choose 'source' (BraTS-2021-like) or "
                         f"'target' (BraTS-Africa-like).")


def _brain(rng: np.random.Generator, x, y, z, shape) -> tuple:
    """Owner map of a skull-stripped brain: white matter, a folded cortical ribbon and deep grey nuclei,
    lateral ventricles and some sulcal CSF; 0 outside the brain. Also returns the brain's centre (x, y, z)."""
    radii = np.array([0.74, 0.88, 0.78]) * rng.uniform(0.94, 1.04, 3)
    c = rng.normal(0, 0.02, 3)
    # Superquadric "radius" (1 on the surface), a little boxier than an ellipsoid, like a brain.
    q = (np.abs((x - c[0]) / radii[0]) ** 2.3 + np.abs((y - c[1]) / radii[1]) ** 2.3
         + np.abs((z - c[2]) / radii[2]) ** 2.3) ** (1 / 2.3)
    brain = q <= 1.0 + 0.03 * _smooth_field(rng, shape, 6)
    owner = np.zeros(shape, dtype=np.uint8)
    owner[brain] = _ID["wm"]
    # Cortical ribbon about 40 % of the brain, its inner edge folded by a field a few voxels across (gyri).
    gyri = np.clip(_smooth_field(rng, shape, max(8, max(shape) // 3)), -2, 2)
    owner[brain & (q > 1 - 0.16 * (1 + 0.35 * gyri))] = _ID["gm"]
    for side in (-1, 1):  # basal ganglia / thalamus, grey matter beside the ventricles
        owner[brain & _inside(x, y, z, (side * 0.2, 0.02, -0.02) + c, (0.11, 0.17, 0.12))] = _ID["gm"]
    # Lateral ventricles: frontal horns diverge a little; their size varies (age, atrophy).
    size = rng.uniform(0.8, 1.4)
    for side in (-1, 1):
        owner[brain & _inside(x, y, z, (side * 0.09, -0.05, 0.12) + c, (0.075 * size, 0.30, 0.10 * size),
                              angle=side * 0.15)] = _ID["csf"]
    sulci = _smooth_field(rng, shape, max(10, max(shape) // 3))
    owner[(owner == _ID["gm"]) & (q > 0.93) & (sulci > 1.0)] = _ID["csf"]
    return owner, c


def _tumour(rng: np.random.Generator, x, y, z, owner: np.ndarray, brain_centre, cfg: dict, shape) -> None:
    """Draw edema, enhancing rim, necrosis (and sometimes non-enhancing core) into `owner`, in place.

    One deformed, rotated ellipsoid per layer around one centre in one hemisphere (the falx stops it at
    the midline): the edema spreads further in white matter than in the cortex and spares the CSF; the
    core may reach the edema's edge.
    """
    h = 2.0 / (min(shape) - 1)  # one voxel in normalised units
    brain = owner > 0
    side = rng.choice([-1.0, 1.0])
    r_e = rng.uniform(*cfg["edema"])
    r_c = r_e * rng.uniform(0.42, 0.62)
    for _ in range(100):  # a centre whose core fits inside the brain, with most of the edema off the midline
        c = rng.uniform(-1, 1, 3) * (0.55, 0.65, 0.5)
        c[0] = side * abs(c[0])
        if abs(c[0]) >= 0.55 * r_e + h and ((c / (0.74, 0.88, 0.78)) ** 2).sum() <= (1 - r_c / 0.74) ** 2:
            break
    c = c + brain_centre
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # a random orientation
    aniso = rng.uniform(0.8, 1.25, 3)
    aniso /= np.cbrt(aniso.prod())  # elongated, same volume
    rel = (x - float(c[0]), y - float(c[1]), z - float(c[2]))
    rho = np.sqrt(sum((sum(float(rot[i, j]) * rel[j] for j in range(3)) / float(aniso[i])) ** 2 for i in range(3)))

    allowed = brain & (side * (x - float(brain_centre[0])) >= 0)
    f_e, f_c, f_n = (np.clip(_smooth_field(rng, shape, 6), -2, 2) for _ in range(3))
    core_edge = r_c * (1 + 0.18 * f_c)
    edema_edge = r_e * (1 + 0.25 * f_e) * np.where(owner == _ID["gm"], 0.85, 1.0).astype(np.float32)
    edema_edge = np.maximum(edema_edge, core_edge + h)  # a halo at least a voxel thick wherever the brain allows
    core = allowed & (rho <= core_edge)
    owner[allowed & (rho <= edema_edge) & (owner != _ID["csf"]) & ~core] = _ID["edema"]
    owner[core] = _ID["enhancing"]

    variant = rng.random()  # about 10 % solid enhancing tumours, 10 % with only a patch of enhancement
    if variant >= 0.1:  # a necrotic centre inside an enhancing rim at least ~1 voxel thick
        rim = max(1.3 * h, r_c * rng.uniform(0.2, 0.4)) * (1 + 0.3 * np.clip(f_n, -1.5, 1.5))
        owner[core & (rho <= core_edge - rim)] = _ID["necrosis"]
    if 0.1 <= variant < 0.2:  # only a patch of the rim enhances; the rest is non-enhancing solid core
        rim = owner == _ID["enhancing"]
        if rim.any():
            patch = _smooth_field(rng, shape, 6)
            keep = patch >= np.quantile(patch[rim], rng.uniform(0.5, 0.8))
            owner[rim & ~keep] = _ID["nonenhancing"]


def _contrast(rng: np.random.Generator, cfg: dict) -> np.ndarray:
    """(owner, channel) intensity table for one case: the population's table, its enhancement gain, and
    a few per cent of per-case variation of each tissue's contrast."""
    table = np.zeros((len(_OWNERS), len(CHANNELS)), dtype=np.float32)
    for name, values in cfg["table"].items():
        table[_ID[name]] = [0 if v is None else v for v in values]
    enh = _ID["enhancing"]
    table[enh, 1] = table[enh, 0] + rng.uniform(*cfg["gain"]) * (_ENHANCED_T1CE - table[enh, 0])
    table[1:] *= rng.uniform(0.94, 1.06, table[1:].shape)
    return table


def _thick_slices(image: np.ndarray, thickness: float, phase: float) -> np.ndarray:
    """Acquire axial slices `thickness` voxels thick (Gaussian slice profile of that FWHM), the first one
    `phase` (0..1) of a slice below the grid's first plane, and interpolate them back onto the grid, as when
    a 2D sequence is resampled to the atlas: through-plane blur and steps."""
    if thickness <= 1.0:
        return image
    n = image.shape[-3]
    profile = ndimage.gaussian_filter1d(image, thickness / 2.355, axis=-3, mode="nearest")
    start = -phase * thickness
    slices = _lerp_z(profile, start + thickness * np.arange(int(np.ceil((n - 1 - start) / thickness)) + 2))
    return _lerp_z(slices, (np.arange(n) - start) / thickness)


def _lerp_z(volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of (..., z, y, x) at fractional z positions (clamped at both ends)."""
    n = volume.shape[-3]
    pos = np.clip(positions, 0, n - 1)
    lo = np.minimum(np.floor(pos).astype(int), n - 2)
    w = (pos - lo).astype(np.float32)[:, None, None]
    return volume[..., lo, :, :] * (1 - w) + volume[..., lo + 1, :, :] * w


def _case(rng_seed: int, population: str, shape):
    """brats_case_arrays plus the owner map (tissue ids of _OWNERS), which the tests use to find WM and CSF."""
    _check_population(population)
    shape = _check_shape(shape)
    cfg = _POPULATION[population]
    rng = np.random.default_rng([int(rng_seed), _SEED_TAG, POPULATIONS.index(population)])
    scale = min(shape) / 32  # blur and slice thickness are given at 32^3: the same look at other sizes
    spacing = tuple(float(s) for s in rng.uniform(0.97, 1.03, 3))

    # Normalised grid, warped by one smooth displacement field (the brain's shape varies coherently).
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    z, y, x = (a + 0.04 * _smooth_field(rng, shape, 4) for a in (z, y, x))
    owner, brain_centre = _brain(rng, x, y, z, shape)
    _tumour(rng, x, y, z, owner, brain_centre, cfg, shape)

    # Intensities: lookup per owner with texture (two smooth fields, shared by the channels as tissue
    # structure is), the scanner's point-spread / thick slices, a bias field per channel, Rician noise.
    table = _contrast(rng, cfg)
    texture = 0.7 * _smooth_field(rng, shape, 8) + 0.3 * _smooth_field(rng, shape, max(shape) // 3)
    # The scanner sees CSF around the brain (skull-stripping removes it afterwards): blur mixes the brain's
    # edge with CSF, not with zeros.
    seen = np.where(owner == _ID["background"], _ID["csf"], owner)
    image = table[seen].transpose(3, 0, 1, 2) * (1 + _TEXTURE[seen] * texture)
    sigma = cfg["blur"] * scale
    image = ndimage.gaussian_filter(image, (0, sigma if cfg["slice"][1] <= 1 else 0, sigma, sigma))
    image = _thick_slices(image, rng.uniform(*cfg["slice"]) * scale, rng.uniform())
    # Bias field: mostly the receive coil's, shared by the sequences of a session, plus a part of each sequence.
    shared = _smooth_field(rng, shape, 2)
    log_bias = np.stack([0.8 * shared + 0.6 * _smooth_field(rng, shape, 2) for _ in CHANNELS])
    image *= np.exp(rng.uniform(*cfg["bias"]) * log_bias)
    brain = owner > 0
    sd = rng.uniform(*cfg["noise"]) * image[:, brain].mean(axis=1)[:, None, None, None]
    noise = rng.standard_normal((2, *image.shape), dtype=np.float32) * sd
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # magnitude of a complex signal: Rician, >= 0
    image *= rng.uniform(0.6, 1.5, (len(CHANNELS), 1, 1, 1))  # MR units are arbitrary per scan and sequence
    image *= brain  # skull-stripped: zero outside the brain mask, as in BraTS
    return image.astype(np.float32), _LABEL_OF[owner], spacing, owner


def brats_case_arrays(rng_seed: int, population: str = "source", shape=(32, 32, 32)):
    """Return (channels float32 (4, z, y, x) in the order T1, T1ce, T2, FLAIR, label uint8 (z, y, x),
    spacing (z, y, x) in mm) for one BraTS-like case.

    Labels: 0 background, 1 edema, 2 necrosis / non-enhancing core, 3 enhancing tumour. The population
    ("source" or "target") is part of the seed, so source and target datasets never share a case.
    """
    channels, label, spacing, _ = _case(rng_seed, population, shape)
    return channels, label, spacing


def synth_brats_dataset(dataset_id: int, num_cases: int, seed: int = 0, name: str | None = None,
                        population: str = "source", num_test: int = 0,
                        shape: tuple[int, int, int] = (32, 32, 32)) -> str:
    """Write $nnUNet_raw/DatasetXXX_NAME/ (4 channels per case, nnU-Net regions); return the dataset folder path.

    Checks, numbering and the temporary folder are synth_dataset's: test cases continue the case numbering
    (and so the seeds) after the training cases, with their labels in labelsTs.
    """
    raw = _raw_folder()
    _check_population(population)
    shape = _check_shape(shape)

    def make_case(i):
        channels, label, spacing = brats_case_arrays(seed * 100003 + i, population, shape)
        return list(channels), label, spacing

    look = "BraTS-2021-like" if population == "source" else "BraTS-Africa-like"
    return _write_dataset(
        raw, dataset_id, name or f"SynthBraTS{population.capitalize()}", num_cases, num_test, make_case,
        channel_names={str(i): c for i, c in enumerate(CHANNELS)}, labels=LABELS,
        regions_class_order=[1, 2, 3],
        description=f"Synthetic brain-tumour MRI, {population} population ({look}; seed {seed}, shape {list(shape)}): "
                    f"skull-stripped T1, T1ce, T2 and FLAIR; labels 1 edema, 2 necrosis / non-enhancing core, "
                    f"3 enhancing tumour.")
