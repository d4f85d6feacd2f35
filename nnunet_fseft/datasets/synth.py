"""Synthetic CT-like abdominal phantoms written as raw nnU-Net v2 datasets.

Built for tests and demos on a small CPU: a 48^3 case takes about 0.15 s (a 32^3 case about 0.02 s),
and the output depends only on (seed, case index, scanner).

Coordinates are normalised to [-1, 1] on every axis. Arrays are ordered (z, y, x), where
x = image left -> right (patient right -> left, the radiological view),
y = anterior -> posterior, and z = inferior -> superior.
The anatomy is defined in voxel space, so it always fills the field of view whatever the spacing.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_fseft.errors import InputError

# Labellable organs: centre (x, y, z), radii (x, y, z), HU on scanner A, HU shift on scanner B
# (a different contrast phase), and texture sd. The pancreas centre and length come from its
# neighbours (see _pancreas), so only its thickness is given here.
ORGANS: dict = {
    "liver":        dict(center=(-0.38, -0.02, 0.30), radii=(0.42, 0.42, 0.45), hu=95, shift_b=30, tex=6),
    "spleen":       dict(center=(0.56, 0.26, 0.35), radii=(0.17, 0.25, 0.28), hu=110, shift_b=45, tex=5),
    "kidney_left":  dict(center=(0.40, 0.42, -0.20), radii=(0.15, 0.19, 0.32), hu=150, shift_b=60, tex=12),
    "kidney_right": dict(center=(-0.40, 0.42, -0.35), radii=(0.15, 0.19, 0.32), hu=150, shift_b=60, tex=12),
    "stomach":      dict(center=(0.26, -0.36, 0.30), radii=(0.28, 0.22, 0.30), hu=15, shift_b=5, tex=6),
    "pancreas":     dict(center=None, radii=(None, 0.13, 0.15), hu=62, shift_b=20, tex=10),
}
# Unlabelled structures: (HU on scanner A, HU shift on scanner B, texture sd).
_TISSUES = {"air": (-1000, 0, 0), "fat": (-100, 0, 10), "tissue": (40, 10, 8), "gas": (-900, 0, 20),
            "aorta": (45, 120, 4), "bone": (450, 0, 60), "cortex": (700, 0, 40)}
_NAMES = list(_TISSUES) + list(ORGANS)  # the index in this list is the voxel's "owner" id
_ID = {n: i for i, n in enumerate(_NAMES)}
# The smallest size per axis at which every organ is still drawn: at 12, all six were in each of
# 400 cases tried (both scanners); at 10 a few cases lose the pancreas or the spleen.
MIN_SHAPE = 12
# Scanner models: in-plane spacing range, slice spacing range, noise sd range, blur sigma (voxels).
_SCANNERS = {"A": dict(inplane=(2.5, 3.5), slice=(3.0, 5.0), noise=(10.0, 20.0), blur=0.0),
             "B": dict(inplane=(2.0, 3.0), slice=(2.0, 3.5), noise=(20.0, 40.0), blur=0.6)}


def _smooth_field(rng: np.random.Generator, shape, cells: int) -> np.ndarray:
    """Unit-sd random field, smooth over ~shape/cells voxels: a coarse random grid upsampled with separable
    Gaussian weights (a few small tensordots, much faster than ndimage.zoom or a wide gaussian_filter)."""
    field = rng.standard_normal((cells + 2,) * 3)  # one cell of margin so borders are as random as the centre
    for s in shape:  # contracts the leading axis and appends the upsampled one: (z,y,x) order is restored after 3
        pos = np.linspace(1.0, cells, s)[:, None] - np.arange(cells + 2)[None, :]
        field = np.tensordot(field, np.exp(-0.5 * (pos / 0.8) ** 2), axes=([0], [1]))
    field -= field.mean()
    return (field / (field.std() + 1e-6)).astype(np.float32)


def _jitter(rng: np.random.Generator, props: dict) -> dict:
    """One case's instance of an organ: about +-15% size, a small shift and rotation, and a superquadric exponent."""
    scale = rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3)
    return dict(center=np.array(props["center"]) + rng.normal(0.0, 0.03, 3),
                radii=np.array(props["radii"]) * scale,
                angle=rng.uniform(-0.17, 0.17),  # about +-10 degrees in the axial plane
                power=rng.uniform(1.8, 2.8))     # below 2 is pointier, above 2 is boxier


def _inside(x, y, z, center, radii, angle=0.0, power=2.0) -> np.ndarray:
    """Mask of a superquadric ellipsoid rotated in the axial plane."""
    (cx, cy, cz), (rx, ry, rz) = map(float, center), map(float, radii)  # Python floats keep the float32 grid float32
    u, v, w = x - cx, y - cy, z - cz
    c, s, p = float(np.cos(angle)), float(np.sin(angle)), float(power)
    u, v = c * u + s * v, -s * u + c * v
    return (np.abs(u / rx) ** p + np.abs(v / ry) ** p + np.abs(w / rz) ** p) <= 1.0


def _pancreas(rng: np.random.Generator, g: dict) -> dict:
    """Place the pancreas from its neighbours. The level is near the upper pole of the left kidney.
    The head touches the liver's medial edge at that level, and the tail reaches the splenic hilum.
    The depth lies between the back of the stomach and the front of the aorta."""
    sp, st, kl, ao, lv = g["spleen"], g["stomach"], g["kidney_left"], g["aorta"], g["liver"]
    z = kl["center"][2] + 0.5 * kl["radii"][2] + rng.normal(0, 0.03)
    liver_half_width = lv["radii"][0] * np.sqrt(max(0.0, 1 - ((z - lv["center"][2]) / lv["radii"][2]) ** 2))
    y_gap = 0.5 * ((st["center"][1] + 0.8 * st["radii"][1]) + (ao["center"][1] - ao["radii"][1]))
    head = np.array([np.clip(lv["center"][0] + liver_half_width, -0.25, 0.02), y_gap + 0.04])
    tail = np.array([sp["center"][0] - 0.45 * sp["radii"][0], sp["center"][1] - 0.3 * sp["radii"][1]])
    d = tail - head
    # Narrower size jitter than other organs, so the pancreas stays above ~150 voxels at 48^3.
    thick = rng.uniform(0.9, 1.15) * rng.uniform(0.95, 1.05, 2) * np.array(ORGANS["pancreas"]["radii"][1:])
    return dict(center=np.array([*(head + tail) / 2, z]), radii=np.array([max(0.6 * np.hypot(*d), 0.28), *thick]),
                angle=np.arctan2(d[1], d[0]), power=rng.uniform(2.0, 2.6))


def case_arrays(rng_seed: int, organs_labelled: list[str], scanner: str = "A", shape=(48, 48, 48)):
    """Return (image HU int16 (z,y,x), label uint8 (z,y,x), spacing (z,y,x) in mm) for one phantom.

    Every organ is drawn in the image. Only `organs_labelled` appear in the label, numbered 1..n in the
    given order. The scanner is part of the seed, so datasets from A and B never share an anatomy.
    """
    _check_args(organs_labelled, scanner)
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng([int(rng_seed), ord(scanner)])
    cfg = _SCANNERS[scanner]
    spacing = (rng.uniform(*cfg["slice"]), rng.uniform(*cfg["inplane"]), rng.uniform(*cfg["inplane"]))

    # Normalised grid, warped by one smooth displacement field (coherent anatomy deformation) and a small global rotation.
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    z, y, x = (a + 0.045 * _smooth_field(rng, shape, 5) for a in (z, y, x))
    a = float(rng.uniform(-0.09, 0.09))
    x, y = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y

    # Draw in painter's order: later structures overwrite earlier ones, so neighbours indent each other.
    owner = np.full(shape, _ID["air"], dtype=np.uint8)
    body_r = np.array([0.96, 0.84]) * rng.uniform(0.95, 1.03, 2)
    body_c = (rng.normal(0, 0.02), 0.03 + rng.normal(0, 0.02), 0.0)
    owner[_inside(x, y, z * 0, body_c, (*body_r, 1), power=2.2)] = _ID["fat"]
    inner = _inside(x, y, z * 0, body_c, (*(body_r - rng.uniform(0.06, 0.12)), 1), power=2.2)
    owner[inner] = _ID["tissue"]

    g = {n: _jitter(rng, p) for n, p in ORGANS.items() if n != "pancreas"}
    g["aorta"] = dict(center=np.array([0.06, 0.30, 0]) + rng.normal(0, 0.02, 3), radii=np.array([0.065, 0.065, 9.0]))
    g["pancreas"] = _pancreas(rng, g)
    for side in ("kidney_left", "kidney_right"):  # perirenal fat pad: gives the kidneys visible edges
        k = g[side]
        owner[inner & _inside(x, y, z, k["center"], k["radii"] * 1.3, k["angle"])] = _ID["fat"]
    for name in ("liver", "spleen", "stomach", "kidney_left", "kidney_right"):
        o = g[name]
        owner[inner & _inside(x, y, z, o["center"], o["radii"], o["angle"], o["power"])] = _ID[name]
    st = g["stomach"]  # gas rises to the anterior (up, patient supine) part of the stomach
    owner[(owner == _ID["stomach"]) & (y < st["center"][1] - 0.55 * st["radii"][1])] = _ID["gas"]
    owner[_inside(x, y, z, g["aorta"]["center"], g["aorta"]["radii"])] = _ID["aorta"]

    # Spine at the back: a vertebral body (cortical rim around marrow) and a spinous process.
    vb_c, vb_r = (rng.normal(0, 0.02), 0.52 + rng.normal(0, 0.02), 0), np.array([0.14, 0.11, 9.0]) * rng.uniform(0.9, 1.1)
    owner[_inside(x, y, z, vb_c, vb_r)] = _ID["cortex"]
    owner[_inside(x, y, z, vb_c, vb_r - (0.035, 0.035, 0))] = _ID["bone"]
    owner[inner & _inside(x, y, z, (vb_c[0], vb_c[1] + 0.19, 0), (0.04, 0.08, 9.0))] = _ID["cortex"]

    # Pancreas last, and only into free fat or tissue: its neighbours bound its shape.
    p = g["pancreas"]
    free = inner & ((owner == _ID["tissue"]) | (owner == _ID["fat"]))
    owner[free & _inside(x, y, z, p["center"], p["radii"], p["angle"], p["power"])] = _ID["pancreas"]

    # Intensities: lookup per owner, plus texture from two smooth fields (lobular and fine).
    shift = 1.0 if scanner == "B" else 0.0
    hu = np.array([_TISSUES[n][0] + shift * _TISSUES[n][1] if n in _TISSUES
                   else ORGANS[n]["hu"] + shift * ORGANS[n]["shift_b"] for n in _NAMES], dtype=np.float32)
    tex = np.array([_TISSUES[n][2] if n in _TISSUES else ORGANS[n]["tex"] for n in _NAMES], dtype=np.float32)
    texture = 0.7 * _smooth_field(rng, shape, 8) + 0.3 * _smooth_field(rng, shape, max(shape) // 3)
    image = hu[owner] + tex[owner] * texture
    if cfg["blur"] > 0:  # scanner B: softer reconstruction kernel
        image = ndimage.gaussian_filter(image, cfg["blur"])
    image += rng.normal(0.0, rng.uniform(*cfg["noise"]), shape).astype(np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    label_of_owner = np.zeros(len(_NAMES), dtype=np.uint8)
    for i, n in enumerate(organs_labelled, start=1):
        label_of_owner[_ID[n]] = i
    if "stomach" in organs_labelled:
        label_of_owner[_ID["gas"]] = label_of_owner[_ID["stomach"]]
    return image, label_of_owner[owner], tuple(float(s) for s in spacing)


def _check_args(organs: list[str], scanner: str) -> None:
    unknown = [o for o in organs if o not in ORGANS]
    if unknown:
        raise InputError(f"Unknown organ(s) {unknown}; known organs are: {', '.join(ORGANS)}.")
    if len(set(organs)) != len(organs):
        raise InputError(f"Organ list {organs} contains duplicates.")
    if scanner not in _SCANNERS:
        raise InputError(f"Unknown scanner {scanner!r}; choose one of {sorted(_SCANNERS)}.")


def _check_shape(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_SHAPE:
        raise InputError(f"--shape {' '.join(map(str, shape))} is too small: give three sizes (z y x) of at least "
                         f"{MIN_SHAPE} voxels each, e.g. --shape 32 32 32.")
    return shape


def _write_case(images, label, spacing, images_dir: str, labels_dir: str, case: str) -> None:
    """Write one case as nnU-Net names it: CASE_0000.nii.gz, CASE_0001.nii.gz, ... (one file per channel) and CASE.nii.gz."""
    lab = sitk.GetImageFromArray(label)
    lab.SetSpacing(tuple(reversed(spacing)))  # SimpleITK spacing is (x, y, z)
    for channel, image in enumerate(images):
        img = sitk.GetImageFromArray(image)
        img.CopyInformation(lab)  # nnU-Net requires the images and label to share spacing, origin and direction
        sitk.WriteImage(img, os.path.join(images_dir, f"{case}_{channel:04d}.nii.gz"), useCompression=True)
    sitk.WriteImage(lab, os.path.join(labels_dir, f"{case}.nii.gz"), useCompression=True)


def _raw_folder() -> str:
    """The nnUNet_raw folder, or an InputError when it is not set."""
    from nnunetv2.paths import nnUNet_raw  # imported here: the env var may be set after this module is imported
    raw = os.fspath(nnUNet_raw) if nnUNet_raw else None
    if not raw:
        raise InputError("nnUNet_raw is not set; export nnUNet_raw=/path/to/nnUNet_raw before generating a dataset.")
    return raw


def _write_dataset(raw: str, dataset_id: int, name: str, num_cases: int, num_test: int, make_case,
                   channel_names: dict, labels: dict, description: str, **extra) -> str:
    """Write raw/DatasetXXX_NAME/ from `make_case(i) -> (channel images, label, spacing)`; return its path.

    The id, counts and name are checked first, and an id already in use is refused. Cases are written into a
    temporary folder that is renamed only when complete, so a failure leaves no half-written dataset behind.
    Test cases continue the case numbering after the training cases; their labels go to labelsTs.
    `extra` keys (e.g. regions_class_order) go into dataset.json after the labels.
    """
    if not 1 <= int(dataset_id) <= 999 or num_cases < 1 or num_test < 0:
        raise InputError("Need 1 <= dataset_id <= 999, num_cases >= 1 and num_test >= 0.")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"Dataset name {name!r} may only contain letters, digits, '_' and '-'.")
    os.makedirs(raw, exist_ok=True)
    clash = [d for d in os.listdir(raw) if d.startswith(f"Dataset{dataset_id:03d}_")]
    if clash:
        raise InputError(f"Dataset id {dataset_id} is already used by {os.path.join(raw, clash[0])}; pick another id or remove it yourself.")

    final = os.path.join(raw, f"Dataset{dataset_id:03d}_{name}")
    tmp = os.path.join(raw, f".tmp_Dataset{dataset_id:03d}_{name}_{os.getpid()}")  # renamed only when complete
    try:
        for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ()):
            os.makedirs(os.path.join(tmp, sub))
        for i in range(num_cases + num_test):
            split = "Tr" if i < num_cases else "Ts"
            images, label, spacing = make_case(i)
            _write_case(images, label, spacing, os.path.join(tmp, f"images{split}"), os.path.join(tmp, f"labels{split}"),
                        f"{name}_{i:03d}")
        meta = {"channel_names": channel_names, "labels": labels, **extra,
                "numTraining": num_cases, "numTest": num_test, "file_ending": ".nii.gz", "name": name,
                "description": description}
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(meta, f, indent=2)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def synth_dataset(dataset_id: int, num_cases: int, organs: list[str], seed: int = 0,
                  name: str | None = None, scanner: str = "A", num_test: int = 0,
                  shape: tuple[int, int, int] = (48, 48, 48)) -> str:
    """Write $nnUNet_raw/DatasetXXX_NAME/{imagesTr,labelsTr,imagesTs,labelsTs,dataset.json}; return the dataset folder path.

    Test cases continue the case numbering (and so the seeds) after the training cases. Their labels
    go to labelsTs, for evaluation.
    """
    raw = _raw_folder()
    organs = list(organs)
    _check_args(organs, scanner)
    shape = _check_shape(shape)
    if not organs:
        raise InputError(f"At least one organ must be labelled; known organs are: {', '.join(ORGANS)}.")

    def make_case(i):
        image, label, spacing = case_arrays(seed * 100003 + i, organs, scanner, shape)
        return [image], label, spacing

    return _write_dataset(
        raw, dataset_id, name or f"SynthCT{scanner}", num_cases, num_test, make_case,
        channel_names={"0": "CT"}, labels={"background": 0, **{o: i for i, o in enumerate(organs, start=1)}},
        description=f"Synthetic CT-like abdominal phantoms (scanner {scanner}, seed {seed}, shape {list(shape)}); "
                    f"all organs are drawn in the image but only the listed labels are annotated.")
