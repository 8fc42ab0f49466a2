//! How many volumes one optimiser step consumes, and so how many steps a
//! run takes: the one definition of the global batch (`batch_size` x
//! `accumulate` x ranks) that step counts, resumes, the loader's position
//! and the logs all use.
use super::config::PretrainConfig;
use crate::artifacts::run::State;

/// The volumes of one optimiser step, over all ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalBatch {
    /// Volumes per micro-batch (`pretrain.batch_size`).
    pub batch: usize,
    /// Micro-batches per rank and step (`pretrain.optimizer.accumulate`).
    pub accumulate: usize,
    /// Ranks.
    pub world: usize,
}

impl GlobalBatch {
    pub fn of(cfg: &PretrainConfig, world: usize) -> GlobalBatch {
        GlobalBatch {
            batch: cfg.batch_size,
            accumulate: cfg.optimizer.accumulate,
            world,
        }
    }

    /// Volumes per optimiser step.
    pub fn volumes(&self) -> usize {
        self.batch * self.accumulate * self.world
    }

    /// Micro-batches (of `batch` volumes) per optimiser step, all ranks:
    /// what the loader's position advances by.
    pub fn micro_batches(&self) -> u64 {
        (self.accumulate * self.world) as u64
    }
}

impl std::fmt::Display for GlobalBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} volumes ({} per micro-batch x {} accumulated x {} ranks)",
            self.volumes(),
            self.batch,
            self.accumulate,
            self.world
        )
    }
}

/// Optimiser steps of the whole run (single process).
pub fn total_steps(cfg: &PretrainConfig, epoch_len: usize) -> u64 {
    total_steps_for(cfg, epoch_len, 1)
}

/// Optimiser steps of the whole run on `world` ranks: `epochs` count
/// passes over the data, so a larger global batch takes fewer steps.
pub fn total_steps_for(cfg: &PretrainConfig, epoch_len: usize, world: usize) -> u64 {
    cfg.max_steps.unwrap_or_else(|| {
        let per_step = GlobalBatch::of(cfg, world).volumes() as f64;
        ((cfg.epochs * epoch_len as f64) / per_step).ceil().max(1.0) as u64
    })
}

/// Steps of a run resumed under another world size: those done, plus
/// those the remaining samples take at the new global batch.
pub fn total_steps_resumed(cfg: &PretrainConfig, epoch_len: usize, world: usize, state: &State) -> u64 {
    if cfg.max_steps.is_some() {
        return total_steps_for(cfg, epoch_len, world);
    }
    let left = cfg.epochs * epoch_len as f64 - (state.data_position * cfg.batch_size as u64) as f64;
    let per_step = GlobalBatch::of(cfg, world).volumes() as f64;
    state.step + (left / per_step).ceil().max(0.0) as u64
}
