"""Headers that declare far more data than their files hold, through the
real binary under an address-space limit (`ulimit -v`, 4 GB), so that an
allocation sized from the header fails loudly here instead of succeeding
lazily (calloc of 17 GB succeeds under overcommit on a 24 GB machine, which
is how this bound was once lost without a test noticing).

Each input must give a named error from `med3d info` (exit 1, the file and
the declared size in the message, no panic, no abort) and fail only its own
case in `med3d preprocess` beside a good case that is still committed.
Covered: 4-file DICOM series of 65535 x 65535 with 128 bytes of pixel data
each (native, RLE, JPEG baseline, JPEG lossless, JPEG 2000), a multi-frame
file with 100000 frames, NIfTI (plain, gzipped) and NRRD (raw, gzipped)
with huge sizes.
"""
import gzip
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)

import dicom_synth

ROOT = Path(__file__).resolve().parents[2]
MED3D = os.environ.get("MED3D_BIN", str(ROOT / "target/release/med3d"))
DEMO = ROOT / "data" / "demo"
# KiB: what `ulimit -v` allows (the binary with libtorch maps ~1.5 GB)
LIMIT_KB = 4_000_000
SIDE = 65535


def limited(*args):
    """Runs med3d under the address-space limit; never a panic or an abort."""
    cmd = ["bash", "-c", f'ulimit -v {LIMIT_KB}; exec "$@"', "med3d", MED3D, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert r.returncode in (0, 1, 2), f"rc {r.returncode} (killed or aborted):\n{r.stdout}\n{r.stderr}"
    for bad in ("panicked", "memory allocation of", "Aborted"):
        assert bad not in r.stderr, r.stderr
    return r


def jpeg_header(rows, cols, sof):
    """SOI, then a frame header (SOFn) declaring rows x cols, 1 component."""
    p = 8 if sof == 0xC0 else 16
    seg = struct.pack(">BHHB", p, rows, cols, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8" + bytes([0xFF, sof]) + struct.pack(">H", len(seg) + 2) + seg


def j2k_header(rows, cols):
    """A JPEG 2000 codestream's SOC and SIZ declaring cols x rows, 1 component."""
    siz = struct.pack(">HIIIIIIIIH", 0, cols, rows, 0, 0, cols, rows, 0, 0, 1) + bytes([15, 1, 1])
    return b"\xff\x4f\xff\x51" + struct.pack(">H", len(siz) + 2) + siz


def rle_fragment():
    """Two segments (16-bit samples) in 128 bytes: far too few for the frame."""
    head = struct.pack("<16I", 2, 64, 96, *([0] * 13))
    return head + bytes([0x81, 0]) * 16 + bytes([0x81, 0]) * 16


def fragment(ts):
    if ts == RLELossless:
        return rle_fragment()
    if ts == JPEG2000Lossless:
        body = j2k_header(SIDE, SIDE)
    elif ts == JPEGBaseline8Bit:
        body = jpeg_header(SIDE, SIDE, 0xC0)
    else:
        body = jpeg_header(SIDE, SIDE, 0xC3)
    return (body + b"\x00" * 128)[:126] + b"\xff\xd9"


def huge_series(out: Path, ts):
    """4 files of one series, each declaring 65535 x 65535 over 128 bytes."""
    out.mkdir(parents=True)
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    for k in range(4):
        px = np.zeros((2, 2), np.int16)
        ds = dicom_synth.slice_dataset(px, aff, k, "1.2.3.4.5.6", "1.2.3.4", (1.0, 0.0))
        ds.Rows, ds.Columns = SIDE, SIDE
        if ts == JPEGBaseline8Bit:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if ts == ExplicitVRLittleEndian:
            ds.PixelData = bytes(range(128))
        else:
            ds.file_meta.TransferSyntaxUID = ts
            ds.PixelData = encapsulate([fragment(ts)])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        ds.save_as(out / f"s{k}.dcm", enforce_file_format=True)
    return out


def huge_multiframe(path: Path):
    """One file declaring 100000 frames of 512 x 512 over 128 bytes."""
    aff = np.diag([0.8, 0.9, 2.5, 1.0])
    ds = dicom_synth.slice_dataset(np.zeros((2, 2), np.int16), aff, 0, "1.2.3.4.5.7", "1.2.3.4", (1.0, 0.0))
    ds.Rows, ds.Columns = 512, 512
    ds.NumberOfFrames = 100000
    ds.GridFrameOffsetVector = dicom_synth.ds_list([2.5 * k for k in range(100000)])
    ds.PixelData = bytes(128)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def huge_nifti(path: Path, gz: bool):
    """nibabel's anatomical file with dims 30000^3 (int16: 54 TB)."""
    raw = bytearray((DEMO / "nibabel_anatomical.nii").read_bytes())
    big = raw[:4] == b"\x00\x00\x01\x5c"
    fmt = ">h" if big else "<h"
    for axis in (1, 2, 3):
        struct.pack_into(fmt, raw, 40 + 2 * axis, 30000)
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    return path


def huge_nrrd(path: Path, gz: bool):
    """An NRRD declaring 20000^3 shorts over 128 bytes of data."""
    enc = "gzip" if gz else "raw"
    head = f"NRRD0004\ntype: short\ndimension: 3\nsizes: 20000 20000 20000\nencoding: {enc}\nendian: little\n\n"
    data = bytes(128)
    path.write_bytes(head.encode() + (gzip.compress(data) if gz else data))
    return path


CASES = {
    "dicom_native": (lambda d: huge_series(d / "native", ExplicitVRLittleEndian), "truncated or corrupt file"),
    "dicom_rle": (lambda d: huge_series(d / "rle", RLELossless), "cannot decode the pixel data"),
    "dicom_jpeg_baseline": (lambda d: huge_series(d / "jpeg", JPEGBaseline8Bit), "cannot decode the pixel data"),
    "dicom_jpeg_lossless": (lambda d: huge_series(d / "jpegll", JPEGLosslessSV1), "cannot decode the pixel data"),
    "dicom_jpeg2000": (lambda d: huge_series(d / "j2k", JPEG2000Lossless), "max_decompressed_mib"),
    "dicom_multiframe": (lambda d: huge_multiframe(d / "mf" / "multiframe.dcm"), "100000 frame(s) of 512x512"),
    "nifti": (lambda d: huge_nifti(d / "huge.nii", False), "header dims [30000, 30000, 30000]"),
    "nifti_gz": (lambda d: huge_nifti(d / "huge.nii.gz", True), "header dims [30000, 30000, 30000]"),
    "nrrd": (lambda d: huge_nrrd(d / "huge.nrrd", False), "sizes [20000, 20000, 20000]"),
    "nrrd_gz": (lambda d: huge_nrrd(d / "huge_gz.nrrd", True), "max_decompressed_mib"),
}

# Bytes each declares, as the message gives them.
DECLARED = {
    "dicom_native": SIDE * SIDE * 2,
    "dicom_rle": SIDE * SIDE * 2,
    "dicom_jpeg_baseline": SIDE * SIDE,
    "dicom_jpeg_lossless": SIDE * SIDE * 2,
    "dicom_jpeg2000": SIDE * SIDE * 2,
    "dicom_multiframe": 512 * 512 * 2 * 100000,
    "nifti": 30000**3 * 2,
    "nifti_gz": 30000**3 * 2,  # over the cap: the cap's message
    "nrrd": 20000**3 * 2,
    "nrrd_gz": 20000**3 * 2,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_info_names_the_file_and_the_declared_size(tmp_path, name):
    make, reason = CASES[name]
    bad = make(tmp_path)
    r = limited("info", bad)
    assert r.returncode == 1, f"rc {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert reason in r.stderr, r.stderr
    # the file (a series: one of its files) is named
    named = [bad] if bad.is_file() else sorted(bad.iterdir())
    assert any(str(p) in r.stderr for p in named), r.stderr
    assert f"need {DECLARED[name]} bytes" in r.stderr, r.stderr
    if reason == "max_decompressed_mib":
        assert "decompresses to more than" in r.stderr, r.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_preprocess_fails_only_the_bad_case(tmp_path, name):
    make, reason = CASES[name]
    (tmp_path / "in").mkdir()
    bad = make(tmp_path / "in")
    good = tmp_path / "good.nii"
    shutil.copy(DEMO / "nibabel_anatomical.nii", good)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"modality: MR\ncases:\n  - {{id: good, image: {good}}}\n  - {{id: bad, image: {bad}}}\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"name: t\nmanifest: {manifest}\nworkdir: {tmp_path / 'work'}\n"
        "preprocess:\n  spacing: [2.0, 2.0, 2.0]\n  roi: [16, 16, 16]\n  roi_mode: resize\n"
        "  slices_per_plane: 2\n  planes: [axial]\n"
    )
    cache = tmp_path / "cache"
    r = limited("preprocess", "--config", cfg, "--out", cache)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "1 done" in r.stdout and "1 failed" in r.stdout, r.stdout
    report = json.loads((cache / "preprocess-report.json").read_text())
    (failure,) = report["failures"]
    assert failure["case"] == "bad" and reason in failure["error"], failure
    rec = json.loads((cache / "cases/good/case.json").read_text())
    assert rec["id"] == "good" and rec["slices"] > 0
    assert not (cache / "cases/bad").exists()


def test_the_limit_is_real():
    """The limit must stop a real allocation of the declared kind: a 5 GB
    buffer in a child under the same `ulimit -v` fails (so the tests above
    cannot pass by overcommit)."""
    code = "import sys\ntry:\n    b = bytearray(5 << 30)\nexcept MemoryError:\n    sys.exit(3)\n"
    r = subprocess.run(["bash", "-c", f'ulimit -v {LIMIT_KB}; exec "$@"', "py", "python3", "-c", code])
    assert r.returncode == 3
