//! The provenance hash that `med3d preprocess` records for a case's source,
//! now taken while the reader reads it (`volume::source`), equals the
//! separate pass it replaced (`volume::source_sha256`: the file's sha256, or
//! for a DICOM folder the hash over its files and series), for every
//! format: gzip'd and plain NIfTI, NRRD, DICOM series of three transfer
//! syntaxes.
use std::path::PathBuf;

use med3dinsight::fuzz::{self, Input};

#[test]
fn hashes_taken_while_reading_equal_a_separate_pass() {
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/case_fuzz");
    let cases = [
        ("ramp_i16.nii.gz", Input::Nifti, "case.nii.gz"),
        ("crop_u8.nii", Input::Nifti, "case.nii"),
        ("ramp_f32_nifti2.nii", Input::Nifti, "case.nii"),
        ("ramp_f32_gz.nrrd", Input::Nrrd, "case.nrrd"),
        ("ramp_i16.nrrd", Input::Nrrd, "case.nrrd"),
        ("series_explicit.dcmseries", Input::DicomSeries, ""),
        ("series_implicit.dcmseries", Input::DicomSeries, ""),
        ("series_rle.dcmseries", Input::DicomSeries, ""),
    ];
    for (seed, input, name) in cases {
        let scratch = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(seeds.join(seed)).unwrap();
        let done = fuzz::whole_case(scratch.path(), input, &bytes).unwrap_or_else(|e| panic!("{seed}: {e:#}"));
        assert!(done, "{seed}: the case was not processed");
        let image = scratch.path().join("src").join(name);
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(scratch.path().join("cache/cases/fuzz/case.json")).unwrap()).unwrap();
        let separate = med3dinsight::volume::source_sha256(&image, None).unwrap();
        assert_eq!(rec["image"]["sha256"], separate.as_str(), "{seed}");
    }
}
