//! Reading one DICOM file down to what med3d may keep: geometry, modality
//! and the values needed to decode its pixels. This is the only place that
//! touches a parsed header, and `FileHeader` has no field for anything else,
//! so names, dates, IDs and free text cannot travel further (the series UID
//! is kept in memory to group slices and to let a user pick a series; it is
//! never written to the cache).
use std::io::Read;
use std::path::{Path, PathBuf};

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::VR;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::guard::Lengths;
use super::series::SliceGeom;
use super::DicomError;

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
    /// Float / double-float pixel data (not supported, but named).
    pub float_pixel_data: bool,
    /// Set when the header parsed but the pixel data did not.
    pub truncated: Option<String>,
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
/// preamble), up to `until` when given, after checking that no declared
/// length runs past the end (see `guard`).
pub fn parse_bytes(bytes: &[u8], until: Option<dicom_core::Tag>) -> Result<DefaultDicomObject, String> {
    match super::guard::check_lengths(bytes) {
        Lengths::Fit => {}
        Lengths::PixelDataTruncated(_) if until == Some(tags::PIXEL_DATA) => {}
        Lengths::PixelDataTruncated(m) | Lengths::Corrupt(m) => return Err(m),
    }
    let off = if bytes.get(128..132) == Some(b"DICM") { 128 } else { 0 };
    let opts = OpenFileOptions::new().read_preamble(ReadPreamble::Never);
    let opts = match until {
        Some(t) => opts.read_until(t),
        None => opts,
    };
    opts.from_reader(&bytes[off..]).map_err(|e| error_chain(&e))
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
            }
            ScanOutcome::Image(Box::new(h))
        }
        Ok(None) => ScanOutcome::Skip(
            "DICOM object without an image (no Rows/Columns: a DICOMDIR, report, RT plan or similar)".into(),
        ),
        Err(e) => ScanOutcome::Broken(e.to_string()),
    }
}

fn label(path: &Path) -> String {
    path.display().to_string()
}

fn invalid(path: &Path, what: &'static str, detail: impl Into<String>) -> DicomError {
    DicomError::InvalidAttribute {
        label: label(path),
        what,
        detail: detail.into(),
    }
}

/// The text of an element whose VR the file left as UN (pydicom reads these
/// by the dictionary's VR; dicom-rs hands over the raw bytes).
fn un_text(e: &InMemElement) -> Option<String> {
    if e.vr() != VR::UN {
        return None;
    }
    let b = e.value().to_bytes().ok()?;
    Some(
        String::from_utf8_lossy(&b)
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string(),
    )
}

fn parse_numbers(path: &Path, text: &str, what: &'static str) -> Result<Vec<f64>, DicomError> {
    text.split('\\')
        .map(|t| {
            t.trim()
                .parse::<f64>()
                .map_err(|_| invalid(path, what, format!("{text:?} is not a number list")))
        })
        .collect()
}

fn get_str(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    let e = obj.get(tag)?;
    let s = match un_text(e) {
        Some(t) => t,
        None => e.to_str().ok()?.into_owned(),
    };
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string();
    (!s.is_empty()).then_some(s)
}

fn is_empty(obj: &InMemDicomObject, tag: dicom_core::Tag) -> bool {
    match obj.get(tag) {
        None => true,
        Some(e) => match e.value() {
            Value::Primitive(PrimitiveValue::Empty) => true,
            Value::Primitive(p) => p
                .to_str()
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .is_empty(),
            _ => false,
        },
    }
}

fn floats(path: &Path, e: &InMemElement, what: &'static str) -> Result<Vec<f64>, DicomError> {
    match un_text(e) {
        Some(t) => parse_numbers(path, &t, what),
        None => e.to_multi_float64().map_err(|err| invalid(path, what, err.to_string())),
    }
}

fn get_f64s(
    path: &Path,
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    what: &'static str,
    n: usize,
) -> Result<Option<Vec<f64>>, DicomError> {
    if is_empty(obj, tag) {
        return Ok(None);
    }
    let Some(e) = obj.get(tag) else { return Ok(None) };
    let v = floats(path, e, what)?;
    if v.len() != n {
        return Err(invalid(path, what, format!("has {} values, expected {n}", v.len())));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(invalid(path, what, format!("{v:?} is not finite")));
    }
    Ok(Some(v))
}

fn get_f64(
    path: &Path,
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    what: &'static str,
) -> Result<Option<f64>, DicomError> {
    if is_empty(obj, tag) {
        return Ok(None);
    }
    // Some writers repeat a DS value (e.g. "1\1"); the first is the value.
    let Some(e) = obj.get(tag) else { return Ok(None) };
    match floats(path, e, what)?.first() {
        Some(x) if x.is_finite() => Ok(Some(*x)),
        Some(x) => Err(invalid(path, what, format!("{x} is not finite"))),
        None => Ok(None),
    }
}

/// A US attribute (`binary`) or an IS one, as u32.
fn get_uint(
    path: &Path,
    obj: &InMemDicomObject,
    tag: dicom_core::Tag,
    what: &'static str,
    binary: bool,
) -> Result<Option<u32>, DicomError> {
    if is_empty(obj, tag) {
        return Ok(None);
    }
    let Some(e) = obj.get(tag) else { return Ok(None) };
    let v: i64 = if e.vr() == VR::UN {
        // US left as UN is 2 little-endian bytes; IS left as UN is text.
        let b = e
            .value()
            .to_bytes()
            .map_err(|err| invalid(path, what, err.to_string()))?;
        match (binary, b.len()) {
            (true, 2) => i64::from(u16::from_le_bytes([b[0], b[1]])),
            (true, 4) => i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => {
                let t = String::from_utf8_lossy(&b)
                    .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                    .to_string();
                t.parse()
                    .map_err(|_| invalid(path, what, format!("{t:?} is not an integer")))?
            }
        }
    } else {
        e.to_int::<i64>().map_err(|err| invalid(path, what, err.to_string()))?
    };
    u32::try_from(v)
        .map(Some)
        .map_err(|_| invalid(path, what, format!("{v} is out of range")))
}

fn first_item(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<&InMemDicomObject> {
    obj.get(tag)?.items()?.first()
}

/// Geometry and rescale found in one place (top level, or a functional
/// groups item); `None` where that place does not say.
#[derive(Default, Clone)]
struct Partial {
    position: Option<[f64; 3]>,
    orientation: Option<[f64; 6]>,
    pixel_spacing: Option<[f64; 2]>,
    slice_thickness: Option<f64>,
    spacing_between_slices: Option<f64>,
    slope: Option<f64>,
    intercept: Option<f64>,
}

impl Partial {
    fn over(self, base: &Partial) -> Partial {
        Partial {
            position: self.position.or(base.position),
            orientation: self.orientation.or(base.orientation),
            pixel_spacing: self.pixel_spacing.or(base.pixel_spacing),
            slice_thickness: self.slice_thickness.or(base.slice_thickness),
            spacing_between_slices: self.spacing_between_slices.or(base.spacing_between_slices),
            slope: self.slope.or(base.slope),
            intercept: self.intercept.or(base.intercept),
        }
    }
}

fn arr<const N: usize>(v: Option<Vec<f64>>) -> Option<[f64; N]> {
    v.and_then(|v| v.try_into().ok())
}

/// Reads the plain (top-level) attributes from `o`.
fn partial_plain(path: &Path, o: &InMemDicomObject) -> Result<Partial, DicomError> {
    Ok(Partial {
        position: arr(get_f64s(
            path,
            o,
            tags::IMAGE_POSITION_PATIENT,
            "ImagePositionPatient",
            3,
        )?),
        orientation: arr(get_f64s(
            path,
            o,
            tags::IMAGE_ORIENTATION_PATIENT,
            "ImageOrientationPatient",
            6,
        )?),
        pixel_spacing: arr(get_f64s(path, o, tags::PIXEL_SPACING, "PixelSpacing", 2)?),
        slice_thickness: get_f64(path, o, tags::SLICE_THICKNESS, "SliceThickness")?,
        spacing_between_slices: get_f64(path, o, tags::SPACING_BETWEEN_SLICES, "SpacingBetweenSlices")?,
        slope: get_f64(path, o, tags::RESCALE_SLOPE, "RescaleSlope")?,
        intercept: get_f64(path, o, tags::RESCALE_INTERCEPT, "RescaleIntercept")?,
    })
}

/// Reads a functional groups item (shared, or one frame's).
fn partial_fg(path: &Path, item: &InMemDicomObject) -> Result<Partial, DicomError> {
    let mut p = Partial::default();
    if let Some(pp) = first_item(item, tags::PLANE_POSITION_SEQUENCE) {
        p.position = arr(get_f64s(
            path,
            pp,
            tags::IMAGE_POSITION_PATIENT,
            "ImagePositionPatient",
            3,
        )?);
    }
    if let Some(po) = first_item(item, tags::PLANE_ORIENTATION_SEQUENCE) {
        p.orientation = arr(get_f64s(
            path,
            po,
            tags::IMAGE_ORIENTATION_PATIENT,
            "ImageOrientationPatient",
            6,
        )?);
    }
    if let Some(pm) = first_item(item, tags::PIXEL_MEASURES_SEQUENCE) {
        p.pixel_spacing = arr(get_f64s(path, pm, tags::PIXEL_SPACING, "PixelSpacing", 2)?);
        p.slice_thickness = get_f64(path, pm, tags::SLICE_THICKNESS, "SliceThickness")?;
        p.spacing_between_slices = get_f64(path, pm, tags::SPACING_BETWEEN_SLICES, "SpacingBetweenSlices")?;
    }
    if let Some(pv) = first_item(item, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE) {
        p.slope = get_f64(path, pv, tags::RESCALE_SLOPE, "RescaleSlope")?;
        p.intercept = get_f64(path, pv, tags::RESCALE_INTERCEPT, "RescaleIntercept")?;
    }
    Ok(p)
}

fn modality_lut(path: &Path, obj: &InMemDicomObject, signed: bool) -> Result<Option<ModalityLut>, DicomError> {
    let Some(item) = first_item(obj, tags::MODALITY_LUT_SEQUENCE) else {
        return Ok(None);
    };
    let desc = item
        .get(tags::LUT_DESCRIPTOR)
        .ok_or_else(|| invalid(path, "ModalityLUTSequence", "item has no LUTDescriptor"))?
        .to_multi_int::<i64>()
        .map_err(|e| invalid(path, "LUTDescriptor", e.to_string()))?;
    if desc.len() != 3 {
        return Err(invalid(
            path,
            "LUTDescriptor",
            format!("has {} values, expected 3", desc.len()),
        ));
    }
    let n = if desc[0] == 0 { 65536 } else { desc[0] as usize };
    // The first mapped value is US or SS, as the pixel representation says.
    let first = if signed && desc[1] > 32767 {
        desc[1] - 65536
    } else {
        desc[1]
    };
    let data_el = item
        .get(tags::LUT_DATA)
        .ok_or_else(|| invalid(path, "ModalityLUTSequence", "item has no LUTData"))?;
    let data: Vec<u32> = match data_el.value() {
        Value::Primitive(PrimitiveValue::U16(v)) => v.iter().map(|&x| u32::from(x)).collect(),
        Value::Primitive(PrimitiveValue::U8(b)) => b
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        _ => data_el
            .to_multi_int::<u32>()
            .map_err(|e| invalid(path, "LUTData", e.to_string()))?,
    };
    if data.len() < n || n == 0 {
        return Err(invalid(
            path,
            "LUTData",
            format!("has {} entries, the descriptor says {n}", data.len()),
        ));
    }
    Ok(Some(ModalityLut {
        first_mapped: first,
        data: data[..n].to_vec(),
    }))
}

/// Per-frame geometry and rescale: per-frame functional groups over shared
/// ones over the top level.
fn frame_headers(
    path: &Path,
    obj: &InMemDicomObject,
    rows: u32,
    cols: u32,
    frames: u32,
) -> Result<Vec<FrameHeader>, DicomError> {
    let top = partial_plain(path, obj)?;
    let shared = match first_item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE) {
        Some(it) => partial_fg(path, it)?.over(&top),
        None => top.clone(),
    };
    let per_frame = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items());
    // A frame count that no real file holds is a broken header, not a reason
    // to allocate (with functional groups the items bound the count).
    if per_frame.is_none() && frames > 100_000 {
        return Err(invalid(path, "NumberOfFrames", format!("{frames} frames")));
    }
    let mut parts: Vec<Partial> = match per_frame {
        Some(items) => {
            if items.len() != frames as usize {
                return Err(invalid(
                    path,
                    "PerFrameFunctionalGroupsSequence",
                    format!("has {} items for {frames} frames", items.len()),
                ));
            }
            items
                .iter()
                .map(|it| partial_fg(path, it).map(|p| p.over(&shared)))
                .collect::<Result<_, _>>()?
        }
        None => vec![shared.clone(); frames as usize],
    };
    if per_frame.is_none() && frames > 1 {
        // Old-style multi-frame: RT dose grids say where frames are with
        // GridFrameOffsetVector; others give one position for all frames,
        // which cannot place them.
        let offsets = get_f64s(
            path,
            obj,
            tags::GRID_FRAME_OFFSET_VECTOR,
            "GridFrameOffsetVector",
            frames as usize,
        )?;
        match (offsets, shared.position, shared.orientation) {
            (Some(off), Some(p0), Some(o)) => {
                let n = super::series::normal_of(&o);
                for (p, d) in parts.iter_mut().zip(off) {
                    p.position = Some([p0[0] + d * n[0], p0[1] + d * n[1], p0[2] + d * n[2]]);
                }
            }
            _ => {
                for p in parts.iter_mut() {
                    p.position = None;
                }
            }
        }
    }
    Ok(parts
        .into_iter()
        .map(|p| FrameHeader {
            geom: SliceGeom {
                rows,
                cols,
                position: p.position,
                orientation: p.orientation,
                pixel_spacing: p.pixel_spacing,
                slice_thickness: p.slice_thickness,
                spacing_between_slices: p.spacing_between_slices,
            },
            rescale: Rescale {
                slope: p.slope.unwrap_or(1.0),
                intercept: p.intercept.unwrap_or(0.0),
            },
        })
        .collect())
}

/// Extracts the header; `Ok(None)` for DICOM objects without an image.
pub fn header_of(
    path: &Path,
    obj: &InMemDicomObject,
    transfer_syntax: String,
) -> Result<Option<FileHeader>, DicomError> {
    let (Some(rows), Some(cols)) = (
        get_uint(path, obj, tags::ROWS, "Rows", true)?,
        get_uint(path, obj, tags::COLUMNS, "Columns", true)?,
    ) else {
        return Ok(None);
    };
    let bits_allocated = get_uint(path, obj, tags::BITS_ALLOCATED, "BitsAllocated", true)?.unwrap_or(0);
    let bits_stored = get_uint(path, obj, tags::BITS_STORED, "BitsStored", true)?.unwrap_or(bits_allocated);
    let signed = get_uint(path, obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation", true)?.unwrap_or(0) == 1;
    let samples = get_uint(path, obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel", true)?.unwrap_or(1);
    let frames = get_uint(path, obj, tags::NUMBER_OF_FRAMES, "NumberOfFrames", false)?
        .unwrap_or(1)
        .max(1);
    let to16 =
        |v: u32, what: &'static str| u16::try_from(v).map_err(|_| invalid(path, what, format!("{v} is out of range")));
    let pixel = PixelFormat {
        rows,
        cols,
        bits_allocated: to16(bits_allocated, "BitsAllocated")?,
        bits_stored: to16(bits_stored, "BitsStored")?,
        signed,
        samples_per_pixel: to16(samples, "SamplesPerPixel")?,
        photometric: get_str(obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default(),
        frames,
    };
    // A header whose geometry cannot be read still has a series; the problem
    // is reported when that series is loaded (after any pixel-format error).
    let (frames_h, mut problem) = match frame_headers(path, obj, rows, cols, frames) {
        Ok(f) => (f, None),
        Err(e) => (
            vec![FrameHeader {
                geom: SliceGeom {
                    rows,
                    cols,
                    ..Default::default()
                },
                rescale: Rescale::default(),
            }],
            Some(e),
        ),
    };
    let modality_lut = modality_lut(path, obj, signed).unwrap_or_else(|e| {
        problem.get_or_insert(e);
        None
    });
    let has_pixel_data = obj.get(tags::PIXEL_DATA).is_some();
    let float_pixel_data =
        obj.get(tags::FLOAT_PIXEL_DATA).is_some() || obj.get(tags::DOUBLE_FLOAT_PIXEL_DATA).is_some();
    Ok(Some(FileHeader {
        path: path.to_path_buf(),
        series_uid: get_str(obj, tags::SERIES_INSTANCE_UID).unwrap_or_else(|| "(no SeriesInstanceUID)".into()),
        modality: get_str(obj, tags::MODALITY),
        transfer_syntax,
        modality_lut,
        problem,
        pixel,
        has_pixel_data: has_pixel_data || float_pixel_data,
        float_pixel_data,
        truncated: None,
        frames: frames_h,
    }))
}
