//! Alignment of the 3D model's plane-slice embeddings with the frozen 2D
//! embeddings: optimal-transport plans and the losses built on them.
pub mod ot;
pub mod pot_fused;

use anyhow::Result;
use tch::{Device, Tensor};

/// The transport plan one alignment term is built on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Plan {
    /// Entropic partial Wasserstein, transporting `mass` (the method).
    Partial { mass: f64 },
    /// Balanced entropic OT (Sinkhorn).
    Balanced,
}

/// The paper's transported mass (METHOD.md).
pub const DEFAULT_MASS: f64 = 0.95;

/// One transport objective: its plan, its solver settings, and which
/// implementation solves it. The one place that chooses: on the CPU the
/// partial plan runs fused (plain loops and a hand-written reverse pass:
/// forward + backward 6-300x faster than 1000 iterations of recorded
/// libtorch ops at B = 256..10, bench/ot_bench.py); elsewhere, and for the
/// balanced plan, libtorch ops under autograd.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transport {
    pub plan: Plan,
    pub solver: ot::Solver,
}

impl Transport {
    /// The log plan (detached) and the plan cross-entropy loss
    /// `-sum_i log(pi_ii) / B`, differentiable back to `cost`.
    pub fn plan_loss(&self, cost: &Tensor) -> Result<(Tensor, Tensor)> {
        match self.plan {
            Plan::Partial { mass } if cost.device() == Device::Cpu => {
                let f = pot_fused::partial_plan_cross_entropy(cost, mass, &self.solver)?;
                Ok((f.log_plan, f.loss))
            }
            Plan::Partial { mass } => {
                let lp = ot::partial_wasserstein_log(cost, mass, &self.solver);
                let t = ot::plan_cross_entropy(&lp);
                Ok((lp, t))
            }
            Plan::Balanced => {
                let lp = ot::sinkhorn_log(cost, &self.solver);
                let t = ot::plan_cross_entropy(&lp);
                Ok((lp, t))
            }
        }
    }
}
