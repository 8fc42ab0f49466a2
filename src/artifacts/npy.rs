//! The cache's arrays (volumes float16, labels uint8): the one `.npy`
//! writer (format 1.0, C order, data 64-byte aligned, so
//! `np.load(path, mmap_mode="r")` maps it without copying) and the one
//! reader (memory-mapped; format 1-3). Hand-written rather than
//! `ndarray-npy`, whose element types do not include float16, the type
//! every cached volume is stored in.
use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::alloc::{self, Supply, Want};

/// Element types the cache stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    F16,
    U8,
    F32,
}

impl NpyDtype {
    fn name(self) -> &'static str {
        match self {
            NpyDtype::F16 => "float16",
            NpyDtype::U8 => "uint8",
            NpyDtype::F32 => "float32",
        }
    }
    fn descr(self) -> &'static str {
        match self {
            NpyDtype::F16 => "<f2",
            NpyDtype::U8 => "|u1",
            NpyDtype::F32 => "<f4",
        }
    }
    fn size(self) -> usize {
        match self {
            NpyDtype::F16 => 2,
            NpyDtype::U8 => 1,
            NpyDtype::F32 => 4,
        }
    }
}

/// Header bytes for a C-order array, padded so the data start 64-byte aligned.
pub fn header(dtype: NpyDtype, shape: &[usize]) -> Vec<u8> {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        dtype.descr(),
        shape_s
    );
    let unpadded = 10 + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    // bounded: a header being written (a writer)
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' '); // bounded: the header's padding
    out.push(b'\n');
    out
}

/// Serialises an array: header then little-endian data.
pub fn to_bytes(dtype: NpyDtype, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = header(dtype, shape);
    out.extend_from_slice(data);
    out
}

/// An opened `.npy`: element type, shape, and the memory-mapped bytes.
pub struct Npy {
    pub dtype: NpyDtype,
    pub shape: Vec<usize>,
    map: memmap2::Mmap,
    offset: usize,
}

impl Npy {
    /// Maps `path` and checks its header against the bytes present: a
    /// header that declares more data than the file holds is an error
    /// before anything is allocated.
    pub fn open(path: &Path) -> Result<Npy> {
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the cache writes its files under a temporary name and
        // renames them into place, so a mapped file is never rewritten.
        let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (descr, shape, offset) = parse_header(&map, path)?;
        let dtype = [NpyDtype::F16, NpyDtype::U8, NpyDtype::F32]
            .into_iter()
            .find(|d| d.descr() == descr)
            .with_context(|| format!("{}: unsupported dtype '{descr}'", path.display()))?;
        let want = shape
            .iter()
            .try_fold(dtype.size(), |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_add(offset));
        if want != Some(map.len()) {
            bail!(
                "{}: {} bytes, expected {} for shape {:?}",
                path.display(),
                map.len(),
                want.map(|w| w.to_string())
                    .unwrap_or_else(|| "more than fits in memory".into()),
                shape
            );
        }
        Ok(Npy {
            dtype,
            shape,
            map,
            offset,
        })
    }

    /// The array's bytes (little-endian, C order).
    pub fn data(&self) -> &[u8] {
        &self.map[self.offset..]
    }

    fn volume(&self, path: &Path, dtype: NpyDtype) -> Result<[usize; 3]> {
        if self.dtype != dtype {
            bail!(
                "{}: expected {} ('{}') voxels, found '{}'; rerun `med3d preprocess`",
                path.display(),
                dtype.name(),
                dtype.descr(),
                self.dtype.descr()
            );
        }
        <[usize; 3]>::try_from(self.shape.as_slice())
            .map_err(|_| anyhow::anyhow!("{}: expected a 3-D volume, shape {:?}", path.display(), self.shape))
    }
}

/// (descr, shape, data offset) of a `.npy` header (format 1, 2 or 3).
fn parse_header(bytes: &[u8], path: &Path) -> Result<(String, Vec<usize>, usize)> {
    if bytes.len() < 12 || &bytes[..6] != b"\x93NUMPY" {
        bail!("{}: not a .npy file", path.display());
    }
    let (hlen, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!("{}: unsupported .npy version {v}", path.display()),
    };
    let dict = bytes
        .get(start..start.saturating_add(hlen))
        .and_then(|b| std::str::from_utf8(b).ok())
        .with_context(|| format!("{}: truncated .npy header", path.display()))?;
    if dict.contains("'fortran_order': True") {
        bail!("{}: Fortran-ordered arrays are not supported", path.display());
    }
    let field = |key: &str, open: char, close: char| -> Option<String> {
        let rest = &dict[dict.find(key)? + key.len()..];
        let rest = &rest[rest.find(open)? + 1..];
        Some(rest[..rest.find(close)?].to_string())
    };
    let descr = field("'descr':", '\'', '\'').with_context(|| format!("{}: no descr in {dict}", path.display()))?;
    let shape = field("'shape':", '(', ')').with_context(|| format!("{}: no shape in {dict}", path.display()))?;
    let shape = shape
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<usize>, _>>()
        .with_context(|| format!("{}: bad shape in {dict}", path.display()))?;
    Ok((descr, shape, start + hlen))
}

/// The array's bytes copied out through the allocation chokepoint, as
/// values of `size` bytes converted by `value`.
fn copy_out<T: Copy>(path: &Path, n: &Npy, size: usize, value: impl Fn(&[u8]) -> T) -> Result<Vec<T>> {
    // `open` checked the header's shape against the file's length
    let count = n.data().len() / size.max(1);
    let (label, what) = (
        path.display().to_string(),
        format!("shape {:?} ({})", n.shape, n.dtype.name()),
    );
    let want = Want {
        label: &label,
        what: &what,
        n: count,
        declared: (count as u64).saturating_mul(size as u64),
    };
    let mut out = alloc::capacity(&want, &Supply::held(n.data().len() as u64, "the file's data holds"))?;
    out.extend(n.data().chunks_exact(size).map(value));
    Ok(out)
}

/// Reads a C-order `.npy`; returns (dtype, shape, data).
pub fn read(path: &Path) -> Result<(NpyDtype, Vec<usize>, Vec<u8>)> {
    let n = Npy::open(path)?;
    let bytes = copy_out(path, &n, 1, |c| c[0])?;
    Ok((n.dtype, n.shape.clone(), bytes))
}

/// Shape of a cached float16 volume, from its header.
pub fn volume_shape(path: &Path) -> Result<[usize; 3]> {
    Npy::open(path)?.volume(path, NpyDtype::F16)
}

/// A cached float16 volume as float32 (C order, shape X, Y, Z).
pub fn read_volume(path: &Path) -> Result<(Vec<f32>, [usize; 3])> {
    let n = Npy::open(path)?;
    let shape = n.volume(path, NpyDtype::F16)?;
    let data = copy_out(path, &n, 2, |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())?;
    Ok((data, shape))
}

/// A cached uint8 label map of `shape`.
pub fn read_label(path: &Path, shape: [usize; 3]) -> Result<Vec<u8>> {
    let n = Npy::open(path)?;
    let got = n.volume(path, NpyDtype::U8)?;
    if got != shape {
        bail!("{}: expected uint8 of shape {shape:?}, got {got:?}", path.display());
    }
    copy_out(path, &n, 1, |c| c[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_parsable() {
        let h = header(NpyDtype::F16, &[3, 4, 5]);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(*h.last().unwrap(), b'\n');
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.npy");
        std::fs::write(&p, to_bytes(NpyDtype::U8, &[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        let (dt, sh, data) = read(&p).unwrap();
        assert_eq!((dt, sh, data), (NpyDtype::U8, vec![2, 3], vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn volumes_read_back_and_short_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.npy");
        let vals = [half::f16::from_f32(0.0), half::f16::from_f32(0.25)];
        let bytes: Vec<u8> = vals.iter().flat_map(|h| h.to_le_bytes()).collect();
        std::fs::write(&p, to_bytes(NpyDtype::F16, &[1, 1, 2], &bytes)).unwrap();
        assert_eq!(read_volume(&p).unwrap(), (vec![0.0, 0.25], [1, 1, 2]));
        assert_eq!(volume_shape(&p).unwrap(), [1, 1, 2]);
        let mut short = to_bytes(NpyDtype::F16, &[1, 1, 2], &bytes);
        short.pop();
        std::fs::write(&p, &short).unwrap();
        assert!(format!("{:#}", read_volume(&p).unwrap_err()).contains("bytes, expected"));
        // a header declaring more than memory holds is refused, not allocated
        std::fs::write(&p, to_bytes(NpyDtype::F16, &[1 << 40, 1 << 40, 1 << 40], &bytes)).unwrap();
        assert!(format!("{:#}", read_volume(&p).unwrap_err()).contains("more than fits"));
    }

    #[test]
    fn npy_header_v1_and_v2() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.npy");
        let vals: Vec<u8> = [0.0f32, 0.25, 1.0, 0.5, 0.125, 0.75]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        std::fs::write(&p, to_bytes(NpyDtype::F16, &[1, 2, 3], &vals)).unwrap();
        let (data, shape) = read_volume(&p).unwrap();
        assert_eq!(shape, [1, 2, 3]);
        assert_eq!(data, vec![0.0, 0.25, 1.0, 0.5, 0.125, 0.75]);
        // version 2: 4-byte header length
        let dict = b"{'descr': '<f2', 'fortran_order': False, 'shape': (1, 1, 2), }   \n";
        let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
        v2.extend_from_slice(&(dict.len() as u32).to_le_bytes());
        v2.extend_from_slice(dict);
        v2.extend_from_slice(&vals[..4]);
        std::fs::write(&p, &v2).unwrap();
        assert_eq!(read_volume(&p).unwrap(), (vec![0.0, 0.25], [1, 1, 2]));
        v2.pop();
        std::fs::write(&p, &v2).unwrap();
        assert!(format!("{:#}", read_volume(&p).unwrap_err()).contains("bytes, expected"));
    }
}
