"""med3d's DICOM pixel decoding against pydicom, on every test file pydicom
ships (and pydicom-data's, when installed).

Each file either decodes to the same values pydicom gives after the
Modality LUT / rescale (compared voxel by voxel through `med3d convert`,
whose NIfTI output holds exactly the voxels every stage works from), or
fails with the named error listed for it in EXPECTED_ERRORS. Files without
a position in space get one added in a temporary copy (header only; the
pixel data and transfer syntax are untouched), since med3d reads volumes,
not loose 2D images.
"""
import glob
import os
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

MED3D = os.environ.get("MED3D_BIN", str(Path(__file__).resolve().parents[2] / "target/release/med3d"))

PYDICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
try:
    import data_store  # pydicom-data

    DATA_STORE_DIR = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover - pydicom-data is in requirements.txt
    DATA_STORE_DIR = None


def all_files():
    out = sorted(PYDICOM_DIR.glob("*.dcm"))
    if DATA_STORE_DIR is not None:
        out += sorted(DATA_STORE_DIR.glob("*.dcm"))
    return out


COLOUR = "unsupported pixel format"
NO_IMAGE = "not a DICOM image file"
JPEG_LS = "unsupported transfer syntax JPEG-LS"

# Files med3d refuses, and the named error it must give.
EXPECTED_ERRORS = {
    # no pixel data / not an image, or not a Part 10 file
    "ExplVR_BigEndNoMeta.dcm": NO_IMAGE,
    "ExplVR_LitEndNoMeta.dcm": NO_IMAGE,
    "UN_sequence.dcm": "truncated or corrupt file",  # dicom-rs cannot parse its UN sequence
    "empty_charset_LEI.dcm": NO_IMAGE,
    "meta_missing_tsyntax.dcm": "truncated or corrupt file",  # file meta without a transfer syntax
    "nested_priv_SQ.dcm": NO_IMAGE,
    "no_meta.dcm": NO_IMAGE,
    "no_meta_group_length.dcm": "truncated or corrupt file",  # file meta without its group length
    "priv_SQ.dcm": NO_IMAGE,
    "reportsi.dcm": NO_IMAGE,
    "reportsi_with_empty_number_tags.dcm": NO_IMAGE,
    "rtplan.dcm": NO_IMAGE,
    "rtstruct.dcm": NO_IMAGE,
    "test-SR.dcm": NO_IMAGE,
    "waveform_ecg.dcm": NO_IMAGE,
    "rtplan_truncated.dcm": "truncated or corrupt file",
    "SC_rgb_jpeg.dcm": "truncated or corrupt file",  # says explicit VR, is implicit
    "OT-PAL-8-face.dcm": NO_IMAGE,  # no file meta (pydicom needs force=True)
    # 12-bit JPEG Extended: the pure-Rust jpeg-decoder refuses it (pydicom's
    # pylibjpeg decodes it; JPEG-lossy.dcm, the same image, pydicom cannot)
    "JPGExtended.dcm": "cannot decode the pixel data",
    "JPEG-lossy.dcm": "cannot decode the pixel data",
    "MR_truncated.dcm": "truncated or corrupt file",
    # pydicom stops reading before Rows; dicom-rs reads the header, which
    # places no frame in space
    "emri_small_jpeg_2k_lossless_too_short.dcm": "missing ImageOrientationPatient",
    # JPEG-LS needs CharLS (C++), which med3d does not link
    "JPEGLSNearLossless_08.dcm": JPEG_LS,
    "JPEGLSNearLossless_16.dcm": JPEG_LS,
    "MR_small_jpeg_ls_lossless.dcm": JPEG_LS,
    "emri_small_jpeg_ls_lossless.dcm": JPEG_LS,
    "SC_rgb_jls_lossy_line.dcm": JPEG_LS,
    "SC_rgb_jls_lossy_sample.dcm": JPEG_LS,
    # 1-bit segmentations
    "liver.dcm": COLOUR,
    "liver_1frame.dcm": COLOUR,
    "liver_expb.dcm": COLOUR,
    "liver_expb_1frame.dcm": COLOUR,
    # invalid NumberOfFrames "1A"
    "badVR.dcm": "invalid NumberOfFrames",
}


def is_colour(name: str) -> bool:
    """Colour (RGB, YBR, palette) files: refused by name, whatever their syntax."""
    prefixes = ("SC_rgb", "SC_ybr", "SC_jpeg", "US1_", "color", "OBXXXX1A", "OT-PAL", "gdcm-US-ALOKA", "examples_")
    colour_examples = {"examples_jpeg2k.dcm", "examples_palette.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm"}
    if name.startswith("examples_"):
        return name in colour_examples
    return name.startswith(prefixes) or name in {"ExplVR_BigEnd.dcm", "GDCMJ2K_TextGBR.dcm", "color3d_jpeg_baseline.dcm"}


def expected_error(name: str):
    if name in EXPECTED_ERRORS:
        return EXPECTED_ERRORS[name]
    if is_colour(name):
        return COLOUR
    return None


def run(*args):
    return subprocess.run([MED3D, *map(str, args)], capture_output=True, text=True, timeout=300)


def frame_rescale(ds, k):
    """(slope, intercept) of frame k: per-frame group, shared group, top level."""
    for groups in (
        [ds.PerFrameFunctionalGroupsSequence[k]] if "PerFrameFunctionalGroupsSequence" in ds else [],
        list(ds.SharedFunctionalGroupsSequence) if "SharedFunctionalGroupsSequence" in ds else [],
    ):
        for g in groups:
            if "PixelValueTransformationSequence" in g:
                t = g.PixelValueTransformationSequence[0]
                return float(t.get("RescaleSlope", 1.0)), float(t.get("RescaleIntercept", 0.0))
    return None


def reference_frames(ds):
    """pydicom's frames after the modality transform, shape (frames, rows, cols)."""
    arr = ds.pixel_array
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    arr = arr.reshape(nframes, int(ds.Rows), int(ds.Columns))
    out = []
    for k in range(nframes):
        r = frame_rescale(ds, k)
        if r is not None:
            out.append(arr[k].astype(np.float64) * r[0] + r[1])
        else:
            out.append(np.asarray(apply_modality_lut(arr[k], ds), dtype=np.float64))
    return np.stack(out)


def frame_positions(ds):
    """Per-frame ImagePositionPatient (LPS) as med3d reads them."""
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        return [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in ds.PerFrameFunctionalGroupsSequence]
    p0 = np.array(ds.ImagePositionPatient, float)
    if nframes == 1:
        return [p0]
    iop = np.array(ds.ImageOrientationPatient, float)
    n = np.cross(iop[:3], iop[3:])
    n /= np.linalg.norm(n)
    return [p0 + d * n for d in np.array(ds.GridFrameOffsetVector, float)]


def with_geometry(path: Path, tmp: Path) -> Path:
    """A copy of `path` that says where its frames are (header only)."""
    try:
        return _with_geometry(path, tmp)
    except Exception:  # files pydicom cannot read or write go in as they are
        return path


def _with_geometry(path: Path, tmp: Path) -> Path:
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        return path
    if "PerFrameFunctionalGroupsSequence" in ds:
        return path
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    changed = False
    if "ImagePositionPatient" not in ds:
        ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        changed = True
    if "ImageOrientationPatient" not in ds:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        changed = True
    if "PixelSpacing" not in ds or not all(float(v) > 0 for v in ds.PixelSpacing):
        ds.PixelSpacing = [1.0, 1.0]
        changed = True
    if nframes > 1 and "GridFrameOffsetVector" not in ds:
        ds.GridFrameOffsetVector = [float(k) for k in range(nframes)]
        changed = True
    if not changed:
        return path
    out = tmp / path.name
    ts = ds.file_meta.TransferSyntaxUID
    ds.save_as(out, little_endian=ts.is_little_endian, implicit_vr=ts.is_implicit_VR)
    return out


FILES = all_files()


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_pixels_match_pydicom_or_named_error(path, tmp_path):
    name = path.name
    err = expected_error(name)
    if err is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = with_geometry(path, tmp_path)
        r = run("info", src, "--json")
        assert r.returncode == 1, f"{name}: expected failure with {err!r}, got rc {r.returncode}: {r.stdout[:300]}"
        assert err in r.stderr, f"{name}: expected {err!r} in: {r.stderr}"
        assert "panicked" not in r.stderr
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = with_geometry(path, tmp_path)
        ds = pydicom.dcmread(src)
        try:
            ref = reference_frames(ds)
        except Exception as e:  # pydicom cannot decode it either
            pytest.skip(f"pydicom cannot decode {name}: {e}")
    out = tmp_path / "out.nii"
    r = run("convert", src, out)
    assert r.returncode == 0, f"{name}: {r.stderr}"
    img = nib.load(out)
    vox = np.asarray(img.dataobj)  # (cols, rows, slices)
    aff = img.affine.astype(np.float64)
    assert vox.shape == (ref.shape[2], ref.shape[1], ref.shape[0]), (vox.shape, ref.shape)
    inv = np.linalg.inv(aff)
    seen = set()
    for k, p in enumerate(frame_positions(ds)):
        ras = np.array([-p[0], -p[1], p[2], 1.0])
        ijk = inv @ ras
        z = int(round(ijk[2]))
        # the frame's corner voxel sits at (0, 0, z): within float32 affine precision
        assert np.allclose(ijk[:3], [0, 0, z], atol=1e-2), (name, k, ijk)
        seen.add(z)
        got = vox[:, :, z].T.astype(np.float64)
        want = ref[k].astype(np.float32).astype(np.float64)
        bad = np.argwhere(got != want)
        assert bad.size == 0, f"{name} frame {k}: {len(bad)} pixels differ, first at {bad[0]}: med3d {got[tuple(bad[0])]} pydicom {want[tuple(bad[0])]}"
    assert seen == set(range(vox.shape[2]))
