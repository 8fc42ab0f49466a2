//! A whole DICOM file from fuzz bytes: parsing (dicom-rs), the header
//! whitelist, the series assembler on its frames and, when it claims a
//! small greyscale image, decoding its first frame (native, RLE, JPEG,
//! JPEG 2000). Any error is fine; a panic is not.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use med3dinsight::volume::dicom::{header, pixels, series};
use med3dinsight::volume::ReadLimits;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.dcm");
    let header::ScanOutcome::Image(h) = header::scan_bytes(path, data) else {
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
    // JPEG 2000 goes through openjp2 (C transliterated to Rust, extern "C"
    // functions): a damaged stream made it panic where unwinding cannot
    // pass, which aborts (tests/data/dicom_fuzz/crash-cc57...; a release
    // build survives that input). Known and reported; skipped here so the
    // search goes on through the other decoders.
    if h.transfer_syntax.starts_with("1.2.840.10008.1.2.4.9") {
        return;
    }
    if let Ok(obj) = header::parse_bytes(data, None) {
        if let Ok(v) = pixels::decode_frame(&obj, &h, 0, &ReadLimits::mib(64)) {
            assert_eq!(v.len(), h.pixel.rows as usize * h.pixel.cols as usize);
        }
    }
});
