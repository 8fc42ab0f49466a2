"""Make a labelled brain-tissue dataset from the one MNI152 T1 (offline).

For the pretrained-vs-scratch experiment (issue 7): N training-style
volumes, each the MNI ICBM152 2009a T1 (data/demo, see
scripts/fetch_demo_data.py) with a 4-class label map, made different from
one another SynthSeg-style by a random smooth elastic deformation, a random
gamma and a smooth multiplicative bias field.

Labels (uint8): 0 background, 1 CSF, 2 grey matter, 3 white matter, made at
1 mm from the MNI152 GM/WM probability maps (g, w in [0, 1]) and the T1:
  - brain mask: g + w > 0.5, closed (6-connected structuring element, 4
    iterations, which bridges the sulci) and hole-filled (the ventricles);
  - WM where w > 0.5 and w > g; GM where g > 0.5 and g >= w;
  - CSF: inside the mask, neither GM nor WM, g + w < 0.5 and T1 darker than
    0.75 x the median T1 of grey matter (CSF is dark on T1; this takes the
    ventricles and sulcal CSF and leaves bright partial-volume voxels out);
  - the mask's other voxels (bright partial volume at tissue borders) go to
    GM or WM, whichever probability is larger; everything else is 0.
Then image and label are resampled to the target spacing (image trilinear,
label nearest) with MONAI's Spacingd.

Per volume, with MONAI transforms applied to image and label together
(label always nearest-neighbour):
  - Rand3DElasticd: smooth displacement field (Gaussian-smoothed noise,
    sigma 6-8 voxels) plus a small rotation (+-0.1 rad) and scaling (+-5%);
  - RandAdjustContrastd: gamma in [0.7, 1.5] (image only);
  - RandBiasFieldd: degree-3 polynomial log bias field, coefficients in
    [0, 0.2] (image only).
The transforms draw from one NumPy generator seeded with --seed, applied to
the volumes in order, so the output is a function of (--n, --seed,
--spacing). The images are float32, the labels uint8, both NIfTI with the
2 mm RAS affine.

Writes into OUT:
  images/bt_XXX.nii.gz, labels/bt_XXX.nii.gz
  brain-tissue-train.yaml, brain-tissue-test.yaml   med3d manifests (first
      N - n_test cases train, the last n_test test; paths relative to OUT)
  dataset.json   label names, split, seed, spacing, sources and what was done

Usage: python scripts/make_brain_tissue_dataset.py OUT [--n 12] [--seed 0]
       [--test 3] [--spacing 2.0] [--demo data/demo]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, Rand3DElasticd, RandAdjustContrastd, RandBiasFieldd, Spacingd
from scipy import ndimage as ndi

LABELS = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The 4-class label map of the module docstring, at the maps' grid."""
    tissue = (gm + wm) > 0.5
    closed = ndi.binary_closing(tissue, structure=ndi.generate_binary_structure(3, 1), iterations=4)
    mask = ndi.binary_fill_holes(closed)
    is_wm = (wm > 0.5) & (wm > gm)
    is_gm = (gm > 0.5) & (gm >= wm) & ~is_wm
    dark = t1 < 0.75 * np.median(t1[is_gm])
    is_csf = mask & ~is_gm & ~is_wm & ((gm + wm) < 0.5) & dark
    rest = mask & ~is_gm & ~is_wm & ~is_csf
    label = np.zeros(t1.shape, np.uint8)
    label[is_csf] = 1
    label[is_gm | (rest & (gm >= wm))] = 2
    label[is_wm | (rest & (wm > gm))] = 3
    return label


def load_base(demo: Path, spacing: float) -> dict:
    """T1 and label at `spacing` mm, channel-first, with their affine."""
    img = nib.load(demo / "mni152_t1.nii.gz")
    t1 = np.asanyarray(img.dataobj).astype(np.float32)
    gm = np.asanyarray(nib.load(demo / "mni152_gm.nii.gz").dataobj).astype(np.float32) / 255.0
    wm = np.asanyarray(nib.load(demo / "mni152_wm.nii.gz").dataobj).astype(np.float32) / 255.0
    label = tissue_labels(t1, gm, wm)
    affine = torch.as_tensor(img.affine, dtype=torch.float64)
    from monai.data import MetaTensor

    data = {
        "image": MetaTensor(torch.from_numpy(t1)[None], affine=affine),
        "label": MetaTensor(torch.from_numpy(label.astype(np.float32))[None], affine=affine),
    }
    s = Spacingd(keys=("image", "label"), pixdim=(spacing,) * 3, mode=("bilinear", "nearest"))
    return s(data)


def augment() -> Compose:
    keys = ("image", "label")
    return Compose(
        [
            Rand3DElasticd(
                keys=keys,
                sigma_range=(6.0, 8.0),
                magnitude_range=(150.0, 250.0),
                prob=1.0,
                rotate_range=(0.1, 0.1, 0.1),
                scale_range=(0.05, 0.05, 0.05),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys="image", prob=1.0, gamma=(0.7, 1.5)),
            RandBiasFieldd(keys="image", prob=1.0, degree=3, coeff_range=(0.0, 0.2)),
        ]
    )


def save(array: np.ndarray, affine: np.ndarray, dtype, path: Path) -> None:
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, tmp)
    tmp.replace(path)


def manifest(name: str, ids: list, out: Path) -> None:
    lines = [
        f"# {name}: made by scripts/make_brain_tissue_dataset.py (see dataset.json); paths relative to this file.",
        f"name: {name}",
        "modality: MR",
        "cases:",
    ]
    for i in ids:
        lines += [f"  - id: {i}", f"    image: images/{i}.nii.gz", f"    label: labels/{i}.nii.gz"]
    (out / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=12, help="volumes in all")
    ap.add_argument("--test", type=int, default=None, help="of which test cases (default: n // 4, at least 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size, mm")
    ap.add_argument("--demo", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "demo")
    a = ap.parse_args(argv)
    n_test = a.test if a.test is not None else max(1, a.n // 4)
    if a.n < 2 or not 1 <= n_test < a.n:
        sys.exit(f"need --n >= 2 and 1 <= --test < --n, got n={a.n}, test={n_test}")
    for f in ("mni152_t1.nii.gz", "mni152_gm.nii.gz", "mni152_wm.nii.gz"):
        if not (a.demo / f).is_file():
            sys.exit(f"{a.demo / f} missing: run `make setup` (scripts/fetch_demo_data.py) first")
    torch.set_num_threads(1)
    t0 = time.time()
    base = load_base(a.demo, a.spacing)
    affine = np.asarray(base["image"].affine, dtype=np.float64)
    (a.out / "images").mkdir(parents=True, exist_ok=True)
    (a.out / "labels").mkdir(parents=True, exist_ok=True)
    tf = augment()
    tf.set_random_state(seed=a.seed)
    ids = [f"bt_{i:03d}" for i in range(a.n)]
    counts = []
    for i in ids:
        d = tf({"image": base["image"].clone(), "label": base["label"].clone()})
        image = np.asarray(d["image"][0], dtype=np.float32)
        label = np.rint(np.asarray(d["label"][0])).astype(np.uint8)
        save(image, affine, np.float32, a.out / "images" / f"{i}.nii.gz")
        save(label, affine, np.uint8, a.out / "labels" / f"{i}.nii.gz")
        counts.append({str(k): int((label == k).sum()) for k in LABELS})
    train, test = ids[: a.n - n_test], ids[a.n - n_test :]
    manifest("brain-tissue-train", train, a.out)
    manifest("brain-tissue-test", test, a.out)
    info = {
        "name": "brain-tissue",
        "labels": {str(k): v for k, v in LABELS.items()},
        "train": train,
        "test": test,
        "seed": a.seed,
        "spacing_mm": [a.spacing] * 3,
        "shape": list(image.shape),
        "voxels_per_class": dict(zip(ids, counts)),
        "source": "MNI ICBM152 2009a T1 and GM/WM probability maps (nilearn), data/demo",
        "made_by": "scripts/make_brain_tissue_dataset.py (its docstring says how labels and augmentations are made)",
    }
    (a.out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"brain-tissue: {len(train)} train + {len(test)} test volumes {image.shape} in {a.out} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
