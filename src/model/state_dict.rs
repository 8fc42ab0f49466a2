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
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))
}
