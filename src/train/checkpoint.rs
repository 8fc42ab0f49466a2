//! Checkpoints of a pretraining run:
//!
//! ```text
//! RUN/checkpoints/step-00001000/model.safetensors      the var store (MONAI keys, psat.*, align.*)
//! RUN/checkpoints/step-00001000/optimizer.safetensors  exp_avg.<var>, exp_avg_sq.<var>
//! RUN/checkpoints/step-00001000/state.json             step, data position, optimiser step, counters, hashes
//! RUN/checkpoints/latest                               the newest complete checkpoint's folder name
//! ```
//! A checkpoint is written into a temporary folder, every file fsynced
//! (their sha256 recorded in state.json), the folder renamed into place and
//! its parent fsynced, then `latest` is replaced the same way: a kill at
//! any instant, or a crash of the machine after `save` returned, leaves the
//! previous checkpoint or the new one, never a torn one. On resume a
//! checkpoint that does not read back whole (truncated, empty, a file
//! whose hash is not the recorded one) is reported and the one before it
//! used; when none is whole the run stops with an error, never restarts
//! from step 0 unasked.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use crate::fsutil::{atomic_write, sha256_file, sync_dir, sync_file, tmp_path};
use crate::runtime::optim::Adam;

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    /// Optimiser steps taken (including skipped ones).
    pub step: u64,
    /// Micro-batches consumed: the loader restarts at this batch number.
    pub data_position: u64,
    /// Updates the optimiser applied (its bias-correction step).
    pub optimizer_t: u64,
    pub total_steps: u64,
    /// Steps skipped for a non-finite loss or gradient, in all and in a row.
    pub nonfinite_total: u64,
    pub nonfinite_streak: u64,
    /// Every random draw is a function of (seed, stream, step or sample):
    /// the seed is the whole RNG state.
    pub seed: u64,
    pub rng: String,
    pub config_hash: String,
    pub data_hash: String,
    /// Wall time spent training so far (seconds).
    pub elapsed_s: f64,
    /// Ranks of the data-parallel run that wrote it (absent: 1). A run may
    /// resume under another world size: `data_position` counts
    /// `batch_size` micro-batches of all ranks together (global samples /
    /// batch_size).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: u64,
    pub med3d_version: String,
    /// sha256 of model.safetensors and optimizer.safetensors as written
    /// (absent in checkpoints of older versions: not checked then).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
}

fn one() -> u64 {
    1
}

fn is_one(v: &u64) -> bool {
    *v == 1
}

pub fn dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The tensor files of a checkpoint, hashed into its state.json.
const FILES: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];

/// Writes a checkpoint of `step` and deletes all but the newest `keep`.
/// A failure (a full disk above all) removes the partial folder and
/// leaves the previous checkpoints as they were.
pub fn save(run: &Path, vs: &VarStore, opt: &Adam, state: &State, keep: usize) -> Result<PathBuf> {
    let root = dir(run);
    let r = save_inner(run, vs, opt, state, keep);
    if r.is_err() {
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&name(state.step)) && n.contains(&format!(".tmp-{}-", std::process::id())) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    r.with_context(|| {
        format!(
            "checkpoint of step {} not written; the previous ones in {} are kept",
            state.step,
            root.display()
        )
    })
}

fn save_inner(run: &Path, vs: &VarStore, opt: &Adam, state: &State, keep: usize) -> Result<PathBuf> {
    let root = dir(run);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let final_dir = root.join(name(state.step));
    let tmp = tmp_path(&final_dir);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    vs.save(tmp.join("model.safetensors"))
        .with_context(|| format!("cannot write {}", tmp.join("model.safetensors").display()))?;
    let opt_state = opt.state_tensors();
    Tensor::write_safetensors(&opt_state, tmp.join("optimizer.safetensors"))
        .with_context(|| format!("cannot write {}", tmp.join("optimizer.safetensors").display()))?;
    let mut state = state.clone();
    for f in FILES {
        sync_file(&tmp.join(f))?;
        state.files.insert(f.to_string(), sha256_file(&tmp.join(f))?);
    }
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&state)?)
        .with_context(|| format!("cannot write {}", tmp.join("state.json").display()))?;
    sync_file(&tmp.join("state.json"))?;
    sync_dir(&tmp)?;
    if final_dir.exists() {
        // The same step written again (a rerun from an older checkpoint).
        let old = tmp_path(&final_dir);
        std::fs::rename(&final_dir, &old).with_context(|| format!("cannot move {} aside", final_dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move {} into place", final_dir.display()))?;
    sync_dir(&root)?;
    atomic_write(&root.join("latest"), name(state.step).as_bytes())?;
    prune(&root, keep, state.step)?;
    Ok(final_dir)
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir(run)) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(step) = n.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if e.path().join("state.json").is_file() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    out
}

fn prune(root: &Path, keep: usize, newest: u64) -> Result<()> {
    let all = list(root.parent().unwrap_or(root));
    let n = all.len();
    for (step, p) in all.into_iter().take(n.saturating_sub(keep)) {
        if step != newest {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove old checkpoint {}", p.display()))?;
        }
    }
    // Temporaries of writers that died mid-checkpoint.
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.contains(".tmp-") && e.path().is_dir() {
                let pid = n
                    .rsplit(".tmp-")
                    .next()
                    .and_then(|r| r.split('-').next()?.parse::<u32>().ok());
                if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    Ok(())
}

/// The newest complete checkpoint: the one `latest` names, or else the
/// highest step folder holding a state.json.
pub fn latest(run: &Path) -> Option<PathBuf> {
    let root = dir(run);
    if let Ok(n) = std::fs::read_to_string(root.join("latest")) {
        let p = root.join(n.trim());
        if p.join("state.json").is_file() {
            return Some(p);
        }
    }
    list(run).pop().map(|(_, p)| p)
}

/// The checkpoint folder of `step` (default: the latest) with a clear
/// error naming the run when it is missing.
pub fn find(run: &Path, step: Option<u64>) -> Result<PathBuf> {
    ensure!(run.is_dir(), "{}: no such run folder", run.display());
    let all = list(run);
    match step {
        None => latest(run).ok_or_else(|| {
            anyhow!(
                "{}: the run holds no complete checkpoint (nothing under {}); run `med3d pretrain` first",
                run.display(),
                dir(run).display()
            )
        }),
        Some(s) => match all.iter().find(|(k, _)| *k == s) {
            Some((_, p)) => Ok(p.clone()),
            None if all.is_empty() => bail!(
                "{}: no checkpoint at step {s}: the run holds no complete checkpoint",
                run.display()
            ),
            None => bail!(
                "{}: no checkpoint at step {s}; the run holds steps {}",
                run.display(),
                all.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

pub fn read_state(ckpt: &Path) -> Result<State> {
    let p = ckpt.join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let s: State = serde_json::from_str(&text).with_context(|| format!("{}: not a checkpoint state", p.display()))?;
    if s.format != super::config::PRETRAIN_FORMAT {
        bail!(
            "{}: checkpoint format {} is not {}; start a new run",
            p.display(),
            s.format,
            super::config::PRETRAIN_FORMAT
        );
    }
    Ok(s)
}

/// Loads the newest checkpoint of `run` that reads back whole, newest
/// first, after `accept` has seen its state (an `accept` error, e.g. a
/// config that changed since, is the caller's answer and ends the search).
/// A damaged checkpoint is logged and the one before it tried; `None`: the
/// run has no checkpoint; an error when every checkpoint is damaged.
pub fn load_newest(
    run: &Path,
    vs: &VarStore,
    opt: &mut Adam,
    accept: impl Fn(&Path, &State) -> Result<()>,
) -> Result<Option<(PathBuf, State)>> {
    let mut candidates: Vec<PathBuf> = list(run).into_iter().rev().map(|(_, p)| p).collect();
    if let Some(l) = latest(run) {
        candidates.retain(|p| *p != l);
        candidates.insert(0, l);
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    let mut damaged = Vec::new();
    for ckpt in &candidates {
        let state = match read_state(ckpt) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    "checkpoint {} is damaged ({e:#}); trying the one before it",
                    ckpt.display()
                );
                damaged.push(format!("{}: {e:#}", ckpt.display()));
                continue;
            }
        };
        accept(ckpt, &state)?;
        match verify(ckpt, &state).and_then(|_| load(ckpt, vs, opt)) {
            Ok(s) => {
                if !damaged.is_empty() {
                    tracing::warn!(
                        "resuming from {} (step {}): the newer checkpoint(s) could not be read back: {}",
                        ckpt.display(),
                        s.step,
                        damaged.join("; ")
                    );
                }
                return Ok(Some((ckpt.clone(), s)));
            }
            Err(e) => {
                tracing::warn!(
                    "checkpoint {} is damaged ({e:#}); trying the one before it",
                    ckpt.display()
                );
                damaged.push(format!("{}: {e:#}", ckpt.display()));
            }
        }
    }
    bail!(
        "every checkpoint of {} is damaged, so the run cannot resume (remove them to start again from step 0, or choose another --out): {}",
        run.display(),
        damaged.join("; ")
    )
}

/// The recorded hashes of a checkpoint's files match what is on disk.
fn verify(ckpt: &Path, state: &State) -> Result<()> {
    for (f, want) in &state.files {
        let p = ckpt.join(f);
        let got = sha256_file(&p)?;
        if &got != want {
            bail!(
                "{}: sha256 {} is not the {} recorded when it was written",
                p.display(),
                &got[..12],
                &want[..12.min(want.len())]
            );
        }
    }
    Ok(())
}

/// Loads the model and optimiser of a checkpoint; returns its state.
pub fn load(ckpt: &Path, vs: &VarStore, opt: &mut Adam) -> Result<State> {
    let state = read_state(ckpt)?;
    let mp = ckpt.join("model.safetensors");
    let model = Tensor::read_safetensors(&mp).with_context(|| format!("cannot read {}", mp.display()))?;
    crate::model::state_dict::load_named(vs, model, &mp.display().to_string())?;
    let op = ckpt.join("optimizer.safetensors");
    let o = Tensor::read_safetensors(&op).with_context(|| format!("cannot read {}", op.display()))?;
    opt.load_state(o, state.optimizer_t, &op.display().to_string())?;
    Ok(state)
}
