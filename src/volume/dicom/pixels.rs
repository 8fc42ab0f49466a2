//! Pixel decoding: one frame of a file to f32 values in the modality's
//! units. Native (uncompressed) data are read here; encapsulated data go
//! through the pure-Rust decoders that dicom-rs registers (JPEG baseline,
//! extended and lossless, RLE, JPEG 2000). Stored samples are masked to
//! BitsStored and sign-extended, then the Modality LUT, or else
//! RescaleSlope/RescaleIntercept, is applied exactly once, in f64.
use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::DefaultDicomObject;
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::header::{frame_label, transfer_syntax_name, FileHeader, ModalityLut, PixelFormat, Rescale};
use super::DicomError;

const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";

/// Refuses, with a named error, what this module cannot decode.
pub fn check_supported(f: &FileHeader) -> Result<(), DicomError> {
    let label = f.path.display().to_string();
    if let Some(why) = &f.truncated {
        return Err(DicomError::Truncated {
            label,
            detail: why.clone(),
        });
    }
    if f.float_pixel_data {
        return Err(DicomError::UnsupportedPixelFormat {
            label,
            detail: "float / double float pixel data".into(),
        });
    }
    if !f.has_pixel_data {
        return Err(DicomError::MissingPixelData(label));
    }
    let unsupported_ts = || DicomError::UnsupportedTransferSyntax {
        name: transfer_syntax_name(&f.transfer_syntax),
        uid: f.transfer_syntax.clone(),
        label: label.clone(),
    };
    match TransferSyntaxRegistry.get(&f.transfer_syntax) {
        Some(ts) if ts.can_decode_all() => {}
        _ => return Err(unsupported_ts()),
    }
    let p = &f.pixel;
    if p.samples_per_pixel != 1 || !(p.photometric == "MONOCHROME1" || p.photometric == "MONOCHROME2") {
        return Err(DicomError::UnsupportedPixelFormat {
            label,
            detail: format!(
                "{} with {} sample(s) per pixel: only greyscale (MONOCHROME1/2) images are read",
                if p.photometric.is_empty() {
                    "no PhotometricInterpretation"
                } else {
                    &p.photometric
                },
                p.samples_per_pixel
            ),
        });
    }
    if ![8, 16, 32].contains(&p.bits_allocated) {
        return Err(DicomError::UnsupportedPixelFormat {
            label,
            detail: format!("BitsAllocated {} (only 8, 16 and 32 are read)", p.bits_allocated),
        });
    }
    if p.bits_stored == 0 || p.bits_stored > p.bits_allocated {
        return Err(DicomError::InvalidAttribute {
            label,
            what: "BitsStored",
            detail: format!("{} with BitsAllocated {}", p.bits_stored, p.bits_allocated),
        });
    }
    Ok(())
}

/// Bytes one frame occupies in native encoding, if that fits in memory.
pub fn frame_bytes(p: &PixelFormat) -> Option<usize> {
    (p.rows as usize)
        .checked_mul(p.cols as usize)?
        .checked_mul(usize::from(p.bits_allocated / 8))
}

/// Decodes frame `k` of `obj` (whose header is `f`) to modality values.
pub fn decode_frame(obj: &DefaultDicomObject, f: &FileHeader, k: usize) -> Result<Vec<f32>, DicomError> {
    let label = frame_label(f, k);
    let fb = frame_bytes(&f.pixel).ok_or_else(|| DicomError::UnsupportedPixelFormat {
        label: label.clone(),
        detail: "image too large".into(),
    })?;
    let ts = TransferSyntaxRegistry.get(&f.transfer_syntax);
    let encapsulated = ts.is_some_and(|t| t.is_encapsulated_pixel_data());
    let el = obj
        .get(tags::PIXEL_DATA)
        .ok_or_else(|| DicomError::MissingPixelData(label.clone()))?;
    let owned;
    let raw: &[u8] = match (encapsulated, el.value()) {
        (false, Value::Primitive(p)) => {
            let all = p.to_bytes();
            let end = (k + 1).checked_mul(fb).filter(|&e| e <= all.len());
            let Some(end) = end else {
                return Err(DicomError::Truncated {
                    label,
                    detail: format!(
                        "the pixel data hold {} bytes, too few for frame {} of {fb} bytes",
                        all.len(),
                        k + 1
                    ),
                });
            };
            owned = native_frame(&all, k * fb..end, p, &f.transfer_syntax, f.pixel.bits_allocated);
            &owned
        }
        _ => {
            let frame = u32::try_from(k).map_err(|_| DicomError::Decode {
                label: label.clone(),
                detail: "frame index".into(),
            })?;
            let d = obj.decode_pixel_data_frame(frame).map_err(|e| DicomError::Decode {
                label: label.clone(),
                detail: super::header::error_chain(&e),
            })?;
            owned = d.data().to_vec();
            if owned.len() < fb {
                return Err(DicomError::Decode {
                    label,
                    detail: format!("decoder gave {} bytes, the frame needs {fb}", owned.len()),
                });
            }
            &owned[..fb]
        }
    };
    Ok(samples_to_f32(
        raw,
        &f.pixel,
        f.frames[k].rescale,
        f.modality_lut.as_ref(),
    ))
}

/// One frame's bytes in little-endian sample order. dicom-rs hands OW
/// values of big-endian files over as native u16 words, which is right for
/// 16-bit samples but swaps the bytes of 8-bit and the words of 32-bit ones.
fn native_frame(
    all: &[u8],
    range: std::ops::Range<usize>,
    p: &PrimitiveValue,
    ts: &str,
    bits_allocated: u16,
) -> Vec<u8> {
    let swapped = ts == EXPLICIT_VR_BIG_ENDIAN && matches!(p, PrimitiveValue::U16(_));
    let src = |g: usize| -> u8 {
        let j = match (swapped, bits_allocated) {
            (true, 8) => g ^ 1,
            (true, 32) => (g & !3) | ((g + 2) & 3),
            _ => g,
        };
        all.get(j).copied().unwrap_or(0)
    };
    if !swapped || bits_allocated == 16 {
        return all[range].to_vec();
    }
    range.map(src).collect()
}

/// Converts little-endian stored samples to modality values: mask to
/// BitsStored, sign-extend when PixelRepresentation is 1, then the Modality
/// LUT if there is one, else the rescale (skipped when it is the identity,
/// so integer values stay exact).
pub fn samples_to_f32(raw: &[u8], p: &PixelFormat, rescale: Rescale, lut: Option<&ModalityLut>) -> Vec<f32> {
    let ba = u32::from(p.bits_allocated);
    let bs = u32::from(p.bits_stored.clamp(1, p.bits_allocated.max(1)));
    let shift = 64 - bs;
    let to_int = |u: u64| -> i64 {
        let m = u << shift;
        if p.signed {
            (m as i64) >> shift
        } else {
            (m >> shift) as i64
        }
    };
    let ints: Vec<i64> = match ba {
        8 => raw.iter().map(|&b| to_int(u64::from(b))).collect(),
        16 => raw
            .chunks_exact(2)
            .map(|c| to_int(u64::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| to_int(u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))))
            .collect(),
    };
    if let Some(l) = lut {
        let last = l.data.len().saturating_sub(1) as i64;
        return ints
            .iter()
            .map(|&x| {
                let i = if x < l.first_mapped {
                    0
                } else {
                    (x - l.first_mapped).min(last)
                };
                l.data.get(i as usize).copied().unwrap_or(0) as f32
            })
            .collect();
    }
    if rescale.slope == 1.0 && rescale.intercept == 0.0 {
        return ints.iter().map(|&x| x as f32).collect();
    }
    ints.iter()
        .map(|&x| (x as f64 * rescale.slope + rescale.intercept) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(ba: u16, bs: u16, signed: bool) -> PixelFormat {
        PixelFormat {
            rows: 1,
            cols: 2,
            bits_allocated: ba,
            bits_stored: bs,
            signed,
            samples_per_pixel: 1,
            photometric: "MONOCHROME2".into(),
            frames: 1,
        }
    }

    #[test]
    fn masks_sign_extends_and_rescales_once() {
        // 12 bits stored in 16: 0xF800 has junk above bit 11; 0x0FFF is -1 signed.
        let raw = [0x00, 0xF8, 0xFF, 0x0F];
        assert_eq!(
            samples_to_f32(&raw, &fmt(16, 12, false), Rescale::default(), None),
            vec![2048.0, 4095.0]
        );
        assert_eq!(
            samples_to_f32(&raw, &fmt(16, 12, true), Rescale::default(), None),
            vec![-2048.0, -1.0]
        );
        let r = Rescale {
            slope: 0.5,
            intercept: -1024.0,
        };
        assert_eq!(
            samples_to_f32(&raw, &fmt(16, 12, true), r, None),
            vec![-2048.0, -1024.5]
        );
        let raw32 = (-5i32)
            .to_le_bytes()
            .iter()
            .chain(7i32.to_le_bytes().iter())
            .copied()
            .collect::<Vec<u8>>();
        assert_eq!(
            samples_to_f32(&raw32, &fmt(32, 32, true), Rescale::default(), None),
            vec![-5.0, 7.0]
        );
    }

    #[test]
    fn modality_lut_clamps_like_pydicom() {
        let lut = ModalityLut {
            first_mapped: 10,
            data: vec![100, 200, 300],
        };
        let raw = [5u8, 11, 200];
        let p = PixelFormat {
            cols: 3,
            ..fmt(8, 8, false)
        };
        assert_eq!(
            samples_to_f32(&raw, &p, Rescale::default(), Some(&lut)),
            vec![100.0, 200.0, 300.0]
        );
    }
}
