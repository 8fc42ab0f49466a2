//! Reading one attribute as a string, numbers or an unsigned integer,
//! whatever VR the writer left it in (UN included), with errors that name
//! the attribute and the file.
use std::path::Path;

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::VR;
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;

use crate::volume::dicom::DicomError;

fn label(path: &Path) -> String {
    path.display().to_string()
}

pub(super) fn invalid(path: &Path, what: &'static str, detail: impl Into<String>) -> DicomError {
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

pub(super) fn get_str(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
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

pub(super) fn get_f64s(
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

pub(super) fn get_f64(
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
pub(super) fn get_uint(
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

pub(super) fn first_item(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<&InMemDicomObject> {
    obj.get(tag)?.items()?.first()
}
