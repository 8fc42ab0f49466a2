"""`med3d info --json` against nibabel on real files: nibabel's own test
NIfTI files, the MNI152 volumes, and files nibabel writes in every layout we
claim (NIfTI-1/2, single file and .hdr/.img pair, gzipped or not, both byte
orders, every real numeric dtype, scaling, qform-only and no-form headers,
4D). Tolerances: affine 1e-4 absolute, statistics 1e-4 relative."""
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import DEMO, NIBABEL_DATA, med3d, med3d_info

REAL = [
    NIBABEL_DATA / n
    for n in [
        "anatomical.nii",
        "functional.nii",
        "example4d.nii.gz",
        "example_nifti2.nii.gz",
        "standard.nii.gz",
        "reoriented_anat_moved.nii",
        "resampled_anat_moved.nii",
    ]
] + [DEMO / f"mni152_{t}.nii.gz" for t in ("t1", "gm", "wm")]


def check_against_nibabel(path):
    img = nib.load(str(path))
    got = med3d_info(path)
    assert got["shape"] == list(img.shape)
    np.testing.assert_allclose(np.array(got["affine"]), img.affine, atol=1e-4, rtol=0)
    assert got["orientation"] == "".join(nib.aff2axcodes(img.affine))
    assert got["dtype"] == np.dtype(img.get_data_dtype()).newbyteorder("=").name
    np.testing.assert_allclose(got["spacing"], np.sqrt((img.affine[:3, :3] ** 2).sum(0)), rtol=1e-6)
    np.testing.assert_allclose(got["zooms"], img.header.get_zooms(), rtol=1e-6)
    data = img.get_fdata(dtype=np.float64)
    finite = data[np.isfinite(data)]
    assert got["nonfinite"] == data.size - finite.size
    for key, ref in [("min", finite.min()), ("max", finite.max()), ("mean", finite.mean()), ("std", finite.std())]:
        assert got[key] == pytest.approx(ref, rel=1e-4, abs=1e-6 * max(1.0, abs(finite).max())), key


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_files_match_nibabel(path, binary):
    check_against_nibabel(path)


DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64]


def _oblique_affine():
    c, s = np.cos(0.3), np.sin(0.3)
    a = np.array([[-1.1 * c, 0.9 * s, 0.0, 40.0], [1.1 * s, 0.9 * c, 0.2, -30.0], [0.0, 0.0, 2.5, 12.0], [0, 0, 0, 1.0]])
    return a


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["nii", "nii.gz", "pair", "pair.gz", "nii2", "nii2-pair"])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_written_layouts_match_nibabel(tmp_path, dtype, layout, endian, binary):
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    shape = (7, 6, 5)
    if info is not None:
        lo, hi = max(info.min, -30000), min(info.max, 60000)
        arr = rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    else:
        arr = (rng.standard_normal(shape) * 1000).astype(dtype)
    cls = nib.Nifti2Image if layout.startswith("nii2") else nib.Nifti1Image
    pair_cls = nib.Nifti2Pair if layout.startswith("nii2") else nib.Nifti1Pair
    hdr = cls.header_class(endianness=endian)
    if "pair" in layout:
        img = pair_cls(arr, _oblique_affine(), header=hdr)
        name = "img.img.gz" if layout.endswith(".gz") else "img.img"
    else:
        img = cls(arr, _oblique_affine(), header=hdr)
        name = "img.nii.gz" if layout == "nii.gz" else "img.nii"
    img.set_data_dtype(np.dtype(dtype).newbyteorder(endian))
    img.header.set_slope_inter(1.0, 0.0)
    path = tmp_path / name
    nib.save(img, str(path))
    check_against_nibabel(path)
    if "pair" in layout:
        # either name of the pair works
        check_against_nibabel(path.with_name(name.replace(".img", ".hdr")))


def _patch(path, offset, fmt, value):
    import struct

    b = bytearray(path.read_bytes())
    b[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(b))


def test_scaling_applied_once(tmp_path, binary):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50
    p = tmp_path / "scaled.nii"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    _patch(p, 112, "<f", 2.5)
    _patch(p, 116, "<f", -1024.0)
    img = nib.load(str(p))
    assert img.dataobj.slope == 2.5
    check_against_nibabel(p)
    # slope 0 means "no scaling" to nibabel, and to us
    _patch(p, 112, "<f", 0.0)
    check_against_nibabel(p)


def test_qform_only_and_no_form_affines(tmp_path, binary):
    arr = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    img = nib.Nifti1Image(arr, None)
    img.set_qform(_oblique_affine(), code=1)
    img.set_sform(None, code=0)
    p = tmp_path / "qform.nii.gz"
    nib.save(img, str(p))
    assert nib.load(str(p)).header["sform_code"] == 0
    check_against_nibabel(p)
    # the other handedness: qfac flips between -1 and 1
    lh = _oblique_affine() @ np.diag([1, 1, -1, 1])
    img.set_qform(lh, code=1)
    p2 = tmp_path / "qform_lh.nii"
    nib.save(img, str(p2))
    qfacs = {float(nib.load(str(q)).header["pixdim"][0]) for q in (p, p2)}
    assert qfacs == {-1.0, 1.0}
    check_against_nibabel(p2)
    # neither form: nibabel's pixdim fallback
    p3 = tmp_path / "noform.nii"
    shutil.copyfile(p2, p3)
    _patch(p3, 252, "<h", 0)
    _patch(p3, 254, "<h", 0)
    check_against_nibabel(p3)


def test_header_without_image_is_a_clear_error(tmp_path, binary):
    shutil.copyfile(NIBABEL_DATA / "nifti1.hdr", tmp_path / "lonely.hdr")
    p = med3d("info", tmp_path / "lonely.hdr", "--json", check=False)
    assert p.returncode != 0
    assert "lonely.img" in p.stderr and "missing" in p.stderr
    assert "panicked" not in p.stderr
