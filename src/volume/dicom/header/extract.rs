//! Building a `FileHeader` from a parsed object: the pixel format, the
//! Modality LUT, and per-frame geometry and rescale resolved the way
//! enhanced (functional groups) and old-style multi-frame files spell them.
use std::path::Path;

use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::attrs::{first_item, get_f64, get_f64s, get_str, get_uint, invalid};
use super::{FileHeader, FrameHeader, ModalityLut, PixelFormat, Rescale};
use crate::volume::dicom::series::{self, SliceGeom};
use crate::volume::dicom::DicomError;

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
                let n = series::normal_of(&o);
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
    let pixel_data = obj.get(tags::PIXEL_DATA);
    let has_pixel_data = pixel_data.is_some();
    let pixel_bytes = match pixel_data.map(|e| e.value()) {
        Some(Value::Primitive(p)) => p.calculate_byte_len() as u64,
        Some(Value::PixelSequence(seq)) => seq.fragments().iter().map(|f| f.len() as u64).sum(),
        _ => 0,
    };
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
        pixel_bytes,
        float_pixel_data,
        truncated: None,
        pixel_offset: None,
        frames: frames_h,
    }))
}
