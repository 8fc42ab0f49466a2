//! One DICOM file from fuzz bytes: med3dinsight::fuzz::dicom_file, JPEG 2000
//! included (openjp2 is built without overflow checks, see fuzz/Cargo.toml).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    med3dinsight::fuzz::dicom_file(data, true);
});
