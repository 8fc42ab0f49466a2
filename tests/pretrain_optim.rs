//! The trainer's Adam / AdamW and gradient clipping against PyTorch's own
//! (torch.optim.AdamW, torch.optim.Adam with L2 weight decay,
//! torch.nn.utils.clip_grad_norm_) over six steps with changing learning
//! rates, clipping active on some steps only; and a save/restore of the
//! optimiser state in the middle continues on the same trajectory.
use std::path::Path;
use std::process::Command;

use med3dinsight::runtime::optim::Adam;
use med3dinsight::train::config::{OptimConfig, OptimizerKind};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const STEPS: usize = 6;

/// A second var store, its variables and optimiser, restored mid-way.
type Restored = (VarStore, Vec<(String, Tensor)>, Adam);

fn reference(dir: &Path) -> Vec<(String, Tensor)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    let out = Command::new(if py.exists() { py } else { "python3".into() })
        .arg(root.join("tests/reference/torch_adamw.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Tensor::read_npz(dir.join("adam.npz")).unwrap()
}

fn get<'a>(r: &'a [(String, Tensor)], k: &str) -> &'a Tensor {
    &r.iter()
        .find(|(n, _)| n == k)
        .unwrap_or_else(|| panic!("{k} missing"))
        .1
}

/// Sets each variable's gradient to the reference's by backpropagating sum(p * g).
fn set_grads(vars: &[(String, Tensor)], r: &[(String, Tensor)], step: usize) {
    let loss = vars
        .iter()
        .map(|(k, p)| (p * get(r, &format!("grad.{step}.{k}"))).sum(Kind::Float))
        .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
    loss.backward();
}

fn model(r: &[(String, Tensor)]) -> (VarStore, Vec<(String, Tensor)>) {
    let vs = VarStore::new(Device::Cpu);
    let vars = ["a", "b"]
        .iter()
        .map(|k| (k.to_string(), vs.root().var_copy(k, get(r, &format!("init.{k}")))))
        .collect();
    (vs, vars)
}

#[test]
fn adam_and_adamw_follow_torch_step_for_step() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let r = reference(d.path());
    let lrs = Vec::<f64>::try_from(get(&r, "lr")).unwrap();
    for (name, kind) in [("adamw", OptimizerKind::Adamw), ("adam", OptimizerKind::Adam)] {
        let cfg = OptimConfig {
            kind,
            betas: [0.9, 0.95],
            eps: 1e-6,
            weight_decay: 0.1,
            clip_grad_norm: 1.5,
            ..Default::default()
        };
        let (vs, vars) = model(&r);
        let mut opt = Adam::new(&vs, &cfg);
        let norms = Vec::<f64>::try_from(get(&r, &format!("{name}.norm"))).unwrap();
        let mut restored: Option<Restored> = None;
        for s in 0..STEPS {
            set_grads(&vars, &r, s);
            let n = opt.grad_norm();
            assert!(
                (n - norms[s]).abs() < 1e-5 * norms[s],
                "{name} step {s}: norm {n} vs {}",
                norms[s]
            );
            opt.clip(cfg.clip_grad_norm, n);
            opt.step(lrs[s]);
            opt.zero_grad();
            for (k, p) in &vars {
                let want = get(&r, &format!("{name}.{s}.{k}"));
                let err = (p - want).abs().max().double_value(&[]);
                assert!(err < 1e-6, "{name} step {s} {k}: max |diff| {err}");
            }
            // at step 3, copy weights + optimiser state into a fresh pair and
            // let it take the remaining steps in parallel
            if s == 2 {
                let (vs2, vars2) = model(&r);
                tch::no_grad(|| {
                    for ((_, dst), (_, src)) in vars2.iter().zip(&vars) {
                        dst.shallow_clone().copy_(src);
                    }
                });
                let mut opt2 = Adam::new(&vs2, &cfg);
                opt2.load_state(opt.state_tensors(), opt.t, "test").unwrap();
                restored = Some((vs2, vars2, opt2));
            } else if let Some((_, vars2, opt2)) = restored.as_mut() {
                set_grads(vars2, &r, s);
                let n2 = opt2.grad_norm();
                opt2.clip(cfg.clip_grad_norm, n2);
                opt2.step(lrs[s]);
                opt2.zero_grad();
                for ((k, a), (_, b)) in vars.iter().zip(vars2.iter()) {
                    assert!(a.equal(b), "{name} step {s} {k}: the restored optimiser diverged");
                }
            }
        }
    }
}

#[test]
fn state_of_another_model_is_refused() {
    let vs = VarStore::new(Device::Cpu);
    let _ = vs.root().var("w", &[2, 3], tch::nn::Init::Const(0.0));
    let mut opt = Adam::new(&vs, &OptimConfig::default());
    let bad = vec![
        (
            "exp_avg.w".to_string(),
            Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
        ),
        (
            "exp_avg_sq.w".to_string(),
            Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
        ),
    ];
    let e = format!("{:#}", opt.load_state(bad, 1, "ckpt").unwrap_err());
    assert!(e.contains("exp_avg.w has shape [3, 2]"), "{e}");
    let e = format!("{:#}", opt.load_state(vec![], 1, "ckpt").unwrap_err());
    assert!(e.contains("no optimiser state exp_avg.w"), "{e}");
}
