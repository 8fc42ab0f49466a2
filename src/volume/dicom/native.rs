//! Native (uncompressed) little-endian pixel data read straight from the
//! file: the scan finds where the PixelData value starts and checks it
//! against dicom-rs's parse ([`pixel_offset`]); the decode then reads each
//! frame from there ([`decode_frame_at`]) instead of parsing the file again.
use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;

use super::header::{self, frame_label, FileHeader};
use super::pixels::{check_file, frame_bytes, stored_frame_into};
use super::DicomError;
use crate::volume::ReadOptions;

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
pub(crate) fn pixel_offset(bytes: &[u8], obj: &DefaultDicomObject, h: &FileHeader) -> Option<u64> {
    use dicom_core::value::Value;
    if super::pixels::encapsulated(h) || h.transfer_syntax.trim_end_matches(['\0', ' ']) == "1.2.840.10008.1.2.2" {
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

/// [`decode_frame_into`] for native little-endian data read straight from
/// the file: frame `k` of the PixelData value that starts at `offset`
/// (the scan's `pixel_offset`, where it found the same bytes dicom-rs
/// parsed) is read into this thread's frame buffer and decoded from there.
pub fn decode_frame_at(
    file: &std::fs::File,
    offset: u64,
    f: &FileHeader,
    k: usize,
    limits: &ReadOptions,
    out: &mut [f32],
) -> Result<(), DicomError> {
    use std::os::unix::fs::FileExt;
    thread_local! {
        static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let label = frame_label(f, k);
    let fb = frame_bytes(&f.pixel).ok_or_else(|| DicomError::UnsupportedPixelFormat {
        label: label.clone(),
        detail: "image too large".into(),
    })?;
    check_file(f, limits)?;
    let end = (k + 1).checked_mul(fb).filter(|&e| e as u64 <= f.pixel_bytes);
    let Some(end) = end else {
        return Err(DicomError::Truncated {
            label,
            detail: format!(
                "the pixel data hold {} bytes, too few for frame {} of {fb} bytes",
                f.pixel_bytes,
                k + 1
            ),
        });
    };
    FRAME.with(|buf| {
        let mut buf = buf.borrow_mut();
        // bounded: one frame, within the PixelData the file holds (checked above and at open)
        buf.resize(fb, 0);
        file.read_exact_at(&mut buf[..], offset + (end - fb) as u64)
            .map_err(|e| DicomError::Truncated {
                label: label.clone(),
                detail: format!("cannot read frame {} of the pixel data: {e}", k + 1),
            })?;
        stored_frame_into(&buf[..], f, k, label, out)
    })
}

/// A series file opened for its pixel data: native little-endian frames
/// are read straight from the file at the value offset the scan checked,
/// one frame at a time; anything else is the file parsed again by dicom-rs.
pub(crate) enum Opened {
    Native(std::fs::File, u64),
    Parsed(Box<DefaultDicomObject>),
}

impl Opened {
    pub(crate) fn open(f: &FileHeader) -> Result<Opened, DicomError> {
        if let Some(off) = f.pixel_offset {
            if let Ok(file) = std::fs::File::open(&f.path) {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                if off.checked_add(f.pixel_bytes).is_some_and(|end| end <= len) {
                    return Ok(Opened::Native(file, off));
                }
            }
            // changed since the scan, or unreadable: the general way names it
        }
        Ok(Opened::Parsed(Box::new(header::open_full(&f.path)?)))
    }
}
