//! What a caption run reports (caption-report.json and the summary line).
use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::openai;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Summary {
    pub shard: String,
    pub backend: String,
    pub model: String,
    /// Slices in this shard.
    pub total: usize,
    /// Captioned `ok` in this run.
    pub captioned: usize,
    pub dropped: usize,
    pub failed: usize,
    /// Already done before this run.
    pub skipped: usize,
    /// Slices that needed more than one request.
    pub retried: usize,
    pub requests: u64,
    /// Slices asked once more because their caption was repeated.
    pub asked_again: usize,
    /// This shard's slices whose final record carries a flag (failed ones
    /// included: a slice that failed because every reply was empty counts).
    pub flagged: usize,
    pub flag_counts: HashMap<String, usize>,
    /// Slices not attempted because the run stopped.
    pub not_attempted: usize,
    /// Why the run stopped early (e.g. the server refused the key).
    pub stopped: Option<String>,
    /// Tokens the server reported for this run's requests (0 when it
    /// reports none), and completion tokens per second of the run.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub completion_tokens_per_s: f64,
    /// The openai backend: requests, failures and tokens per server.
    pub servers: Vec<openai::ServerStats>,
    pub seconds: f64,
    pub captions: PathBuf,
    pub failures: Vec<SliceFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SliceFailure {
    pub slice_id: String,
    pub error: String,
}
