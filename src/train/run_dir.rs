//! The run folder of `med3d pretrain`, defined once: where its files live
//! and `run.json`'s typed record, written by the trainer and read by
//! export (checkpoints: `checkpoint`; metrics lines: `metrics`).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::config::PretrainConfig;

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

/// `run.json`: what a run trains and on what. Fields after `config` are
/// optional when read, so records of older runs (and hand-made ones) load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    #[serde(default)]
    pub format: String,
    #[serde(default)]
    pub med3d_version: String,
    #[serde(default)]
    pub cache: Option<PathBuf>,
    pub config: PretrainConfig,
    #[serde(default)]
    pub config_hash: String,
    #[serde(default)]
    pub data_hash: String,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub autocast_bf16: bool,
    #[serde(default)]
    pub parameters: i64,
    #[serde(default)]
    pub total_steps: u64,
    #[serde(default)]
    pub targets: Vec<(String, i64)>,
    #[serde(default)]
    pub usable_slices: Option<usize>,
    #[serde(default)]
    pub noisy_slices: usize,
    #[serde(default)]
    pub cases: Option<usize>,
    #[serde(default)]
    pub skipped_cases: Vec<(String, String)>,
}

impl RunRecord {
    pub fn read(run: &Path) -> Result<RunRecord> {
        let p = run_json(run);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {} (the run's pretrain config)", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a pretrain run record", p.display()))
    }

    pub fn write(&self, run: &Path) -> Result<()> {
        crate::fsutil::atomic_write(&run_json(run), &serde_json::to_vec_pretty(self)?)
    }
}
