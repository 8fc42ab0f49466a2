//! Reads PyTorch checkpoints written by `torch.save` (the zip format, the
//! default since PyTorch 1.6): `<archive>/data.pkl` holds a pickle of the
//! state dict whose tensors point, by persistent id, at raw storages
//! `<archive>/data/<key>`. libtorch's own loader rejects the
//! `collections.OrderedDict` (with its `_metadata`) that
//! `model.state_dict()` is, which is what real checkpoints such as
//! BiomedCLIP's `open_clip_pytorch_model.bin` hold; this reader handles the
//! subset of pickle that state dicts use and nothing that executes code.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// A storage by persistent id: element kind, key in data/, element count.
    Storage(Kind, String),
    Tensor(TensorRef),
    /// The result of calling something this reader does not model.
    Opaque,
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    kind: Kind,
    key: String,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn storage_kind(name: &str) -> Result<Kind> {
    Ok(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => bail!("unsupported storage type {other}"),
    })
}

fn ints(v: &Value) -> Result<Vec<i64>> {
    match v {
        Value::Tuple(xs) | Value::List(xs) => xs
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                other => bail!("expected an integer, got {other:?}"),
            })
            .collect(),
        other => bail!("expected a tuple of integers, got {other:?}"),
    }
}

/// Calls a global the way `torch.load` would, for the few that state dicts use.
fn reduce(callable: Value, args: Value) -> Result<Value> {
    let Value::Global(module, name) = &callable else {
        return Ok(Value::Opaque);
    };
    let args = match args {
        Value::Tuple(a) => a,
        _ => return Ok(Value::Opaque),
    };
    Ok(match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => Value::Dict(Vec::new()),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let Some(Value::Storage(kind, key)) = args.first().cloned() else {
                bail!("_rebuild_tensor without a storage");
            };
            let offset = match args.get(1) {
                Some(Value::Int(o)) => *o,
                _ => bail!("_rebuild_tensor without an offset"),
            };
            Value::Tensor(TensorRef {
                kind,
                key,
                offset,
                size: ints(args.get(2).unwrap_or(&Value::None))?,
                stride: ints(args.get(3).unwrap_or(&Value::None))?,
            })
        }
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            args.into_iter().next().unwrap_or(Value::None)
        }
        _ => Value::Opaque,
    })
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.context("pickle ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .context("pickle line without end")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("pickle stack underflow")
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .context("pickle MARK missing")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().context("pickle stack underflow")
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                } // PROTO
                0x95 => {
                    self.take(8)?;
                } // FRAME
                b'.' => return self.pop(),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Bool),
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v))
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        bail!("integer of {n} bytes");
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v))
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float)
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s))
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => bail!("STACK_GLOBAL without names"),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .with_context(|| format!("pickle memo {i} missing"))?;
                    self.stack.push(v)
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let at = self.stack.len().checked_sub(n).context("pickle stack underflow")?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(items))
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let Value::Tuple(p) = pid else {
                        bail!("persistent id is not a tuple");
                    };
                    match (p.get(1), p.get(2)) {
                        (Some(Value::Global(_, ty)), Some(Value::Str(key))) => {
                            self.stack.push(Value::Storage(storage_kind(ty)?, key.clone()))
                        }
                        _ => bail!("unsupported persistent id {p:?}"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(callable, args)?)
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.stack.push(reduce(cls, args)?)
                }
                b'b' => {
                    // BUILD: object state (an OrderedDict's `_metadata`); not needed.
                    self.pop()?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Value::Dict(d) = self.top()? {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Value::Dict(d) = self.top()? {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Value::List(l) = self.top()? {
                        l.push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top()? {
                        l.extend(items);
                    }
                }
                other => bail!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1),
            }
        }
    }
}

/// Flattens nested dicts of tensors to `a.b.c` names (a checkpoint that
/// wraps its state dict, e.g. under `state_dict`, keeps the inner names
/// after the wrapper's key).
fn collect(prefix: &str, v: &Value, out: &mut Vec<(String, TensorRef)>) {
    if let Value::Dict(items) = v {
        for (k, x) in items {
            let name = match k {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            let full = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            match x {
                Value::Tensor(t) => out.push((full, t.clone())),
                Value::Dict(_) => collect(&full, x, out),
                _ => {}
            }
        }
    }
}

/// Every tensor of a `torch.save` zip checkpoint, by name, on the CPU.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f)).with_context(|| {
        format!(
            "{}: not a zip checkpoint (torch.save's format since PyTorch 1.6; re-save older files with a recent torch)",
            path.display()
        )
    })?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .with_context(|| format!("{}: no <archive>/data.pkl", path.display()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    let root = Unpickler {
        data: &pkl,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
    .with_context(|| format!("{}: cannot read the pickle", path.display()))?;
    let mut refs = Vec::new();
    collect("", &root, &mut refs);
    if refs.is_empty() {
        bail!("{}: holds no tensors in a (nested) dict", path.display());
    }
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(refs.len());
    for (name, t) in refs {
        if !storages.contains_key(&t.key) {
            let entry = format!("{prefix}data/{}", t.key);
            let mut bytes = Vec::new();
            zip.by_name(&entry)
                .with_context(|| format!("{}: storage {entry} missing", path.display()))?
                .read_to_end(&mut bytes)?;
            let esize = t.kind.elt_size_in_bytes();
            let n = (bytes.len() / esize) as i64;
            let s = Tensor::f_from_data_size(&bytes, &[n], t.kind)
                .with_context(|| format!("{}: storage {entry}", path.display()))?;
            storages.insert(t.key.clone(), s);
        }
        let s = &storages[&t.key];
        let tensor = s
            .f_as_strided(&t.size, &t.stride, Some(t.offset))
            .with_context(|| format!("{}: tensor {name} does not fit its storage", path.display()))?
            .contiguous();
        out.push((name, tensor));
    }
    Ok(out)
}
