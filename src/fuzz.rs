//! What the fuzz targets run, one body each: the cargo-fuzz targets in
//! `fuzz/fuzz_targets/` (nightly, libFuzzer) and their bounded stable-Rust
//! versions in `tests/` (fixed seeds, deterministic mutations, run by
//! `make test`) call these functions, so what is fuzzed is what is tested.
//!
//! - `whole_case`: bytes written out as a NIfTI file, an NRRD file or a
//!   DICOM series go
//!   through exactly what `med3d preprocess` runs for one case (read,
//!   reorient, resample, intensity, crop, slices, commit), on a small grid.
//! - `dicom_file`: one file through parsing, the header whitelist, the series
//!   assembler and the decoding of its first frame.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::artifacts::cache::{PreprocessConfig, RoiMode};
use crate::manifest::Case;
use crate::volume::dicom::{header, pixels, series};
use crate::volume::{Modality, ReadOptions};

/// Between the files of a DICOM series in one fuzz input.
pub const FILE_SEPARATOR: &[u8] = b"\n--med3d-next-file--\n";

/// What the bytes are written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// One NIfTI file (.nii.gz when the bytes start with the gzip magic).
    Nifti,
    /// One NRRD file with its header attached (.nrrd).
    Nrrd,
    /// A folder of DICOM files, the bytes split at `FILE_SEPARATOR`.
    DicomSeries,
}

/// The settings of a fuzzed case: a grid small enough for thousands of runs
/// a second, every plane, and a 64 MiB cap on decompressed data.
pub fn config() -> PreprocessConfig {
    PreprocessConfig {
        spacing: [4.0, 4.0, 4.0],
        roi: [16, 16, 16],
        roi_mode: RoiMode::CropPad,
        slices_per_plane: 2,
        max_decompressed_mib: 64,
        ..PreprocessConfig::default()
    }
}

/// Writes `bytes` under `scratch` as `input` and runs one case on them into
/// a fresh cache there; the case's result (an error for nearly every
/// mutant) is returned, a panic is not caught. The modality (CT or MR, so
/// both intensity paths run) is taken from the length's parity.
pub fn whole_case(scratch: &Path, input: Input, bytes: &[u8]) -> Result<bool> {
    let src = scratch.join("src");
    let cache = scratch.join("cache");
    for d in [&src, &cache] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    std::fs::create_dir_all(&src)?;
    let image: PathBuf = match input {
        Input::Nifti => {
            let gz = bytes.starts_with(&[0x1f, 0x8b]);
            let p = src.join(if gz { "case.nii.gz" } else { "case.nii" });
            std::fs::write(&p, bytes)?;
            p
        }
        Input::Nrrd => {
            let p = src.join("case.nrrd");
            std::fs::write(&p, bytes)?;
            p
        }
        Input::DicomSeries => {
            for (i, part) in split(bytes).enumerate() {
                std::fs::write(src.join(format!("{i:03}.dcm")), part)?;
            }
            src.clone()
        }
    };
    let case = Case {
        id: "fuzz".into(),
        image,
        modality: if bytes.len().is_multiple_of(2) {
            Modality::CT
        } else {
            Modality::MR
        },
        label: None,
        class: None,
        series_uid: None,
    };
    std::fs::create_dir_all(crate::artifacts::cache::cases_dir(&cache))?;
    crate::preprocess::process_case(&case, &config(), "fuzz", &cache)
}

/// The files of a series input.
pub fn split(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let b = rest?;
        match b.windows(FILE_SEPARATOR.len()).position(|w| w == FILE_SEPARATOR) {
            Some(i) => {
                rest = Some(&b[i + FILE_SEPARATOR.len()..]);
                Some(&b[..i])
            }
            None => {
                rest = None;
                Some(b)
            }
        }
    })
}

/// One DICOM file from bytes: parsing (patched dicom-rs), the header
/// whitelist, the series assembler on its frames and, when it claims a
/// small greyscale image, the decoding of its first frame (native, RLE,
/// JPEG, and JPEG 2000 when `jpeg2000`). Any error is fine; a panic is not,
/// nor a decoded frame of the wrong size.
///
/// JPEG 2000 goes through openjp2 (C transliterated to Rust, extern "C"
/// functions), which relies on wrapping arithmetic: built with overflow
/// checks (cargo's dev profile), a damaged stream made it panic where
/// unwinding cannot pass, which aborts (tests/data/dicom_fuzz/crash-cc57..).
/// A release build, what users run, survives it; the fuzz build turns the
/// checks on for med3d and dicom-rs only (fuzz/Cargo.toml). Callers built
/// with the checks everywhere pass `jpeg2000: false`.
pub fn dicom_file(bytes: &[u8], jpeg2000: bool) {
    let path = Path::new("fuzz.dcm");
    let header::ScanOutcome::Image(h) = header::scan_bytes(path, bytes) else {
        return;
    };
    let geoms: Vec<series::SliceGeom> = h.frames.iter().map(|f| f.geom.clone()).collect();
    let labels: Vec<String> = (0..geoms.len()).map(|k| header::frame_label(&h, k)).collect();
    let _ = series::assemble(&geoms, &labels, &series::Tolerance::default());
    if pixels::check_supported(&h).is_err() || h.problem.is_some() {
        return;
    }
    if pixels::frame_bytes(&h.pixel).is_none_or(|n| n > 1 << 20) {
        return;
    }
    if !jpeg2000 && h.transfer_syntax.starts_with("1.2.840.10008.1.2.4.9") {
        return;
    }
    if let Ok(obj) = header::parse_bytes(bytes, None) {
        if let Ok(v) = pixels::decode_frame(&obj, &h, 0, &ReadOptions::mib(64)) {
            assert_eq!(v.len(), h.pixel.rows as usize * h.pixel.cols as usize);
        }
    }
}
