//! Minimal `.npy` (format 1.0) writer and reader for the cache's volumes:
//! C-order arrays that `np.load(path, mmap_mode="r")` maps without copying.
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Element types the cache stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    F16,
    U8,
    F32,
}

impl NpyDtype {
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
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// Serialises an array: header then little-endian data.
pub fn to_bytes(dtype: NpyDtype, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = header(dtype, shape);
    out.extend_from_slice(data);
    out
}

/// Reads a C-order `.npy` written by `to_bytes`; returns (dtype, shape, data).
pub fn read(path: &Path) -> Result<(NpyDtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("{}: not a .npy file", path.display());
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let dict = std::str::from_utf8(bytes.get(10..10 + hlen).context("truncated .npy header")?)?;
    let dtype = [NpyDtype::F16, NpyDtype::U8, NpyDtype::F32]
        .into_iter()
        .find(|d| dict.contains(&format!("'descr': '{}'", d.descr())))
        .with_context(|| format!("{}: unsupported dtype in {dict}", path.display()))?;
    if dict.contains("'fortran_order': True") {
        bail!("{}: Fortran-ordered arrays are not supported", path.display());
    }
    let s = dict
        .split("'shape': (")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .context("no shape in .npy header")?;
    let shape: Vec<usize> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let data = bytes[10 + hlen..].to_vec();
    if data.len() != shape.iter().product::<usize>() * dtype.size() {
        bail!("{}: data length does not match shape {shape:?}", path.display());
    }
    Ok((dtype, shape, data))
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
}
