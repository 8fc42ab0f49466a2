//! The whole per-case path of `med3d preprocess` on fuzz bytes, as a NIfTI
//! file, an NRRD file or a DICOM series (FUZZ_CASE_INPUT=nifti|nrrd|dicom): see
//! med3dinsight::fuzz::whole_case. Any error is fine; a panic, an
//! abort or an allocation past libFuzzer's limit is a finding.
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use med3dinsight::fuzz::{self, Input};

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("FUZZ_SCRATCH").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let d = base.join(format!("med3d-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn input() -> Input {
    match std::env::var("FUZZ_CASE_INPUT").as_deref() {
        Ok("dicom") => Input::DicomSeries,
        Ok("nrrd") => Input::Nrrd,
        _ => Input::Nifti,
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = fuzz::whole_case(scratch(), input(), data);
});
