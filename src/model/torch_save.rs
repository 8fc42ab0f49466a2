//! Writes what `torch.save({"network_weights": state_dict}, f)` writes
//! (PyTorch's zip format, pickle protocol 2): `<archive>/data.pkl` holds
//! a dict of `collections.OrderedDict`s of tensors rebuilt by
//! `torch._utils._rebuild_tensor_v2` from storages `<archive>/data/<k>`,
//! each record aligned to 64 bytes as PyTorch aligns them. Names that hold
//! the same tensor (a shallow clone: the same data) share one storage, as
//! in a `state_dict()` whose modules are registered twice.
//! Only globals that `torch.load(weights_only=True)` allows are named.
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::fsutil::{commit_file, tmp_path};

fn storage_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "FloatStorage",
        Kind::Double => "DoubleStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Int16 => "ShortStorage",
        Kind::Int8 => "CharStorage",
        Kind::Uint8 => "ByteStorage",
        Kind::Bool => "BoolStorage",
        k => bail!("cannot write tensors of kind {k:?} for torch.load"),
    })
}

/// A pickle protocol 2 stream.
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, b: u8) {
        self.0.push(b);
    }
    fn string(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.0.extend_from_slice(&[b'K', v as u8]); // BININT1
        } else if i32::try_from(v).is_ok() {
            self.0.push(b'J'); // BININT
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            self.0.extend_from_slice(&[0x8a, 8]); // LONG1, 8 bytes
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    fn tuple(&mut self, v: &[i64]) {
        self.op(b'(');
        for &x in v {
            self.int(x);
        }
        self.op(b't');
    }
    /// A JSON value as plain Python objects (dict, list, str, int,
    /// float, bool, None), all of which `weights_only=True` allows.
    fn value(&mut self, v: &serde_json::Value) {
        use serde_json::Value;
        match v {
            Value::Null => self.op(b'N'),
            Value::Bool(b) => self.op(if *b { 0x88 } else { 0x89 }), // NEWTRUE / NEWFALSE
            Value::Number(n) => match n.as_i64() {
                Some(i) => self.int(i),
                None => {
                    self.op(b'G'); // BINFLOAT, big-endian
                    self.0.extend_from_slice(&n.as_f64().unwrap_or(f64::NAN).to_be_bytes());
                }
            },
            Value::String(s) => self.string(s),
            Value::Array(a) => {
                self.op(b']'); // EMPTY_LIST
                if !a.is_empty() {
                    self.op(b'(');
                    for x in a {
                        self.value(x);
                    }
                    self.op(b'e'); // APPENDS
                }
            }
            Value::Object(m) => {
                self.op(b'}');
                if !m.is_empty() {
                    self.op(b'(');
                    for (k, x) in m {
                        self.string(k);
                        self.value(x);
                    }
                    self.op(b'u');
                }
            }
        }
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')'); // EMPTY_TUPLE
        self.op(b'R'); // REDUCE
    }
}

/// Writes `{outer_key: OrderedDict(named)}` atomically at `path`, in the
/// order given. Tensors are written contiguous, from the CPU.
pub fn save_nested(path: &Path, outer_key: &str, named: &[(String, Tensor)]) -> Result<()> {
    save_checkpoint(path, outer_key, named, &[])
}

/// Writes `{outer_key: OrderedDict(named), key: value, ...}` atomically at
/// `path`: the state dict, then each `extra` entry as plain Python values.
pub fn save_checkpoint(
    path: &Path,
    outer_key: &str,
    named: &[(String, Tensor)],
    extra: &[(&str, &serde_json::Value)],
) -> Result<()> {
    let archive = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && s.is_ascii() && !s.contains('/'))
        .unwrap_or("archive")
        .to_string();
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.op(b'}'); // EMPTY_DICT
    p.string(outer_key);
    p.ordered_dict();
    p.op(b'(');
    // (name of the first tensor, its CPU contiguous data) per storage key;
    // a tensor whose data another name already holds reuses its key.
    let mut storages: Vec<(&str, Tensor)> = Vec::new();
    let mut by_data: std::collections::HashMap<(usize, Kind, Vec<i64>), usize> = std::collections::HashMap::new();
    for (name, t) in named {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let kind = t.kind();
        let storage = storage_name(kind)?;
        let id = (t.data_ptr() as usize, kind, t.size());
        let key = *by_data.entry(id).or_insert_with(|| {
            storages.push((name.as_str(), t.shallow_clone()));
            storages.len() - 1
        });
        p.string(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        // Persistent id: ('storage', torch.<Kind>Storage, key, 'cpu', numel).
        p.op(b'(');
        p.string("storage");
        p.global("torch", storage);
        p.string(&key.to_string());
        p.string("cpu");
        p.int(t.numel() as i64);
        p.op(b't');
        p.op(b'Q'); // BINPERSID
        p.int(0); // storage offset
        p.tuple(&t.size());
        p.tuple(&t.stride());
        p.op(0x89); // NEWFALSE: requires_grad
        p.ordered_dict(); // backward hooks
        p.op(b't');
        p.op(b'R');
    }
    p.op(b'u'); // SETITEMS
    p.op(b's'); // SETITEM
    for (k, v) in extra {
        p.string(k);
        p.value(v);
        p.op(b's');
    }
    p.op(b'.'); // STOP

    let tmp = tmp_path(path);
    let write = || -> Result<()> {
        let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut z = zip::ZipWriter::new(std::io::BufWriter::new(f));
        let opts = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        let record = |z: &mut zip::ZipWriter<_>, name: &str, bytes: &[u8]| -> Result<()> {
            z.start_file_aligned(format!("{archive}/{name}"), opts, 64)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
            z.write_all(bytes)
                .with_context(|| format!("cannot write {}", tmp.display()))
        };
        record(&mut z, "data.pkl", &p.0)?;
        record(&mut z, "byteorder", b"little")?;
        for (i, (name, t)) in storages.iter().enumerate() {
            let n = t.numel() * t.kind().elt_size_in_bytes();
            let mut bytes = vec![0u8; n];
            t.f_copy_data_u8(&mut bytes, t.numel())
                .with_context(|| format!("cannot read tensor {name}"))?;
            record(&mut z, &format!("data/{i}"), &bytes)?;
        }
        record(&mut z, "version", b"3\n")?;
        record(&mut z, ".data/version", b"3\n")?;
        z.finish().map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    commit_file(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_reader_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("med3d-torch-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.pth");
        let a = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([2, 3, 4]);
        let b = Tensor::from_slice(&[7i64, 300, 1 << 40]);
        let named = vec![
            ("enc.w".to_string(), a.transpose(0, 2)),
            ("enc.n".to_string(), b.shallow_clone()),
            ("dec.enc.n".to_string(), b.shallow_clone()),
        ];
        save_nested(&path, "network_weights", &named).unwrap();
        // the second name of `b` shares its storage
        let zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(zip.file_names().filter(|n| n.contains("/data/")).count(), 2);
        let back: std::collections::HashMap<String, Tensor> = crate::encoders::torch_pickle::read(&path)
            .unwrap()
            .into_iter()
            .collect();
        let w = &back["network_weights.enc.w"];
        assert_eq!(w.size(), vec![4, 3, 2]);
        assert!(w.equal(&a.transpose(0, 2)));
        assert!(back["network_weights.enc.n"].equal(&b));
        assert!(back["network_weights.dec.enc.n"].equal(&b));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
