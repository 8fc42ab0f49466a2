//! med3dinsight: language-aligned pretraining of 3D medical image encoders
//! (Med3DInsight), as staged subcommands over files. docs/architecture.md
//! describes the stages and their artifacts; each module below is one piece
//! of that pipeline.

// Affine and matrix code reads best as index loops over rows and columns.
#![allow(clippy::needless_range_loop)]

/// med3d's version, recorded in every artifact it writes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod align;
pub mod alloc;
pub mod artifacts;
pub mod caption;
pub mod config;
pub mod convert;
pub mod dist;
pub mod doctor;
pub mod downstream;
pub mod embed;
pub mod encoders;
pub mod export;
pub mod fsutil;
pub mod fuzz;
pub mod info;
pub mod manifest;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod progress;
pub mod runtime;
pub mod train;
pub mod volume;
