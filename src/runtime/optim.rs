//! Adam / AdamW on tch tensors, with its state (first and second moments,
//! step count) held here so a checkpoint can save and restore it exactly;
//! the learning-rate schedule (linear warm-up, then cosine or constant);
//! and global-norm gradient clipping. The arithmetic follows
//! torch.optim.AdamW / Adam (foreach=False) and
//! torch.nn.utils.clip_grad_norm_.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Decoupled weight decay (torch.optim.AdamW).
    Adamw,
    /// L2 weight decay added to the gradient (torch.optim.Adam, the paper's).
    Adam,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warm-up, then cosine decay to `min_lr` at the last step.
    Cosine,
    /// Linear warm-up, then `lr` throughout.
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub schedule: Schedule,
    /// Optimiser steps of linear warm-up from lr/warmup_steps to lr.
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub clip_grad_norm: f64,
    /// Micro-batches whose gradients are summed into one optimiser step.
    pub accumulate: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::Adamw,
            lr: 1e-5,
            min_lr: 0.0,
            weight_decay: 1e-5,
            betas: [0.9, 0.999],
            eps: 1e-8,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            clip_grad_norm: 0.0,
            accumulate: 1,
        }
    }
}

/// Learning rate of optimiser step `step` (0-based) of `total`.
pub fn lr_at(cfg: &OptimConfig, step: u64, total: u64) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    match cfg.schedule {
        Schedule::Constant => cfg.lr,
        Schedule::Cosine => {
            let span = total.saturating_sub(cfg.warmup_steps).saturating_sub(1).max(1);
            let t = ((step - cfg.warmup_steps) as f64 / span as f64).min(1.0);
            cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

/// The optimiser over a var store's trainable variables, in name order.
#[derive(Debug)]
pub struct Adam {
    cfg: OptimConfig,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Updates applied so far (bias correction uses it).
    pub t: u64,
}

impl Adam {
    pub fn new(vs: &VarStore, cfg: &OptimConfig) -> Adam {
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |p: &Tensor| tch::no_grad(|| p.zeros_like());
        Adam {
            cfg: cfg.clone(),
            exp_avg: params.iter().map(|(_, p)| zeros(p)).collect(),
            exp_avg_sq: params.iter().map(|(_, p)| zeros(p)).collect(),
            params,
            t: 0,
        }
    }

    /// The optimised variables, in name order.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Number of parameters (scalars) being optimised.
    pub fn numel(&self) -> i64 {
        self.params.iter().map(|(_, p)| p.numel() as i64).sum()
    }

    /// L2 norm of all gradients together (the norm of the per-tensor norms).
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.detach().to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        Tensor::stack(&norms, 0).norm().double_value(&[])
    }

    /// Scales the gradients so their global norm is at most `max_norm`,
    /// given their current norm.
    pub fn clip(&self, max_norm: f64, norm: f64) {
        let coef = max_norm / (norm + 1e-6);
        if coef >= 1.0 {
            return;
        }
        tch::no_grad(|| {
            for (_, p) in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        });
    }

    pub fn zero_grad(&self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// One update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.t += 1;
        let [b1, b2] = self.cfg.betas;
        let wd = self.cfg.weight_decay;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.t as i32)).sqrt();
        tch::no_grad(|| {
            for (((_, p), m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let (mut m, mut v) = (m.shallow_clone(), v.shallow_clone());
                let g = match self.cfg.kind {
                    OptimizerKind::Adam if wd != 0.0 => &g + &p * wd,
                    _ => g,
                };
                if self.cfg.kind == OptimizerKind::Adamw && wd != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = v.g_mul_scalar_(b2);
                let _ = v.g_add_(&(&g * &g * (1.0 - b2)));
                let denom = v.sqrt() / bc2_sqrt + self.cfg.eps;
                let _ = p.g_sub_(&(&m / denom * (lr / bc1)));
            }
        });
    }

    /// The state as named tensors (`exp_avg.<var>`, `exp_avg_sq.<var>`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (((n, _), m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            out.push((format!("exp_avg.{n}"), m.shallow_clone()));
            out.push((format!("exp_avg_sq.{n}"), v.shallow_clone()));
        }
        out
    }

    /// Restores the state saved by `state_tensors`; every tensor must be
    /// there with its variable's shape.
    pub fn load_state(&mut self, tensors: Vec<(String, Tensor)>, t: u64, source: &str) -> Result<()> {
        let mut map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        for (((n, p), m), v) in self.params.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
            for (prefix, dst) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let key = format!("{prefix}.{n}");
                let Some(src) = map.remove(&key) else {
                    bail!("{source}: no optimiser state {key}: the checkpoint is of another model");
                };
                if src.size() != p.size() {
                    bail!("{source}: {key} has shape {:?}, the model {:?}", src.size(), p.size());
                }
                tch::no_grad(|| dst.copy_(&src.to_kind(p.kind())));
            }
        }
        if let Some(extra) = map.keys().next() {
            bail!("{source}: optimiser state {extra} matches no variable of the model");
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_reaches_min_lr_at_the_last_step() {
        let cfg = OptimConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            ..Default::default()
        };
        assert_eq!(lr_at(&cfg, 0, 20), 0.25);
        assert_eq!(lr_at(&cfg, 3, 20), 1.0);
        assert_eq!(lr_at(&cfg, 4, 20), 1.0);
        assert!((lr_at(&cfg, 19, 20) - 0.1).abs() < 1e-12);
        let mid = lr_at(&cfg, 4 + 15 / 2, 20);
        assert!(mid > 0.5 && mid < 0.6, "{mid}");
        let c = OptimConfig {
            schedule: Schedule::Constant,
            ..cfg
        };
        assert_eq!(lr_at(&c, 19, 20), 1.0);
    }

    #[test]
    fn first_adamw_step_matches_the_closed_form() {
        let vs = VarStore::new(tch::Device::Cpu);
        let p = vs.root().var_copy("p", &Tensor::from_slice(&[2.0f32, -1.0]));
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.5,
            eps: 1e-8,
            ..Default::default()
        };
        let mut opt = Adam::new(&vs, &cfg);
        let loss = (&p * Tensor::from_slice(&[3.0f32, 0.5])).sum(Kind::Float);
        loss.backward();
        assert!((opt.grad_norm() - (9.0f64 + 0.25).sqrt()).abs() < 1e-6);
        opt.step(0.1);
        // decay first, then m_hat / (sqrt(v_hat) + eps) = sign(g) on step 1
        let want = [2.0 * (1.0 - 0.05) - 0.1, -(1.0 - 0.05) - 0.1];
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.t, 1);
    }
}
