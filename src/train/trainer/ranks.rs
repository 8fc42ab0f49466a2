//! The run's scalar state and step values shared over the ranks of a
//! data-parallel run.
use anyhow::{Context, Result};
use tch::Tensor;

use crate::artifacts::run::State;
use crate::dist::Dist;

/// The step's scalar state, as rank 0 has it, on every rank.
pub(super) fn broadcast_state(d: &Dist, state: &mut State) -> Result<()> {
    let v = Tensor::from_slice(&[
        state.step as i64,
        state.data_position as i64,
        state.optimizer_t as i64,
        state.nonfinite_total as i64,
        state.nonfinite_streak as i64,
        state.elapsed_s.to_bits() as i64,
        state.world_size as i64,
    ])
    .to_device(d.device);
    d.broadcast(&v, 0).context("receiving the run state from rank 0")?;
    let v = Vec::<i64>::try_from(&v.to_device(tch::Device::Cpu))?;
    state.step = v[0] as u64;
    state.data_position = v[1] as u64;
    state.optimizer_t = v[2] as u64;
    state.nonfinite_total = v[3] as u64;
    state.nonfinite_streak = v[4] as u64;
    state.elapsed_s = f64::from_bits(v[5] as u64);
    state.world_size = v[6] as u64;
    Ok(())
}

/// Sums `values` over the ranks, in place.
pub(super) fn sum_over_ranks(d: &Dist, values: &mut [f64]) -> Result<()> {
    let t = Tensor::from_slice(values).to_device(d.device);
    d.all_reduce_sum(&t)?;
    values.copy_from_slice(&Vec::<f64>::try_from(&t.to_device(tch::Device::Cpu))?);
    Ok(())
}
