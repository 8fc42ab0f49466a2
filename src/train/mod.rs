//! The pretrain stage: SwinUNETR + PSAT aligned to the cached 2D
//! embeddings by partial optimal transport, plus reconstruction (docs/method.md).
//!
//! It writes a run folder (`artifacts::run` names every file of it and
//! holds the checkpoint reader and writer). Pieces: `config` (the
//! `pretrain` section), `data` (dataset, sampling, loader threads), `model`
//! (backbone + head + losses), `metrics` and `plot`, `noise` (swapped targets for the noise
//! experiment), and the loop in `trainer`. The optimiser, schedule and
//! seeded random streams are shared with fine-tuning (`crate::runtime`).
//!
//! Named `train` for what the code does; users call the stage `pretrain`
//! (`med3d pretrain`), and fine-tuning lives in `downstream`.
pub mod alignment_eval;
pub mod config;
pub mod data;
pub mod metrics;
pub mod model;
pub mod noise;
pub mod plot;
mod signals;
pub mod steps;
pub mod targets;
pub mod trainer;

pub use config::{PretrainConfig, PretrainRun};
pub use trainer::{run, Options, Status, StepOutcome, Summary, Trainer};
