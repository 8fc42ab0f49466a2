//! A VarStore as a PyTorch state dict in safetensors: loading checks keys,
//! shapes and kinds the way `load_state_dict(strict=True)` does (tch's own
//! `VarStore::load` ignores extra keys and lets `copy_` broadcast a wrong
//! shape), and saving writes a file PyTorch loads with no renaming.
use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::nn::VarStore;
use tch::Tensor;

/// Copies `tensors` into the variables of `vs`, requiring exactly the same
/// names and shapes on both sides. Floating-point values are converted to
/// the store's kind (a float32 checkpoint loads into a float64 store);
/// integer buffers must match in kind. `source` names the origin in errors.
pub fn load_named(vs: &VarStore, tensors: Vec<(String, Tensor)>, source: &str) -> Result<()> {
    let vars = vs.variables();
    let theirs: BTreeSet<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    let ours: BTreeSet<&str> = vars.keys().map(|k| k.as_str()).collect();
    let missing: Vec<&str> = ours.difference(&theirs).copied().collect();
    let unexpected: Vec<&str> = theirs.difference(&ours).copied().collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing {} key(s): {}", missing.len(), preview(&missing)));
    }
    if !unexpected.is_empty() {
        problems.push(format!(
            "unexpected {} key(s): {}",
            unexpected.len(),
            preview(&unexpected)
        ));
    }
    for (name, src) in &tensors {
        let Some(dst) = vars.get(name) else { continue };
        if src.size() != dst.size() {
            problems.push(format!(
                "{name}: shape {:?} in the file, {:?} in the model",
                src.size(),
                dst.size()
            ));
        } else if src.is_floating_point() != dst.is_floating_point()
            || (!dst.is_floating_point() && src.kind() != dst.kind())
        {
            problems.push(format!(
                "{name}: kind {:?} in the file, {:?} in the model",
                src.kind(),
                dst.kind()
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{source} does not match the model's state dict (same architecture and config are needed):\n  {}",
            problems.join("\n  ")
        );
    }
    tch::no_grad(|| {
        for (name, src) in &tensors {
            let mut dst = vars[name].shallow_clone();
            dst.copy_(&src.to_device(dst.device()).to_kind(dst.kind()));
        }
    });
    Ok(())
}

fn preview(keys: &[&str]) -> String {
    const SHOWN: usize = 8;
    let mut s = keys.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", keys.len() - SHOWN));
    }
    s
}

/// Loads a safetensors state dict (e.g. `safetensors.torch.save_file(
/// model.state_dict(), path)` from MONAI) into `vs`, strictly.
pub fn load_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let tensors = Tensor::read_safetensors(path).with_context(|| format!("cannot read {}", path.display()))?;
    load_named(vs, tensors, &path.display().to_string())
}

/// Saves every variable of `vs` (parameters and buffers) under its name,
/// atomically (temporary file, then rename).
pub fn save_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let tmp = crate::fsutil::tmp_path(path);
    let vars = vs.variables();
    let mut named: Vec<(&String, Tensor)> = vars.iter().map(|(k, v)| (k, v.to_device(tch::Device::Cpu))).collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    Tensor::write_safetensors(&named, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    crate::fsutil::commit_file(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::Init;
    use tch::{Device, Kind};

    fn store() -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let p = vs.root() / "block";
        let _ = p.var("weight", &[3, 2], Init::Const(0.0));
        let _ = p.add("index", Tensor::from_slice(&[1i64, 2]), false);
        vs
    }

    /// Damaged safetensors (a header length of 2^64 - 1 or past the file, a
    /// tensor whose offsets lie outside the data, cut short) are named
    /// errors, with nothing allocated for what they declare.
    #[test]
    fn damaged_safetensors_are_named_errors() {
        let d = tempfile::tempdir().unwrap();
        let good = d.path().join("good.safetensors");
        save_safetensors(&store(), &good).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + hlen].to_vec()).unwrap();
        let mut variants: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        variants.push(("huge header length", huge));
        let mut past = bytes.clone();
        past[..8].copy_from_slice(&((bytes.len() as u64) * 2).to_le_bytes());
        variants.push(("header past the end", past));
        variants.push(("cut", bytes[..bytes.len() - 3].to_vec()));
        // the same header length, an offset far beyond the data
        let far = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[9000000000,", 1);
        let mut off = bytes.clone();
        if far.len() == header.len() {
            off[8..8 + hlen].copy_from_slice(far.as_bytes());
            variants.push(("offset beyond the data", off));
        }
        for (what, b) in variants {
            let p = d.path().join("bad.safetensors");
            std::fs::write(&p, &b).unwrap();
            let e = load_safetensors(&store(), &p).expect_err(what);
            assert!(format!("{e:#}").contains("bad.safetensors"), "{what}: {e:#}");
        }
    }

    #[test]
    fn strict_load_names_every_mismatch_and_converts_floats() {
        let vs = store();
        let weight = Tensor::arange(6, (Kind::Double, Device::Cpu)).view([3, 2]);
        let good = || {
            vec![
                ("block.weight".to_string(), weight.shallow_clone()),
                ("block.index".to_string(), Tensor::from_slice(&[7i64, 8])),
            ]
        };
        load_named(&vs, good(), "good").unwrap();
        let vars = vs.variables();
        assert_eq!(vars["block.weight"].kind(), Kind::Float);
        assert_eq!(vars["block.weight"].double_value(&[2, 1]), 5.0);
        assert_eq!(vars["block.index"].int64_value(&[1]), 8);

        let mut bad = good();
        bad[0].1 = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        bad[1].0 = "block.idx".into();
        let msg = format!("{:#}", load_named(&vs, bad, "bad.safetensors").unwrap_err());
        assert!(msg.contains("bad.safetensors"), "{msg}");
        assert!(msg.contains("missing 1 key(s): block.index"), "{msg}");
        assert!(msg.contains("unexpected 1 key(s): block.idx"), "{msg}");
        assert!(
            msg.contains("block.weight: shape [2, 3] in the file, [3, 2] in the model"),
            "{msg}"
        );
        // nothing was copied from the rejected file
        assert_eq!(vs.variables()["block.weight"].double_value(&[2, 1]), 5.0);

        let mut wrong_kind = good();
        wrong_kind[1].1 = Tensor::from_slice(&[7.0f32, 8.0]);
        let msg = format!("{:#}", load_named(&vs, wrong_kind, "f").unwrap_err());
        assert!(
            msg.contains("block.index: kind Float in the file, Int64 in the model"),
            "{msg}"
        );
    }

    #[test]
    fn saved_file_loads_back_strictly() {
        let vs = store();
        let _ = tch::no_grad(|| vs.variables()["block.weight"].shallow_clone().fill_(3.5));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save_safetensors(&vs, &path).unwrap();
        let other = store();
        load_safetensors(&other, &path).unwrap();
        assert_eq!(other.variables()["block.weight"].double_value(&[0, 0]), 3.5);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left behind"
        );
    }
}
