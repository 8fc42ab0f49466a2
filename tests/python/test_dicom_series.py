"""The MNI152 T1 written as DICOM series with pydicom (axial, and oblique;
files shuffled, renamed and nested; a different non-trivial rescale on
alternate slices; SliceThickness deliberately not the slice step) must come
back as the same voxels and the same affine as reading the NIfTI, through
`med3d info`, `med3d convert` and the preprocess cache. The headers carry
made-up patient data, none of which may reach the cache or the output.
"""
import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import ImplicitVRLittleEndian

import dicom_synth

ROOT = Path(__file__).resolve().parents[2]
MED3D = os.environ.get("MED3D_BIN", str(ROOT / "target/release/med3d"))
MNI = ROOT / "data/demo/mni152_t1.nii.gz"

pytestmark = pytest.mark.skipif(not MNI.exists(), reason="demo data missing: run `make setup`")


def run(*args, check=True):
    r = subprocess.run([MED3D, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"med3d {' '.join(map(str, args))}: rc {r.returncode}\n{r.stderr}"
    assert "panicked" not in r.stderr
    return r


def info(path, *extra):
    return json.loads(run("info", path, "--json", *extra).stdout)


@pytest.fixture(scope="module")
def mni():
    img = nib.load(MNI)
    return np.asarray(img.dataobj).astype(np.float32), img.affine


@pytest.fixture(scope="module")
def series(tmp_path_factory, mni):
    """axial and oblique DICOM series of the MNI T1, and an oblique NIfTI."""
    vol, aff = mni
    d = tmp_path_factory.mktemp("series")
    axial_uid = dicom_synth.write_series(vol, aff, d / "axial", seed=3)
    # rounded to float32 so the NIfTI's sform (float32) holds exactly what
    # the DICOM headers say; then both readers must agree to rounding error
    obl_aff = (dicom_synth.rotation(17.0, -11.0) @ aff).astype(np.float32).astype(np.float64)
    obl_uid = dicom_synth.write_series(vol, obl_aff, d / "oblique", seed=4, ts=ImplicitVRLittleEndian)
    obl_nii = d / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(vol, obl_aff), obl_nii)
    # a stray non-DICOM file in the folder is skipped with a note
    (d / "axial" / "README.txt").write_text("exported by a PACS viewer\n")
    return {"dir": d, "axial": d / "axial", "oblique": d / "oblique", "oblique_nii": obl_nii,
            "axial_uid": axial_uid, "oblique_uid": obl_uid, "oblique_affine": obl_aff}


def assert_same_info(dcm, nii, affine_atol):
    assert dcm["shape"] == nii["shape"]
    np.testing.assert_allclose(dcm["affine"], nii["affine"], atol=affine_atol, rtol=0)
    np.testing.assert_allclose(dcm["spacing"], nii["spacing"], atol=affine_atol, rtol=0)
    assert dcm["orientation"] == nii["orientation"]
    for k in ("min", "max", "mean", "std"):
        assert dcm[k] == pytest.approx(nii[k], rel=1e-9), k


def test_axial_series_has_the_niftis_voxels_and_affine(series, mni, tmp_path):
    vol, aff = mni
    dcm = info(series["axial"])
    assert_same_info(dcm, info(MNI), affine_atol=1e-9)
    np.testing.assert_allclose(dcm["affine"], aff, atol=1e-9, rtol=0)
    assert dcm["orientation"] == "RAS"
    # spacing from positions (1 mm), not SliceThickness (1.7 mm)
    assert dcm["dicom"]["slice_spacing"] == pytest.approx(1.0, abs=1e-9)
    assert sorted(map(tuple, dcm["dicom"]["rescale"])) == [(0.25, 100.0), (0.5, 50.0)]
    assert dcm["dicom"]["files"] == vol.shape[2]
    assert any("README.txt" in s for s in dcm["skipped"])
    out = tmp_path / "axial.nii"
    run("convert", series["axial"], out)
    got = nib.load(out)
    assert np.array_equal(np.asarray(got.dataobj), vol)
    np.testing.assert_allclose(got.affine, aff, atol=1e-6, rtol=0)


def test_oblique_series_has_the_niftis_voxels_and_affine(series, mni, tmp_path):
    vol, _ = mni
    dcm = info(series["oblique"])
    # DS strings hold 16 characters: far finer than NIfTI's float32 sform
    np.testing.assert_allclose(dcm["affine"], series["oblique_affine"], atol=1e-9, rtol=0)
    assert_same_info(dcm, info(series["oblique_nii"]), affine_atol=2e-5)
    assert dcm["dicom"]["transfer_syntaxes"] == ["Implicit VR Little Endian"]
    out = tmp_path / "oblique.nii.gz"
    run("convert", series["oblique"], out)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), vol)


PHI_VALUES = list(dicom_synth.PHI.values())


def test_preprocess_cache_matches_nifti_and_holds_no_phi(series, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "cases:\n"
        f"  - {{id: mni_nii, image: {MNI}, modality: MR}}\n"
        f"  - {{id: mni_dcm, image: {series['axial']}, modality: MR}}\n"
        f"  - {{id: obl_nii, image: {series['oblique_nii']}, modality: MR}}\n"
        f"  - {{id: obl_dcm, image: {series['oblique']}, modality: MR}}\n"
    )
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"name: t\nmanifest: {manifest}\nworkdir: {tmp_path / 'work'}\n"
        "preprocess:\n  spacing: [2.0, 2.0, 2.0]\n  roi: [96, 96, 96]\n  roi_mode: crop_pad\n"
        "  ct_window: [-1000.0, 1000.0]\n  mr_percentiles: [0.5, 99.5]\n  foreground_threshold: 0.0\n"
        "  slices_per_plane: 4\n  planes: [axial, coronal, sagittal]\n"
    )
    cache = tmp_path / "cache"
    r = run("preprocess", "--config", cfg, "--out", cache, "--workers", "2")
    logs = r.stdout + r.stderr
    cases = cache / "cases"
    a = np.load(cases / "mni_nii/image.npy")
    b = np.load(cases / "mni_dcm/image.npy")
    assert a.shape == b.shape == (96, 96, 96)
    assert np.array_equal(a, b), f"axial: {np.abs(a.astype(np.float32) - b).max()} max difference"
    # the oblique NIfTI's affine is float32, the DICOM's is exact: resampling
    # positions differ by ~1e-6 mm, which float16 storage hides almost always
    c = np.load(cases / "obl_nii/image.npy").astype(np.float32)
    d = np.load(cases / "obl_dcm/image.npy").astype(np.float32)
    assert c.shape == d.shape
    diff = np.abs(c - d)
    assert diff.max() <= 2.0**-10 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    rec = json.loads((cases / "mni_dcm/case.json").read_text())
    assert rec["dicom"]["modality"] == "MR"
    assert sorted(map(tuple, rec["dicom"]["rescale"])) == [(0.25, 100.0), (0.5, 50.0)]
    ref = json.loads((cases / "mni_nii/case.json").read_text())
    np.testing.assert_allclose(rec["source_geometry"]["affine"], ref["source_geometry"]["affine"], atol=1e-9)
    # PHI: nothing from the headers beyond geometry / decoding values
    secrets = PHI_VALUES + [series["axial_uid"], series["oblique_uid"]]
    for p in cache.rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            for s in secrets:
                assert s.encode() not in blob, f"{s!r} found in {p}"
    for s in secrets:
        assert s not in logs, f"{s!r} in the logs"


def test_rerun_skips_unchanged_dicom_folder_and_redoes_a_changed_one(tmp_path):
    d = tmp_path / "s"
    dicom_synth.small_series(d, n=5, shape=(20, 18))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"cases:\n  - {{id: s, image: {d}, modality: CT}}\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"name: t\nmanifest: {manifest}\nworkdir: {tmp_path / 'work'}\n"
        "preprocess:\n  spacing: [1.0, 1.0, 1.0]\n  roi: [16, 16, 16]\n  roi_mode: resize\n"
        "  ct_window: [-1000.0, 1000.0]\n  mr_percentiles: [0.5, 99.5]\n  foreground_threshold: 0.0\n"
        "  slices_per_plane: 2\n  planes: [axial]\n"
    )
    cache = tmp_path / "cache"
    assert "1 done" in run("preprocess", "--config", cfg, "--out", cache).stdout
    assert "1 skipped" in run("preprocess", "--config", cfg, "--out", cache).stdout
    f = sorted(d.rglob("*.dcm"))[0]
    ds = dicom_synth.read(f)
    ds.RescaleIntercept = -1000
    ds.save_as(f)
    assert "1 done" in run("preprocess", "--config", cfg, "--out", cache).stdout


def test_multiframe_file_spanning_decode_slabs(mni, tmp_path):
    """One multi-frame file of 189 frames stored in reverse slice order
    (GridFrameOffsetVector descending): med3d decodes 32 planes at a time and
    keeps the file open across those slabs; every voxel must land where
    the NIfTI has it."""
    vol, aff = mni
    vol = vol[::3, ::3, :]  # 66 x 78 x 189, a small file
    aff = aff @ np.diag([3.0, 3.0, 1.0, 1.0])
    r = (0.25, 100.0)
    nz = vol.shape[2]
    order = list(range(nz))[::-1]
    ds = dicom_synth.slice_dataset(dicom_synth.stored_values(vol[:, :, order[0]], r).T, aff, order[0],
                                   "1.2.3.4.5", "1.2.3.4", r)
    # frame f sits at slice order[f]: offsets along the normal from frame 0
    step = float(np.linalg.norm(aff[:3, 2]))
    ds.NumberOfFrames = nz
    ds.GridFrameOffsetVector = dicom_synth.ds_list([(k - order[0]) * step for k in order])
    ds.PixelData = b"".join(np.ascontiguousarray(dicom_synth.stored_values(vol[:, :, k], r).T.astype("<i2")).tobytes()
                            for k in order)
    src = tmp_path / "multiframe.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = tmp_path / "mf.nii"
    run("convert", src, out)
    img = nib.load(out)
    got = np.asarray(img.dataobj).astype(np.float32)
    assert got.shape == vol.shape
    np.testing.assert_array_equal(got, vol)
    np.testing.assert_allclose(img.affine, aff, atol=1e-4, rtol=0)
