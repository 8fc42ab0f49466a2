//! `med3d finetune`: trains the task's network from an export or from
//! scratch (the same network, randomly initialised from the same seed, so
//! the two runs differ only in the init) and writes the run folder:
//! `model.safetensors` (MONAI keys), `metrics.jsonl` (one line per step)
//! and `finetune.json` (settings, split, init, losses). On the CPU the run
//! is a pure function of the config, the cache and the init.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use super::config::{DownstreamConfig, Task};
use super::results::StepLine;
use super::{data, loss, model};
use crate::runtime::optim::{lr_at, Adam};
use crate::runtime::rng::{torch_seed, STREAM_FT_INIT, STREAM_FT_TORCH};

pub const FINETUNE_FORMAT: &str = "med3d-finetune/1";

pub use super::config::Init;

pub struct Options {
    pub cache: PathBuf,
    pub out: PathBuf,
    pub init: Init,
    /// Names the config in errors (its file).
    pub config_name: String,
}

/// `finetune.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub format: String,
    pub med3d_version: String,
    pub config: DownstreamConfig,
    pub init: String,
    pub init_notes: Vec<String>,
    pub cache: PathBuf,
    pub train_cases: Vec<String>,
    pub val_cases: Vec<String>,
    pub skipped_cases: Vec<(String, String)>,
    /// Cases of the cache without a label map (segmentation) or class.
    pub unlabelled_cases: usize,
    pub device: String,
    pub parameters: i64,
    pub steps: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub seconds: f64,
}

pub fn read_summary(run: &Path) -> Result<Summary> {
    let path = crate::artifacts::run::finetune_json(run);
    let bytes =
        std::fs::read(&path).with_context(|| format!("cannot read {} (is it a finetune run?)", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a finetune summary", path.display()))
}

/// Whether `dir` already holds the fine-tuning `med3d run` would do: same
/// config, same initialisation, same cache, and its weights written.
pub fn is_up_to_date(dir: &Path, cfg: &DownstreamConfig, init: &Init, cache: &Path) -> bool {
    read_summary(dir).is_ok_and(|s| {
        // operational settings (device, threads) do not make it stale
        DownstreamConfig {
            run: cfg.run.clone(),
            ..s.config
        } == *cfg
            && s.init == init.describe()
            && s.cache == cache
            && crate::artifacts::run::model_file(dir).is_file()
    })
}

pub(crate) fn setup(cfg: &DownstreamConfig) -> Result<tch::Device> {
    crate::runtime::start(
        cfg.run.threads,
        cfg.run.device,
        "downstream.run.device",
        cfg.run.keep_freed_memory,
    )
}

/// A libtorch failure in a fine-tuning or evaluation step, with the
/// settings that size it.
pub(crate) fn out_of_memory(e: anyhow::Error, at: &str, cfg: &DownstreamConfig, device: tch::Device) -> anyhow::Error {
    crate::runtime::guard::explain(
        e,
        at,
        device,
        &format!(
            "The step holds downstream.batch_size {} patches of downstream.patch_size {:?} (sliding windows: downstream.sliding_window.sw_batch_size {}) through {}",
            cfg.batch_size, cfg.patch_size, cfg.sliding_window.sw_batch_size, cfg.backbone.name()
        ),
        "Lower downstream.batch_size or downstream.patch_size (evaluation: downstream.sliding_window.sw_batch_size), or the backbone's width",
    )
}

pub fn run(cfg: &DownstreamConfig, opts: &Options) -> Result<Summary> {
    cfg.validate()
        .with_context(|| format!("{}: invalid downstream section", opts.config_name))?;
    let device = setup(cfg)?;
    let started = Instant::now();
    let (ids, unlabelled) = data::labelled_ids(&opts.cache, cfg.task)?;
    let (train_ids, val_ids) = data::split(&ids, cfg.val_fraction, cfg.seed);
    let mut cases = Vec::new();
    let mut skipped = Vec::new();
    for id in &train_ids {
        match data::read_case(&opts.cache, id, cfg.task, cfg.num_classes) {
            Ok(c) => cases.push(c),
            Err(e) => skipped.push((id.clone(), format!("{e:#}"))),
        }
    }
    ensure!(
        !cases.is_empty(),
        "no usable training case in {} ({} skipped{})",
        opts.cache.display(),
        skipped.len(),
        skipped
            .first()
            .map(|(i, e)| format!(", e.g. {i}: {e}"))
            .unwrap_or_default()
    );

    tch::manual_seed(torch_seed(cfg.seed, STREAM_FT_INIT, 0));
    let vs = VarStore::new(device);
    let net = model::Net::new(&vs, cfg)?;
    let notes = match &opts.init {
        Init::Scratch => Vec::new(),
        Init::Export(p) => model::load_export(&vs, &net, p, cfg, &opts.config_name)?,
    };
    let mut opt = Adam::new(&vs, &cfg.optimizer);

    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    // A fine-tuning run is redone whole: so are its event files.
    let tb = crate::artifacts::run::tensorboard_dir(&opts.out);
    match std::fs::remove_dir_all(&tb) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot clear {}", tb.display()))
        }
        _ => {}
    }
    let mut events = crate::artifacts::events::EventWriter::create(&tb)?;
    let mut metrics = Vec::new();
    let (mut first, mut last) = (None, None);
    for step in 0..cfg.steps {
        let at = format!("finetune step {} of {}", step + 1, cfg.steps);
        crate::runtime::guard::boundary(|| {
            tch::manual_seed(torch_seed(cfg.seed, STREAM_FT_TORCH, step));
            let b = data::batch(&cases, cfg, step)?;
            let (x, y) = (b.images.to_device(device), b.targets.to_device(device));
            let logits = net.forward_t(&x, true)?;
            let (mut dice_loss, mut ce_loss) = (None, None);
            let total = match cfg.task {
                Task::Segmentation => {
                    let l = loss::dice_ce(&logits, &y)?;
                    dice_loss = Some(l.dice.double_value(&[]));
                    ce_loss = Some(l.ce.double_value(&[]));
                    l.total
                }
                Task::Classification => loss::cross_entropy(&logits, &y),
            };
            let value = total.double_value(&[]);
            ensure!(
                value.is_finite(),
                "step {}: the loss is {value} (lower downstream.optimizer.lr?)",
                step + 1
            );
            opt.zero_grad();
            total.backward();
            let norm = opt.grad_norm();
            if cfg.optimizer.clip_grad_norm > 0.0 {
                opt.clip(cfg.optimizer.clip_grad_norm, norm);
            }
            let lr = lr_at(&cfg.optimizer, step, cfg.steps);
            opt.step(lr);
            let line = StepLine {
                step: step + 1,
                dice_loss,
                ce_loss,
                loss: value,
                lr,
                grad_norm: norm,
            };
            events.scalars(line.step, &crate::artifacts::events::numeric_fields(&line, &["step"]))?;
            metrics.push(serde_json::to_string(&line)?);
            first.get_or_insert(value);
            last = Some(value);
            Ok(())
        })
        .map_err(|e| out_of_memory(e, &at, cfg, device))?;
    }

    crate::model::state_dict::save_safetensors(&vs, &crate::artifacts::run::model_file(&opts.out))?;
    let mut jsonl = Vec::new();
    for m in &metrics {
        writeln!(jsonl, "{m}")?;
    }
    crate::fsutil::atomic_write(&crate::artifacts::run::finetune_metrics(&opts.out), &jsonl)?;
    let summary = Summary {
        format: FINETUNE_FORMAT.into(),
        med3d_version: env!("CARGO_PKG_VERSION").into(),
        config: cfg.clone(),
        init: opts.init.describe(),
        init_notes: notes,
        cache: opts.cache.clone(),
        train_cases: cases.iter().map(|c| c.id.clone()).collect(),
        val_cases: val_ids,
        skipped_cases: skipped,
        unlabelled_cases: unlabelled,
        device: format!("{device:?}"),
        parameters: opt.numel(),
        steps: cfg.steps,
        first_loss: first,
        last_loss: last,
        seconds: started.elapsed().as_secs_f64(),
    };
    crate::fsutil::atomic_write(
        &crate::artifacts::run::finetune_json(&opts.out),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}
