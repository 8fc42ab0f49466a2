//! The pretrain stage: SwinUNETR + PSAT aligned to the cached 2D
//! embeddings by partial optimal transport, plus reconstruction (METHOD.md).
//!
//! ```text
//! RUN/run.json          the pretrain config, its hash, data hash, device, parameter count
//! RUN/metrics.jsonl     one JSON line per optimiser step
//! RUN/checkpoints/      step-<n>/{model,optimizer}.safetensors + state.json, and `latest`
//! RUN/loss.png          the loss curves, drawn at the end (and on interruption)
//! RUN/summary.json      how the last invocation ended
//! ```
//! Pieces: `config` (the `pretrain` section), `data` (dataset, sampling,
//! loader threads), `model` (backbone + head + losses), `checkpoint`,
//! `metrics` and `plot`, `noise` (swapped targets for the noise
//! experiment), and the loop in `trainer`. The optimiser, schedule and
//! seeded random streams are shared with fine-tuning (`crate::runtime`).
//!
//! Named `train` for what the code does; users call the stage `pretrain`
//! (`med3d pretrain`), and fine-tuning lives in `downstream`.
pub mod alignment_eval;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod metrics;
pub mod model;
pub mod noise;
pub mod plot;
pub mod run_dir;
mod signals;
pub mod steps;
pub mod targets;
pub mod trainer;

pub use config::PretrainConfig;
pub use trainer::{run, Options, Status, Summary};
