//! Times one pretraining step of med3d's SwinUNETR + PSAT (forward,
//! backward, gradient clipping and the Adam/AdamW update, as the trainer
//! runs it) on random volumes and random targets; bench/train_step_bench.py
//! runs the same model in PyTorch eager beside it.
//!
//! usage: train_step_bench CONFIG.yaml [--threads N] [--steps S] [--warmup W]
//!        [--size X] [--batch B] [--feature-size F] [--text-dim D] [--seed K]
//!
//! Prints one JSON line: the model's settings (backbone, PSAT, alignment,
//! optimiser, batch, input side, target width, parameter count), the
//! milliseconds of each timed step and their median. Warm-up steps are
//! run first and not timed.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use med3dinsight::config::Experiment;
use med3dinsight::runtime::optim::Adam;
use med3dinsight::train::model::Pretrainer;
use tch::{nn, Device, Kind, Tensor};

struct Args {
    config: PathBuf,
    threads: i32,
    steps: usize,
    warmup: usize,
    size: Option<i64>,
    batch: Option<usize>,
    feature_size: Option<i64>,
    text_dim: i64,
    seed: i64,
    device: Device,
    bf16: bool,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let config = PathBuf::from(
        it.next()
            .context("usage: train_step_bench CONFIG.yaml [--threads N] ...")?,
    );
    let mut a = Args {
        config,
        threads: 1,
        steps: 5,
        warmup: 2,
        size: None,
        batch: None,
        feature_size: None,
        text_dim: 384,
        seed: 0,
        device: Device::Cpu,
        bf16: false,
    };
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        let bad = || format!("{k}: cannot parse {v:?}");
        match k.as_str() {
            "--threads" => a.threads = v.parse().with_context(bad)?,
            "--steps" => a.steps = v.parse().with_context(bad)?,
            "--warmup" => a.warmup = v.parse().with_context(bad)?,
            "--size" => a.size = Some(v.parse().with_context(bad)?),
            "--batch" => a.batch = Some(v.parse().with_context(bad)?),
            "--feature-size" => a.feature_size = Some(v.parse().with_context(bad)?),
            "--text-dim" => a.text_dim = v.parse().with_context(bad)?,
            "--seed" => a.seed = v.parse().with_context(bad)?,
            "--device" => {
                a.device = match v.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    _ => bail!("--device: cpu or cuda"),
                }
            }
            "--bf16" => a.bf16 = v.parse().with_context(bad)?,
            _ => bail!("unknown option {k}"),
        }
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = parse()?;
    tch::set_num_threads(a.threads);
    let dev = a.device;
    // as `med3d pretrain` does
    if dev.is_cuda() {
        if a.bf16 {
            med3dinsight::train::model::use_bf16_autocast();
        }
    } else {
        med3dinsight::runtime::memory::reuse_freed_memory();
    }
    let autocast = dev.is_cuda() && a.bf16;
    let mut cfg = Experiment::load(&a.config)?.pretrain;
    if let Some(b) = a.batch {
        cfg.batch_size = b;
    }
    if let Some(f) = a.feature_size {
        match &mut cfg.backbone {
            med3dinsight::model::backbone::BackboneConfig::SwinUnetr(c) => c.feature_size = f,
            _ => anyhow::bail!("--feature-size applies to a SwinUNETR backbone"),
        }
    }
    let side = a.size.or(cfg.input_size.map(|s| s[0])).unwrap_or(64);
    cfg.input_size = Some([side; 3]);
    cfg.validate()?;
    tch::manual_seed(a.seed);
    let vs = nn::VarStore::new(dev);
    let targets = vec![("text".to_string(), a.text_dim)];
    let model = Pretrainer::new(&vs.root(), &cfg, &targets)?;
    let mut opt = Adam::new(&vs, &cfg.optimizer);
    let b = cfg.batch_size as i64;
    let vols = Tensor::rand([b, 1, side, side, side], (Kind::Float, dev));
    let planes = Tensor::randint(3, [b], (Kind::Int64, dev));
    let bins = Tensor::randint(cfg.psat.bins, [b], (Kind::Int64, dev));
    let ys = vec![("text".to_string(), Tensor::randn([b, a.text_dim], (Kind::Float, dev)))];
    if dev.is_cuda() {
        med3dinsight::runtime::torch::cuda_reset_peak_memory(0);
    }
    let lr = cfg.optimizer.lr;
    let mut times = Vec::new();
    // per timed step: (forward incl. the losses, backward, optimiser) ms
    let mut parts: Vec<[f64; 3]> = Vec::new();
    let mut loss = f64::NAN;
    let sync = || {
        if let Device::Cuda(d) = dev {
            tch::Cuda::synchronize(d as i64);
        }
    };
    for i in 0..a.warmup + a.steps {
        let t = Instant::now();
        let l = model.losses(&vols, &planes, &bins, &ys, true, autocast, None)?;
        loss = l.total.double_value(&[]);
        sync();
        let t_fwd = t.elapsed();
        l.total.backward();
        sync();
        let t_bwd = t.elapsed();
        let norm = opt.grad_norm();
        if cfg.optimizer.clip_grad_norm > 0.0 {
            opt.clip(cfg.optimizer.clip_grad_norm, norm);
        }
        opt.step(lr);
        opt.zero_grad();
        sync();
        if i >= a.warmup {
            let total = t.elapsed();
            times.push(total.as_secs_f64() * 1e3);
            parts.push([
                t_fwd.as_secs_f64() * 1e3,
                (t_bwd - t_fwd).as_secs_f64() * 1e3,
                (total - t_bwd).as_secs_f64() * 1e3,
            ]);
        }
    }
    let part_median = |k: usize| {
        let mut v: Vec<f64> = parts.iter().map(|p| p[k]).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n.is_multiple_of(2) {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        } else {
            v[n / 2]
        }
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "backbone": cfg.backbone,
            "psat": cfg.psat,
            "head": cfg.head,
            "align": cfg.align,
            "optimizer": cfg.optimizer,
            "weights": cfg.weights,
            "batch": b,
            "side": side,
            "text_dim": a.text_dim,
            "threads": a.threads,
            "parameters": opt.numel(),
            "last_loss": loss,
            "step_ms": times,
            // as Python's statistics.median: the mean of the middle two for an even count
            "median_ms": if sorted.len().is_multiple_of(2) {
                (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
            } else {
                sorted[sorted.len() / 2]
            },
            "device": format!("{dev:?}"),
            "bf16": autocast,
            "peak_cuda_allocated_bytes": med3dinsight::runtime::torch::cuda_peak_memory(0).filter(|_| dev.is_cuda()).map(|p| p.0),
            "peak_rss_bytes": med3dinsight::runtime::memory::peak_rss_bytes(),
            "forward_ms": part_median(0),
            "backward_ms": part_median(1),
            "optimizer_ms": part_median(2),
        })
    );
    Ok(())
}
