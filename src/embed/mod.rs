//! The embed stage: slices and captions -> frozen 2D embeddings, one row
//! per slice of the index.
//!
//! ```text
//! cache/embeddings/text.safetensors    embeddings f32 [N, D], valid u8 [N]; rows in index.jsonl order
//! cache/embeddings/image.safetensors   likewise, when an image encoder is configured
//! cache/embeddings/parts/<table>-<key>.safetensors   finished chunks (resume points)
//! cache/embeddings/embed-report.json   what the last run did
//! ```
//! A row is valid when its slice has an `ok` caption (text) or a readable
//! PNG (image); invalid rows are zeros. Each table's metadata names the
//! encoder, its weights file and sha256, the tokenizer or preprocessing,
//! and hashes of the index order and of the inputs. The rows are cut into
//! chunks; a finished chunk is written atomically under a name keyed by the
//! encoder and the chunk's inputs, so a killed run resumes where it stopped
//! and a rerun recomputes only chunks whose captions or images changed. A
//! table whose encoder, index and inputs are unchanged is skipped without
//! loading the model.
pub mod encode;

mod table;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::artifacts::cache::read_index;
use crate::artifacts::embeddings::TargetKind;
use crate::encoders::{Env, ImagePlan, ImageSpec, TextPlan, TextSpec};
use crate::fsutil::sweep_stale_tmp;
use table::{embed_table, Inputs, Plan};

/// Bumped whenever the tables' layout or meaning changes.
pub const EMBED_FORMAT: &str = "med3d-embeddings/1";

pub use crate::runtime::DeviceChoice;

/// The experiment's `embed` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// The text encoder (default: all-MiniLM-L6-v2).
    pub text: TextSpec,
    /// The image encoder; absent: text embeddings only.
    pub image: Option<ImageSpec>,
    /// Inputs per forward pass.
    pub batch_size: usize,
    /// Index rows per resume chunk.
    pub chunk_rows: usize,
    pub device: DeviceChoice,
    /// A Hugging Face hub cache folder searched before the hub client's
    /// defaults (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub).
    pub hf_cache: Option<PathBuf>,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            text: TextSpec::default(),
            image: None,
            batch_size: 64,
            chunk_rows: 1024,
            device: DeviceChoice::Auto,
            hf_cache: None,
        }
    }
}

impl EmbedConfig {
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.batch_size > 0, "embed.batch_size must be positive");
        anyhow::ensure!(self.chunk_rows > 0, "embed.chunk_rows must be positive");
        Ok(())
    }

    pub fn env(&self, cache: &Path) -> Env {
        Env {
            hub_caches: crate::encoders::weights::hub_caches(self.hf_cache.as_deref()),
            hash_memo: Some(crate::artifacts::cache::embeddings_dir(cache).join(".weights-sha256.json")),
        }
    }
}

/// What happened to one table.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TableSummary {
    pub table: String,
    pub encoder: String,
    pub path: PathBuf,
    pub rows: usize,
    pub valid: usize,
    pub dim: usize,
    /// The stored table was current: nothing loaded or computed.
    pub up_to_date: bool,
    pub chunks_reused: usize,
    pub chunks_computed: usize,
    pub rows_computed: usize,
    pub seconds: f64,
    pub failures: Vec<RowFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowFailure {
    pub slice_id: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Summary {
    pub device: String,
    pub text: TableSummary,
    pub image: Option<TableSummary>,
    /// Slices without an `ok` caption (their text rows are invalid).
    pub uncaptioned: usize,
    /// Lines of captions.jsonl that could not be parsed (skipped).
    pub bad_caption_lines: usize,
}

impl Summary {
    pub fn failed(&self) -> usize {
        self.text.failures.len() + self.image.as_ref().map(|i| i.failures.len()).unwrap_or(0)
    }
}

pub use crate::caption::store::read_ok_captions;
/// Options of one run beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Captions file; default `<cache>/captions.jsonl`.
    pub captions: Option<PathBuf>,
    /// Tables folder; default `<cache>/embeddings` (the one pretraining
    /// reads). Another folder holds tables of other captions of the same
    /// slices, e.g. for `med3d evaluate-alignment --embeddings`.
    pub out: Option<PathBuf>,
}

/// Runs the stage over a cache.
pub fn run(cfg: &EmbedConfig, cache: &Path, opts: &RunOptions) -> Result<Summary> {
    cfg.validate()?;
    let rows = read_index(cache)?;
    let out_dir = opts
        .out
        .clone()
        .unwrap_or_else(|| crate::artifacts::cache::embeddings_dir(cache));
    let parts = out_dir.join("parts");
    std::fs::create_dir_all(&parts).with_context(|| format!("cannot create {}", parts.display()))?;
    sweep_stale_tmp(&out_dir)?;
    sweep_stale_tmp(&parts)?;
    let device = cfg.device.resolve("embed.device")?;
    let env = cfg.env(cache);
    let index_sha = crate::artifacts::cache::index_sha256(&rows);

    let captions_path = opts
        .captions
        .clone()
        .unwrap_or_else(|| crate::artifacts::cache::captions_path(cache));
    let (captions, bad_lines) = read_ok_captions(&captions_path)?;
    if bad_lines > 0 {
        tracing::warn!("{}: {bad_lines} unparsable lines skipped", captions_path.display());
    }
    let texts: Vec<Option<String>> = rows.iter().map(|r| captions.get(&r.slice_id).cloned()).collect();
    let uncaptioned = texts.iter().filter(|t| t.is_none()).count();
    let text_plan = Plan::Text(TextPlan::new(&cfg.text, &env).context("text encoder")?);
    let text = embed_table(
        TargetKind::Text,
        &text_plan,
        &Inputs::Text(texts),
        &rows,
        &index_sha,
        cfg,
        device,
        &out_dir,
    )?;

    let image = match &cfg.image {
        None => {
            tracing::info!(
                "no image encoder configured: text embeddings only; pretraining will use the text term alone"
            );
            None
        }
        Some(spec) => {
            let plan = Plan::Image(ImagePlan::new(spec, &env).context("image encoder")?);
            let pngs = rows
                .iter()
                .map(|r| {
                    let p = cache.join(&r.png);
                    match crate::fsutil::sha256_file(&p) {
                        Ok(h) => Ok((p, h)),
                        Err(e) => Err(format!("{e:#}")),
                    }
                })
                .collect();
            Some(embed_table(
                TargetKind::Image,
                &plan,
                &Inputs::Image(pngs),
                &rows,
                &index_sha,
                cfg,
                device,
                &out_dir,
            )?)
        }
    };
    let s = Summary {
        device: format!("{device:?}"),
        text,
        image,
        uncaptioned,
        bad_caption_lines: bad_lines,
    };
    crate::fsutil::atomic_write(&out_dir.join("embed-report.json"), &serde_json::to_vec_pretty(&s)?)?;
    Ok(s)
}
