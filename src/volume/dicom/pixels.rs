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
use crate::alloc::{self, Supply, Want};
use crate::volume::ReadOptions;

const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.57";
const JPEG_LOSSLESS_SV1: &str = "1.2.840.10008.1.2.4.70";

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
/// Native frames are bounded by the bytes present; what compressed frames
/// decode to, by `limits` (all frames of the file together), and a JPEG or
/// JPEG 2000 stream must declare the image that Rows/Columns say before a
/// decoder sizes its buffers from it.
pub fn decode_frame(
    obj: &DefaultDicomObject,
    f: &FileHeader,
    k: usize,
    limits: &ReadOptions,
) -> Result<Vec<f32>, DicomError> {
    let label = frame_label(f, k);
    let what = format!(
        "frame {} of {}x{} at {} bits",
        k + 1,
        f.pixel.cols,
        f.pixel.rows,
        f.pixel.bits_allocated
    );
    let want = Want {
        label: &label,
        what: &what,
        n: f.pixel.rows as usize * f.pixel.cols as usize,
        declared: frame_bytes(&f.pixel).map_or(u64::MAX, |b| b as u64),
    };
    let mut out = alloc::zeroed(&want, &supply(f, limits)).map_err(|e| refused(f, e))?;
    decode_frame_into(obj, f, k, limits, &mut out)?;
    Ok(out)
}

/// Bytes of stored samples that the header of `f` declares for all its
/// frames (u64::MAX when that overflows).
pub fn declared_bytes(f: &FileHeader) -> u64 {
    frame_bytes(&f.pixel).map_or(u64::MAX, |b| (b as u64).saturating_mul(f.frames.len() as u64))
}

/// Refuses a file whose header declares more stored samples, over all its
/// frames, than its pixel data can [`supply`]; the error names the file.
pub fn check_file(f: &FileHeader, limits: &ReadOptions) -> Result<(), DicomError> {
    let label = f.path.display().to_string();
    let what = format!(
        "{} frame(s) of {}x{} at {} bits",
        f.frames.len(),
        f.pixel.cols,
        f.pixel.rows,
        f.pixel.bits_allocated
    );
    let want = Want {
        label: &label,
        what: &what,
        n: 0,
        declared: declared_bytes(f),
    };
    supply(f, limits).check(&want).map_err(|e| refused(f, e))
}

/// What the pixel data of `f` can supply, in bytes of stored samples: a
/// native element's own bytes; for encapsulated data its fragments times
/// the most their codec can expand (RLE's PackBits 2 bytes to 128; the
/// Huffman-coded JPEG processes DICOM allows spend at least one bit per
/// sample (lossless) or per 8x8 block (DCT)), and never more than the cap,
/// which alone bounds JPEG-LS, JPEG 2000 and deflate.
pub fn supply(f: &FileHeader, limits: &ReadOptions) -> Supply {
    if !encapsulated(f) {
        return Supply::held(f.pixel_bytes, "the PixelData holds");
    }
    let bps = u64::from(f.pixel.bits_allocated / 8).max(1);
    let per_byte = match f.transfer_syntax.as_str() {
        RLE_LOSSLESS => Some(64),
        JPEG_BASELINE | JPEG_EXTENDED => Some(512 * bps),
        JPEG_LOSSLESS | JPEG_LOSSLESS_SV1 => Some(8 * bps),
        _ => None,
    };
    let cap = limits.cap();
    match per_byte {
        Some(r) => cap.tighter(Supply::held(
            f.pixel_bytes.saturating_mul(r),
            "the PixelData fragments decode to at most",
        )),
        None => cap,
    }
}

/// Whether the pixel data of `f` are encapsulated (compressed fragments).
pub fn encapsulated(f: &FileHeader) -> bool {
    TransferSyntaxRegistry
        .get(&f.transfer_syntax)
        .is_some_and(|t| t.is_encapsulated_pixel_data())
}

/// A refused buffer as the DICOM error users match on: native data too
/// short are a truncated file; compressed data, an undecodable one.
pub fn refused(f: &FileHeader, e: alloc::Refused) -> DicomError {
    let native = !encapsulated(f);
    let (label, detail) = (e.label.clone(), e.detail());
    if native && e.is_short() {
        DicomError::Truncated { label, detail }
    } else {
        DicomError::Decode { label, detail }
    }
}

/// [`decode_frame`] into `out`, which must hold exactly Rows x Columns
/// values (the frame's place in a volume being assembled).
pub fn decode_frame_into(
    obj: &DefaultDicomObject,
    f: &FileHeader,
    k: usize,
    limits: &ReadOptions,
    out: &mut [f32],
) -> Result<(), DicomError> {
    let label = frame_label(f, k);
    let fb = frame_bytes(&f.pixel).ok_or_else(|| DicomError::UnsupportedPixelFormat {
        label: label.clone(),
        detail: "image too large".into(),
    })?;
    let encapsulated = encapsulated(f);
    // A decoder sizes its output from the header: the file's frames must
    // fit in what its pixel data can supply before any of them is decoded.
    check_file(f, limits)?;
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
        (_, Value::PixelSequence(seq)) if f.transfer_syntax == RLE_LOSSLESS => {
            // Ours rather than dicom-rs's: that one reads 8 and 16 bits only
            // and panics on some damaged streams (found by fuzzing).
            let frags = seq.fragments();
            let frag = if frags.len() == f.frames.len() {
                frags.get(k)
            } else {
                None
            };
            let frag = frag.ok_or_else(|| DicomError::Decode {
                label: label.clone(),
                detail: format!(
                    "{} RLE fragments for {} frames (one fragment per frame is required)",
                    frags.len(),
                    f.frames.len()
                ),
            })?;
            owned = super::rle::decode(
                frag,
                f.pixel.rows as usize * f.pixel.cols as usize,
                usize::from(f.pixel.bits_allocated / 8),
            )
            .map_err(|detail| DicomError::Decode {
                label: label.clone(),
                detail,
            })?;
            &owned
        }
        (_, value) => {
            if let Value::PixelSequence(seq) = value {
                let frags = seq.fragments();
                let mine = if frags.len() == f.frames.len() {
                    std::slice::from_ref(&frags[k])
                } else {
                    frags
                };
                for frag in mine {
                    check_stream_dims(frag, &f.pixel).map_err(|detail| DicomError::Decode {
                        label: label.clone(),
                        detail,
                    })?;
                }
            }
            let frame = u32::try_from(k).map_err(|_| DicomError::Decode {
                label: label.clone(),
                detail: "frame index".into(),
            })?;
            let d = guarded(|| obj.decode_pixel_data_frame(frame).map(|d| d.data().to_vec()))
                .map_err(|detail| DicomError::Decode {
                    label: label.clone(),
                    detail,
                })?
                .map_err(|e| DicomError::Decode {
                    label: label.clone(),
                    detail: super::header::error_chain(&e),
                })?;
            owned = d;
            if owned.len() < fb {
                return Err(DicomError::Decode {
                    label,
                    detail: format!("decoder gave {} bytes, the frame needs {fb}", owned.len()),
                });
            }
            &owned[..fb]
        }
    };
    stored_frame_into(raw, f, k, label, out)
}

/// Frame `k`'s stored samples `raw` (as decoded or read) into `out`, in the
/// modality's units, once their count is the frame's.
pub(crate) fn stored_frame_into(
    raw: &[u8],
    f: &FileHeader,
    k: usize,
    label: String,
    out: &mut [f32],
) -> Result<(), DicomError> {
    let samples = raw.len() / usize::from(f.pixel.bits_allocated / 8).max(1);
    if samples != out.len() {
        return Err(DicomError::Decode {
            label,
            detail: format!("decoded {samples} pixels, expected {}", out.len()),
        });
    }
    samples_to_f32_into(raw, &f.pixel, f.frames[k].rescale, f.modality_lut.as_ref(), out);
    Ok(())
}

/// The image size a compressed stream declares for itself, (columns, rows,
/// components): a JPEG's frame header (SOFn) or a JPEG 2000 codestream's SIZ
/// segment. None when the fragment does not start such a stream or its
/// header is not within it (a continuation fragment; the decoder then
/// reports what is wrong).
pub fn stream_dims(frag: &[u8]) -> Option<(u32, u32, u32)> {
    let be16 = |i: usize| frag.get(i..i + 2).map(|b| u32::from(u16::from_be_bytes([b[0], b[1]])));
    let be32 = |i: usize| frag.get(i..i + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    match frag.get(..4)? {
        // JPEG 2000 codestream: SOC, then SIZ first
        [0xFF, 0x4F, 0xFF, 0x51] => {
            let (x, y, x0, y0) = (be32(8)?, be32(12)?, be32(16)?, be32(20)?);
            Some((x.checked_sub(x0)?, y.checked_sub(y0)?, be16(40)?))
        }
        // JPEG: SOI, then marker segments up to the frame header
        [0xFF, 0xD8, ..] => {
            let mut i = 2;
            while i + 4 <= frag.len() {
                if frag[i] != 0xFF {
                    return None;
                }
                let m = frag[i + 1];
                if m == 0xFF {
                    i += 1; // fill byte
                    continue;
                }
                if (0xD0..=0xD7).contains(&m) || m == 0x01 {
                    i += 2;
                    continue;
                }
                if matches!(m, 0xC0..=0xCF) && !matches!(m, 0xC4 | 0xC8 | 0xCC) || m == 0xF7 {
                    // P, Y (rows), X (columns), Nf
                    return Some((be16(i + 7)?, be16(i + 5)?, u32::from(*frag.get(i + 9)?)));
                }
                if m == 0xDA || m == 0xD9 {
                    return None;
                }
                i += 2 + be16(i + 2)? as usize;
            }
            None
        }
        _ => None,
    }
}

/// Refuses a compressed stream that declares another image than the
/// header's Rows/Columns/SamplesPerPixel: its decoder would size its
/// buffers from the stream (65535 x 65535 from a few bytes) and the frame
/// would be wrong anyway.
fn check_stream_dims(frag: &[u8], p: &PixelFormat) -> Result<(), String> {
    match stream_dims(frag) {
        Some((c, r, n)) if (c, r, n) != (p.cols, p.rows, u32::from(p.samples_per_pixel)) => Err(format!(
            "the compressed stream declares a {c}x{r} image with {n} component(s), but Columns/Rows/SamplesPerPixel \
             say {}x{} with {}",
            p.cols, p.rows, p.samples_per_pixel
        )),
        _ => Ok(()),
    }
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

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a third-party decoder, turning a panic into an error (damaged
/// streams have made decoders index out of bounds). The panic hook is
/// silenced for this thread while it runs, so a caught panic prints nothing.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                prev(info);
            }
        }));
    });
    QUIET_PANICS.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(false));
    r.map_err(|e| {
        let msg = e
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| e.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("the decoder failed on damaged data ({msg})")
    })
}

/// Converts little-endian stored samples to modality values: mask to
/// BitsStored, sign-extend when PixelRepresentation is 1, then the Modality
/// LUT if there is one, else the rescale (skipped when it is the identity,
/// so integer values stay exact).
pub fn samples_to_f32(raw: &[u8], p: &PixelFormat, rescale: Rescale, lut: Option<&ModalityLut>) -> Vec<f32> {
    // bounded: one value per sample of `raw`, already in memory
    let mut out = vec![0f32; raw.len() / usize::from(p.bits_allocated / 8).max(1)];
    samples_to_f32_into(raw, p, rescale, lut, &mut out);
    out
}

/// [`samples_to_f32`] into `out` (one value per whole sample of `raw`;
/// extra room in `out` is left as it is), sample by sample with no
/// intermediate buffer.
pub fn samples_to_f32_into(raw: &[u8], p: &PixelFormat, rescale: Rescale, lut: Option<&ModalityLut>, out: &mut [f32]) {
    let bs = u32::from(p.bits_stored.clamp(1, p.bits_allocated.max(1)));
    let shift = 64 - bs;
    let signed = p.signed;
    let to_int = move |u: u64| -> i64 {
        let m = u << shift;
        if signed {
            (m as i64) >> shift
        } else {
            (m >> shift) as i64
        }
    };
    // One loop per (sample width, value mapping), the choice made outside it.
    fn convert<const B: usize>(raw: &[u8], out: &mut [f32], to_int: impl Fn(u64) -> i64, map: impl Fn(i64) -> f32) {
        let word = |c: &[u8]| -> u64 {
            match B {
                1 => u64::from(c[0]),
                2 => u64::from(u16::from_le_bytes([c[0], c[1]])),
                _ => u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            }
        };
        for (o, c) in out.iter_mut().zip(raw.chunks_exact(B)) {
            *o = map(to_int(word(c)));
        }
    }
    fn by_width(
        raw: &[u8],
        bits_allocated: u16,
        out: &mut [f32],
        to_int: impl Fn(u64) -> i64,
        map: impl Fn(i64) -> f32,
    ) {
        match bits_allocated {
            8 => convert::<1>(raw, out, to_int, map),
            16 => convert::<2>(raw, out, to_int, map),
            _ => convert::<4>(raw, out, to_int, map),
        }
    }
    let ba = p.bits_allocated;
    if let Some(l) = lut {
        let last = l.data.len().saturating_sub(1) as i64;
        let first = l.first_mapped;
        return by_width(raw, ba, out, to_int, |x: i64| {
            let i = if x < first { 0 } else { (x - first).min(last) };
            l.data.get(i as usize).copied().unwrap_or(0) as f32
        });
    }
    if rescale.slope == 1.0 && rescale.intercept == 0.0 {
        return by_width(raw, ba, out, to_int, |x| x as f32);
    }
    let (slope, intercept) = (rescale.slope, rescale.intercept);
    by_width(raw, ba, out, to_int, |x| (x as f64 * slope + intercept) as f32)
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
    fn decoder_panics_become_errors() {
        let r: Result<(), String> = guarded(|| panic!("boom"));
        assert!(r.unwrap_err().contains("boom"));
        assert_eq!(guarded(|| 3), Ok(3));
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
