//! Downstream fine-tuning and evaluation: what shows whether pretraining
//! helped. `finetune` trains a segmentation SwinUNETR or an encoder
//! classifier from an export (or from scratch) on a labelled preprocess
//! cache; `evaluate` scores a run with MONAI's metrics (Dice, HD95,
//! accuracy, ROC AUC), segmenting whole volumes by sliding-window inference.
pub mod config;
pub mod data;
pub mod evaluate;
pub mod finetune;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod results;
pub mod sliding;

pub use config::{DownstreamConfig, DownstreamRun, Task};
