//! Partial optimal transport against the POT library (the reference the
//! method names): plans equal `ot.partial.entropic_partial_wasserstein`, and
//! gradients of the plan cross-entropy equal POT's torch backend under
//! autograd, for eps in {0.03, 0.1}, m in {0.8, 0.95}, B in {8, 64}; and at
//! eps = 0.01 in float32, where POT's multiplicative solver gives NaN or
//! zeros (POT issue #723), ours stays finite and matches the float64 plan.
//! Both implementations are checked: the libtorch-autograd solver
//! (`ot::partial_wasserstein_log`) and the fused CPU loss with its
//! hand-written reverse pass (`pot_fused::partial_plan_cross_entropy`).
use std::path::Path;
use std::process::Command;

use med3dinsight::align::ot::{mahalanobis_cost, partial_wasserstein_log, plan_cross_entropy, Solver};
use med3dinsight::align::pot_fused::partial_plan_cross_entropy;
use tch::{Device, Kind, Tensor};

mod common;
use common::python;

/// Costs as the method builds them: normalised Mahalanobis distances between
/// L2-normalised embeddings, with paired rows close to each other.
fn embedding_cost(b: i64, d: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let y = Tensor::randn([b, d], (Kind::Double, Device::Cpu));
    let x = &y + Tensor::randn([b, d], (Kind::Double, Device::Cpu)) * 0.7;
    let n = |t: &Tensor| t / t.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
    let w = Tensor::rand([d], (Kind::Double, Device::Cpu)) + 1.0;
    mahalanobis_cost(&n(&x), &n(&y), &w)
}

fn uniform_cost(b: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let c = Tensor::rand([b, b], (Kind::Double, Device::Cpu));
    &c / c.max()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn partial_plans_and_gradients_match_pot() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    let mut seed = 10;
    for b in [8i64, 64] {
        for (kind, cost) in [
            ("uniform", uniform_cost(b, seed)),
            ("embedding", embedding_cost(b, 32, seed + 1)),
        ] {
            seed += 2;
            for reg in [0.03, 0.1] {
                for mass in [0.8, 0.95] {
                    let name = format!("{kind}_b{b}_eps{reg}_m{mass}");
                    let file = format!("{name}.cost.npy");
                    cost.write_npy(dir.path().join(&file)).unwrap();
                    cases.push(serde_json::json!({"name": name, "cost": file, "reg": reg, "mass": mass}));
                    ours.push((name, cost.shallow_clone(), reg, mass));
                }
            }
        }
    }
    // the underflow case: eps = 0.01 on costs spread over [0, 1]
    let small = uniform_cost(64, 99);
    small.write_npy(dir.path().join("small.cost.npy")).unwrap();
    cases.push(serde_json::json!({"name": "small", "cost": "small.cost.npy", "reg": 0.01, "mass": 0.95}));
    std::fs::write(dir.path().join("cases.json"), serde_json::to_vec(&cases).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/pot_partial.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "POT reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let solver = |reg| Solver {
        reg,
        max_iter: 1000,
        tol: 0.0,
    };
    let mut worst_plan: f64 = 0.0;
    let mut worst_grad: f64 = 0.0;
    let mut worst_fused: f64 = 0.0;
    for (name, cost, reg, mass) in &ours {
        let want = Tensor::read_npy(dir.path().join(format!("{name}.plan.npy"))).unwrap();
        let got = partial_wasserstein_log(cost, *mass, &solver(*reg)).exp();
        let scale = want.abs().max().double_value(&[]);
        let err = max_abs(&got, &want) / scale;
        assert!(err < 1e-8, "{name}: plan relative error {err}");
        worst_plan = worst_plan.max(err);

        let c = cost.detach().set_requires_grad(true);
        let loss = plan_cross_entropy(&partial_wasserstein_log(&c, *mass, &solver(*reg)));
        loss.backward();
        let grad = c.grad();
        let want_g = Tensor::read_npy(dir.path().join(format!("{name}.grad.npy"))).unwrap();
        let gscale = want_g.abs().max().double_value(&[]);
        let gerr = max_abs(&grad, &want_g) / gscale;
        assert!(gerr < 1e-6, "{name}: gradient relative error {gerr}");
        worst_grad = worst_grad.max(gerr);

        // the fused loss: same plan, same loss value, same gradient
        let c = cost.detach().set_requires_grad(true);
        let fused = partial_plan_cross_entropy(&c, *mass, &solver(*reg)).unwrap();
        let ferr = max_abs(&fused.log_plan.exp(), &want) / scale;
        assert!(ferr < 1e-8, "{name}: fused plan relative error {ferr}");
        let lerr = (fused.loss.double_value(&[]) - loss.double_value(&[])).abs();
        assert!(lerr < 1e-9, "{name}: fused loss differs by {lerr}");
        fused.loss.backward();
        let fgerr = max_abs(&c.grad(), &want_g) / gscale;
        assert!(fgerr < 1e-6, "{name}: fused gradient relative error {fgerr}");
        worst_fused = worst_fused.max(ferr).max(fgerr);
    }
    eprintln!(
        "worst relative error over {} cases: plan {worst_plan:.2e}, gradient {worst_grad:.2e}; fused plan or gradient {worst_fused:.2e}",
        ours.len()
    );

    // eps = 0.01: POT's float32 multiplicative solver breaks down, ours does not.
    let pot32 = Tensor::read_npy(dir.path().join("small.plan32.npy")).unwrap();
    let pot64 = Tensor::read_npy(dir.path().join("small.plan.npy")).unwrap();
    let pot32_broken = !bool::try_from(pot32.isfinite().all()).unwrap()
        || (pot32.sum(Kind::Double).double_value(&[]) - 0.95).abs() > 1e-3;
    assert!(
        pot32_broken,
        "expected POT's float32 multiplicative solver to fail at eps = 0.01"
    );
    let ours32 = partial_wasserstein_log(&small.to_kind(Kind::Float), 0.95, &solver(0.01))
        .exp()
        .to_kind(Kind::Double);
    assert!(bool::try_from(ours32.isfinite().all()).unwrap());
    let err = max_abs(&ours32, &pot64) / pot64.abs().max().double_value(&[]);
    assert!(
        err < 1e-3,
        "float32 log-domain plan vs POT float64: relative error {err}"
    );
    let fused32 = partial_plan_cross_entropy(&small.to_kind(Kind::Float), 0.95, &solver(0.01)).unwrap();
    let err = max_abs(&fused32.log_plan.exp().to_kind(Kind::Double), &pot64) / pot64.abs().max().double_value(&[]);
    assert!(
        err < 1e-4,
        "fused plan from a float32 cost vs POT float64: relative error {err}"
    );
}
