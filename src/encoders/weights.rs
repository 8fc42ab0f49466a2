//! Where a frozen encoder's files come from and how its tensors are read.
//!
//! A model is named by a local file, a local folder, or a hub id
//! (`org/name`) looked up in Hugging Face cache folders laid out as the hub
//! client leaves them (`models--org--name/snapshots/<rev>/...`). Nothing is
//! ever downloaded: a missing file is an error that names the file and every
//! place looked. Tensors are read by their upstream names from safetensors
//! or from PyTorch pickles (`.bin`, `.pt`, `.pth`), so VarStore paths that
//! mirror upstream keys load real checkpoints without a renaming table.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Tensor};

/// A model's folder and the weights file chosen in it.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// How the model was named (path or hub id), for messages.
    pub spec: String,
    pub dir: PathBuf,
    pub weights: PathBuf,
}

impl ModelFiles {
    /// The first of `names` present beside the weights, if any.
    pub fn find(&self, names: &[&str]) -> Option<PathBuf> {
        names.iter().map(|n| self.dir.join(n)).find(|p| p.is_file())
    }

    /// Like `find`, but a missing file is an error naming where it looked.
    pub fn require(&self, names: &[&str], what: &str) -> Result<PathBuf> {
        self.find(names).with_context(|| {
            format!(
                "{what} for {} not found: looked for {} in {}",
                self.spec,
                names.join(" or "),
                self.dir.display()
            )
        })
    }
}

/// Hub cache folders to search, in order: the configured one, then the hub
/// client's own environment variables and default.
pub fn hub_caches(configured: Option<&Path>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = configured {
        v.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        v.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        v.push(PathBuf::from(p).join("hub"));
    }
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(x) = xdg {
        v.push(x.join("huggingface").join("hub"));
    }
    v.dedup();
    v
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Snapshot folders of a hub repo in one cache, the `refs/main` revision first.
fn snapshots(cache: &Path, id: &str) -> Vec<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let mut out = Vec::new();
    let main = std::fs::read_to_string(repo.join("refs").join("main"))
        .ok()
        .map(|s| s.trim().to_string());
    if let Some(rev) = &main {
        out.push(repo.join("snapshots").join(rev));
    }
    if let Ok(rd) = std::fs::read_dir(repo.join("snapshots")) {
        let mut rest: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !out.contains(p))
            .collect();
        rest.sort();
        out.extend(rest);
    }
    out
}

/// Finds a model's weights: `spec` is a weights file, a folder holding one
/// of `candidates`, or a hub id searched in `caches`.
pub fn resolve(spec: &str, candidates: &[&str], caches: &[PathBuf]) -> Result<ModelFiles> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(ModelFiles {
            spec: spec.to_string(),
            dir: p.parent().map(Path::to_path_buf).unwrap_or_default(),
            weights: p.to_path_buf(),
        });
    }
    let mut looked: Vec<String> = Vec::new();
    let in_dir = |dir: &Path| -> Option<ModelFiles> {
        let weights = candidates.iter().map(|c| dir.join(c)).find(|f| f.is_file())?;
        Some(ModelFiles {
            spec: spec.to_string(),
            dir: dir.to_path_buf(),
            weights,
        })
    };
    if p.is_dir() {
        if let Some(m) = in_dir(p) {
            return Ok(m);
        }
        looked.push(p.display().to_string());
    } else if !looks_like_hub_id(spec) {
        bail!("model weights {spec:?}: no such file or folder (give a weights file, a folder holding {}, or a hub id org/name in a local hub cache)", candidates.join(" or "));
    } else {
        looked.push(format!("{spec} (not a local path)"));
    }
    if looks_like_hub_id(spec) {
        for cache in caches {
            let snaps = snapshots(cache, spec);
            if snaps.is_empty() {
                looked.push(format!(
                    "{} (no snapshot)",
                    cache.join(format!("models--{}", spec.replace('/', "--"))).display()
                ));
            }
            for s in snaps {
                if let Some(m) = in_dir(&s) {
                    return Ok(m);
                }
                looked.push(s.display().to_string());
            }
        }
    }
    bail!(
        "model weights for {spec:?} not found (no network is used): looked for {} in:\n  {}",
        candidates.join(" or "),
        looked.join("\n  ")
    )
}

/// Every tensor of a checkpoint by name, on the CPU.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let named = match ext {
        "safetensors" => {
            Tensor::read_safetensors(path).with_context(|| format!("{}: cannot read safetensors", path.display()))?
        }
        "bin" | "pt" | "pth" => super::torch_pickle::read(path)?,
        _ => bail!(
            "{}: unknown weights format (expected .safetensors, .bin, .pt or .pth)",
            path.display()
        ),
    };
    Ok(named.into_iter().collect())
}

/// Number of `prefix.<i>.` groups in `names` (layers of a stack).
pub fn count_layers(tensors: &HashMap<String, Tensor>, prefix: &str) -> usize {
    let p = format!("{prefix}.");
    tensors
        .keys()
        .filter_map(|k| k.strip_prefix(&p)?.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Shape of a named tensor, or an error naming the key and the file.
pub fn shape_of(tensors: &HashMap<String, Tensor>, key: &str, file: &Path) -> Result<Vec<i64>> {
    tensors.get(key).map(|t| t.size()).with_context(|| {
        format!(
            "{}: no tensor {key:?} (is this the right kind of checkpoint?)",
            file.display()
        )
    })
}

/// Copies each of the var store's variables from the tensor of the same
/// name, converting dtype and device; a missing or misshapen tensor is an
/// error that names it and the file. Extra tensors are ignored (a CLIP
/// checkpoint holds both towers; each loads its own).
pub fn load_into(vs: &VarStore, tensors: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let missing: Vec<&str> = vars
        .iter()
        .filter(|(n, _)| !tensors.contains_key(n))
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(8).copied().collect();
        bail!(
            "{}: {} tensors the model needs are missing, e.g. {} (is this the right kind of checkpoint?)",
            file.display(),
            missing.len(),
            shown.join(", ")
        );
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vars {
            let src = &tensors[&name];
            if src.size() != var.size() {
                bail!(
                    "{}: tensor {name} has shape {:?}, the model expects {:?}",
                    file.display(),
                    src.size(),
                    var.size()
                );
            }
            var.f_copy_(&src.to_kind(var.kind()).to_device(var.device()))
                .with_context(|| format!("{}: cannot copy {name}", file.display()))?;
        }
        Ok(())
    })
}

/// sha256 of a weights file, remembered in `memo` (a JSON file) by path,
/// size and modification time, so reruns do not rehash large checkpoints.
pub fn sha256_memo(path: &Path, memo: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = format!("{}|{}|{}", canon.display(), meta.len(), mtime);
    let mut map: HashMap<String, String> = std::fs::read(memo)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(h) = map.get(&key) {
        return Ok(h.clone());
    }
    let h = crate::fsutil::sha256_file(path)?;
    map.insert(key, h.clone());
    if let Some(dir) = memo.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    // The memo is only a shortcut: failing to write it costs a rehash later.
    if let Ok(bytes) = serde_json::to_vec_pretty(&map) {
        let _ = crate::fsutil::atomic_write(memo, &bytes);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_layout_prefers_refs_main_and_names_every_place_looked() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("models--org--m");
        for rev in ["aaa", "bbb"] {
            std::fs::create_dir_all(repo.join("snapshots").join(rev)).unwrap();
            std::fs::write(repo.join("snapshots").join(rev).join("model.safetensors"), b"x").unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "bbb\n").unwrap();
        let caches = vec![d.path().join("empty"), d.path().to_path_buf()];
        let m = resolve("org/m", &["model.safetensors"], &caches).unwrap();
        assert!(m.weights.ends_with("snapshots/bbb/model.safetensors"), "{m:?}");

        let e = format!(
            "{:#}",
            resolve("org/other", &["model.safetensors", "pytorch_model.bin"], &caches).unwrap_err()
        );
        assert!(e.contains("model.safetensors or pytorch_model.bin"), "{e}");
        assert!(e.contains("empty/models--org--other"), "{e}");
        assert!(
            e.contains(&d.path().join("models--org--other").display().to_string()),
            "{e}"
        );

        let e = format!(
            "{:#}",
            resolve("./nowhere/at/all", &["model.safetensors"], &caches).unwrap_err()
        );
        assert!(e.contains("./nowhere/at/all") && e.contains("no such file"), "{e}");
    }

    #[test]
    fn folder_without_weights_names_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            resolve(d.path().to_str().unwrap(), &["model.safetensors"], &[]).unwrap_err()
        );
        assert!(
            e.contains(&d.path().display().to_string()) && e.contains("model.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn layers_are_counted_from_keys() {
        let mut m = HashMap::new();
        for k in ["a.layer.0.w", "a.layer.1.w", "a.layer.11.b", "a.other"] {
            m.insert(k.to_string(), Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)));
        }
        assert_eq!(count_layers(&m, "a.layer"), 12);
        assert_eq!(count_layers(&m, "b.layer"), 0);
    }
}
