//! NIfTI-1 and NIfTI-2 reading: single files (.nii, .nii.gz) and header/image
//! pairs (.hdr/.img, optionally gzipped), either byte order, every real
//! numeric datatype. The affine follows nibabel's `img.affine` (sform when
//! its code is set, else qform, else the pixdim-based fallback) and scaling
//! follows nibabel's rule (scl_slope of 0, NaN or Inf means "no scaling").
//!
//! Our own parser rather than the `nifti` crate: that crate reads NIfTI-1
//! only, and the header parser is small enough to own, fuzz and give errors
//! that name the field that is wrong.
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::affine::{identity4, Mat4};

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

/// How the voxels of a `NiftiImage` are laid out in `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// As on disk: first axis fastest over every dimension (nibabel's
    /// F-ordered array).
    File,
    /// Each 3D volume (the first three axes) in C order, last axis fastest,
    /// volumes one after another: the layout `Volume` keeps.
    CPerVolume,
}

/// A decoded NIfTI image: header, shape and scaled voxels, in file order
/// (first axis fastest, as on disk and as nibabel's F-ordered arrays) unless
/// it was read with `read_as(.., Layout::CPerVolume)`.
#[derive(Debug, Clone)]
pub struct NiftiImage {
    pub path: PathBuf,
    pub header: NiftiHeader,
    pub shape: Vec<usize>,
    pub dtype: DataType,
    pub data: Vec<f32>,
    pub layout: Layout,
}

fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let cannot_read = || format!("cannot read {}", path.display());
    let mut file = std::fs::File::open(path).with_context(cannot_read)?;
    let len = file.metadata().with_context(cannot_read)?.len() as usize;
    let mut magic = [0u8; 2];
    let gz = is_gz(path) || (file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]);
    file.rewind().with_context(cannot_read)?;
    if gz {
        // Inflate straight from the file: the compressed bytes are never
        // held in memory as a whole.
        let mut out = Vec::with_capacity(len * 3);
        flate2::read::MultiGzDecoder::new(file)
            .read_to_end(&mut out)
            .with_context(|| format!("{}: gzip stream is corrupt or truncated", path.display()))?;
        Ok(out)
    } else {
        let mut raw = Vec::with_capacity(len);
        file.read_to_end(&mut raw).with_context(cannot_read)?;
        Ok(raw)
    }
}

/// For a `.hdr`/`.img` pair given by either name, the (header, image) paths.
fn pair_paths(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let name = path.file_name()?.to_str()?.to_string();
    let lower = name.to_ascii_lowercase();
    for (h, i) in [(".hdr", ".img"), (".hdr.gz", ".img.gz")] {
        for (this, other, is_hdr) in [(h, i, true), (i, h, false)] {
            if lower.ends_with(this) {
                let stem = &name[..name.len() - this.len()];
                let other_path = path.with_file_name(format!("{stem}{other}"));
                let other_path = if other_path.exists() {
                    other_path
                } else {
                    // the partner may be plain where this one is gzipped, or the reverse
                    let alt = if other.ends_with(".gz") {
                        other.trim_end_matches(".gz").to_string()
                    } else {
                        format!("{other}.gz")
                    };
                    path.with_file_name(format!("{stem}{alt}"))
                };
                return Some(if is_hdr {
                    (path.to_path_buf(), other_path)
                } else {
                    (other_path, path.to_path_buf())
                });
            }
        }
    }
    None
}

/// Reads the header only (cheap for uncompressed files).
pub fn read_header(path: &Path) -> Result<NiftiHeader> {
    let hdr_path = pair_paths(path).map(|(h, _)| h).unwrap_or_else(|| path.to_path_buf());
    let bytes = read_maybe_gz(&hdr_path)?;
    parse_header(&bytes).with_context(|| format!("{}: invalid NIfTI header", hdr_path.display()))
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
const SLAB: usize = 32;

/// Like `decode`, for elements in file order that make up volumes of
/// `shape` (3D; any number of them): writes each volume in C order (last
/// axis fastest), so the caller needs no transpose of its own.
pub fn decode_c_order(
    bytes: &[u8],
    dtype: DataType,
    big_endian: bool,
    scaling: Option<(f64, f64)>,
    shape: [usize; 3],
) -> Vec<f32> {
    let size = dtype.size();
    let mut out = vec![0f32; bytes.len() / size];
    let per = shape.iter().product::<usize>();
    if per == 0 {
        return out;
    }
    for (src, volume) in bytes.chunks_exact(per * size).zip(out.chunks_exact_mut(per)) {
        decode_slab(src, dtype, big_endian, scaling, shape, 0, volume);
    }
    out
}

/// Decodes `src`, the file-order k-planes k0.. of one volume of `shape`,
/// into their C-order places in `volume`.
fn decode_slab(
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

/// The transpose of `decode_slab` goes through a 32x32 tile, so that both
/// the file-order rows read and the C-order rows written are contiguous
/// runs; the tile is filled row by row as decoded (the conversion runs over
/// contiguous input and output) and read by column on the way out. For each
/// (i, j) the whole slab's k run is written before moving on.
fn slab_into<T: Raw<N>, const N: usize>(
    src: &[u8],
    big_endian: bool,
    scaling: Option<(f64, f64)>,
    [nx, ny, nz]: [usize; 3],
    k0: usize,
    volume: &mut [f32],
) {
    const T: usize = 32;
    let k_end = (k0 + src.len() / (N * nx * ny)).min(nz);
    let mut tile = [[0f32; T]; T];
    for j in 0..ny {
        for i0 in (0..nx).step_by(T) {
            let i1 = (i0 + T).min(nx);
            for kt in (k0..k_end).step_by(T) {
                let kt1 = (kt + T).min(k_end);
                for k in kt..kt1 {
                    // file order: element (i, j, k) is at i + nx * (j + ny * k)
                    let row = nx * (j + ny * (k - k0));
                    let src_row = src[(row + i0) * N..(row + i1) * N].chunks_exact(N);
                    for (t, c) in tile[k - kt].iter_mut().zip(src_row) {
                        *t = element::<T, N>(c, big_endian, scaling);
                    }
                }
                for i in i0..i1 {
                    let row = (i * ny + j) * nz;
                    for (d, t) in volume[row + kt..row + kt1].iter_mut().zip(&tile) {
                        *d = t[i - i0];
                    }
                }
            }
        }
    }
}

/// `read_as(.., Layout::CPerVolume)` for a single .nii or .nii.gz, without
/// holding the whole (decompressed) file: the header is parsed from the
/// first bytes, then the voxels are inflated and decoded `SLAB` k-planes at
/// a time straight into their C-order places. None for anything but a
/// well-formed single file (a pair, a short or corrupt file, ...): `read_as`
/// then goes the general way, which names the problem.
fn read_c_order_streamed(path: &Path) -> Option<NiftiImage> {
    if pair_paths(path).is_some() {
        return None;
    }
    let mut file = std::fs::File::open(path).ok()?;
    let mut magic = [0u8; 2];
    let gz = is_gz(path) || (file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]);
    file.rewind().ok()?;
    let mut stream: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut head = Vec::with_capacity(540);
    (&mut stream).take(540).read_to_end(&mut head).ok()?;
    let header = parse_header(&head).ok()?;
    if !header.single_file {
        return None;
    }
    let dtype = header.data_type().ok()?;
    let need = data_nbytes(&header, dtype).ok()?;
    let min = if header.version == 1 { 348 } else { 540 };
    let offset = (header.vox_offset as usize).max(min);
    let skip = offset.saturating_sub(head.len()) as u64;
    if std::io::copy(&mut (&mut stream).take(skip), &mut std::io::sink()).ok()? != skip {
        return None;
    }
    // The voxels: those the header read took, then the rest of the stream.
    let mut voxels = head.get(offset..).unwrap_or(&[]).chain(stream);
    let sh = header.shape();
    let shape = [sh[0], *sh.get(1).unwrap_or(&1), *sh.get(2).unwrap_or(&1)];
    let (size, plane, per) = (dtype.size(), shape[0] * shape[1], shape.iter().product::<usize>());
    if per == 0 {
        return None;
    }
    let mut data = vec![0f32; need / size];
    let mut slab = vec![0u8; SLAB * plane * size];
    for volume in data.chunks_exact_mut(per) {
        for k0 in (0..shape[2]).step_by(SLAB) {
            let bytes = &mut slab[..(SLAB.min(shape[2] - k0)) * plane * size];
            voxels.read_exact(bytes).ok()?;
            decode_slab(bytes, dtype, header.big_endian, header.scaling(), shape, k0, volume);
        }
    }
    // Read to the end as the general way does: for gzip, that checks the
    // CRC and size of every member.
    std::io::copy(&mut voxels, &mut std::io::sink()).ok()?;
    Some(NiftiImage {
        path: path.to_path_buf(),
        shape: header.shape(),
        header,
        dtype,
        data,
        layout: Layout::CPerVolume,
    })
}

/// Number of bytes the voxel data needs, or an error when the dims overflow.
pub fn data_nbytes(h: &NiftiHeader, dtype: DataType) -> Result<usize> {
    h.shape()
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as usize)
        .with_context(|| format!("header dims {:?} describe an impossibly large image", h.shape()))
}

/// Reads and decodes a whole NIfTI image, voxels in file order.
pub fn read(path: &Path) -> Result<NiftiImage> {
    read_as(path, Layout::File)
}

/// Reads and decodes a whole NIfTI image, voxels in the given layout.
pub fn read_as(path: &Path, layout: Layout) -> Result<NiftiImage> {
    if layout == Layout::CPerVolume {
        if let Some(img) = read_c_order_streamed(path) {
            return Ok(img);
        }
    }
    read_whole(path, layout)
}

/// `read_as` by way of the whole file's bytes in memory.
fn read_whole(path: &Path, layout: Layout) -> Result<NiftiImage> {
    let ctx = || format!("{}", path.display());
    if !path.exists() {
        bail!("{}: file not found", path.display());
    }
    let (header, bytes, offset) = match pair_paths(path) {
        Some((hdr_path, img_path)) => {
            let hbytes = read_maybe_gz(&hdr_path)?;
            let header =
                parse_header(&hbytes).with_context(|| format!("{}: invalid NIfTI header", hdr_path.display()))?;
            if !img_path.exists() {
                bail!(
                    "{}: the image file {} of this header/image pair is missing",
                    path.display(),
                    img_path.display()
                );
            }
            let bytes = read_maybe_gz(&img_path)?;
            let off = header.vox_offset as usize;
            (header, bytes, off)
        }
        None => {
            let bytes = read_maybe_gz(path)?;
            let header = parse_header(&bytes).with_context(|| format!("{}: invalid NIfTI header", path.display()))?;
            if !header.single_file {
                bail!(
                    "{}: header says the data are in a separate .img file, but this is a single file",
                    path.display()
                );
            }
            let off = header.vox_offset as usize;
            let min = if header.version == 1 { 348 } else { 540 };
            (header, bytes, off.max(min))
        }
    };
    let dtype = header.data_type().with_context(ctx)?;
    let need = data_nbytes(&header, dtype).with_context(ctx)?;
    let have = bytes.len().saturating_sub(offset);
    if have < need {
        bail!(
            "{}: header dims {:?} ({}) need {need} bytes of voxel data after offset {offset}, but the file holds {have}; \
             the file is truncated or its header is wrong",
            path.display(),
            header.shape(),
            dtype.name()
        );
    }
    let raw = &bytes[offset..offset + need];
    let data = match layout {
        Layout::File => decode(raw, dtype, header.big_endian, header.scaling()),
        Layout::CPerVolume => {
            let sh = header.shape();
            let volume = [sh[0], *sh.get(1).unwrap_or(&1), *sh.get(2).unwrap_or(&1)];
            decode_c_order(raw, dtype, header.big_endian, header.scaling(), volume)
        }
    };
    Ok(NiftiImage {
        path: path.to_path_buf(),
        shape: header.shape(),
        header,
        dtype,
        data,
        layout,
    })
}

/// Serialises a NIfTI-1 single-file image (float32 or uint8 or int16 data
/// given as raw little-endian bytes in file order). Used for test fixtures
/// and for exporting processed volumes.
pub fn write_nifti1(shape: &[usize], pixdim: [f64; 3], affine: &Mat4, datatype: i16, raw: &[u8]) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            let c = decode_c_order(&raw, dtype, be, scaling, [nx, ny, nz]);
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

    #[test]
    fn streamed_reading_matches_whole_file_reading() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let gz = |bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        };
        // i16 3D (more k-planes than one slab), f32 4D with scaling, u8 2D
        let i16s: Vec<u8> = (0..37 * 5 * 70)
            .flat_map(|v| ((v * 37 % 4001) as i16 - 2000).to_le_bytes())
            .collect();
        let f32s: Vec<u8> = (0..9 * 4 * 3 * 2)
            .flat_map(|v| (v as f32 * 0.25 - 3.0).to_le_bytes())
            .collect();
        let mut scaled = write_nifti1(&[9, 4, 3, 2], [1.0; 3], &identity4(), 16, &f32s);
        scaled[112..116].copy_from_slice(&0.5f32.to_le_bytes());
        scaled[116..120].copy_from_slice(&10f32.to_le_bytes());
        let files = [
            ("a.nii", write_nifti1(&[37, 5, 70], [1.0; 3], &identity4(), 4, &i16s)),
            ("b.nii.gz", gz(&scaled)),
            (
                "c.nii.gz",
                gz(&write_nifti1(&[6, 7], [1.0; 3], &identity4(), 2, &[7u8; 42])),
            ),
        ];
        for (name, bytes) in files {
            let p = d.path().join(name);
            std::fs::write(&p, &bytes).unwrap();
            let a = read_c_order_streamed(&p).unwrap_or_else(|| panic!("{name}: not streamed"));
            let b = read_whole(&p, Layout::CPerVolume).unwrap();
            assert_eq!(
                (&a.header, &a.shape, a.dtype, a.layout),
                (&b.header, &b.shape, b.dtype, b.layout),
                "{name}"
            );
            assert!(
                a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()) && a.data.len() == b.data.len()
            );
            // anything short or corrupt is left to the general way
            let cut = d.path().join(format!("cut_{name}"));
            std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
            assert!(read_c_order_streamed(&cut).is_none(), "{name}");
            assert!(read_whole(&cut, Layout::CPerVolume).is_err(), "{name}");
        }
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
