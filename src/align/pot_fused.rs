//! The partial-OT loss of docs/method.md, L = -sum_i log(pi_ii) / B, computed
//! in plain Rust (float64) with a hand-written reverse pass through every
//! solver iteration, for the CPU.
//!
//! `ot::partial_wasserstein_log` records each iteration as libtorch ops for
//! autograd: ~15 ops per iteration, 1000 iterations, so a B x B problem
//! with B = 10..64 spends its time in op dispatch and autograd bookkeeping
//! rather than arithmetic, and every log-sum-exp takes n x m
//! exponentials. Here the same iteration (log K = L0 + r + c + s, see
//! `ot`) runs as loops over E = exp(L0 - max): each log-sum-exp is a
//! matrix-vector product (see `Problem`), only the potentials of each
//! iteration are kept (O(B) per iteration), and the backward pass replays
//! them in reverse, rebuilding the softmax weights from E. The result enters autograd as
//! `L + sum((C - C.detach()) * dL/dC)`: value L, gradient dL/dC exactly.
//! With `tol > 0` each problem of a batch stops on its own (`ot` stops a
//! batch when its worst problem has converged).
//! Plans and gradients equal POT's (tests/ot_parity.rs).
// Index loops over i (rows) and j (columns) mirror the formulas.
#![allow(clippy::needless_range_loop)]

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::ot::{self, Solver};

/// The loss (differentiable with respect to the cost when it requires
/// grad) and the log plan (detached), as `plan_cross_entropy` and
/// `partial_wasserstein_log` would give them.
#[derive(Debug)]
pub struct PotLoss {
    pub loss: Tensor,
    pub log_plan: Tensor,
}

/// Potentials after one iteration, and the log-sum-exps that made them.
struct Step {
    r: Vec<f64>,
    c: Vec<f64>,
    s: f64,
    /// Row log-sum-exps of L0 + c_prev.
    row_lse: Vec<f64>,
    /// Column log-sum-exps of L0 + r.
    col_lse: Vec<f64>,
}

fn lse(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = v.clone().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + v.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Whether the last iteration changed log K by less than `tol` (Frobenius).
fn converged(steps: &[Step], n: usize, m: usize, tol: f64) -> bool {
    let Some(cur) = steps.last() else {
        return false;
    };
    let (zr, zc) = (vec![0.0; n], vec![0.0; m]);
    let (r0, c0, s0) = match steps.len() {
        1 => (&zr, &zc, 0.0),
        k => (&steps[k - 2].r, &steps[k - 2].c, steps[k - 2].s),
    };
    let mut err = 0.0;
    for i in 0..n {
        for j in 0..m {
            let d = (cur.r[i] - r0[i]) + (cur.c[j] - c0[j]) + (cur.s - s0);
            err += d * d;
        }
    }
    err.sqrt() < tol
}

/// Widest range of L0 = -C/eps (+ const) solved here: exp(L0 - max) then
/// stays above f64's smallest normal number (1e-308) with room to spare.
/// Wider ranges go to the libtorch solver.
const MAX_RANGE: f64 = 600.0;

/// One problem: L0 (n x m, row-major), E = exp(L0 - max L0), and the
/// iterations. The log-sum-exps are log(E @ exp(c)) + max and likewise for
/// columns: a matrix-vector product with O(n + m) exponentials per
/// iteration instead of 2nm, exact in float64 because E's entries cannot
/// underflow (see MAX_RANGE) and every sum is of positive terms.
struct Problem {
    n: usize,
    m: usize,
    l0: Vec<f64>,
    e: Vec<f64>,
    top: f64,
    steps: Vec<Step>,
}

impl Problem {
    /// None when L0's range is too wide for the exponential form.
    fn solve(cost: &[f64], n: usize, m: usize, mass: f64, sv: &Solver) -> Option<Problem> {
        let (la, lb, lmass) = (-(n as f64).ln(), -(m as f64).ln(), mass.ln());
        let raw: Vec<f64> = cost.iter().map(|c| -c / sv.reg).collect();
        let h0 = lmass - lse(raw.iter().copied());
        let l0: Vec<f64> = raw.iter().map(|v| v + h0).collect();
        let top = l0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let bottom = l0.iter().copied().fold(f64::INFINITY, f64::min);
        if top - bottom > MAX_RANGE || (top - bottom).is_nan() {
            return None;
        }
        let e: Vec<f64> = l0.iter().map(|v| (v - top).exp()).collect();
        let mut steps: Vec<Step> = Vec::with_capacity(sv.max_iter);
        let (mut c, mut s) = (vec![0.0; m], 0.0);
        let mut ec = vec![1.0; m];
        let mut colsum = vec![0.0; m];
        for it in 0..sv.max_iter {
            // rows of L0 + c + s at most a
            let row_lse: Vec<f64> = (0..n)
                .map(|i| {
                    let row = &e[i * m..(i + 1) * m];
                    top + row.iter().zip(&ec).map(|(a, b)| a * b).sum::<f64>().ln()
                })
                .collect();
            let r: Vec<f64> = row_lse.iter().map(|&rl| (la - s - rl).min(0.0)).collect();
            // columns of L0 + r + s at most b
            colsum.fill(0.0);
            for (i, ri) in r.iter().enumerate() {
                let er = ri.exp();
                for (acc, v) in colsum.iter_mut().zip(&e[i * m..(i + 1) * m]) {
                    *acc += v * er;
                }
            }
            let col_lse: Vec<f64> = colsum.iter().map(|v| top + v.ln()).collect();
            let c_new: Vec<f64> = (0..m).map(|j| (lb - s - col_lse[j]).min(0.0)).collect();
            // mass m, from the column sums
            let s_new = lmass - lse((0..m).map(|j| col_lse[j] + c_new[j]));
            c.clone_from(&c_new);
            for (x, cj) in ec.iter_mut().zip(&c) {
                *x = cj.exp();
            }
            s = s_new;
            steps.push(Step {
                r,
                c: c_new,
                s: s_new,
                row_lse,
                col_lse,
            });
            // as `ot`: every 10 iterations, ||log K_prev - log K||_F < tol
            if sv.tol > 0.0 && it % 10 == 0 && converged(&steps, n, m, sv.tol) {
                break;
            }
        }
        Some(Problem {
            n,
            m,
            l0,
            e,
            top,
            steps,
        })
    }

    fn log_plan(&self) -> Vec<f64> {
        let Some(st) = self.steps.last() else {
            return self.l0.clone();
        };
        let m = self.m;
        (0..self.n * m)
            .map(|k| self.l0[k] + st.r[k / m] + st.c[k % m] + st.s)
            .collect()
    }

    /// dL/dcost for L = scale * sum_i log pi_ii.
    fn grad(&self, scale: f64, mass: f64, sv: &Solver) -> Vec<f64> {
        let (n, m, top) = (self.n, self.m, self.top);
        let (la, lb, lmass) = (-(n as f64).ln(), -(m as f64).ln(), mass.ln());
        let d = n.min(m);
        let mut gl0 = vec![0.0; n * m];
        let mut gr = vec![0.0; n];
        let mut gc = vec![0.0; m];
        for i in 0..d {
            gl0[i * m + i] = scale;
            gr[i] = scale;
            gc[i] = scale;
        }
        let mut gs = scale * d as f64;
        let zeros = vec![0.0; m];
        let mut ga = vec![0.0; m];
        let mut gcp = vec![0.0; m];
        let mut ecp = vec![0.0; m];
        for k in (0..self.steps.len()).rev() {
            let st = &self.steps[k];
            let (cp, sp) = match k {
                0 => (&zeros, 0.0),
                _ => (&self.steps[k - 1].c, self.steps[k - 1].s),
            };
            let mut gsp = 0.0;
            // s = lmass - lse_j(A_j + c_j)
            for j in 0..m {
                let w = (st.col_lse[j] + st.c[j] + st.s - lmass).exp();
                ga[j] = -gs * w;
                gc[j] -= gs * w;
            }
            // c_j = min(0, lb - s_prev - A_j); clamp passes the gradient where x <= 0
            for j in 0..m {
                if lb - sp - st.col_lse[j] <= 0.0 {
                    gsp -= gc[j];
                    ga[j] -= gc[j];
                }
            }
            // A_j = lse_i(L0_ij + r_i): weights E_ij exp(r_i) exp(top - A_j)
            for j in 0..m {
                ga[j] *= (top - st.col_lse[j]).exp();
            }
            for i in 0..n {
                let er = st.r[i].exp();
                let row = &self.e[i * m..(i + 1) * m];
                let g = &mut gl0[i * m..(i + 1) * m];
                let mut acc = 0.0;
                for j in 0..m {
                    let v = ga[j] * row[j] * er;
                    g[j] += v;
                    acc += v;
                }
                gr[i] += acc;
            }
            // r_i = min(0, la - s_prev - R_i), R_i = lse_j(L0_ij + c_prev_j):
            // weights E_ij exp(c_prev_j) exp(top - R_i)
            for (x, cj) in ecp.iter_mut().zip(cp) {
                *x = cj.exp();
            }
            gcp.fill(0.0);
            for i in 0..n {
                if la - sp - st.row_lse[i] > 0.0 {
                    continue;
                }
                gsp -= gr[i];
                let g_r = -gr[i] * (top - st.row_lse[i]).exp();
                let row = &self.e[i * m..(i + 1) * m];
                let g = &mut gl0[i * m..(i + 1) * m];
                for j in 0..m {
                    let v = g_r * row[j] * ecp[j];
                    g[j] += v;
                    gcp[j] += v;
                }
            }
            std::mem::swap(&mut gc, &mut gcp);
            gs = gsp;
            gr.fill(0.0);
        }
        // L0 = raw + lmass - lse_all(raw), raw = -C / eps, and
        // softmax_all(raw) = exp(L0 - lmass)
        let total: f64 = gl0.iter().sum();
        gl0.iter()
            .zip(&self.l0)
            .map(|(g, l)| -(g - total * (l - lmass).exp()) / sv.reg)
            .collect()
    }
}

/// Partial-OT plan cross-entropy of `cost` [..., n, m] (uniform marginals,
/// transported mass `mass`), averaged over leading dimensions, with its
/// gradient through the iterations. The cost must be on the CPU.
pub fn partial_plan_cross_entropy(cost: &Tensor, mass: f64, sv: &Solver) -> Result<PotLoss> {
    let size = cost.size();
    if size.len() < 2 || cost.device() != Device::Cpu {
        bail!(
            "partial OT: expected a CPU cost [..., n, m], got {:?} on {:?}",
            size,
            cost.device()
        );
    }
    let (n, m) = (size[size.len() - 2] as usize, size[size.len() - 1] as usize);
    let c64: Vec<f64> = Vec::<f64>::try_from(cost.detach().to_kind(Kind::Double).contiguous().view([-1]))?;
    let problems = c64.len().checked_div(n * m).unwrap_or(0);
    let scale = -1.0 / (m as f64 * problems.max(1) as f64);
    let want_grad = cost.requires_grad();
    let mut log_plan = Vec::with_capacity(c64.len());
    let mut grad = Vec::with_capacity(if want_grad { c64.len() } else { 0 });
    let mut loss = 0.0;
    for p in 0..problems {
        let Some(prob) = Problem::solve(&c64[p * n * m..(p + 1) * n * m], n, m, mass, sv) else {
            // costs too spread out for the exponential form
            let log_plan = ot::partial_wasserstein_log(cost, mass, sv);
            return Ok(PotLoss {
                loss: ot::plan_cross_entropy(&log_plan),
                log_plan: log_plan.detach(),
            });
        };
        let lp = prob.log_plan();
        loss += scale * (0..n.min(m)).map(|i| lp[i * m + i]).sum::<f64>();
        log_plan.extend_from_slice(&lp);
        if want_grad {
            grad.extend(prob.grad(scale, mass, sv));
        }
    }
    let kind = cost.kind();
    let log_plan = Tensor::from_slice(&log_plan).view(size.as_slice()).to_kind(kind);
    let value = Tensor::from(loss).to_kind(kind);
    let loss = if want_grad {
        let g = Tensor::from_slice(&grad).view(size.as_slice()).to_kind(kind);
        value + ((cost - cost.detach()) * g).sum(kind)
    } else {
        value
    };
    Ok(PotLoss { loss, log_plan })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(b: i64, seed: i64, scale: f64) -> Tensor {
        tch::manual_seed(seed);
        let c = Tensor::rand([2, b, b], (Kind::Double, Device::Cpu));
        &c / c.max() * scale
    }

    /// Loss, log plan and gradient of the libtorch solver under autograd.
    fn reference(c: &Tensor, sv: &Solver) -> (f64, Tensor, Tensor) {
        let c = c.detach().set_requires_grad(true);
        let lp = ot::partial_wasserstein_log(&c, 0.9, sv);
        let loss = ot::plan_cross_entropy(&lp);
        loss.backward();
        (loss.double_value(&[]), lp.detach(), c.grad())
    }

    fn check(c: &Tensor, sv: &Solver, tol: f64) {
        let (l, lp, g) = reference(c, sv);
        let x = c.detach().set_requires_grad(true);
        let f = partial_plan_cross_entropy(&x, 0.9, sv).unwrap();
        f.loss.backward();
        assert!(
            (f.loss.double_value(&[]) - l).abs() < tol,
            "loss {} vs {l} (solver {sv:?})",
            f.loss.double_value(&[])
        );
        assert!((f.log_plan - lp).abs().max().double_value(&[]) < tol, "log plan");
        let gerr = (x.grad() - &g).abs().max().double_value(&[]) / g.abs().max().double_value(&[]);
        assert!(gerr < tol, "gradient {gerr}");
    }

    #[test]
    fn batched_and_early_stopped_solves_match_the_autograd_solver() {
        let c = cost(12, 1, 1.0);
        // a batch stops per problem here but on its worst problem in `ot`,
        // so the early-stopped case is checked on one problem
        for (c, tol) in [(c.shallow_clone(), 0.0), (c.get(0), 1e-6)] {
            let sv = Solver {
                reg: 0.05,
                max_iter: 300,
                tol,
            };
            check(&c, &sv, 1e-9);
        }
    }

    #[test]
    fn costs_beyond_the_exponential_range_fall_back() {
        // L0 spans 1e3 / 0.1 = 1e4 > MAX_RANGE: the libtorch solver answers
        let c = cost(6, 2, 1e3);
        let sv = Solver {
            reg: 0.1,
            max_iter: 50,
            tol: 0.0,
        };
        check(&c, &sv, 1e-12);
    }
}
