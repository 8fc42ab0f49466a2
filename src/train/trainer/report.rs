//! What a pretraining invocation is asked ([`Options`]) and what it
//! reports ([`Summary`], summary.json), and how a libtorch failure is
//! explained to the user.
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::super::config::PretrainConfig;
use super::super::metrics;
use crate::artifacts::run as run_dir;
use crate::runtime::guard;

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub cache: PathBuf,
    /// The run folder (checkpoints, metrics, plot).
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `out` (a fresh start when
    /// there is none). Without it, a folder holding checkpoints is an error.
    pub resume: bool,
    /// Checkpoint and stop on SIGTERM / SIGINT (a second SIGINT exits at once).
    pub handle_signals: bool,
    /// The command line's `--set` overrides the config came with, recorded
    /// in run.json.
    pub overrides: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Trained to the last step.
    Done,
    /// The run had already reached its last step; nothing was trained.
    UpToDate,
    /// Stopped by a signal after writing a checkpoint.
    Interrupted,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub status: Status,
    pub step: u64,
    pub total_steps: u64,
    /// Steps run by this invocation.
    pub steps_run: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub nonfinite_total: u64,
    pub checkpoint: Option<PathBuf>,
    pub metrics: PathBuf,
    pub plot: PathBuf,
    pub device: String,
    pub autocast_bf16: bool,
    pub parameters: i64,
    pub volumes_per_s: f64,
    pub usable_slices: usize,
    pub cases: usize,
    pub skipped_cases: Vec<(String, String)>,
    pub targets: Vec<(String, i64)>,
    /// This process's rank and the number of ranks (absent: 0 of 1).
    #[serde(skip_serializing_if = "is_zero")]
    pub rank: usize,
    #[serde(skip_serializing_if = "is_one")]
    pub world_size: usize,
    /// Usable slices whose targets were swapped (`target_noise`).
    pub noisy_slices: usize,
    /// The signal (SIGINT 2, SIGTERM 15) that interrupted the run.
    pub signal: Option<i32>,
    /// Peak resident memory of this process (bytes).
    pub peak_rss_bytes: u64,
    /// CUDA: the caching allocator's peak allocated / reserved bytes on
    /// this rank's device during this invocation.
    pub peak_cuda_allocated_bytes: Option<i64>,
    pub peak_cuda_reserved_bytes: Option<i64>,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

/// A libtorch failure during pretraining as the user should read it: where,
/// and for an out-of-memory, the settings that size the step and what to
/// change; the run folder keeps its last checkpoint.
pub(super) fn torch_failure(
    e: anyhow::Error,
    at: &str,
    cfg: &PretrainConfig,
    dev: tch::Device,
    bf16: bool,
    out: &Path,
) -> anyhow::Error {
    let last = run_dir::latest(out)
        .map(|p| format!("the last checkpoint, {}, is kept (resume with --resume)", p.display()))
        .unwrap_or_else(|| "no checkpoint had been written yet".into());
    if !guard::is_out_of_memory(&e) {
        return e.context(format!("pretrain {at} on {dev:?} failed in libtorch; {last}"));
    }
    let size = cfg
        .input_size
        .map(|s| format!("{s:?}"))
        .unwrap_or_else(|| "the cached grid (no input_size)".into());
    anyhow::anyhow!(
        "pretrain {at}: out of memory on {dev:?} ({}). The step holds pretrain.batch_size {} volumes of pretrain.input_size {size} through {} at {}. Lower pretrain.batch_size (raise pretrain.optimizer.accumulate to keep the global batch), or pretrain.input_size, or {}{}; {last}",
        guard::without_backtrace(&format!("{e:#}")),
        cfg.batch_size,
        cfg.backbone.name(),
        if bf16 { "bf16 autocast" } else { "float32 (pretrain.precision)" },
        cfg.backbone.width_knob(),
        if dev.is_cuda() && !bf16 { "; on a GPU, pretrain.precision: bf16 halves activations" } else { "" }
    )
}

/// Reads the whole log (first and last loss of the run), draws the loss
/// curve and writes `summary.json`.
pub(super) fn finish(summary: &mut Summary, run: &Path) -> Result<()> {
    let all = metrics::read(&summary.metrics)?;
    summary.first_loss = all.iter().find_map(|m| m.loss);
    summary.last_loss = all.iter().rev().find_map(|m| m.loss);
    super::super::plot::write(&all, &summary.plot)?;
    crate::fsutil::atomic_write(&run_dir::summary_json(run), &serde_json::to_vec_pretty(summary)?)
}
