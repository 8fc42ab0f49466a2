//! The export stage: a pretraining checkpoint -> weights for downstream
//! networks, with a model card beside them.
//!
//! ```text
//! --format monai-swinunetr                 SwinUNETR's state dict, MONAI's keys (no psat./pool./align.)
//! --format monai-swinunetr --encoder-only  swinViT.* with the prefix removed: MONAI's SwinTransformer
//! --format safetensors                     the whole variable store as trained
//! --format nnunet                          torch.save({"network_weights": state_dict}): what
//!                                          nnUNetv2_train -pretrained_weights loads (nnU-Net backbones)
//! <out>.card.json                          kwargs, input spacing/ROI/intensities, data, step, losses, source
//! ```
//! The checkpoint is loaded strictly into the model its run's config
//! builds (every key, shape and kind), so a file that does not belong to
//! its config is refused, not exported. Files are written to a temporary
//! name and renamed; the card is written last.
pub mod card;
pub mod nnssl;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::artifacts::cache::PreprocessConfig;
use crate::artifacts::run::{self as run_dir, Checkpoint};
use crate::fsutil::{atomic_write, sha256_file, tmp_path};
use crate::model::backbone::{Backbone, BackboneConfig};
use crate::model::state_dict::{load_named, save_safetensors};
use crate::model::swin_unetr::ENCODER_PREFIX;
use crate::train::model::Pretrainer;
use card::{Card, DataProvenance, InputSpec, Source, Training, Variant, CARD_FORMAT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// MONAI SwinUNETR (or, with --encoder-only, SwinTransformer) state dict.
    MonaiSwinunetr,
    /// The whole variable store as trained (backbone, head, alignment weights).
    Safetensors,
    /// nnU-Net's checkpoint layout (`network_weights`: the network's whole
    /// state dict), for `nnUNetv2_train ... -pretrained_weights`.
    Nnunet,
    /// nnssl's checkpoint layout: `network_weights` and the adaptation plan
    /// (`nnssl_adaptation_plan`) that nnU-Net's pretrained fine-tuning
    /// reads (see [`nnssl`]).
    Nnssl,
}

#[derive(Debug, Clone)]
pub struct Request {
    /// The run folder `med3d pretrain` wrote.
    pub run: PathBuf,
    /// The checkpoint's step; default: the latest.
    pub step: Option<u64>,
    pub format: Format,
    pub encoder_only: bool,
    pub out: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Exported {
    pub file: PathBuf,
    pub card: PathBuf,
    pub variant: Variant,
    pub step: u64,
    pub tensors: usize,
    pub parameters: i64,
    /// Nothing written: the export was newer than its checkpoint.
    pub up_to_date: bool,
}

pub use card::card_path;

type RunRecord = crate::artifacts::run::RunRecord<crate::train::PretrainConfig>;

pub use crate::artifacts::run::find as find_checkpoint;

fn variant(req: &Request) -> Variant {
    match (req.format, req.encoder_only) {
        (Format::Safetensors, _) => Variant::TrainingState,
        (Format::MonaiSwinunetr, false) => Variant::Full,
        (Format::MonaiSwinunetr, true) => Variant::Encoder,
        (Format::Nnunet, _) => Variant::Nnunet,
        (Format::Nnssl, _) => Variant::Nnssl,
    }
}

/// Refuses a format that does not hold the run's backbone.
fn check_format(req: &Request, backbone: &BackboneConfig) -> Result<()> {
    let name = backbone.name();
    match (req.format, backbone) {
        (Format::MonaiSwinunetr, BackboneConfig::Nnunet(_)) => {
            bail!("--format monai-swinunetr: the run's backbone is nnU-Net's {name}; export it with --format nnunet")
        }
        (Format::Nnunet | Format::Nnssl, BackboneConfig::SwinUnetr(_)) => {
            bail!(
                "--format {}: the run's backbone is SwinUNETR; export it with --format monai-swinunetr",
                if req.format == Format::Nnssl { "nnssl" } else { "nnunet" }
            )
        }
        (Format::Nnunet | Format::Nnssl, _) if req.encoder_only => {
            bail!("--encoder-only applies to --format monai-swinunetr; nnU-Net loads the whole network")
        }
        _ => Ok(()),
    }
}

/// Whether `req.out` (and its card) were exported from `ckpt` after the
/// checkpoint was written, in the same variant.
fn up_to_date(req: &Request, ckpt: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(card_path(&req.out)) else {
        return false;
    };
    let Ok(c) = serde_json::from_str::<Card>(&text) else {
        return false;
    };
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let (Some(out), Some(src)) = (mtime(&req.out), mtime(&run_dir::model_file(ckpt))) else {
        return false;
    };
    c.variant == variant(req) && c.source.checkpoint == ckpt && out >= src
}

/// Exports unless the export is already newer than its checkpoint.
pub fn run_if_stale(req: &Request) -> Result<Exported> {
    let ckpt = find_checkpoint(&req.run, req.step)?;
    if up_to_date(req, &ckpt) {
        let cp = card_path(&req.out);
        let text = std::fs::read_to_string(&cp).with_context(|| format!("cannot read {}", cp.display()))?;
        let c: Card = serde_json::from_str(&text).with_context(|| format!("{}: not an export card", cp.display()))?;
        return Ok(Exported {
            file: req.out.clone(),
            card: card_path(&req.out),
            variant: c.variant,
            step: c.training.step,
            tensors: c.tensors,
            parameters: c.parameters,
            up_to_date: true,
        });
    }
    run(req)
}

/// Loads a checkpoint's model strictly into the model its run builds;
/// returns the backbone's store, the backbone, and the whole store.
fn load_checkpoint(rec: &RunRecord, ckpt: &Checkpoint) -> Result<(VarStore, Backbone, VarStore)> {
    let source = ckpt.model_file().display().to_string();
    let tensors = ckpt.model_tensors()?;
    let whole = VarStore::new(Device::Cpu);
    Pretrainer::new(&whole.root(), &rec.config, &rec.targets)
        .with_context(|| format!("{}: cannot build the model of its run.json", ckpt.dir.display()))?;
    let backbone = VarStore::new(Device::Cpu);
    let net = Backbone::new(&backbone.root(), &rec.config.backbone, 1)?;
    let body: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| Pretrainer::is_backbone_key(k))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    load_named(&backbone, body, &source).context("the checkpoint does not fit the backbone its run.json configures")?;
    load_named(&whole, tensors, &source).context("the checkpoint does not fit the model its run.json configures")?;
    Ok((backbone, net, whole))
}

fn lcm(a: i64, b: i64) -> i64 {
    fn gcd(a: i64, b: i64) -> i64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

/// Writes named tensors (on the CPU, sorted by name) atomically.
fn write_tensors(named: &mut [(String, Tensor)], out: &Path) -> Result<()> {
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let tmp = tmp_path(out);
    Tensor::write_safetensors(named, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    crate::fsutil::commit_file(&tmp, out)
}

fn read_preprocess(cache: Option<&Path>) -> Option<PreprocessConfig> {
    match crate::artifacts::cache::CacheInfo::read(cache?) {
        Ok(c) => Some(c.preprocess),
        Err(e) => {
            tracing::warn!("export: {e:#}; the card will not name the preprocess settings");
            None
        }
    }
}

/// The metrics line of `step`, or the last one before it.
fn metrics_at(run: &Path, step: u64) -> Result<Option<BTreeMap<String, serde_json::Value>>> {
    let all = crate::train::metrics::read(&run_dir::metrics_jsonl(run))?;
    let Some(m) = all.into_iter().rev().find(|m| m.step <= step) else {
        return Ok(None);
    };
    Ok(serde_json::from_value(serde_json::to_value(m)?)?)
}

/// Exports the checkpoint `req` names.
pub fn run(req: &Request) -> Result<Exported> {
    let (ckpt, rec) = Checkpoint::open::<crate::train::PretrainConfig>(&req.run, req.step)?;
    check_format(req, &rec.config.backbone)?;
    let (backbone, net, whole) = load_checkpoint(&rec, &ckpt)?;
    let state = &ckpt.state;
    let variant = variant(req);
    // the cache's settings, for the card and the nnssl plan (read once)
    let preprocess = read_preprocess(rec.cache.as_deref());
    if let Some(dir) = req.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let store = match variant {
        Variant::TrainingState => &whole,
        _ => &backbone,
    };
    let vars = store.variables();
    let mut named: Vec<(String, Tensor)> = vars
        .iter()
        .filter_map(|(k, t)| match variant {
            Variant::Encoder => k
                .strip_prefix(ENCODER_PREFIX)
                .map(|s| (s.to_string(), t.shallow_clone())),
            _ => Some((k.clone(), t.shallow_clone())),
        })
        .collect();
    let parameters: i64 = named
        .iter()
        .filter(|(_, t)| t.is_floating_point())
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let tensors = named.len();
    match variant {
        Variant::Encoder => write_tensors(&mut named, &req.out)?,
        Variant::Nnunet | Variant::Nnssl => {
            // PyTorch's state dict names some tensors twice (see
            // model::nnunet::net); nnU-Net's loader asks for every name.
            for (alias, name) in net.aliases() {
                let t = vars
                    .get(name)
                    .ok_or_else(|| anyhow!("internal: alias {alias} of a missing {name}"))?;
                named.push((alias.clone(), t.shallow_clone()));
            }
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let plan = match (&rec.config.backbone, variant) {
                (BackboneConfig::Nnunet(n), Variant::Nnssl) => {
                    let pre = preprocess.as_ref().with_context(|| {
                        format!(
                            "--format nnssl records the spacing pretraining used: the run's cache ({}) has no readable cache.json",
                            rec.cache.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into())
                        )
                    })?;
                    Some(nnssl::adaptation_plan(n, pre, rec.config.input_size)?)
                }
                _ => None,
            };
            let extra: Vec<(&str, &serde_json::Value)> = plan.iter().map(|p| ("nnssl_adaptation_plan", p)).collect();
            crate::model::torch_save::save_checkpoint(&req.out, "network_weights", &named, &extra)?;
        }
        _ => save_safetensors(store, &req.out)?,
    }

    // Checkpoint::open verified the file against this hash; older
    // checkpoints recorded none.
    let model_sha256 = match state.files.get(run_dir::TENSOR_FILES[0]) {
        Some(h) => h.clone(),
        None => sha256_file(&ckpt.model_file())?,
    };
    let cfg = &rec.config;
    let card = Card {
        format: CARD_FORMAT.into(),
        variant,
        file: req
            .out
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        file_sha256: sha256_file(&req.out)?,
        tensors,
        parameters,
        monai: match &cfg.backbone {
            BackboneConfig::SwinUnetr(c) => card::monai_model(variant, c),
            BackboneConfig::Nnunet(_) => None,
        },
        nnunet: match &cfg.backbone {
            BackboneConfig::Nnunet(n) if matches!(variant, Variant::Nnunet | Variant::Nnssl) => {
                Some(card::nnunet_model(n, &req.out, variant)?)
            }
            _ => None,
        },
        input: InputSpec {
            channels: 1,
            preprocess,
            model_input_size: cfg.input_size,
            size_multiple: cfg.backbone.size_multiple()?.into_iter().fold(1, lcm),
            orientation: "RAS".into(),
            intensity_range: [0.0, 1.0],
        },
        data: DataProvenance {
            cache: rec.cache.clone(),
            data_hash: state.data_hash.clone(),
            cases: rec.cases,
            usable_slices: rec.usable_slices,
            targets: rec.targets.clone(),
        },
        training: Training {
            step: state.step,
            total_steps: state.total_steps,
            config_hash: state.config_hash.clone(),
            final_metrics: metrics_at(&req.run, state.step)?,
            pretrain_config: cfg.clone(),
        },
        source: Source {
            run: req.run.clone(),
            checkpoint: ckpt.dir.clone(),
            model_sha256,
            trained_with: state.med3d_version.clone(),
        },
        med3d_version: crate::VERSION.into(),
    };
    atomic_write(&card_path(&req.out), &serde_json::to_vec_pretty(&card)?)?;
    Ok(Exported {
        file: req.out.clone(),
        card: card_path(&req.out),
        variant,
        step: state.step,
        tensors,
        parameters,
        up_to_date: false,
    })
}
