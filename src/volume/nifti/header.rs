//! The NIfTI-1 / NIfTI-2 header: parsing either version in either byte
//! order into one widened struct, and what the header alone decides: the
//! shape, the datatype, nibabel's scaling rule and nibabel's affine (sform,
//! else qform, else the pixdim fallback).
use anyhow::{bail, Result};

use super::data::DataType;
use crate::volume::affine::{identity4, Mat4};

/// The fields of a NIfTI-1 or NIfTI-2 header that decoding and geometry need,
/// widened to the NIfTI-2 types.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiHeader {
    pub version: u8,
    pub big_endian: bool,
    /// true for "n+1"/"n+2" (data in the same file), false for "ni1"/"ni2".
    pub single_file: bool,
    pub dim: [i64; 8],
    pub datatype: i16,
    pub bitpix: i16,
    pub pixdim: [f64; 8],
    pub vox_offset: f64,
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub qform_code: i32,
    pub sform_code: i32,
    pub quatern: [f64; 3],
    pub qoffset: [f64; 3],
    pub srow: [[f64; 4]; 3],
}

struct Fields<'a> {
    b: &'a [u8],
    be: bool,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[off..off + N]);
        a
    }
    fn i16(&self, off: usize) -> i16 {
        let a = self.bytes::<2>(off);
        if self.be {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    }
    fn i32(&self, off: usize) -> i32 {
        let a = self.bytes::<4>(off);
        if self.be {
            i32::from_be_bytes(a)
        } else {
            i32::from_le_bytes(a)
        }
    }
    fn i64(&self, off: usize) -> i64 {
        let a = self.bytes::<8>(off);
        if self.be {
            i64::from_be_bytes(a)
        } else {
            i64::from_le_bytes(a)
        }
    }
    fn f32(&self, off: usize) -> f64 {
        let a = self.bytes::<4>(off);
        f64::from(if self.be {
            f32::from_be_bytes(a)
        } else {
            f32::from_le_bytes(a)
        })
    }
    fn f64(&self, off: usize) -> f64 {
        let a = self.bytes::<8>(off);
        if self.be {
            f64::from_be_bytes(a)
        } else {
            f64::from_le_bytes(a)
        }
    }
}

/// Parses a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header from the start of
/// `bytes`. Never panics, whatever the bytes.
pub fn parse_header(bytes: &[u8]) -> Result<NiftiHeader> {
    if bytes.len() < 4 {
        bail!("file is too short to hold a NIfTI header ({} bytes)", bytes.len());
    }
    let le = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let be = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let (size, big_endian) = match (le, be) {
        (348, _) | (540, _) => (le, false),
        (_, 348) | (_, 540) => (be, true),
        _ => bail!("not a NIfTI file: sizeof_hdr is {le}, expected 348 (NIfTI-1) or 540 (NIfTI-2)"),
    };
    let size = size as usize;
    if bytes.len() < size {
        bail!("file is truncated inside the header ({} of {size} bytes)", bytes.len());
    }
    let f = Fields {
        b: bytes,
        be: big_endian,
    };
    let mut h = if size == 348 {
        let magic = &bytes[344..348];
        let single_file = match magic {
            b"n+1\0" => true,
            b"ni1\0" => false,
            _ => bail!(
                "header has sizeof_hdr 348 but no NIfTI-1 magic (\"n+1\"/\"ni1\"); Analyze 7.5 files are not supported"
            ),
        };
        let mut dim = [0i64; 8];
        for (i, d) in dim.iter_mut().enumerate() {
            *d = i64::from(f.i16(40 + 2 * i));
        }
        let mut pixdim = [0f64; 8];
        for (i, p) in pixdim.iter_mut().enumerate() {
            *p = f.f32(76 + 4 * i);
        }
        let mut srow = [[0f64; 4]; 3];
        for (r, row) in srow.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = f.f32(280 + 16 * r + 4 * c);
            }
        }
        NiftiHeader {
            version: 1,
            big_endian,
            single_file,
            dim,
            datatype: f.i16(70),
            bitpix: f.i16(72),
            pixdim,
            vox_offset: f.f32(108),
            scl_slope: f.f32(112),
            scl_inter: f.f32(116),
            qform_code: i32::from(f.i16(252)),
            sform_code: i32::from(f.i16(254)),
            quatern: [f.f32(256), f.f32(260), f.f32(264)],
            qoffset: [f.f32(268), f.f32(272), f.f32(276)],
            srow,
        }
    } else {
        let magic = &bytes[4..12];
        let single_file = match &magic[..4] {
            b"n+2\0" => true,
            b"ni2\0" => false,
            _ => bail!("header has sizeof_hdr 540 but no NIfTI-2 magic (\"n+2\"/\"ni2\")"),
        };
        let mut dim = [0i64; 8];
        for (i, d) in dim.iter_mut().enumerate() {
            *d = f.i64(16 + 8 * i);
        }
        let mut pixdim = [0f64; 8];
        for (i, p) in pixdim.iter_mut().enumerate() {
            *p = f.f64(104 + 8 * i);
        }
        let mut srow = [[0f64; 4]; 3];
        for (r, row) in srow.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = f.f64(400 + 32 * r + 8 * c);
            }
        }
        NiftiHeader {
            version: 2,
            big_endian,
            single_file,
            dim,
            datatype: f.i16(12),
            bitpix: f.i16(14),
            pixdim,
            vox_offset: f.i64(168) as f64,
            scl_slope: f.f64(176),
            scl_inter: f.f64(184),
            qform_code: f.i32(344),
            sform_code: f.i32(348),
            quatern: [f.f64(352), f.f64(360), f.f64(368)],
            qoffset: [f.f64(376), f.f64(384), f.f64(392)],
            srow,
        }
    };
    if h.dim[0] < 1 || h.dim[0] > 7 {
        bail!("header dim[0] = {} is outside 1..=7", h.dim[0]);
    }
    for i in 1..=h.dim[0] as usize {
        if h.dim[i] < 1 {
            bail!("header dim[{i}] = {} must be at least 1", h.dim[i]);
        }
    }
    // Unused trailing dims are 1 by definition, whatever the file says.
    for i in (h.dim[0] as usize + 1)..8 {
        h.dim[i] = 1;
    }
    if !h.vox_offset.is_finite() || h.vox_offset < 0.0 {
        bail!("header vox_offset {} is not a non-negative number", h.vox_offset);
    }
    Ok(h)
}

impl NiftiHeader {
    /// The array shape nibabel reports: dims 1..=dim[0].
    pub fn shape(&self) -> Vec<usize> {
        (1..=self.dim[0] as usize).map(|i| self.dim[i] as usize).collect()
    }

    pub fn data_type(&self) -> Result<DataType> {
        let dt = DataType::from_code(self.datatype)?;
        if self.bitpix != 0 && self.bitpix as usize != dt.size() * 8 {
            // nibabel trusts datatype and fixes bitpix; so do we.
            tracing::debug!(
                bitpix = self.bitpix,
                datatype = self.datatype,
                "bitpix disagrees with datatype"
            );
        }
        Ok(dt)
    }

    /// (slope, intercept) to apply, or None for "no scaling" (nibabel's rule).
    pub fn scaling(&self) -> Option<(f64, f64)> {
        let s = self.scl_slope;
        if s.is_nan() || s == 0.0 || s.is_infinite() {
            return None;
        }
        let i = if self.scl_inter.is_finite() {
            self.scl_inter
        } else {
            0.0
        };
        if s == 1.0 && i == 0.0 {
            return None;
        }
        Some((s, i))
    }

    /// nibabel's `get_best_affine`: sform, else qform, else pixdim fallback.
    pub fn affine(&self) -> Mat4 {
        if self.sform_code != 0 {
            let mut m = identity4();
            m[..3].copy_from_slice(&self.srow);
            m
        } else if self.qform_code != 0 {
            self.qform_affine()
        } else {
            self.base_affine()
        }
    }

    fn qform_affine(&self) -> Mat4 {
        let [b, c, d] = self.quatern;
        let w2 = 1.0 - (b * b + c * c + d * d);
        let a = if w2 < 0.0 { 0.0 } else { w2.sqrt() };
        let (w, x, y, z) = (a, b, c, d);
        let nq = w * w + x * x + y * y + z * z;
        let rot: [[f64; 3]; 3] = if nq < f64::EPSILON {
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        } else {
            let s = 2.0 / nq;
            let (xs, ys, zs) = (x * s, y * s, z * s);
            let (wx, wy, wz) = (w * xs, w * ys, w * zs);
            let (xx, xy, xz) = (x * xs, x * ys, x * zs);
            let (yy, yz, zz) = (y * ys, y * zs, z * zs);
            [
                [1.0 - (yy + zz), xy - wz, xz + wy],
                [xy + wz, 1.0 - (xx + zz), yz - wx],
                [xz - wy, yz + wx, 1.0 - (xx + yy)],
            ]
        };
        // nibabel fixes qfac values other than -1 to 1 when it loads a file.
        let qfac = if self.pixdim[0] == -1.0 { -1.0 } else { 1.0 };
        let vox = [self.pixdim[1].abs(), self.pixdim[2].abs(), self.pixdim[3].abs() * qfac];
        let mut m = identity4();
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] = rot[i][j] * vox[j];
            }
            m[i][3] = self.qoffset[i];
        }
        m
    }

    /// nibabel's fallback when neither form code is set: x flipped, origin at
    /// the centre of the volume, pixdim as zooms.
    fn base_affine(&self) -> Mat4 {
        let mut m = identity4();
        for i in 0..3 {
            let n = if (i as i64) < self.dim[0] {
                self.dim[i + 1] as f64
            } else {
                1.0
            };
            let z = if (i as i64) < self.dim[0] {
                self.pixdim[i + 1]
            } else {
                1.0
            };
            let z = if i == 0 { -z } else { z };
            m[i][i] = z;
            m[i][3] = -(n - 1.0) / 2.0 * z;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::nifti::{decode, write_nifti1};

    #[test]
    fn header_roundtrip_and_scaling_rules() {
        let mut aff = identity4();
        aff[0][0] = -2.0;
        aff[1][3] = 5.0;
        let raw: Vec<u8> = [1i16, -2, 300, 4, 5, 6].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut bytes = write_nifti1(&[3, 2, 1], [2.0, 1.0, 1.0], &aff, 4, &raw);
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.shape(), vec![3, 2, 1]);
        assert_eq!(h.affine(), aff);
        assert_eq!(h.scaling(), None);
        bytes[112..116].copy_from_slice(&0.5f32.to_le_bytes());
        bytes[116..120].copy_from_slice(&10f32.to_le_bytes());
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.scaling(), Some((0.5, 10.0)));
        let v = decode(&bytes[352..], DataType::I16, false, h.scaling());
        assert_eq!(v, vec![10.5, 9.0, 160.0, 12.0, 12.5, 13.0]);
        bytes[112..116].copy_from_slice(&0f32.to_le_bytes());
        assert_eq!(parse_header(&bytes).unwrap().scaling(), None);
    }

    #[test]
    fn garbage_headers_are_errors_not_panics() {
        assert!(parse_header(&[]).is_err());
        assert!(parse_header(&[0x5c, 0x01, 0, 0, 1, 2]).is_err());
        let mut b = write_nifti1(&[2, 2, 2], [1.0; 3], &identity4(), 2, &[0; 8]);
        b[40..42].copy_from_slice(&9i16.to_le_bytes());
        assert!(parse_header(&b).unwrap_err().to_string().contains("dim[0]"));
    }
}
