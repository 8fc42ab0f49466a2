//! Times med3d's log-domain partial OT solver on cost matrices written by
//! bench/ot_bench.py, which times POT on the same matrices and prints the
//! side-by-side table.
//!
//! usage: ot_bench DIR [--threads N] [--reps R] [--eps E] [--mass M] [--max-iter K] [--tol T] [--device cpu|cuda]
//!
//! DIR/cases.json lists `{"name", "cost": "<file.npy>"}` (a [B, B] cost, or
//! a stack [S, B, B] solved as one batch); for each case this writes
//! DIR/<name>.med3d.plan.npy (the plan, float64) and prints one JSON line:
//! median milliseconds of the forward solve (no autograd) and of forward +
//! backward (loss = plan cross-entropy -sum_i log(pi_ii) / B, gradients
//! through every iteration back to the cost, as in training), for both
//! implementations: `tch` (`ot::partial_wasserstein_log` under libtorch's
//! autograd) and `fused` (`pot_fused::partial_plan_cross_entropy`, what
//! training uses on the CPU). `--device cuda` runs the `tch` solver on the
//! GPU (fused stays on the CPU, as in training). Both gradients of the loss
//! with respect to the cost are written too (<name>.{med3d,fused}.grad.npy),
//! so the GPU check can compare the two.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use med3dinsight::align::ot::{partial_wasserstein_log, plan_cross_entropy, Solver};
use med3dinsight::align::pot_fused::partial_plan_cross_entropy;
use tch::{Kind, Tensor};

struct Args {
    dir: PathBuf,
    threads: i32,
    reps: usize,
    solver: Solver,
    mass: f64,
    device: tch::Device,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let dir = PathBuf::from(it.next().context("usage: ot_bench DIR [--threads N] [--reps R] ...")?);
    let mut a = Args {
        dir,
        threads: 1,
        reps: 5,
        solver: Solver {
            reg: 0.03,
            max_iter: 1000,
            tol: 0.0,
        },
        mass: 0.95,
        device: tch::Device::Cpu,
    };
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        let bad = || format!("{k}: cannot parse {v:?}");
        match k.as_str() {
            "--threads" => a.threads = v.parse().with_context(bad)?,
            "--reps" => a.reps = v.parse().with_context(bad)?,
            "--eps" => a.solver.reg = v.parse().with_context(bad)?,
            "--mass" => a.mass = v.parse().with_context(bad)?,
            "--max-iter" => a.solver.max_iter = v.parse().with_context(bad)?,
            "--tol" => a.solver.tol = v.parse().with_context(bad)?,
            "--device" => {
                a.device = match v.as_str() {
                    "cpu" => tch::Device::Cpu,
                    "cuda" => tch::Device::Cuda(0),
                    _ => bail!("--device: cpu or cuda"),
                }
            }
            _ => bail!("unknown option {k}"),
        }
    }
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of `f` over `reps` runs after one warm-up run.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn sync(d: tch::Device) {
    if let tch::Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

fn run_case(a: &Args, name: &str, file: &Path) -> Result<serde_json::Value> {
    let cost = Tensor::read_npy(file).with_context(|| format!("cannot read {}", file.display()))?;
    let on_dev = cost.to_device(a.device);
    let b = *cost.size().last().context("empty cost")?;
    let fwd = time(a.reps, || {
        let _g = tch::no_grad_guard();
        let _ = partial_wasserstein_log(&on_dev, a.mass, &a.solver);
        sync(a.device);
    });
    let tch_grad = |c: &Tensor| {
        let c = c.detach().set_requires_grad(true);
        let loss = plan_cross_entropy(&partial_wasserstein_log(&c, a.mass, &a.solver));
        loss.backward();
        c.grad()
    };
    let fwd_bwd = time(a.reps, || {
        let _ = tch_grad(&on_dev);
        sync(a.device);
    });
    let mut failed = None;
    let fused_fwd = time(a.reps, || {
        if let Err(e) = partial_plan_cross_entropy(&cost, a.mass, &a.solver) {
            failed = Some(e);
        }
    });
    let fused_fwd_bwd = time(a.reps, || {
        let c = cost.detach().set_requires_grad(true);
        match partial_plan_cross_entropy(&c, a.mass, &a.solver) {
            Ok(l) => {
                l.loss.backward();
                let _ = c.grad();
            }
            Err(e) => failed = Some(e),
        }
    });
    // What training runs for a cost on `--device`: `align::Transport`'s
    // choice (on a GPU with B <= its cpu_max_rows: the cost copied to the
    // CPU, the fused solver, the gradient copied back).
    let transport = med3dinsight::align::Transport {
        plan: med3dinsight::align::Plan::Partial { mass: a.mass },
        solver: a.solver,
        cpu_max_rows: med3dinsight::align::DEFAULT_CPU_MAX_ROWS,
    };
    let routed_fwd_bwd = time(a.reps, || {
        let c = on_dev.detach().set_requires_grad(true);
        match transport.plan_loss(&c) {
            Ok((_, loss)) => {
                loss.backward();
                let _ = c.grad();
                sync(a.device);
            }
            Err(e) => failed = Some(e),
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let fused_plan = partial_plan_cross_entropy(&cost, a.mass, &a.solver)?
        .log_plan
        .exp()
        .to_kind(Kind::Double);
    let out = a.dir.join(format!("{name}.fused.plan.npy"));
    fused_plan
        .write_npy(&out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let plan = {
        let _g = tch::no_grad_guard();
        partial_wasserstein_log(&on_dev, a.mass, &a.solver)
            .exp()
            .to_kind(Kind::Double)
            .to_device(tch::Device::Cpu)
    };
    {
        let write = |t: Tensor, what: &str| {
            let out = a.dir.join(format!("{name}.{what}.grad.npy"));
            t.to_kind(Kind::Double)
                .to_device(tch::Device::Cpu)
                .write_npy(&out)
                .with_context(|| format!("cannot write {}", out.display()))
        };
        write(tch_grad(&on_dev), "med3d")?;
        let c = cost.detach().set_requires_grad(true);
        partial_plan_cross_entropy(&c, a.mass, &a.solver)?.loss.backward();
        write(c.grad(), "fused")?;
    }
    let out = a.dir.join(format!("{name}.med3d.plan.npy"));
    plan.write_npy(&out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(serde_json::json!({
        "name": name,
        "b": b,
        "dtype": format!("{:?}", cost.kind()),
        "threads": a.threads,
        "device": format!("{:?}", a.device),
        "fwd_ms": fwd,
        "fwd_bwd_ms": fwd_bwd,
        "fused_fwd_ms": fused_fwd,
        "fused_fwd_bwd_ms": fused_fwd_bwd,
        "training_path": if transport.fused_on_cpu(&on_dev) { "fused on the CPU" } else { "autograd on the device" },
        "training_fwd_bwd_ms": routed_fwd_bwd,
    }))
}

fn main() -> Result<()> {
    let a = parse()?;
    tch::set_num_threads(a.threads);
    let list = a.dir.join("cases.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&list).with_context(|| format!("cannot read {}", list.display()))?)
            .with_context(|| format!("{}: not a JSON list of cases", list.display()))?;
    for c in &cases {
        let (Some(name), Some(cost)) = (c["name"].as_str(), c["cost"].as_str()) else {
            bail!("{}: each case needs `name` and `cost`", list.display());
        };
        let r = run_case(&a, name, &a.dir.join(cost)).with_context(|| format!("case {name}"))?;
        println!("{r}");
    }
    Ok(())
}
