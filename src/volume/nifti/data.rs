//! Voxel bytes to f32: the element types NIfTI can hold, either byte
//! order, scl_slope/scl_inter applied once in f64 (nibabel's arithmetic),
//! into file order or straight into C order per volume.
use anyhow::{bail, Context, Result};

use super::header::NiftiHeader;

/// Element types we decode, with their NIfTI codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl DataType {
    pub fn from_code(code: i16) -> Result<Self> {
        Ok(match code {
            2 => Self::U8,
            256 => Self::I8,
            4 => Self::I16,
            512 => Self::U16,
            8 => Self::I32,
            768 => Self::U32,
            1024 => Self::I64,
            1280 => Self::U64,
            16 => Self::F32,
            64 => Self::F64,
            32 | 1792 | 2048 => bail!("datatype {code} is complex-valued; only real-valued images are supported"),
            128 | 2304 => bail!("datatype {code} is RGB(A) colour; only scalar images are supported"),
            1536 => bail!("datatype 1536 (float128) is not supported"),
            other => bail!("unknown NIfTI datatype code {other}"),
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    /// numpy's name for the on-disk type, as nibabel reports it.
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "uint8",
            Self::I8 => "int8",
            Self::I16 => "int16",
            Self::U16 => "uint16",
            Self::I32 => "int32",
            Self::U32 => "uint32",
            Self::I64 => "int64",
            Self::U64 => "uint64",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }
}

/// An element type of NIfTI voxel data, read from its bytes in either order.
trait Raw<const N: usize> {
    fn to_f64(bytes: [u8; N], big_endian: bool) -> f64;
}

macro_rules! raw {
    ($($t:ty, $n:literal);*) => {$(
        impl Raw<$n> for $t {
            fn to_f64(a: [u8; $n], big_endian: bool) -> f64 {
                (if big_endian { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) }) as f64
            }
        }
    )*};
}

raw!(u8, 1; i8, 1; i16, 2; u16, 2; i32, 4; u32, 4; i64, 8; u64, 8; f32, 4; f64, 8);

/// Calls `f::<T, N>(args..)` with the Rust type and size of `dtype`'s elements.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DataType::U8 => $f::<u8, 1>($($arg),*),
            DataType::I8 => $f::<i8, 1>($($arg),*),
            DataType::I16 => $f::<i16, 2>($($arg),*),
            DataType::U16 => $f::<u16, 2>($($arg),*),
            DataType::I32 => $f::<i32, 4>($($arg),*),
            DataType::U32 => $f::<u32, 4>($($arg),*),
            DataType::I64 => $f::<i64, 8>($($arg),*),
            DataType::U64 => $f::<u64, 8>($($arg),*),
            DataType::F32 => $f::<f32, 4>($($arg),*),
            DataType::F64 => $f::<f64, 8>($($arg),*),
        }
    };
}

/// One element: raw bytes, widened to f64, scaled, then rounded to f32 once
/// (nibabel's arithmetic).
#[inline(always)]
fn element<T: Raw<N>, const N: usize>(c: &[u8], big_endian: bool, scaling: Option<(f64, f64)>) -> f32 {
    let v = T::to_f64(c.try_into().unwrap_or([0; N]), big_endian);
    match scaling {
        Some((s, i)) => (v * s + i) as f32,
        None => v as f32,
    }
}

/// Decodes raw little/big-endian elements into f32, applying scaling once.
pub fn decode(bytes: &[u8], dtype: DataType, big_endian: bool, scaling: Option<(f64, f64)>) -> Vec<f32> {
    fn run<T: Raw<N>, const N: usize>(bytes: &[u8], be: bool, scaling: Option<(f64, f64)>) -> Vec<f32> {
        bytes.chunks_exact(N).map(|c| element::<T, N>(c, be, scaling)).collect()
    }
    by_dtype!(dtype, run(bytes, big_endian, scaling))
}

/// k-planes read and decoded at a time when streaming (16 MB for a 512x512
/// int16 image). Each slab is one sweep over the C-order output; 64 or 128
/// planes a sweep measured no faster.
pub(super) const SLAB: usize = 32;

/// `decode` into `out` (one value per whole element of `bytes`), for a
/// buffer the caller allocated through [`crate::alloc`].
pub fn decode_into(bytes: &[u8], dtype: DataType, big_endian: bool, scaling: Option<(f64, f64)>, out: &mut [f32]) {
    fn run<T: Raw<N>, const N: usize>(bytes: &[u8], be: bool, scaling: Option<(f64, f64)>, out: &mut [f32]) {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
            *o = element::<T, N>(c, be, scaling);
        }
    }
    by_dtype!(dtype, run(bytes, big_endian, scaling, out))
}

/// Like `decode_into`, for elements in file order that make up volumes of
/// `shape` (3D; any number of them): writes each volume in C order (last
/// axis fastest), so the caller needs no transpose of its own.
pub fn decode_c_order_into(
    bytes: &[u8],
    dtype: DataType,
    big_endian: bool,
    scaling: Option<(f64, f64)>,
    shape: [usize; 3],
    out: &mut [f32],
) {
    let size = dtype.size();
    let per = shape.iter().product::<usize>();
    if per == 0 {
        return;
    }
    for (src, volume) in bytes.chunks_exact(per * size).zip(out.chunks_exact_mut(per)) {
        decode_slab(src, dtype, big_endian, scaling, shape, 0, volume);
    }
}

/// Decodes `src`, the file-order k-planes k0.. of one volume of `shape`,
/// into their C-order places in `volume`.
pub(super) fn decode_slab(
    src: &[u8],
    dtype: DataType,
    big_endian: bool,
    scaling: Option<(f64, f64)>,
    shape: [usize; 3],
    k0: usize,
    volume: &mut [f32],
) {
    by_dtype!(dtype, slab_into(src, big_endian, scaling, shape, k0, volume))
}

/// Each file-order row piece is decoded into the shared tiled transpose
/// ([`crate::volume::tiled_f_to_c`]), so the conversion runs over
/// contiguous input and output.
fn slab_into<T: Raw<N>, const N: usize>(
    src: &[u8],
    big_endian: bool,
    scaling: Option<(f64, f64)>,
    [nx, ny, nz]: [usize; 3],
    k0: usize,
    volume: &mut [f32],
) {
    let k_end = (k0 + src.len() / (N * nx * ny)).min(nz);
    crate::volume::tiled_f_to_c([nx, ny, nz], k0..k_end, volume, |k, j, i0, row| {
        // file order: element (i, j, k) is at i + nx * (j + ny * (k - k0))
        let start = nx * (j + ny * (k - k0)) + i0;
        let src_row = src[start * N..(start + row.len()) * N].chunks_exact(N);
        for (t, c) in row.iter_mut().zip(src_row) {
            *t = element::<T, N>(c, big_endian, scaling);
        }
    });
}

/// Number of bytes the voxel data needs, or an error when the dims overflow.
pub fn data_nbytes(h: &NiftiHeader, dtype: DataType) -> Result<usize> {
    h.shape()
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
        .with_context(|| format!("header dims {:?} describe an impossibly large image", h.shape()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_order_decoding_is_the_transpose_of_file_order() {
        use ndarray::{Array3, ShapeBuilder};
        // 2 volumes of (37, 5, 33), every dtype width, both byte orders, with scaling
        let (nx, ny, nz) = (37, 5, 33);
        let per = nx * ny * nz;
        for (dtype, be, scaling) in [
            (DataType::I16, false, None),
            (DataType::I16, true, Some((0.5, -3.0))),
            (DataType::U8, false, None),
            (DataType::F32, true, None),
            (DataType::F64, false, Some((2.0, 1.0))),
        ] {
            let raw: Vec<u8> = (0..2 * per * dtype.size()).map(|b| (b * 7 % 251) as u8).collect();
            let file = decode(&raw, dtype, be, scaling);
            let mut c = vec![f32::NAN; file.len()];
            decode_c_order_into(&raw, dtype, be, scaling, [nx, ny, nz], &mut c);
            let mut flat = vec![f32::NAN; file.len()];
            decode_into(&raw, dtype, be, scaling, &mut flat);
            assert!(flat.iter().zip(&file).all(|(a, b)| a.to_bits() == b.to_bits()));
            for t in 0..2 {
                let want = Array3::from_shape_vec((nx, ny, nz).f(), file[t * per..(t + 1) * per].to_vec()).unwrap();
                let got = Array3::from_shape_vec((nx, ny, nz), c[t * per..(t + 1) * per].to_vec()).unwrap();
                let same = want.iter().zip(got.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same && want.shape() == got.shape(),
                    "{dtype:?} be={be} {scaling:?} volume {t}"
                );
            }
        }
    }
}
