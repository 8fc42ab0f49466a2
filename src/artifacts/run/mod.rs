//! A pretraining run folder and what `med3d run` keeps beside it, defined
//! once, as `cache` defines the cache: every path, the typed records
//! (run.json, a checkpoint's state.json) and the one checkpoint reader.
//!
//! ```text
//! <workdir>/runs/<name>/                        the run (`med3d pretrain --out`)
//!   run.json                                    RunRecord: what trains, on what
//!   metrics.jsonl  loss.png  summary.json
//!   tensorboard/events.out.tfevents.*               every metrics.jsonl scalar
//!   checkpoints/step-00001000/model.safetensors     the var store
//!   checkpoints/step-00001000/optimizer.safetensors exp_avg.<var>, exp_avg_sq.<var>
//!   checkpoints/step-00001000/state.json            State: step, data position, hashes
//!   checkpoints/latest                              the newest complete checkpoint's name
//!   export/swinunetr.safetensors | encoder.safetensors | nnunet_pretrained.pth (+ .card.json)
//! <workdir>/finetune/<name>/                    a fine-tuning run
//!   model.safetensors  metrics.jsonl  finetune.json  evaluate.json
//!   tensorboard/events.out.tfevents.*           step scalars, evaluate's scores
//! ```
//!
//! [`Checkpoint`] is the one reader of a checkpoint, for resume, export,
//! evaluate-alignment and `med3d run`: it checks the state's format, that
//! the checkpoint was written under the config its run records, and the
//! sha256 of every tensor file against what was recorded when it was
//! written, so that a damaged or foreign checkpoint is the same named error
//! everywhere. [`save`] is its one writer.
//!
//! A checkpoint is written into a temporary folder, every file fsynced
//! (their sha256 recorded in state.json), the folder renamed into place and
//! its parent fsynced, then `latest` is replaced the same way: a kill at
//! any instant, or a crash of the machine after `save` returned, leaves the
//! previous checkpoint or the new one, never a torn one.
//!
//! The run record is generic over the run's config (`C`, the pretrain
//! stage's own type) so that this module, below the stages, knows its shape
//! but not its meaning: the stage says how its config hashes
//! ([`RunConfig`]).
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fsutil::atomic_write;

mod checkpoint;

pub use checkpoint::{find, latest, list, read_state, save, Checkpoint, OpenError, State};

/// The format of run.json and state.json this version writes and reads.
pub const FORMAT: &str = "med3d-pretrain/1";

/// run.json
pub fn run_json(run: &Path) -> PathBuf {
    run.join("run.json")
}

pub fn metrics_jsonl(run: &Path) -> PathBuf {
    run.join("metrics.jsonl")
}

pub fn loss_png(run: &Path) -> PathBuf {
    run.join("loss.png")
}

pub fn summary_json(run: &Path) -> PathBuf {
    run.join("summary.json")
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// The file in `checkpoints/` that names the newest complete checkpoint.
pub fn latest_file(run: &Path) -> PathBuf {
    checkpoints_dir(run).join("latest")
}

/// A checkpoint folder's name: `step-00001000`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(checkpoint_name(step))
}

/// A checkpoint's (or a fine-tuning run's) weights.
pub fn model_file(dir: &Path) -> PathBuf {
    dir.join(MODEL_FILE)
}

pub fn optimizer_file(ckpt: &Path) -> PathBuf {
    ckpt.join(OPTIMIZER_FILE)
}

pub fn state_file(ckpt: &Path) -> PathBuf {
    ckpt.join(STATE_FILE)
}

const STATE_FILE: &str = "state.json";

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The tensor files of a checkpoint, hashed into its state.json.
pub const TENSOR_FILES: [&str; 2] = [MODEL_FILE, OPTIMIZER_FILE];

/// `<workdir>/runs/<name>`: where `med3d run` pretrains.
pub fn default_run(workdir: &Path, name: &str) -> PathBuf {
    workdir.join("runs").join(name)
}

/// A run's export folder.
pub fn export_dir(run: &Path) -> PathBuf {
    run.join("export")
}

/// Where `med3d run` exports: the whole SwinUNETR (what finetune starts
/// from), its encoder, or an nnU-Net backbone for nnU-Net.
pub fn export_file(run: &Path, what: ExportFile) -> PathBuf {
    export_dir(run).join(match what {
        ExportFile::SwinUnetr => "swinunetr.safetensors",
        ExportFile::Encoder => "encoder.safetensors",
        ExportFile::Nnunet => "nnunet_pretrained.pth",
    })
}

/// The export files `med3d run` writes into a run's export folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFile {
    SwinUnetr,
    Encoder,
    Nnunet,
}

/// `<workdir>/finetune/<name>`: where `med3d run` fine-tunes.
pub fn default_finetune(workdir: &Path, name: &str) -> PathBuf {
    workdir.join("finetune").join(name)
}

/// A fine-tuning run's summary.
pub fn finetune_json(dir: &Path) -> PathBuf {
    dir.join("finetune.json")
}

/// A fine-tuning run's evaluation.
pub fn evaluate_json(dir: &Path) -> PathBuf {
    dir.join("evaluate.json")
}

/// A run folder's TensorBoard event files (pretraining and fine-tuning
/// alike): `tensorboard --logdir RUN/tensorboard`.
pub fn tensorboard_dir(dir: &Path) -> PathBuf {
    dir.join("tensorboard")
}

/// A fine-tuning run's per-step log.
pub fn finetune_metrics(dir: &Path) -> PathBuf {
    dir.join("metrics.jsonl")
}

/// How a stage's run config identifies the math it trains (what a
/// checkpoint must have been written under).
pub trait RunConfig: Serialize + DeserializeOwned {
    fn config_hash(&self) -> String;

    /// Brings a config recorded by an earlier version into this version's
    /// layout (settings that moved), returning what it moved.
    fn upgrade(_config: &mut serde_json::Value) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// `run.json`: what a run trains and on what. Every field is required
/// and `format` is checked when read: a record of another version or a
/// hand-made one is a named error, not a silent default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRecord<C> {
    pub format: String,
    pub med3d_version: String,
    pub cache: Option<PathBuf>,
    pub config: C,
    pub config_hash: String,
    pub data_hash: String,
    pub device: String,
    pub autocast_bf16: bool,
    pub parameters: i64,
    pub total_steps: u64,
    pub targets: Vec<(String, i64)>,
    pub usable_slices: Option<usize>,
    pub noisy_slices: usize,
    pub cases: Option<usize>,
    pub skipped_cases: Vec<(String, String)>,
    /// The `--set KEY=VALUE` overrides given on the command line (their
    /// effect is already in `config`). The one field with a default:
    /// records written before it existed had none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
}

impl<C: RunConfig> RunRecord<C> {
    pub fn read(run: &Path) -> Result<RunRecord<C>> {
        let p = run_json(run);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {} (the run's pretrain config)", p.display()))?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not a pretrain run record", p.display()))?;
        if let Some(config) = value.get_mut("config") {
            C::upgrade(config).with_context(|| format!("{}: config", p.display()))?;
        }
        let rec: RunRecord<C> =
            serde_json::from_value(value).with_context(|| format!("{}: not a pretrain run record", p.display()))?;
        ensure!(
            rec.format == FORMAT,
            "{}: run format {:?} is not {FORMAT:?} (written by med3d {}); export or resume it with that version, or start a new run",
            p.display(),
            rec.format,
            rec.med3d_version
        );
        let hash = rec.config.config_hash();
        ensure!(
            rec.config_hash == hash,
            "{}: config_hash {} is not the hash of its config ({}): the record was edited by hand or written by \
             another version; restore it, or start a new run",
            p.display(),
            short(&rec.config_hash),
            short(&hash)
        );
        Ok(rec)
    }

    pub fn write(&self, run: &Path) -> Result<()> {
        atomic_write(&run_json(run), &serde_json::to_vec_pretty(self)?)
    }
}

pub(super) fn short(hash: &str) -> &str {
    &hash[..12.min(hash.len())]
}
