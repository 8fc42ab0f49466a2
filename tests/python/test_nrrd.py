"""NRRD input against pynrrd: real files (pyradiomics' and slicerio's, from
`make real-data`) and files pynrrd writes here in every type, encoding, byte
order and header layout; voxels through `med3d convert` (read back with
nibabel) and the affine as ITK / 3D Slicer define it (world = origin +
sum_a i_a dir_a in the header's space, LPS turned to RAS); 3D Slicer
segmentations merged into one label map; damaged headers named."""
import gzip
import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from conftest import ROOT, med3d, med3d_info

REAL = ROOT / "data" / "real"
REAL_NRRD = sorted(REAL.glob("*/*.nrrd"))

FLIP = {
    "left-posterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "right-anterior-superior": np.eye(3),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
}


def slicer_affine(header):
    """ITK / 3D Slicer: RAS affine of the spatial axes."""
    dirs = header["space directions"]
    rows = [np.asarray(d, float) for d in dirs if d is not None and not np.isnan(np.asarray(d, float)).any()]
    m = np.eye(4)
    f = FLIP[header.get("space", "right-anterior-superior")]
    m[:3, :3] = f @ np.stack(rows, axis=1)
    m[:3, 3] = f @ np.asarray(header.get("space origin", [0, 0, 0]), float)
    return m


def convert(src, tmp_path, *extra):
    out = tmp_path / (Path(src).name.replace(".", "_") + ".nii")
    med3d("convert", src, out, *extra)
    img = nib.load(str(out))
    return np.asarray(img.dataobj), img.affine


@pytest.mark.skipif(not REAL_NRRD, reason="run `make real-data`")
@pytest.mark.parametrize("path", REAL_NRRD, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_files_match_pynrrd(path, tmp_path):
    data, header = nrrd.read(str(path))
    info = med3d_info(path)
    assert info["shape"] == list(data.shape)
    assert info["dtype"] == np.dtype(data.dtype).name
    want = slicer_affine(header)
    np.testing.assert_allclose(np.asarray(info["affine"]), want, rtol=0, atol=1e-9)
    finite = data.astype(np.float64)
    assert info["min"] == finite.min() and info["max"] == finite.max()
    np.testing.assert_allclose(info["mean"], finite.mean(), rtol=1e-9)
    if path.name.endswith(".seg.nrrd"):
        return  # label maps: below
    got, aff = convert(path, tmp_path)
    np.testing.assert_array_equal(got, data.astype(np.float32))
    np.testing.assert_allclose(aff, want, rtol=0, atol=1e-5)


def segments(header):
    out = []
    i = 0
    while f"Segment{i}_ID" in header:
        out.append((int(header.get(f"Segment{i}_Layer", i)), int(header[f"Segment{i}_LabelValue"])))
        i += 1
    return out


def merged(data, header, overlap):
    """The label map: class s+1 where segment s is (first or last wins)."""
    segs = segments(header)
    if data.ndim == 3:
        data = data[None]
    out = np.zeros(data.shape[1:], np.float32)
    order = list(enumerate(segs)) if overlap == "last" else list(enumerate(segs))[::-1]
    for s, (layer, value) in order:
        out[data[layer] == value] = s + 1
    return out


@pytest.mark.skipif(not (REAL / "slicerio").exists(), reason="run `make real-data`")
def test_slicer_segmentations_become_label_maps(tmp_path):
    d = REAL / "slicerio"
    data, header = nrrd.read(str(d / "Segmentation.seg.nrrd"))
    got, aff = convert(d / "Segmentation.seg.nrrd", tmp_path)
    np.testing.assert_array_equal(got, merged(data, header, "last"))
    info = med3d_info(d / "Segmentation.seg.nrrd")
    assert info["segments"][0] == "ribs" and len(info["segments"]) == 7
    # on the CT's grid
    np.testing.assert_allclose(aff, convert(d / "CTChest4.nrrd", tmp_path)[1], atol=1e-6)
    # overlapping layers: an error by default, naming the segments; first/last on request
    ov = d / "SegmentationOverlapping.seg.nrrd"
    p = med3d("convert", ov, tmp_path / "o.nii", check=False)
    assert p.returncode != 0 and "overlap" in p.stderr and "label-overlap" in p.stderr, p.stderr
    data, header = nrrd.read(str(ov))
    for how in ("first", "last"):
        got, _ = convert(ov, tmp_path, "--label-overlap", how)
        np.testing.assert_array_equal(got, merged(data, header, how))


TYPES = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64"]


# every type both ways round; every encoding attached and detached
CASES = [(t, "gzip", e, False) for t in TYPES for e in ("little", "big")] + [
    ("int16", enc, "big", det) for enc in ("raw", "gzip", "ascii") for det in (False, True)
] + [("float32", enc, "little", True) for enc in ("raw", "gzip", "ascii")]


@pytest.mark.parametrize("dtype,encoding,endian,detached", CASES)
def test_written_by_pynrrd(dtype, encoding, endian, detached, tmp_path):
    rng = np.random.default_rng(abs(hash((dtype, encoding, endian, detached))) % 2**32)
    shape = (7, 5, 4)
    if np.dtype(dtype).kind == "f":
        a = rng.normal(0, 100, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(max(info.min, -30000), min(info.max, 30000), shape).astype(dtype)
    c, s = np.cos(0.3), np.sin(0.3)
    header = {
        "space": "left-posterior-superior",
        "space directions": [[0.9 * c, 0.9 * s, 0.0], [-1.1 * s, 1.1 * c, 0.0], [0.0, 0.2, 2.5]],
        "space origin": [12.5, -30.25, 7.0],
        "kinds": ["domain", "domain", "domain"],
        "encoding": encoding,
        "endian": endian,
    }
    name = "x.nhdr" if detached else "x.nrrd"
    path = tmp_path / name
    nrrd.write(str(path), a, header, detached_header=detached)
    data, h = nrrd.read(str(path))
    got, aff = convert(path, tmp_path)
    want = data.astype(np.float32)
    if encoding == "ascii":
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(aff, slicer_affine(h), rtol=0, atol=1e-5)


def test_ras_space_spacings_and_4d_volumes(tmp_path):
    a = np.arange(3 * 4 * 5 * 2, dtype=np.int16).reshape(3, 4, 5, 2)
    p = tmp_path / "t.nrrd"
    nrrd.write(
        str(p),
        a,
        {
            "space": "right-anterior-superior",
            "space directions": [[2.0, 0, 0], [0, 3.0, 0], [0, 0, 4.0], [np.nan] * 3],
            "space origin": [1.0, 2.0, 3.0],
            "kinds": ["domain", "domain", "domain", "list"],
        },
    )
    e = med3d("convert", p, tmp_path / "o.nii", check=False)
    assert e.returncode != 0 and "volume_index" in e.stderr, e.stderr
    got, aff = convert(p, tmp_path, "--volume-index", "1")
    np.testing.assert_array_equal(got, a[..., 1].astype(np.float32))
    np.testing.assert_allclose(aff, [[2, 0, 0, 1], [0, 3, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]])
    # no space: `spacings`
    q = tmp_path / "s.nrrd"
    nrrd.write(str(q), a[..., 0], {"spacings": [0.5, 0.25, 2.0]})
    got, aff = convert(q, tmp_path)
    np.testing.assert_array_equal(got, a[..., 0].astype(np.float32))
    np.testing.assert_allclose(np.diag(aff)[:3], [0.5, 0.25, 2.0])


def damaged(tmp_path, name, header_text, data=b""):
    p = tmp_path / name
    p.write_bytes(header_text.encode() + b"\n" + data)
    r = med3d("info", p, check=False)
    assert r.returncode != 0
    assert str(p) in r.stderr
    return r.stderr


def test_damaged_headers_are_named_errors(tmp_path):
    base = "NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\nendian: little\n"
    good = np.arange(64, dtype="<i2").tobytes()
    assert "truncated" in damaged(tmp_path, "short.nrrd", base, good[:-10])
    assert "no `type` field" in damaged(tmp_path, "notype.nrrd", base.replace("type: short\n", ""), good)
    assert "`endian`" in damaged(tmp_path, "noendian.nrrd", base.replace("endian: little\n", ""), good)
    assert "sizes" in damaged(tmp_path, "badsizes.nrrd", base.replace("sizes: 4 4 4", "sizes: 4 x 4"), good)
    assert "not a NRRD file" in damaged(tmp_path, "magic.nrrd", base.replace("NRRD0004", "NRRDXXXX"), good)
    assert "bzip2" in damaged(tmp_path, "bz.nrrd", base.replace("encoding: raw", "encoding: bzip2"), good)
    # terabytes declared over a few bytes: refused before anything is reserved
    err = damaged(tmp_path, "huge.nrrd", base.replace("sizes: 4 4 4", "sizes: 100000 100000 100000"), good)
    assert "need" in err and "holds" in err, err
    gz = base.replace("encoding: raw", "encoding: gzip").replace("sizes: 4 4 4", "sizes: 30000 30000 3000")
    err = damaged(tmp_path, "huge_gz.nrrd", gz, gzip.compress(good))
    assert "max_decompressed_mib" in err, err
    # a detached header whose data file is missing
    err = damaged(tmp_path, "d.nhdr", base + "data file: nothere.raw\n")
    assert "nothere.raw" in err, err
