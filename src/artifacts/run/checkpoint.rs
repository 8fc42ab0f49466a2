//! A run's checkpoints: the state record (state.json), listing and
//! finding them, the one reader ([`Checkpoint`], which verifies the
//! format, the config hash and the tensor files' sha256) and the one
//! writer ([`save`]), with pruning. Paths come from the parent module.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use super::*;
use crate::fsutil::{atomic_write, sha256_file, sync_dir, sync_file, tmp_path};

/// Everything besides tensors that a resumed run needs: a checkpoint's
/// state.json.
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
    /// Ranks of the data-parallel run that wrote it. A run may resume under
    /// another world size: `data_position` counts `batch_size` micro-batches
    /// of all ranks together (global samples / batch_size). Left out when 1
    /// (so state.json stays as earlier versions wrote it), hence its default.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: u64,
    pub med3d_version: String,
    /// sha256 of model.safetensors and optimizer.safetensors as written
    /// (absent only in checkpoints of versions before hashes were kept).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
}

fn one() -> u64 {
    1
}

fn is_one(v: &u64) -> bool {
    *v == 1
}

/// Complete checkpoints of a run (a folder with a state.json), oldest first.
pub fn list(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(checkpoints_dir(run)) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(step) = n.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if state_file(&e.path()).is_file() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    out
}

/// The newest complete checkpoint: the one `latest` names, or else the
/// highest step folder holding a state.json.
pub fn latest(run: &Path) -> Option<PathBuf> {
    if let Ok(n) = std::fs::read_to_string(latest_file(run)) {
        let p = checkpoints_dir(run).join(n.trim());
        if state_file(&p).is_file() {
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
                checkpoints_dir(run).display()
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

/// A checkpoint's state.json, its format checked.
pub fn read_state(ckpt: &Path) -> Result<State> {
    let p = state_file(ckpt);
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let s: State = serde_json::from_str(&text).with_context(|| format!("{}: not a checkpoint state", p.display()))?;
    ensure!(
        s.format == FORMAT,
        "{}: checkpoint format {} is not {FORMAT}; start a new run",
        p.display(),
        s.format
    );
    Ok(s)
}

/// The recorded hashes of a checkpoint's files match what is on disk.
fn verify(ckpt: &Path, state: &State) -> Result<()> {
    for (f, want) in &state.files {
        let p = ckpt.join(f);
        let got = sha256_file(&p)?;
        ensure!(
            &got == want,
            "{}: sha256 {} is not the {} recorded when it was written: the checkpoint is damaged",
            p.display(),
            short(&got),
            short(want)
        );
    }
    Ok(())
}

/// Why a checkpoint could not be opened: damaged (an earlier one may do)
/// or written under another config (none of the run's will do).
#[derive(Debug)]
pub enum OpenError {
    Damaged(anyhow::Error),
    Foreign(anyhow::Error),
}

impl From<OpenError> for anyhow::Error {
    fn from(e: OpenError) -> anyhow::Error {
        match e {
            OpenError::Damaged(e) | OpenError::Foreign(e) => e,
        }
    }
}

/// A checkpoint that read back whole: its state's format, its config hash
/// and its tensor files' hashes were checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: State,
}

impl Checkpoint {
    /// The checkpoint of `step` (default: the latest) of `run`, checked
    /// against the run's run.json, which is returned with it.
    pub fn open<C: RunConfig>(run: &Path, step: Option<u64>) -> Result<(Checkpoint, RunRecord<C>)> {
        let dir = find(run, step)?;
        let record = RunRecord::<C>::read(run)?;
        let ckpt = Checkpoint::open_dir(&dir, &record.config_hash)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} cannot be read", dir.display()))?;
        Ok((ckpt, record))
    }

    /// A checkpoint folder already chosen, which must have been written
    /// under the config of hash `config_hash`.
    pub fn open_dir(dir: &Path, config_hash: &str) -> std::result::Result<Checkpoint, OpenError> {
        let state = read_state(dir).map_err(OpenError::Damaged)?;
        if state.config_hash != config_hash {
            return Err(OpenError::Foreign(anyhow!(
                "{}: written with another pretrain config than its run records (hash {} vs {}): \
                 resume only with the settings the run started with, or start a new --out",
                dir.display(),
                short(&state.config_hash),
                short(config_hash)
            )));
        }
        verify(dir, &state).map_err(OpenError::Damaged)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            state,
        })
    }

    /// Resume's search: the newest checkpoint of `run` that opens under
    /// `config_hash`, is accepted by `accept` (e.g. written for the same
    /// data) and loads with `load`, newest first. A damaged checkpoint (one
    /// that does not read back, or fails `load`) is logged and the one
    /// before it tried; a foreign one, or an `accept` error, ends the
    /// search with that error. `None`: the run has no checkpoint; an error
    /// when every checkpoint is damaged.
    pub fn newest_whole(
        run: &Path,
        config_hash: &str,
        accept: impl Fn(&Checkpoint) -> Result<()>,
        mut load: impl FnMut(&Checkpoint) -> Result<()>,
    ) -> Result<Option<Checkpoint>> {
        let mut candidates: Vec<PathBuf> = list(run).into_iter().rev().map(|(_, p)| p).collect();
        if let Some(l) = latest(run) {
            candidates.retain(|p| *p != l);
            candidates.insert(0, l);
        }
        if candidates.is_empty() {
            return Ok(None);
        }
        let mut damaged = Vec::new();
        for dir in &candidates {
            let opened = match Checkpoint::open_dir(dir, config_hash) {
                Ok(c) => accept(&c).map(|_| c).map_err(OpenError::Foreign),
                Err(e) => Err(e),
            };
            let e = match opened {
                Ok(c) => match load(&c) {
                    Ok(()) => {
                        if !damaged.is_empty() {
                            tracing::warn!(
                                "resuming from {} (step {}): the newer checkpoint(s) could not be read back: {}",
                                c.dir.display(),
                                c.state.step,
                                damaged.join("; ")
                            );
                        }
                        return Ok(Some(c));
                    }
                    Err(e) => e,
                },
                Err(OpenError::Foreign(e)) => return Err(e),
                Err(OpenError::Damaged(e)) => e,
            };
            tracing::warn!(
                "checkpoint {} is damaged ({e:#}); trying the one before it",
                dir.display()
            );
            damaged.push(format!("{}: {e:#}", dir.display()));
        }
        bail!(
            "every checkpoint of {} is damaged, so the run cannot resume (remove them to start again from step 0, or choose another --out): {}",
            run.display(),
            damaged.join("; ")
        )
    }

    pub fn model_file(&self) -> PathBuf {
        model_file(&self.dir)
    }

    /// The model's tensors, by var-store name.
    pub fn model_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mp = self.model_file();
        Tensor::read_safetensors(&mp).with_context(|| format!("cannot read {}", mp.display()))
    }

    /// Loads the model strictly into `vs` (built for this run's config):
    /// every variable present with its shape, nothing left over.
    pub fn load_model(&self, vs: &VarStore) -> Result<()> {
        let source = self.model_file().display().to_string();
        crate::model::state_dict::load_named(vs, self.model_tensors()?, &source)
            .context("the checkpoint does not fit the model its run.json configures")
    }

    /// The optimiser's state tensors, by name, and the file they came from.
    pub fn optimizer_tensors(&self) -> Result<(Vec<(String, Tensor)>, String)> {
        let op = optimizer_file(&self.dir);
        let t = Tensor::read_safetensors(&op).with_context(|| format!("cannot read {}", op.display()))?;
        Ok((t, op.display().to_string()))
    }
}

/// Writes a checkpoint of `state.step` (the model in `vs`, the optimiser's
/// named state tensors) and deletes all but the newest `keep`. A failure (a
/// full disk above all) removes the partial folder and leaves the previous
/// checkpoints as they were.
pub fn save(run: &Path, vs: &VarStore, optimizer: &[(String, Tensor)], state: &State, keep: usize) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    let r = save_inner(run, vs, optimizer, state, keep);
    if r.is_err() {
        if let Ok(rd) = std::fs::read_dir(&root) {
            let name = checkpoint_name(state.step);
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&name) && n.contains(&format!(".tmp-{}-", std::process::id())) {
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

fn save_inner(
    run: &Path,
    vs: &VarStore,
    optimizer: &[(String, Tensor)],
    state: &State,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let final_dir = checkpoint_dir(run, state.step);
    let tmp = tmp_path(&final_dir);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    vs.save(model_file(&tmp))
        .with_context(|| format!("cannot write {}", model_file(&tmp).display()))?;
    Tensor::write_safetensors(optimizer, optimizer_file(&tmp))
        .with_context(|| format!("cannot write {}", optimizer_file(&tmp).display()))?;
    let mut state = state.clone();
    for f in TENSOR_FILES {
        sync_file(&tmp.join(f))?;
        state.files.insert(f.to_string(), sha256_file(&tmp.join(f))?);
    }
    let sp = state_file(&tmp);
    std::fs::write(&sp, serde_json::to_vec_pretty(&state)?)
        .with_context(|| format!("cannot write {}", sp.display()))?;
    sync_file(&sp)?;
    sync_dir(&tmp)?;
    if final_dir.exists() {
        // The same step written again (a rerun from an older checkpoint).
        let old = tmp_path(&final_dir);
        std::fs::rename(&final_dir, &old).with_context(|| format!("cannot move {} aside", final_dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move {} into place", final_dir.display()))?;
    sync_dir(&root)?;
    atomic_write(&latest_file(run), checkpoint_name(state.step).as_bytes())?;
    prune(run, keep, state.step)?;
    Ok(final_dir)
}

fn prune(run: &Path, keep: usize, newest: u64) -> Result<()> {
    let all = list(run);
    let n = all.len();
    for (step, p) in all.into_iter().take(n.saturating_sub(keep)) {
        if step != newest {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove old checkpoint {}", p.display()))?;
        }
    }
    // Temporaries of writers that died mid-checkpoint.
    if let Ok(rd) = std::fs::read_dir(checkpoints_dir(run)) {
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
