"""Bad DICOM inputs: each yields its named error (exit status 1 from
`med3d info`, a failed case with the reason from `med3d preprocess`), never
a panic; stray non-DICOM files are skipped with a note; a folder with two
series is listed, and either series can be picked by UID.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import dicom_synth

ROOT = Path(__file__).resolve().parents[2]
MED3D = os.environ.get("MED3D_BIN", str(ROOT / "target/release/med3d"))


def run(*args):
    r = subprocess.run([MED3D, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert "panicked" not in r.stderr, r.stderr
    return r


def files(d):
    return sorted(p for p in Path(d).rglob("*.dcm"))


def edit(path, fn):
    ds = dicom_synth.read(path)
    fn(ds)
    ds.save_as(path)


@pytest.fixture
def good(tmp_path):
    d = tmp_path / "good"
    vol, aff, uid = dicom_synth.small_series(d)
    return d, vol, aff, uid


def expect_error(path, needle):
    r = run("info", path)
    assert r.returncode == 1, f"rc {r.returncode}: {r.stdout}{r.stderr}"
    assert needle in r.stderr, r.stderr
    return r.stderr


def test_good_series_reads(good):
    d, vol, aff, _ = good
    i = json.loads(run("info", d, "--json").stdout)
    assert i["shape"] == list(vol.shape)
    # RAS affine: the synthetic affine (LPS flip is undone by the writer)
    np.testing.assert_allclose(i["affine"], aff, atol=1e-9)
    assert i["min"] == vol.min() and i["max"] == vol.max()


def test_missing_pixel_data(good):
    d = good[0]
    edit(files(d)[2], lambda ds: delattr(ds, "PixelData"))
    err = expect_error(d, "missing PixelData (7FE0,0010)")
    assert files(d)[2].name in err


def test_missing_image_position(good):
    d = good[0]
    edit(files(d)[3], lambda ds: delattr(ds, "ImagePositionPatient"))
    err = expect_error(d, "missing ImagePositionPatient (0020,0032)")
    assert files(d)[3].name in err


def test_missing_image_orientation(good):
    d = good[0]
    edit(files(d)[0], lambda ds: delattr(ds, "ImageOrientationPatient"))
    expect_error(d, "missing ImageOrientationPatient (0020,0037)")


def test_inconsistent_rows_columns(good):
    d = good[0]

    def shrink(ds):
        a = np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns)[:, :-1]
        ds.Columns = a.shape[1]
        ds.PixelData = np.ascontiguousarray(a).tobytes()

    edit(files(d)[4], shrink)
    expect_error(d, "inconsistent Rows/Columns within the series")


def test_truncated_file(good):
    d = good[0]
    f = files(d)[1]
    b = f.read_bytes()
    f.write_bytes(b[: len(b) - 40])
    err = expect_error(d, "truncated or corrupt file")
    assert f.name in err


def test_file_cut_inside_the_header(good):
    d = good[0]
    f = files(d)[1]
    f.write_bytes(f.read_bytes()[:200])
    expect_error(d, "truncated or corrupt file")


def test_non_dicom_files_are_skipped_with_a_note(good):
    d, vol, _, _ = good
    (d / "notes.txt").write_text("not an image")
    (d / "empty").write_bytes(b"")
    (d / "sub").mkdir()
    (d / "sub" / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (d / "DICOMDIR.dcm").write_bytes(b"\0" * 10)
    r = run("info", d, "--json")
    assert r.returncode == 0, r.stderr
    i = json.loads(r.stdout)
    assert i["shape"] == list(vol.shape)
    skipped = "\n".join(i["skipped"])
    for name in ("notes.txt", "empty", "thumb.png", "DICOMDIR.dcm"):
        assert name in skipped
    assert "skipped" in r.stderr  # the note on stderr, too


def test_two_series_listed_and_picked_by_uid(tmp_path):
    d = tmp_path / "two"
    vol_a, aff_a, uid_a = dicom_synth.small_series(d / "a", n=4)
    vol_b, aff_b, uid_b = dicom_synth.small_series(d / "b", n=7, shape=(5, 6))
    r = run("info", d)
    assert r.returncode == 0, r.stderr
    assert "2 DICOM series" in r.stdout and uid_a in r.stdout and uid_b in r.stdout
    listing = json.loads(run("info", d, "--json").stdout)
    assert sorted(s["series_uid"] for s in listing["series"]) == sorted([uid_a, uid_b])
    for uid, vol in ((uid_a, vol_a), (uid_b, vol_b)):
        i = json.loads(run("info", d, "--series", uid, "--json").stdout)
        assert i["shape"] == list(vol.shape)
    err = run("info", d, "--series", "1.2.3.999")
    assert err.returncode == 1 and "no series with SeriesInstanceUID 1.2.3.999" in err.stderr
    out = tmp_path / "b.nii"
    r = run("convert", d, out)
    assert r.returncode == 1 and "several series found" in r.stderr
    assert run("convert", d, out, "--series", uid_b).returncode == 0


def series_positions(d, fn):
    """Rewrites each file's ImagePositionPatient z with fn(index, z)."""
    for k, f in enumerate(files(d)):
        edit(f, lambda ds: setattr(ds, "ImagePositionPatient", [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], fn(k, float(ds.ImagePositionPatient[2]))]))


def test_duplicate_positions(good):
    d = good[0]
    series_positions(d, lambda k, z: 10.0 if k in (2, 3) else z)
    expect_error(d, "duplicate slice position")


def test_gap(good):
    d = good[0]
    shutil.move(str(files(d)[3]), str(d.parent / "removed.dcm"))
    err = expect_error(d, "gap in the slice positions: about 1 slice(s) missing")
    assert "5.0000 mm apart where the series steps 2.5000 mm" in err


def test_non_uniform_spacing(good):
    d = good[0]
    series_positions(d, lambda k, z: z + (0.9 if k >= 4 else 0.0))
    expect_error(d, "non-uniform slice spacing")


def test_mixed_orientations(good):
    d = good[0]
    edit(files(d)[5], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9848078, 0.1736482]))
    expect_error(d, "mixed orientations within the series")


def test_gantry_tilt_is_named(good):
    d = good[0]
    for k, f in enumerate(files(d)):
        edit(f, lambda ds, k=k: setattr(ds, "ImagePositionPatient", [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + 0.4 * k, ds.ImagePositionPatient[2]]))
    expect_error(d, "do not lie along the slice normal")


def test_colour_image_is_named(tmp_path):
    import pydicom

    src = Path(pydicom.__file__).parent / "data/test_files/SC_rgb_small_odd.dcm"
    expect_error(src, "only greyscale (MONOCHROME1/2) images are read")


def test_preprocess_reports_each_bad_case_and_finishes_the_rest(tmp_path):
    good = tmp_path / "good"
    dicom_synth.small_series(good, n=5, shape=(20, 18))
    no_pos = tmp_path / "no_pos"
    dicom_synth.small_series(no_pos, n=5, shape=(20, 18))
    edit(files(no_pos)[1], lambda ds: delattr(ds, "ImagePositionPatient"))
    gap = tmp_path / "gap"
    dicom_synth.small_series(gap, n=5, shape=(20, 18))
    files(gap)[2].unlink()
    two = tmp_path / "two"
    dicom_synth.small_series(two / "a", n=4, shape=(20, 18))
    _, _, uid_b = dicom_synth.small_series(two / "b", n=4, shape=(20, 18))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "modality: CT\ncases:\n"
        f"  - {{id: good, image: {good}}}\n"
        f"  - {{id: no_pos, image: {no_pos}}}\n"
        f"  - {{id: gap, image: {gap}}}\n"
        f"  - {{id: two, image: {two}}}\n"
        f"  - {{id: two_b, image: {two}, series_uid: '{uid_b}'}}\n"
    )
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"name: t\nmanifest: {manifest}\nworkdir: {tmp_path / 'work'}\n"
        "preprocess:\n  spacing: [1.0, 1.0, 1.0]\n  roi: [16, 16, 16]\n  roi_mode: resize\n"
        "  ct_window: [-1000.0, 1000.0]\n  mr_percentiles: [0.5, 99.5]\n  foreground_threshold: 0.0\n"
        "  slices_per_plane: 2\n  planes: [axial]\n"
    )
    cache = tmp_path / "cache"
    r = run("preprocess", "--config", cfg, "--out", cache)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "2 done" in r.stdout and "3 failed" in r.stdout
    report = json.loads((cache / "preprocess-report.json").read_text())
    reasons = {f["case"]: f["error"] for f in report["failures"]}
    assert "missing ImagePositionPatient" in reasons["no_pos"]
    assert "gap in the slice positions" in reasons["gap"]
    assert "several series found" in reasons["two"]
    rec = json.loads((cache / "cases/two_b/case.json").read_text())
    assert rec["source_geometry"]["shape"] == [20, 18, 4]
