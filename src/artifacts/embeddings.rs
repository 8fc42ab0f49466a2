//! Embedding tables on disk: safetensors files holding `embeddings` (f32
//! [N, D]) and `valid` (u8 [N]), with string metadata saying what made
//! them. Readable with `safetensors.numpy.load_file` / `safe_open(...).metadata()`.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// What a table embeds: the closed set of targets pretraining aligns to,
/// each in its own file (`embeddings/<name>.safetensors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    /// The captions, by the frozen text encoder.
    Text,
    /// The slice PNGs, by the frozen image encoder.
    Image,
}

impl TargetKind {
    /// Every kind, in the order tables are read and losses summed.
    pub const ALL: [TargetKind; 2] = [TargetKind::Text, TargetKind::Image];

    /// The table's name (its file stem, and its key in run records).
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Text => "text",
            TargetKind::Image => "image",
        }
    }

    pub fn from_name(name: &str) -> Result<TargetKind> {
        TargetKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .with_context(|| format!("embedding table {name:?} is neither \"text\" nor \"image\""))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub dim: usize,
    /// Row-major [rows, dim].
    pub embeddings: Vec<f32>,
    /// 1 where the row holds an embedding, 0 where it is zeros.
    pub valid: Vec<u8>,
    pub meta: BTreeMap<String, String>,
}

impl Table {
    pub fn rows(&self) -> usize {
        self.valid.len()
    }

    pub fn valid_rows(&self) -> usize {
        self.valid.iter().filter(|&&v| v != 0).count()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }
}

/// Serialises a table: the safetensors layout (an 8-byte little-endian
/// header length, a JSON header, then the data), written by hand so the
/// header's key order, and so the file's bytes, are deterministic.
pub fn to_bytes(t: &Table) -> Result<Vec<u8>> {
    if t.embeddings.len() != t.rows() * t.dim {
        bail!(
            "embedding table has {} values for {} rows of {}",
            t.embeddings.len(),
            t.rows(),
            t.dim
        );
    }
    let emb_len = t.embeddings.len() * 4;
    // serde_json's map keeps keys sorted: __metadata__, embeddings, valid.
    let header = serde_json::json!({
        "__metadata__": t.meta,
        "embeddings": {"dtype": "F32", "shape": [t.rows(), t.dim], "data_offsets": [0, emb_len]},
        "valid": {"dtype": "U8", "shape": [t.rows()], "data_offsets": [emb_len, emb_len + t.rows()]},
    });
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    // bounded: the size of a table in memory (a writer)
    let mut out = Vec::with_capacity(8 + h.len() + emb_len + t.rows());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for v in &t.embeddings {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&t.valid);
    Ok(out)
}

/// Writes a table atomically.
pub fn write(path: &Path, t: &Table) -> Result<()> {
    crate::fsutil::atomic_write(path, &to_bytes(t)?)
}

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

fn header(bytes: &[u8], path: &Path) -> Result<(serde_json::Value, usize)> {
    if bytes.len() < 8 {
        bail!("{}: not a safetensors file", path.display());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    let end = 8usize.saturating_add(n as usize);
    if n > 100 << 20 || end > bytes.len() {
        bail!("{}: truncated or implausible safetensors header", path.display());
    }
    let v = serde_json::from_slice(&bytes[8..end])
        .with_context(|| format!("{}: bad safetensors header", path.display()))?;
    Ok((v, end))
}

fn meta_of(v: &serde_json::Value) -> BTreeMap<String, String> {
    v.get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub fn read(path: &Path) -> Result<Table> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (h, start) = header(&bytes, path)?;
    let entry = |name: &str| -> Result<Entry> {
        let e = h
            .get(name)
            .with_context(|| format!("{}: no `{name}` tensor", path.display()))?;
        serde_json::from_value(e.clone()).with_context(|| format!("{}: bad entry for `{name}`", path.display()))
    };
    let (emb, valid) = (entry("embeddings")?, entry("valid")?);
    if emb.dtype != "F32" || emb.shape.len() != 2 || valid.dtype != "U8" || valid.shape.len() != 1 {
        bail!("{}: expected f32 embeddings [N, D] and u8 valid [N]", path.display());
    }
    let (n, dim) = (emb.shape[0], emb.shape[1]);
    if valid.shape[0] != n {
        bail!("{}: valid has {} rows, embeddings {n}", path.display(), valid.shape[0]);
    }
    let data = &bytes[start..];
    let slice = |e: &Entry, len: usize| -> Result<&[u8]> {
        let [a, b] = e.data_offsets;
        if b < a || b - a != len || b > data.len() {
            bail!("{}: tensor data out of bounds", path.display());
        }
        Ok(&data[a..b])
    };
    let bytes_of = n
        .checked_mul(dim)
        .and_then(|v| v.checked_mul(4))
        .with_context(|| format!("{}: embeddings shape [{n}, {dim}] is impossibly large", path.display()))?;
    let raw = slice(&emb, bytes_of)?;
    let (label, what) = (path.display().to_string(), format!("embeddings [{n}, {dim}] (F32)"));
    let want = crate::alloc::Want {
        label: &label,
        what: &what,
        n: n * dim,
        declared: bytes_of as u64,
    };
    let mut embeddings = crate::alloc::capacity(
        &want,
        &crate::alloc::Supply::held(raw.len() as u64, "the tensor's data holds"),
    )?;
    embeddings.extend(
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(Table {
        dim,
        embeddings,
        // bounded: a slice of the file, checked against the header above
        valid: slice(&valid, n)?.to_vec(),
        meta: meta_of(&h),
    })
}

/// Only the metadata, from the header (no tensor data read).
pub fn read_meta(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(n);
    let len = f
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    if n > 100 << 20 || n > len.saturating_sub(8) {
        bail!(
            "{}: safetensors header of {n} bytes is implausible for a file of {len} bytes",
            path.display()
        );
    }
    // bounded: at most 100 MiB and the file's length, checked above
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).with_context(|| format!("{}: bad safetensors header", path.display()))?;
    Ok(meta_of(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_with_metadata() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.safetensors");
        let mut meta = BTreeMap::new();
        meta.insert("encoder".to_string(), "minilm".to_string());
        let t = Table {
            dim: 2,
            embeddings: vec![1.0, -2.5, 0.0, 0.0, 3.25, 1e-7],
            valid: vec![1, 0, 1],
            meta,
        };
        write(&p, &t).unwrap();
        let back = read(&p).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.row(2), &[3.25, 1e-7]);
        assert_eq!(read_meta(&p).unwrap()["encoder"], "minilm");
        assert_eq!(std::fs::read(&p).unwrap(), to_bytes(&t).unwrap(), "deterministic bytes");
        assert_eq!(std::fs::read(&p).unwrap()[8..].iter().position(|&b| b == b'{'), Some(0));
    }
}
