//! Alignment of the 3D model's plane-slice embeddings with the frozen 2D
//! embeddings: optimal-transport plans and the losses built on them, and
//! the metrics of how well two sets of embeddings are aligned (`metrics`).
pub mod metrics;
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

/// The paper's transported mass (docs/method.md).
pub const DEFAULT_MASS: f64 = 0.95;

/// Default of [`Transport::cpu_max_rows`]: the paper's B = 10 and the
/// all-gathered batches of a few nodes (B up to 256) solve on the CPU.
pub const DEFAULT_CPU_MAX_ROWS: i64 = 256;

/// The size rule: a CPU cost stays there; one on an accelerator comes to
/// the CPU when it has at most `cpu_max_rows` rows.
pub fn solved_on_cpu(device: Device, rows: i64, cpu_max_rows: i64) -> bool {
    device == Device::Cpu || (rows > 0 && rows <= cpu_max_rows)
}

/// One transport objective: its plan, its solver settings, and which
/// implementation solves it. The one place that chooses: the partial plan
/// runs fused on the CPU (plain loops and a hand-written reverse pass:
/// forward + backward 6-300x faster than 1000 iterations of recorded
/// libtorch ops at B = 256..10, bench/ot_bench.py), also for a cost on an
/// accelerator with at most `cpu_max_rows` rows (the B x B cost goes down,
/// its gradient comes back up: two small copies instead of thousands of
/// tiny kernel launches); larger plans on an accelerator, and the balanced
/// plan, run as libtorch ops under autograd where the cost is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transport {
    pub plan: Plan,
    pub solver: ot::Solver,
    /// Costs off the CPU with at most this many rows are solved on the
    /// CPU; 0 keeps every plan on its device.
    pub cpu_max_rows: i64,
}

impl Transport {
    /// Whether the partial plan of `cost` is solved by the fused CPU solver.
    pub fn fused_on_cpu(&self, cost: &Tensor) -> bool {
        let rows = cost.size().iter().rev().nth(1).copied().unwrap_or(0);
        solved_on_cpu(cost.device(), rows, self.cpu_max_rows)
    }

    /// The log plan (detached) and the plan cross-entropy loss
    /// `-sum_i log(pi_ii) / B`, differentiable back to `cost`, both on
    /// `cost`'s device.
    pub fn plan_loss(&self, cost: &Tensor) -> Result<(Tensor, Tensor)> {
        match self.plan {
            Plan::Partial { mass } if self.fused_on_cpu(cost) => {
                let device = cost.device();
                // `to_device` is differentiable: the CPU gradient flows back.
                let c = cost.to_device(Device::Cpu);
                let f = pot_fused::partial_plan_cross_entropy(&c, mass, &self.solver)?;
                Ok((f.log_plan.to_device(device), f.loss.to_device(device)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_rule_sends_small_gpu_plans_to_the_cpu() {
        let gpu = Device::Cuda(0);
        assert!(solved_on_cpu(Device::Cpu, 4096, 0));
        assert!(solved_on_cpu(gpu, 10, DEFAULT_CPU_MAX_ROWS));
        assert!(solved_on_cpu(gpu, 256, DEFAULT_CPU_MAX_ROWS));
        assert!(!solved_on_cpu(gpu, 257, DEFAULT_CPU_MAX_ROWS));
        assert!(!solved_on_cpu(gpu, 10, 0));
    }

    #[test]
    fn a_cpu_cost_gives_the_fused_loss_and_gradient() {
        let t = Transport {
            plan: Plan::Partial { mass: 0.9 },
            solver: ot::Solver::default(),
            cpu_max_rows: 0,
        };
        let c = Tensor::rand([6, 6], (tch::Kind::Double, Device::Cpu)).set_requires_grad(true);
        let (_, loss) = t.plan_loss(&c).unwrap();
        loss.backward();
        let want = pot_fused::partial_plan_cross_entropy(&c.detach(), 0.9, &t.solver).unwrap();
        assert!((loss.double_value(&[]) - want.loss.double_value(&[])).abs() < 1e-12);
        assert!(c.grad().abs().sum(tch::Kind::Double).double_value(&[]) > 0.0);
    }
}
