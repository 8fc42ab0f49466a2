"""Writes volumes as DICOM series with pydicom, for the DICOM tests.

`write_series(vol, affine, out)` stores a (X, Y, Z) volume with a RAS+
affine the way a scanner would: one file per slice k holding vol[:, :, k]
(rows along Y, columns along X), ImageOrientationPatient / PixelSpacing /
ImagePositionPatient in LPS derived from the affine, int16 stored values
with a RescaleSlope/Intercept per slice that recovers the voxels exactly.
The headers also carry made-up patient data, so tests can check that none
of it leaks into what med3d writes.
"""
import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from pydicom.valuerep import DSfloat

# Made-up identifying data written into every synthetic header.
PHI = {
    "PatientName": "DOE^JANE^Q",
    "PatientID": "PHI-ID-93731",
    "PatientBirthDate": "19610704",
    "InstitutionName": "St Elsewhere PHI Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "AccessionNumber": "ACC-PHI-5521",
    "StudyDescription": "PHI STUDY DESCRIPTION",
    "SeriesDescription": "PHI SERIES DESCRIPTION",
}

LPS = np.diag([-1.0, -1.0, 1.0])
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def ds_list(values):
    return [DSfloat(float(v), auto_format=True) for v in values]


def default_rescale(k):
    """Alternating slopes/intercepts: each slice is rescaled on its own."""
    return (0.25, 100.0) if k % 2 == 0 else (0.5, 50.0)


def slice_dataset(pixels, affine, k, series_uid, study_uid, rescale, modality="MR", ts=ExplicitVRLittleEndian):
    """One slice as a pydicom Dataset (pixels: (rows, cols) int16 stored values)."""
    a = np.asarray(affine, float)
    col_dir = LPS @ a[:3, 0]
    row_dir = LPS @ a[:3, 1]
    sx, sy = np.linalg.norm(col_dir), np.linalg.norm(row_dir)
    ipp = LPS @ (a @ np.array([0.0, 0.0, k, 1.0]))[:3]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = ds_list(list(col_dir / sx) + list(row_dir / sy))
    ds.ImagePositionPatient = ds_list(ipp)
    ds.PixelSpacing = ds_list([sy, sx])
    ds.SliceThickness = DSfloat(float(np.linalg.norm(a[:3, 2])) * 1.7, auto_format=True)  # deliberately not the step
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    slope, inter = rescale
    ds.RescaleSlope = DSfloat(slope, auto_format=True)
    ds.RescaleIntercept = DSfloat(inter, auto_format=True)
    ds.PixelData = np.ascontiguousarray(pixels.astype("<i2")).tobytes()
    if ts == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    return ds


def stored_values(vol_k, rescale):
    slope, inter = rescale
    stored = np.round((vol_k.astype(np.float64) - inter) / slope)
    assert np.array_equal(stored * slope + inter, vol_k), "rescale must recover the voxels exactly"
    assert stored.min() >= -32768 and stored.max() <= 32767
    return stored.astype(np.int16)


def write_series(
    vol,
    affine,
    out: Path,
    *,
    rescale=default_rescale,
    shuffle=True,
    seed=0,
    modality="MR",
    ts=ExplicitVRLittleEndian,
    series_uid=None,
):
    """Writes `vol` as a series under `out` (created); returns the series UID.

    With `shuffle`, files get random names (no extension) in nested
    sub-folders, written in random order, so nothing but the headers tells
    the slice order."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    rng = random.Random(seed)
    order = list(range(vol.shape[2]))
    if shuffle:
        rng.shuffle(order)
    for n, k in enumerate(order):
        r = rescale(k)
        pixels = stored_values(vol[:, :, k], r).T  # (rows=Y, cols=X)
        ds = slice_dataset(pixels, affine, k, series_uid, study_uid, r, modality=modality, ts=ts)
        if shuffle:
            name = Path(f"d{rng.randrange(3)}") / f"{rng.getrandbits(40):010x}"
        else:
            name = Path(f"slice_{k:04d}.dcm")
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return series_uid


def rotation(ax_deg, az_deg):
    """4x4 rotation: about x by ax_deg, then about z by az_deg."""
    a, b = np.radians(ax_deg), np.radians(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx
    return m


def small_series(out: Path, n=6, shape=(8, 7), spacing=(0.8, 0.9, 2.5), seed=1, **kw):
    """A small axial series of integer ramps (for the bad-input tests)."""
    vol = np.zeros((*shape, n), np.float32)
    for k in range(n):
        vol[:, :, k] = (np.arange(shape[0])[:, None] * 10 + np.arange(shape[1])[None, :] + 100 * k).astype(np.float32)
    aff = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [-3.0, 4.0, 10.0]
    uid = write_series(vol, aff, out, rescale=lambda k: (1.0, -1024.0), shuffle=False, seed=seed, **kw)
    return vol, aff, uid


def read(path):
    return pydicom.dcmread(path)
