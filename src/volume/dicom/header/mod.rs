//! Reading one DICOM file down to what med3d may keep: geometry, modality
//! and the values needed to decode its pixels. This is the only place that
//! touches a parsed header, and `FileHeader` has no field for anything else,
//! so names, dates, IDs and free text cannot travel further (the series UID
//! is kept in memory to group slices and to let a user pick a series; it is
//! never written to the cache).
//!
//! The parts: `parse` turns bytes into a parsed object (dicom-rs, patched to
//! bound its reads) and a scan outcome, `attrs` reads single attributes however the
//! writer encoded them, and `extract` builds the `FileHeader` from them.
//! The types below are what leaves this module; the re-exports keep every
//! `header::` path the same as before the split.
mod attrs;
mod extract;
mod parse;

use std::path::PathBuf;

use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::series::SliceGeom;
use super::DicomError;

pub use extract::header_of;
pub use parse::{error_chain, has_dicm_marker, open_full, parse_bytes, scan_bytes, scan_file};

/// How stored samples are laid out and interpreted.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelFormat {
    pub rows: u32,
    pub cols: u32,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
    pub samples_per_pixel: u16,
    pub photometric: String,
    pub frames: u32,
}

impl PixelFormat {
    /// numpy's name for the stored sample type.
    pub fn dtype_name(&self) -> String {
        format!("{}int{}", if self.signed { "" } else { "u" }, self.bits_allocated)
    }
}

/// RescaleSlope / RescaleIntercept of one frame (1 and 0 when absent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rescale {
    pub slope: f64,
    pub intercept: f64,
}

impl Default for Rescale {
    fn default() -> Self {
        Rescale {
            slope: 1.0,
            intercept: 0.0,
        }
    }
}

/// A Modality LUT Sequence's first item: output = data[clamp(x - first, 0, n-1)].
#[derive(Debug, Clone, PartialEq)]
pub struct ModalityLut {
    pub first_mapped: i64,
    pub data: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FrameHeader {
    pub geom: SliceGeom,
    pub rescale: Rescale,
}

/// What med3d keeps of one DICOM file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileHeader {
    pub path: PathBuf,
    pub series_uid: String,
    pub modality: Option<String>,
    pub transfer_syntax: String,
    pub pixel: PixelFormat,
    pub has_pixel_data: bool,
    /// Bytes the PixelData element holds: its value for native data, the
    /// sum of its fragments for encapsulated data (what a decode may be
    /// sized against, see [`crate::alloc`]).
    pub pixel_bytes: u64,
    /// Float / double-float pixel data (not supported, but named).
    pub float_pixel_data: bool,
    /// Set when the header parsed but the pixel data did not.
    pub truncated: Option<String>,
    /// Where the native PixelData value starts in the file, when the scan
    /// found it there and checked that those bytes are the value dicom-rs
    /// parsed (little-endian native data only): the decode then reads the
    /// frames from the file's bytes without parsing the file again.
    pub pixel_offset: Option<u64>,
    /// Set when the geometry or decoding attributes are unreadable.
    pub problem: Option<DicomError>,
    pub modality_lut: Option<ModalityLut>,
    /// One entry per frame.
    pub frames: Vec<FrameHeader>,
}

/// The result of looking at one file during a scan.
#[derive(Debug)]
pub enum ScanOutcome {
    Image(Box<FileHeader>),
    /// Not a DICOM image (another file type, a DICOMDIR, a report...).
    Skip(String),
    /// Has the DICOM marker but cannot be parsed.
    Broken(String),
}

/// `path` or `path [frame k]` for multi-frame files.
pub fn frame_label(f: &FileHeader, k: usize) -> String {
    if f.frames.len() > 1 {
        format!("{} [frame {}]", f.path.display(), k + 1)
    } else {
        f.path.display().to_string()
    }
}

/// Human name of a transfer syntax UID, e.g. "JPEG-LS Lossless".
pub fn transfer_syntax_name(uid: &str) -> String {
    let uid = uid.trim_end_matches(['\0', ' ']);
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) => ts.name().to_string(),
        None => format!("unknown transfer syntax {uid}"),
    }
}
