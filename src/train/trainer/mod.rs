//! The pretraining loop: builds the model, restores a checkpoint when
//! resuming, pulls micro-batches from the loader, accumulates gradients,
//! skips steps whose loss or gradient is not finite (stopping after
//! `max_nonfinite` in a row), logs one metrics line per step, checkpoints
//! every `run.checkpoint_every` steps, at the end and on SIGTERM/SIGINT, and
//! draws the loss curve.
//!
//! Launched by torchrun or srun (see `crate::dist`), it runs data-parallel:
//! one process per GPU (CUDA device = local rank), rank 0's parameters,
//! buffers and optimiser state broadcast at the start, each rank on its
//! disjoint slice of every global batch, gradients averaged before
//! clipping and the step, and the step skipped or the run stopped on every
//! rank alike. Only rank 0 writes the run folder.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::nn::VarStore;
use tch::Tensor;

use super::config::{Precision, PretrainConfig, PRETRAIN_FORMAT};
use super::data::{BatchMaker, Dataset, Loader};
use super::metrics::{MetricsLog, StepMetrics};
use super::model::{use_bf16_autocast, Pretrainer};
use super::signals::Signals;
use super::steps::total_steps_resumed;
pub use super::steps::{total_steps, total_steps_for, GlobalBatch};
use crate::artifacts::run::{self as run_dir, Checkpoint, RunRecord, State};
use crate::dist::{grads, Dist, Launch};
use crate::runtime::guard;
use crate::runtime::optim::{lr_at, Adam};
use crate::runtime::rng::{torch_seed, STREAM_INIT, STREAM_TORCH};
use ranks::{broadcast_state, sum_over_ranks};
use report::{finish, torch_failure};
pub use report::{Options, Status, Summary};

mod ranks;
mod report;

fn progress(total: u64, at: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    if let Ok(s) =
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
    {
        b.set_style(s.progress_chars("=> "));
    }
    b.set_prefix("pretrain");
    b.set_position(at);
    b
}

/// One pretraining run in its four parts, as nnU-Net's trainer is split:
/// [`Trainer::start`] (device, data-parallel group, data, model, resume,
/// run record), [`Trainer::step`] (one optimiser step, its metrics),
/// [`Trainer::checkpoint`] and [`Trainer::finish`]. [`run`] drives them.
pub struct Trainer {
    cfg: PretrainConfig,
    opts: Options,
    dev: tch::Device,
    dist: Option<Dist>,
    autocast: bool,
    maker: Arc<BatchMaker>,
    epoch_len: usize,
    global: GlobalBatch,
    total: u64,
    vs: VarStore,
    model: Pretrainer,
    opt: Adam,
    state: State,
    summary: Summary,
    log: Option<MetricsLog>,
    loader: Option<Loader>,
    started: Instant,
    elapsed_before: f64,
    volumes: u64,
}

/// What one step did.
pub struct StepOutcome {
    pub metrics: StepMetrics,
    /// A stop was asked for (on any rank): checkpoint and end the run.
    pub stop: bool,
}

impl Trainer {
    /// Sets up the device and the data-parallel group, opens the data,
    /// builds the model and optimiser, restores the newest whole
    /// checkpoint with `opts.resume`, and (rank 0) writes run.json.
    pub fn start(cfg: &PretrainConfig, opts: &Options) -> Result<Trainer> {
        cfg.validate()?;
        let mut dev = crate::runtime::start(
            cfg.run.threads,
            cfg.run.device,
            "pretrain.run.device",
            cfg.run.keep_freed_memory,
        )?;
        let forced_group = crate::dist::backend_override()?.is_some();
        let launch = Launch::from_env()?.filter(|l| l.world_size > 1 || forced_group);
        if let (Some(l), tch::Device::Cuda(_)) = (&launch, dev) {
            let n = tch::Cuda::device_count() as usize;
            if l.local_rank >= n {
                bail!(
                    "rank {} has local rank {} but this node has {n} CUDA devices: launch one process per GPU",
                    l.rank,
                    l.local_rank
                );
            }
            dev = tch::Device::Cuda(l.local_rank);
        }
        let dist = match &launch {
            Some(l) => Some(Dist::connect(
                l,
                crate::dist::timeout_from(cfg.run.dist_timeout_s)?,
                dev,
            )?),
            None => None,
        };
        let (rank, world) = dist.as_ref().map(|d| (d.rank, d.world_size)).unwrap_or((0, 1));
        let main = rank == 0;
        let autocast = dev.is_cuda() && matches!(cfg.precision, Precision::Auto | Precision::Bf16);
        if autocast {
            use_bf16_autocast();
        }
        let ds = Arc::new(Dataset::open(&opts.cache, cfg)?);
        for (case, why) in ds.skipped_cases.iter().filter(|_| main) {
            tracing::warn!("pretrain: case {case} left out: {why}");
        }
        let maker = Arc::new(BatchMaker::new(ds.clone(), cfg));
        let epoch_len = maker.sampler.epoch_len();
        let mut total = total_steps_for(cfg, epoch_len, world);
        let global = GlobalBatch::of(cfg, world);
        let targets = ds.target_dims();
        let config_hash = cfg.hash();

        if main {
            std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
        }
        // Only rank 0 reads the run folder (other nodes may not see it); the
        // others receive its weights and state below.
        let existing = run_dir::latest(&opts.out).filter(|_| main);
        if existing.is_some() && !opts.resume {
            bail!(
                "{} already holds checkpoints: pass --resume to continue that run, or choose another --out",
                opts.out.display()
            );
        }

        tch::manual_seed(torch_seed(cfg.seed, STREAM_INIT, 0));
        let vs = VarStore::new(dev);
        let (model, mut opt) = guard::boundary(|| {
            Ok((
                Pretrainer::new(&vs.root(), cfg, &targets)?,
                Adam::new(&vs, &cfg.optimizer),
            ))
        })
        .map_err(|e| torch_failure(e, "building the model", cfg, dev, autocast, &opts.out))?;
        let mut state = State {
            format: PRETRAIN_FORMAT.to_string(),
            step: 0,
            data_position: 0,
            optimizer_t: 0,
            total_steps: total,
            nonfinite_total: 0,
            nonfinite_streak: 0,
            seed: cfg.seed,
            rng: "splitmix64(seed, stream, index): order per epoch, slice and augmentation per sample, torch seed per micro-batch".into(),
            config_hash: config_hash.clone(),
            data_hash: ds.data_hash.clone(),
            elapsed_s: 0.0,
            med3d_version: crate::VERSION.to_string(),
            world_size: 1,
            files: Default::default(),
        };
        let mut existing = existing;
        if existing.is_some() {
            let accept = |c: &Checkpoint| -> Result<()> {
                if c.state.data_hash != ds.data_hash {
                    bail!(
                        "{}: written for other data (the slice index or embeddings of {} changed since); start a new --out",
                        c.dir.display(),
                        opts.cache.display()
                    );
                }
                Ok(())
            };
            let load = |c: &Checkpoint| -> Result<()> {
                c.load_model(&vs)?;
                let (tensors, source) = c.optimizer_tensors()?;
                opt.load_state(tensors, c.state.optimizer_t, &source)
            };
            if let Some(c) = Checkpoint::newest_whole(&opts.out, &config_hash, accept, load)? {
                tracing::info!("resuming {} at step {}", c.dir.display(), c.state.step);
                state = c.state;
                existing = Some(c.dir);
            }
        }
        if let Some(d) = &dist {
            broadcast_state(d, &mut state)?;
            grads::broadcast_variables(d, &vs.variables().into_iter().collect::<Vec<_>>())
                .context("receiving rank 0's parameters")?;
            grads::broadcast_variables(d, &opt.state_tensors()).context("receiving rank 0's optimiser state")?;
            opt.t = state.optimizer_t;
        }
        if state.world_size != world as u64 && state.step > 0 {
            let before = total;
            total = total_steps_resumed(cfg, epoch_len, world, &state);
            if main {
                tracing::warn!(
                    "resuming a run of {} ranks on {world}: the global batch is now {global} ({} steps in all{})",
                    state.world_size,
                    total,
                    if before == total {
                        String::new()
                    } else {
                        format!(", was {before}")
                    }
                );
            }
        }
        state.world_size = world as u64;
        state.total_steps = total;

        let record = RunRecord {
            format: PRETRAIN_FORMAT.to_string(),
            med3d_version: crate::VERSION.to_string(),
            cache: Some(opts.cache.clone()),
            config: cfg.clone(),
            config_hash,
            data_hash: ds.data_hash.clone(),
            device: format!("{dev:?}"),
            autocast_bf16: autocast,
            parameters: opt.numel(),
            total_steps: total,
            targets: targets.clone(),
            usable_slices: Some(ds.usable.len()),
            noisy_slices: ds.noisy_slices,
            cases: Some(ds.cases.len()),
            skipped_cases: ds.skipped_cases.clone(),
            overrides: opts.overrides.clone(),
        };
        if main {
            record.write(&opts.out)?;
        }
        let summary = Summary {
            status: Status::Done,
            step: state.step,
            total_steps: total,
            steps_run: 0,
            first_loss: None,
            last_loss: None,
            nonfinite_total: state.nonfinite_total,
            checkpoint: existing,
            metrics: run_dir::metrics_jsonl(&opts.out),
            plot: run_dir::loss_png(&opts.out),
            device: format!("{dev:?}"),
            autocast_bf16: autocast,
            parameters: opt.numel(),
            volumes_per_s: 0.0,
            usable_slices: ds.usable.len(),
            cases: ds.cases.len(),
            skipped_cases: ds.skipped_cases.clone(),
            targets,
            rank,
            world_size: world,
            noisy_slices: ds.noisy_slices,
            signal: None,
            peak_rss_bytes: 0,
            peak_cuda_allocated_bytes: None,
            peak_cuda_reserved_bytes: None,
        };
        if let tch::Device::Cuda(i) = dev {
            crate::runtime::torch::cuda_reset_peak_memory(i);
        }
        let log = if main && state.step < total {
            Some(MetricsLog::open(&opts.out, state.step)?)
        } else {
            None
        };
        let elapsed_before = state.elapsed_s;
        Ok(Trainer {
            cfg: cfg.clone(),
            opts: opts.clone(),
            dev,
            dist,
            autocast,
            maker,
            epoch_len,
            global,
            total,
            vs,
            model,
            opt,
            state,
            summary,
            log,
            loader: None,
            started: Instant::now(),
            elapsed_before,
            volumes: 0,
        })
    }

    /// Optimiser steps taken (restored ones included) and the run's last.
    pub fn position(&self) -> (u64, u64) {
        (self.state.step, self.total)
    }

    pub fn is_done(&self) -> bool {
        self.state.step >= self.total
    }

    /// Whether this process writes the run folder (rank 0).
    pub fn is_main(&self) -> bool {
        self.summary.rank == 0
    }

    /// One optimiser step over `optimizer.accumulate` micro-batches: the
    /// losses, the gradient (averaged over the ranks), the clipped update,
    /// or a skip when the loss or the gradient is not finite; its metrics
    /// line is appended to metrics.jsonl (rank 0). `stop_asked` is this
    /// rank's stop request; the outcome's `stop` is every rank's.
    pub fn step(&mut self, stop_asked: bool) -> Result<StepOutcome> {
        if self.loader.is_none() {
            let (rank, world) = (self.summary.rank as u64, self.summary.world_size as u64);
            self.loader = Some(Loader::start_sharded(
                self.maker.clone(),
                self.state.data_position,
                rank,
                world,
            )?);
        }
        let t0 = Instant::now();
        let (cfg, dev, autocast, total) = (&self.cfg, self.dev, self.autocast, self.total);
        let world = self.summary.world_size;
        let accum = cfg.optimizer.accumulate as u64;
        let lr = lr_at(&cfg.optimizer, self.state.step, total);
        let mut wait = 0.0;
        let mut finite = true;
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut allreduce_s = None;
        let mut stop = stop_asked;
        let mut grad_norm = f64::NAN;
        let mut ok = false;
        let (loader, model, opt, state, dist) = (
            self.loader.as_mut().expect("started above"),
            &self.model,
            &mut self.opt,
            &mut self.state,
            &self.dist,
        );
        // One step inside one boundary: a libtorch exception anywhere in it
        // (an out-of-memory above all) ends the run with a named error and
        // the last checkpoint kept.
        let stepped = guard::boundary(|| {
            for _ in 0..accum {
                let tw = Instant::now();
                let b = loader.next_batch()?;
                wait += tw.elapsed().as_secs_f64();
                tch::manual_seed(torch_seed(cfg.seed, STREAM_TORCH, b.index));
                let vols = b.volumes.to_device(dev);
                let planes = Tensor::from_slice(&b.planes).to_device(dev);
                let bins = Tensor::from_slice(&model.bins(&b.positions, &b.indices)).to_device(dev);
                let ys: Vec<(String, Tensor)> = b.targets.iter().map(|(n, t)| (n.clone(), t.to_device(dev))).collect();
                let gather = dist.as_ref().filter(|_| cfg.all_gather_embeddings);
                let l = model.losses(&vols, &planes, &bins, &ys, true, autocast, gather)?;
                let total_loss = l.total.double_value(&[]);
                if !total_loss.is_finite() {
                    finite = false;
                    continue;
                }
                (&l.objective / accum as f64).backward();
                *sums.entry("loss".into()).or_default() += total_loss / accum as f64;
                let named = l
                    .terms
                    .iter()
                    .map(|(n, t)| (format!("loss_{n}"), t))
                    .chain(l.mass.iter().map(|(n, t)| (format!("mass_{n}"), t)))
                    .chain(l.matched.iter().map(|(n, t)| (format!("matched_{n}"), t)));
                for (k, t) in named {
                    *sums.entry(k).or_default() += t.double_value(&[]) / accum as f64;
                }
            }
            state.data_position += self.global.micro_batches();
            if let Some(d) = dist {
                // Every rank must skip, step or stop alike.
                let mut flags = [finite as u8 as f64, stop as u8 as f64];
                sum_over_ranks(d, &mut flags)?;
                finite = flags[0] == world as f64;
                stop = flags[1] > 0.0;
                if finite {
                    let ta = Instant::now();
                    grads::average_gradients(d, opt.params(), grads::BUCKET_BYTES)?;
                    allreduce_s = Some(ta.elapsed().as_secs_f64());
                    // The logged values: means over the ranks.
                    let mut vals: Vec<f64> = sums.values().copied().collect();
                    sum_over_ranks(d, &mut vals)?;
                    for (v, s) in sums.values_mut().zip(vals) {
                        *v = s / world as f64;
                    }
                }
            }
            grad_norm = if finite { opt.grad_norm() } else { f64::NAN };
            ok = finite && grad_norm.is_finite();
            if ok {
                if cfg.optimizer.clip_grad_norm > 0.0 {
                    opt.clip(cfg.optimizer.clip_grad_norm, grad_norm);
                }
                opt.step(lr);
                state.nonfinite_streak = 0;
            } else {
                state.nonfinite_total += 1;
                state.nonfinite_streak += 1;
            }
            opt.zero_grad();
            Ok(())
        });
        if let Err(e) = stepped {
            return Err(torch_failure(
                e,
                &format!("step {} of {total}", state.step + 1),
                cfg,
                dev,
                autocast,
                &self.opts.out,
            ));
        }
        state.step += 1;
        state.optimizer_t = opt.t;
        state.elapsed_s = self.elapsed_before + self.started.elapsed().as_secs_f64();
        self.summary.steps_run += 1;
        let step_volumes = self.global.volumes() as u64;
        self.volumes += step_volumes;
        let loss = sums.remove("loss").filter(|_| ok);
        let m = StepMetrics {
            step: state.step,
            epoch: (state.data_position * cfg.batch_size as u64) as f64 / self.epoch_len as f64,
            loss,
            terms: sums.into_iter().map(|(k, v)| (k, ok.then_some(v))).collect(),
            lr,
            grad_norm: ok.then_some(grad_norm),
            volumes_per_s: step_volumes as f64 / t0.elapsed().as_secs_f64(),
            data_wait_s: wait,
            allreduce_s,
            skipped: !ok,
            nonfinite_total: state.nonfinite_total,
            elapsed_s: state.elapsed_s,
        };
        if let Some(log) = self.log.as_mut() {
            log.append(&m)?;
        }
        if state.nonfinite_streak >= cfg.run.max_nonfinite as u64 {
            bail!(
                "stopped at step {}: {} steps in a row had a non-finite loss or gradient ({} in all), so they were skipped; the weights are those before step {}. Lower pretrain.optimizer.lr, set pretrain.optimizer.clip_grad_norm, or check the inputs; the last checkpoint is {}",
                state.step,
                state.nonfinite_streak,
                state.nonfinite_total,
                state.step + 1 - state.nonfinite_streak,
                run_dir::latest(&self.opts.out)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            );
        }
        Ok(StepOutcome { metrics: m, stop })
    }

    /// Whether the step just taken should be followed by a checkpoint:
    /// every `run.checkpoint_every` steps, at the last one, or on a stop.
    pub fn checkpoint_due(&self, stop: bool) -> bool {
        self.state.step.is_multiple_of(self.cfg.run.checkpoint_every) || self.state.step == self.total || stop
    }

    /// Writes a checkpoint of the weights, the optimiser and the state
    /// (rank 0; other ranks write nothing and get None), keeping the
    /// newest `run.keep_checkpoints`.
    pub fn checkpoint(&mut self) -> Result<Option<PathBuf>> {
        if !self.is_main() {
            return Ok(None);
        }
        let p = run_dir::save(
            &self.opts.out,
            &self.vs,
            &self.opt.state_tensors(),
            &self.state,
            self.cfg.run.keep_checkpoints,
        )?;
        self.summary.checkpoint = Some(p.clone());
        Ok(Some(p))
    }

    /// Ends the run: stops the loader, fills in the summary and (rank 0)
    /// draws the loss curve and writes summary.json.
    pub fn finish(mut self, status: Status, signal: Option<i32>) -> Result<Summary> {
        drop(self.loader.take());
        let mut summary = self.summary;
        summary.status = status;
        summary.signal = signal;
        summary.step = self.state.step;
        summary.nonfinite_total = self.state.nonfinite_total;
        if summary.steps_run > 0 {
            summary.volumes_per_s = self.volumes as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            summary.peak_rss_bytes = crate::runtime::memory::peak_rss_bytes();
            if let tch::Device::Cuda(i) = self.dev {
                if let Some((a, r)) = crate::runtime::torch::cuda_peak_memory(i) {
                    summary.peak_cuda_allocated_bytes = Some(a);
                    summary.peak_cuda_reserved_bytes = Some(r);
                }
            }
        }
        if summary.rank == 0 {
            finish(&mut summary, &self.opts.out)?;
        }
        Ok(summary)
    }
}

/// Runs (or resumes) pretraining: start, steps with checkpoints, finish.
pub fn run(cfg: &PretrainConfig, opts: &Options) -> Result<Summary> {
    let mut t = Trainer::start(cfg, opts)?;
    if t.is_done() {
        return t.finish(Status::UpToDate, None);
    }
    let signals = Signals::new(opts.handle_signals)?;
    let (step, total) = t.position();
    let bar = if t.is_main() {
        progress(total, step)
    } else {
        indicatif::ProgressBar::hidden()
    };
    while !t.is_done() {
        let out = match t.step(signals.raised()) {
            Ok(out) => out,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        if let Some(l) = out.metrics.loss {
            bar.set_message(format!("loss {l:.4}"));
        }
        bar.set_position(out.metrics.step);
        if t.checkpoint_due(out.stop) {
            if let Some(p) = t.checkpoint()? {
                tracing::info!(
                    "step {}/{total}: loss {:?}, checkpoint {}",
                    out.metrics.step,
                    out.metrics.loss,
                    p.display()
                );
            }
        }
        if out.stop {
            bar.finish_and_clear();
            let signal = signals.signal();
            drop(signals);
            return t.finish(Status::Interrupted, signal);
        }
    }
    bar.finish_and_clear();
    drop(signals);
    t.finish(Status::Done, None)
}
