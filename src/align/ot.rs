//! Entropic optimal transport in the log domain, batched over leading
//! dimensions and differentiable through its iterations (every step is a
//! libtorch op, so autograd records the unrolled solver).
//!
//! `partial_wasserstein_log` is the Dykstra-type iteration of POT's
//! `ot.partial.entropic_partial_wasserstein` (Benamou et al. 2015: row
//! marginals <= a, column marginals <= b, total mass = m), carried out on
//! log K instead of K. The multiplicative form underflows once -C/eps is
//! below float32's range (eps = 0.01 with costs in [0, 1]; POT issue #723);
//! in log space nothing underflows. `sinkhorn_log` is the balanced case.
use tch::{Kind, Tensor};

/// Solver settings shared by the balanced and partial solvers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Solver {
    /// Entropic regularisation eps (paper: 0.03).
    pub reg: f64,
    /// Iteration cap (POT's default: 1000).
    pub max_iter: usize,
    /// Stop when ||log K_prev - log K||_F (checked every 10 iterations, as
    /// POT does, on the first batch element's worst case) falls below this.
    /// 0 runs all `max_iter` iterations.
    pub tol: f64,
}

impl Default for Solver {
    fn default() -> Self {
        Solver {
            reg: 0.03,
            max_iter: 1000,
            tol: 0.0,
        }
    }
}

fn lse_rows(t: &Tensor) -> Tensor {
    t.logsumexp([-1i64].as_slice(), true)
}

fn lse_cols(t: &Tensor) -> Tensor {
    t.logsumexp([-2i64].as_slice(), true)
}

fn lse_all(t: &Tensor) -> Tensor {
    t.logsumexp([-2i64, -1].as_slice(), true)
}

/// True when the change between iterates is below `tol`.
fn converged(prev: &Tensor, cur: &Tensor, tol: f64) -> bool {
    if tol <= 0.0 {
        return false;
    }
    let diff = (prev - cur).detach();
    let err = diff
        .square()
        .sum_dim_intlist([-2i64, -1].as_slice(), false, Kind::Double)
        .sqrt()
        .max();
    err.double_value(&[]) < tol
}

/// Log of the entropic partial transport plan for `cost` [..., n, m] with
/// uniform marginals a = 1/n, b = 1/m and transported mass `mass`
/// (0 < mass <= 1). Returns log(pi) with the shape of `cost`.
///
/// POT's iteration keeps the plan K and three Dykstra correction matrices
/// q1, q2, q3 and projects in turn onto {rows <= a}, {columns <= b} and
/// {mass = m}. In the log domain each projection adds a row vector r, a
/// column vector c or a scalar s, and each correction is minus the last
/// such term (log q1 = -r, log q2 = -c, log q3 = -s), so the iterate is
/// log K = L0 + r + c + s with L0 = -C/eps normalised to mass m. The solver
/// carries only those potentials: two log-sum-exps over n x m per
/// iteration (rows of L0 + c, columns of L0 + r; the mass step reuses the
/// column sums), the same iterates as POT's up to rounding.
pub fn partial_wasserstein_log(cost: &Tensor, mass: f64, s: &Solver) -> Tensor {
    let size = cost.size();
    let (n, m) = (size[size.len() - 2], size[size.len() - 1]);
    let la = -(n as f64).ln();
    let lb = -(m as f64).ln();
    let lmass = mass.ln();
    let l_raw = cost / (-s.reg);
    let l0 = &l_raw + lmass - lse_all(&l_raw);
    let mut r = l0.narrow(-1, 0, 1).zeros_like(); // [..., n, 1]
    let mut c = l0.narrow(-2, 0, 1).zeros_like(); // [..., 1, m]
    let mut sc = l0.narrow(-1, 0, 1).narrow(-2, 0, 1).zeros_like(); // [..., 1, 1]
    let mut prev: Option<(Tensor, Tensor, Tensor)> = None;
    for it in 0..s.max_iter {
        let check = s.tol > 0.0 && it % 10 == 0;
        if check {
            prev = Some((r.detach(), c.detach(), sc.detach()));
        }
        // rows of L0 + c + s at most a
        r = (-lse_rows(&(&l0 + &c)) + (la - &sc)).clamp_max(0.0);
        // columns of L0 + r + s at most b
        let col = lse_cols(&(&l0 + &r)); // [..., 1, m]
        c = (-&col + (lb - &sc)).clamp_max(0.0);
        // total mass m: log sum(exp(L0 + r + c)) from the column sums
        sc = -(&col + &c).logsumexp([-1i64].as_slice(), true) + lmass;
        if check {
            if let Some((r0, c0, s0)) = prev.take() {
                let before = &r0 + &c0 + &s0;
                let now = (&r + &c + &sc).detach();
                if converged(&before, &now, s.tol) {
                    break;
                }
            }
        }
    }
    l0 + r + c + sc
}

/// Log of the balanced entropic plan (Sinkhorn, log domain) for `cost`
/// [..., n, m] with uniform marginals.
pub fn sinkhorn_log(cost: &Tensor, s: &Solver) -> Tensor {
    let size = cost.size();
    let (n, m) = (size[size.len() - 2], size[size.len() - 1]);
    let la = -(n as f64).ln();
    let lb = -(m as f64).ln();
    let lk = cost / (-s.reg);
    let mut f = lk.narrow(-1, 0, 1).zeros_like(); // [..., n, 1]
    let mut g = lk.narrow(-2, 0, 1).zeros_like(); // [..., 1, m]
    for it in 0..s.max_iter {
        let g_prev = g.shallow_clone();
        f = -lse_rows(&(&lk + &g)) + la;
        g = -lse_cols(&(&lk + &f)) + lb;
        if it % 10 == 0 && converged(&g_prev, &g, s.tol) {
            break;
        }
    }
    lk + f + g
}

/// Cross-entropy between the ideal plan I/B and the plan:
/// L = -sum_ij (I_ij / B) log pi_ij, averaged over leading dimensions.
pub fn plan_cross_entropy(log_plan: &Tensor) -> Tensor {
    let b = *log_plan.size().last().unwrap_or(&1) as f64;
    let diag = log_plan.diagonal(0, -2, -1);
    -(diag.sum_dim_intlist([-1i64].as_slice(), false, None) / b).mean(None)
}

/// C_ij = sqrt(sum_k w_k (x_ik - y_jk)^2), divided by max_ij C_ij, for
/// x [..., n, d], y [..., m, d] and a non-negative weight w [d] (the
/// diagonal of the Mahalanobis matrix of docs/method.md).
pub fn mahalanobis_cost(x: &Tensor, y: &Tensor, w: &Tensor) -> Tensor {
    let w = w.clamp_min(0.0);
    let xw = x * &w;
    let xx = (&xw * x).sum_dim_intlist([-1i64].as_slice(), true, None); // [..., n, 1]
    let yy = (y * &w * y)
        .sum_dim_intlist([-1i64].as_slice(), true, None)
        .transpose(-2, -1); // [..., 1, m]
    let xy = xw.matmul(&y.transpose(-2, -1));
    // sqrt has an infinite slope at 0 (x_i == y_j); keep it finite.
    let c = (xx + yy - xy * 2.0).clamp_min(1e-12).sqrt();
    let max = c.amax([-2i64, -1].as_slice(), true);
    c / max
}

/// Symmetric InfoNCE (CLIP) on L2-normalised x, y [..., B, d].
pub fn info_nce(x: &Tensor, y: &Tensor, temperature: f64) -> Tensor {
    let logits = x.matmul(&y.transpose(-2, -1)) / temperature;
    let diag_rows = logits.log_softmax(-1, None).diagonal(0, -2, -1);
    let diag_cols = logits.log_softmax(-2, None).diagonal(0, -2, -1);
    -(diag_rows.mean(None) + diag_cols.mean(None)) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn rand_cost(b: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let c = Tensor::rand([b, b], (Kind::Double, Device::Cpu));
        &c / c.max()
    }

    #[test]
    fn partial_plan_has_mass_m_and_bounded_marginals() {
        let c = rand_cost(16, 1);
        let lp = partial_wasserstein_log(
            &c,
            0.8,
            &Solver {
                reg: 0.05,
                max_iter: 500,
                tol: 0.0,
            },
        );
        let p = lp.exp();
        assert!((p.sum(Kind::Double).double_value(&[]) - 0.8).abs() < 1e-9);
        let rows = p.sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
        let cols = p.sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
        assert!(rows.max().double_value(&[]) <= 1.0 / 16.0 + 1e-6);
        assert!(cols.max().double_value(&[]) <= 1.0 / 16.0 + 1e-6);
    }

    #[test]
    fn sinkhorn_marginals_are_uniform() {
        let c = rand_cost(12, 2);
        let p = sinkhorn_log(
            &c,
            &Solver {
                reg: 0.05,
                max_iter: 2000,
                tol: 0.0,
            },
        )
        .exp();
        let rows = p.sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
        let cols = p.sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
        assert!((rows - 1.0 / 12.0).abs().max().double_value(&[]) < 1e-6);
        assert!((cols - 1.0 / 12.0).abs().max().double_value(&[]) < 1e-9);
    }

    #[test]
    fn batched_equals_one_by_one() {
        let c = Tensor::stack(&[rand_cost(8, 3), rand_cost(8, 4)], 0);
        let s = Solver {
            reg: 0.03,
            max_iter: 200,
            tol: 0.0,
        };
        let both = partial_wasserstein_log(&c, 0.95, &s);
        for i in 0..2 {
            let one = partial_wasserstein_log(&c.get(i), 0.95, &s);
            assert!((both.get(i) - one).abs().max().double_value(&[]) < 1e-12);
        }
    }

    #[test]
    fn small_eps_in_float32_stays_finite() {
        let c = rand_cost(32, 5).to_kind(Kind::Float);
        let lp = partial_wasserstein_log(
            &c,
            0.95,
            &Solver {
                reg: 0.01,
                max_iter: 1000,
                tol: 0.0,
            },
        );
        assert!(bool::try_from(lp.isfinite().all()).unwrap());
    }

    #[test]
    fn mahalanobis_with_unit_weights_is_scaled_euclidean() {
        tch::manual_seed(0);
        let x = Tensor::randn([5, 7], (Kind::Double, Device::Cpu));
        let y = Tensor::randn([6, 7], (Kind::Double, Device::Cpu));
        let c = mahalanobis_cost(&x, &y, &Tensor::ones([7], (Kind::Double, Device::Cpu)));
        let e = x.unsqueeze(1) - y.unsqueeze(0);
        let d = e.square().sum_dim_intlist([-1i64].as_slice(), false, None).sqrt();
        let d = &d / d.max();
        assert!((c - d).abs().max().double_value(&[]) < 1e-9);
    }
}
