"""Copy the demo data out of installed registry packages (no network).

- MNI ICBM152 2009a T1 and its grey/white-matter maps (nilearn's wheel); a
  tissue label map (0 background, 1 grey matter, 2 white matter) is derived
  from the two probability maps by thresholding at 0.5.
- nibabel's test image anatomical.nii (big-endian int16, LAS).
- a real CT as DICOM: pydicom-data's eCT_Supplemental.dcm, an enhanced
  (multi-frame) CT Image with two 512x512 frames 10 mm apart, stored in
  reverse order, rescale intercept -1024 in the shared functional groups;
  copied into its own folder, as a series export would be.

Usage: python scripts/fetch_demo_data.py OUT_DIR
"""
import shutil
import sys
from pathlib import Path

import data_store  # pydicom-data
import nibabel as nib
import nilearn
import numpy as np


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    nl = Path(nilearn.__file__).parent / "datasets" / "data"
    nb = Path(nib.__file__).parent / "tests" / "data"
    for tissue in ("t1", "gm", "wm"):
        src = nl / f"mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz"
        shutil.copyfile(src, out / f"mni152_{tissue}.nii.gz")
    gm = nib.load(out / "mni152_gm.nii.gz")
    wm = nib.load(out / "mni152_wm.nii.gz")
    g = np.asanyarray(gm.dataobj).astype(np.float32) / 255.0
    w = np.asanyarray(wm.dataobj).astype(np.float32) / 255.0
    label = np.zeros(g.shape, np.uint8)
    label[(g > 0.5) & (g >= w)] = 1
    label[(w > 0.5) & (w > g)] = 2
    img = nib.Nifti1Image(label, gm.affine)
    img.set_data_dtype(np.uint8)
    nib.save(img, out / "mni152_tissue.nii.gz")
    shutil.copyfile(nb / "anatomical.nii", out / "nibabel_anatomical.nii")
    ct = out / "dicom" / "ect_supplemental"
    ct.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(data_store.__file__).parent / "data" / "eCT_Supplemental.dcm", ct / "eCT_Supplemental.dcm")
    print(f"demo data in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))
