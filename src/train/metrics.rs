//! The run's metrics log, `RUN/metrics.jsonl`: one JSON object per
//! optimiser step, appended and flushed as the step ends. On resume the
//! lines after the checkpoint's step are dropped (they are replayed), so
//! the log of a resumed run reads like that of an uninterrupted one.
//!
//! Every numeric field of a line is also a TensorBoard scalar of the same
//! name (`RUN/tensorboard/`, see [`crate::artifacts::events`]): a writer
//! opened at step `upto` starts a new event file that tells TensorBoard to
//! drop the earlier files' points after `upto`, as the lines are dropped.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::artifacts::events::{numeric_fields, EventWriter};

/// One step. Loss values are `null` for a step skipped as non-finite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimiser steps done, this one included (1-based).
    pub step: u64,
    /// Epochs of data consumed.
    pub epoch: f64,
    /// Weighted total loss (mean over the step's micro-batches).
    pub loss: Option<f64>,
    /// Unweighted terms: `loss_text`, `loss_image`, `loss_recon`; plan
    /// mass `mass_<target>` and the share of it on matching pairs
    /// `matched_<target>`.
    #[serde(flatten)]
    pub terms: BTreeMap<String, Option<f64>>,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: Option<f64>,
    pub volumes_per_s: f64,
    /// Seconds this step waited for the loader.
    pub data_wait_s: f64,
    /// Data-parallel runs: seconds this step spent averaging gradients
    /// across ranks (rank 0's view; absent in single-process runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
    pub skipped: bool,
    pub nonfinite_total: u64,
    pub elapsed_s: f64,
}

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    events: EventWriter,
}

/// Fields of a line that are not scalars to plot.
const NOT_SCALARS: &[&str] = &["step"];

/// Reads a metrics log, skipping a torn last line.
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

impl MetricsLog {
    /// Opens `RUN/metrics.jsonl` keeping only the lines of steps <= `upto`.
    pub fn open(run: &Path, upto: u64) -> Result<MetricsLog> {
        let path = crate::artifacts::run::metrics_jsonl(run);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        // Kept lines stay byte for byte: a parse and re-print of a float
        // may move its last digit.
        let mut body = String::new();
        for line in text.lines() {
            if serde_json::from_str::<StepMetrics>(line).is_ok_and(|m| m.step <= upto) {
                body.push_str(line);
                body.push('\n');
            }
        }
        crate::fsutil::atomic_write(&path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut events = EventWriter::create(&crate::artifacts::run::tensorboard_dir(run))?;
        events.start_at(upto + 1)?;
        Ok(MetricsLog { path, file, events })
    }

    pub fn append(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        self.events.scalars(m.step, &numeric_fields(m, NOT_SCALARS))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: step as f64 / 10.0,
            loss: Some(1.0 / step as f64),
            terms: [("loss_text".to_string(), Some(0.5)), ("loss_recon".into(), None)].into(),
            lr: 1e-4,
            grad_norm: Some(2.0),
            volumes_per_s: 3.0,
            data_wait_s: 0.0,
            allreduce_s: None,
            skipped: false,
            nonfinite_total: 0,
            elapsed_s: 1.0,
        }
    }

    #[test]
    fn resume_drops_replayed_lines_and_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(d.path(), 0).unwrap();
        for s in 1..=5 {
            log.append(&m(s)).unwrap();
        }
        drop(log);
        let p = crate::artifacts::run::metrics_jsonl(d.path());
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"step\":6,\"epo").unwrap();
        let before = std::fs::read_to_string(&p).unwrap();
        let log = MetricsLog::open(d.path(), 3).unwrap();
        drop(log);
        let back = read(&p).unwrap();
        assert_eq!(back, vec![m(1), m(2), m(3)]);
        // the kept lines are the very bytes written
        let after = std::fs::read_to_string(&p).unwrap();
        assert!(before.starts_with(&after) && after.lines().count() == 3);
        let line = std::fs::read_to_string(&p).unwrap();
        assert!(line.starts_with("{\"step\":1,"), "{line}");
        assert!(line.contains("\"loss_text\":0.5") && line.contains("\"loss_recon\":null"));
    }
}
