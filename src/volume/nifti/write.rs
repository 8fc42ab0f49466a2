//! The NIfTI-1 writer: one little-endian single file with an aligned sform,
//! the counterpart of the reader for exports and test fixtures.
use crate::volume::affine::Mat4;

/// Serialises a NIfTI-1 single-file image (float32 or uint8 or int16 data
/// given as raw little-endian bytes in file order). Used for test fixtures
/// and for exporting processed volumes.
pub fn write_nifti1(shape: &[usize], pixdim: [f64; 3], affine: &Mat4, datatype: i16, raw: &[u8]) -> Vec<u8> {
    // bounded: a NIfTI-1 header
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    let ndim = shape.len().min(7);
    h[40..42].copy_from_slice(&(ndim as i16).to_le_bytes());
    for i in 0..7 {
        let d = shape.get(i).copied().unwrap_or(1) as i16;
        h[42 + 2 * i..44 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    let bitpix: i16 = match datatype {
        2 | 256 => 8,
        4 | 512 => 16,
        8 | 16 | 768 => 32,
        _ => 64,
    };
    h[70..72].copy_from_slice(&datatype.to_le_bytes());
    h[72..74].copy_from_slice(&bitpix.to_le_bytes());
    let mut pd = [1.0f32; 8];
    pd[1] = pixdim[0] as f32;
    pd[2] = pixdim[1] as f32;
    pd[3] = pixdim[2] as f32;
    for (i, p) in pd.iter().enumerate() {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&p.to_le_bytes());
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes());
    h[112..116].copy_from_slice(&1f32.to_le_bytes());
    h[123] = 2; // mm
    h[254..256].copy_from_slice(&2i16.to_le_bytes()); // sform_code: aligned
    for r in 0..3 {
        for c in 0..4 {
            let off = 280 + 16 * r + 4 * c;
            h[off..off + 4].copy_from_slice(&(affine[r][c] as f32).to_le_bytes());
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    h.extend_from_slice(raw);
    h
}
