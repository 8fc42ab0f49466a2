//! The downstream networks and how an export initialises them.
//!
//! Segmentation trains the backbone (MONAI's SwinUNETR, or an nnU-Net
//! U-Net from a plans file) with `num_classes` outputs;
//! classification trains its encoder (`swinViT`) with a global average pool
//! of the deepest hidden state and a linear `head`. Variable names are
//! MONAI's, so the fine-tuned weights load into MONAI as they are.
//!
//! An export (see docs/monai-export.md, `med3d export`) is a safetensors state
//! dict beside a `.card.json` model card: the full SwinUNETR (`variant:
//! full`) or the encoder alone with the `swinViT.` prefix stripped
//! (`variant: encoder`). Loading is strict on names and shapes except for
//! what the task replaces (an `out` head of another class count, the
//! decoder an encoder-only export lacks, the classification head), and the
//! card's backbone must equal the config's. An nnU-Net export (`variant:
//! nnunet`, `torch.save`'s `network_weights`) loads into the same plans'
//! network, all but `seg_layers` when the class count differs.
use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use tch::nn::{self, Module, VarStore};
use tch::{Kind, Tensor};

use super::config::{DownstreamConfig, Task};
use crate::export::card::{card_path, read_card, InitCard as Card, Variant};
use crate::model::backbone::{Backbone, BackboneConfig};
use crate::model::swin::transformer::SwinTransformer;
use crate::model::swin_unetr::{SwinUnetrConfig, ENCODER, ENCODER_PREFIX};

/// The encoder, pooled, and a linear read-out.
#[derive(Debug)]
pub struct Classifier {
    config: SwinUnetrConfig,
    swin_vit: SwinTransformer,
    head: nn::Linear,
}

impl Classifier {
    pub fn new(p: &nn::Path, config: &SwinUnetrConfig, num_classes: i64) -> Result<Self> {
        config.validate()?;
        Ok(Classifier {
            swin_vit: SwinTransformer::new(&(p / ENCODER), config),
            // Zero-initialised so the first logits are uniform: the pooled
            // features share a large common part, which a random head turns
            // into confident, arbitrary first predictions.
            head: nn::linear(
                p / "head",
                config.bottleneck_channels(),
                num_classes,
                nn::LinearConfig {
                    ws_init: nn::Init::Const(0.0),
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                },
            ),
            config: config.clone(),
        })
    }

    /// Logits [b, num_classes].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.config.check_input(&x.size())?;
        let hidden = self.swin_vit.forward(x, self.config.normalize, train);
        let pooled = hidden[4].mean_dim(&[2i64, 3, 4][..], false, Kind::Float);
        Ok(self.head.forward(&pooled))
    }
}

/// The network a task trains.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process; boxing buys nothing
pub enum Net {
    Segmentation(Backbone),
    Classification(Classifier),
}

impl Net {
    /// Creates the task's network at the root of `vs` (randomly initialised
    /// from libtorch's current generator).
    pub fn new(vs: &VarStore, cfg: &DownstreamConfig) -> Result<Net> {
        let root = vs.root();
        Ok(match cfg.task {
            Task::Segmentation => Net::Segmentation(Backbone::new(&root, &cfg.backbone, cfg.num_classes)?),
            Task::Classification => Net::Classification(Classifier::new(&root, &cfg.swin_config()?, cfg.num_classes)?),
        })
    }

    /// (second name, store name) of tensors PyTorch's state dict names twice.
    pub fn aliases(&self) -> &[(String, String)] {
        match self {
            Net::Segmentation(b) => b.aliases(),
            Net::Classification(_) => &[],
        }
    }

    /// Logits: [b, classes, x, y, z] or [b, classes].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Net::Segmentation(m) => Ok(m.forward_t(x, train)?.logits),
            Net::Classification(m) => m.forward_t(x, train),
        }
    }
}

/// Settings that only change training-time randomness or arithmetic, not
/// the weights' meaning.
const NOT_ARCHITECTURE: &[&str] = &[
    "in_channels",
    "out_channels",
    "fused_attention",
    "drop_rate",
    "attn_drop_rate",
    "dropout_path_rate",
];

fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a, b) {
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => x.as_f64() == y.as_f64(),
        (serde_json::Value::Array(x), serde_json::Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

/// Errors naming every backbone setting where the card and config differ.
pub fn check_backbone(card: &Card, card_path: &Path, ours: &BackboneConfig, config_name: &str) -> Result<()> {
    let ours = match ours {
        BackboneConfig::SwinUnetr(c) => c,
        BackboneConfig::Nnunet(n) => {
            let theirs = card
                .backbone
                .pointer("/nnunet/resolved/architecture")
                .with_context(|| format!("{}: not an nnU-Net backbone's card", card_path.display()))?;
            let ours = &n
                .resolved
                .as_ref()
                .context("downstream.backbone.nnunet: plans not read")?
                .architecture;
            ensure!(
                theirs == ours,
                "the export's nnU-Net architecture ({}) is not that of {} configuration {} ({config_name})",
                card_path.display(),
                n.plans.display(),
                n.configuration
            );
            return Ok(());
        }
    };
    let ours = serde_json::to_value(ours)?;
    let (Some(theirs), Some(ours)) = (card.backbone.as_object(), ours.as_object()) else {
        bail!("{}: `backbone` is not an object", card_path.display());
    };
    let mut diffs = Vec::new();
    for (k, v) in theirs {
        if NOT_ARCHITECTURE.contains(&k.as_str()) {
            continue;
        }
        match ours.get(k) {
            Some(o) if same(o, v) => {}
            Some(o) => diffs.push(format!(
                "{k} is {v} in the export, {o} in {config_name} downstream.backbone"
            )),
            None => diffs.push(format!(
                "{k} ({v}) in the export is not a SwinUNETR setting med3d knows"
            )),
        }
    }
    if !diffs.is_empty() {
        bail!(
            "the export's backbone ({}) does not match the config's:\n  {}",
            card_path.display(),
            diffs.join("\n  ")
        );
    }
    Ok(())
}

/// Loads export `path` into the task's network in `vs` (see the module
/// doc); returns notes on what was not loaded, for the log.
pub fn load_export(
    vs: &VarStore,
    net: &Net,
    path: &Path,
    cfg: &DownstreamConfig,
    config_name: &str,
) -> Result<Vec<String>> {
    let card = read_card(path)?;
    let nnunet_backbone = matches!(cfg.backbone, BackboneConfig::Nnunet(_));
    ensure!(
        card.variant.holds_nnunet_network() == nnunet_backbone,
        "{}: a {:?} export does not initialise downstream.backbone {} ({config_name})",
        path.display(),
        card.variant.name(),
        cfg.backbone.name()
    );
    check_backbone(&card, &card_path(path), &cfg.backbone, config_name)?;
    let mut tensors: Vec<(String, Tensor)> = match card.variant {
        Variant::Full | Variant::Encoder => {
            let t = Tensor::read_safetensors(path).with_context(|| format!("cannot read export {}", path.display()))?;
            if card.variant == Variant::Full {
                t
            } else {
                t.into_iter()
                    .map(|(k, t)| (format!("{ENCODER_PREFIX}{k}"), t))
                    .collect()
            }
        }
        Variant::Nnunet | Variant::Nnssl => nnunet_weights(path, vs, net.aliases())?,
        Variant::TrainingState => bail!(
            "{}: a training_state export holds the whole pretraining store; fine-tune from \
             `med3d export --format monai-swinunetr` (or --format nnunet)",
            card_path(path).display()
        ),
    };
    let vars = vs.variables();
    let mut notes = Vec::new();
    // What the task replaces: dropped from the file, kept as initialised.
    let keep_own: Box<dyn Fn(&str) -> bool> = match (cfg.task, card.variant) {
        (Task::Classification, _) => {
            notes.push(format!(
                "classification: only the encoder ({ENCODER_PREFIX}*) of {} is loaded; the linear head is initialised randomly",
                path.display()
            ));
            Box::new(|k: &str| !k.starts_with(ENCODER_PREFIX))
        }
        (Task::Segmentation, Variant::Encoder) => {
            notes.push(format!(
                "{} is an encoder-only export: the decoder (encoder1..4, encoder10, decoder1..5, out) is initialised randomly",
                path.display()
            ));
            Box::new(|k: &str| !k.starts_with(ENCODER_PREFIX))
        }
        (Task::Segmentation, Variant::Nnunet | Variant::Nnssl) => {
            let head = "decoder.seg_layers.";
            let differ = tensors
                .iter()
                .filter(|(k, _)| k.starts_with(head))
                .any(|(k, t)| vars.get(k).map(|v| v.size()) != Some(t.size()));
            if differ {
                notes.push(format!(
                    "the export's seg_layers are not for downstream.num_classes {}: decoder.seg_layers.* is not loaded (initialised randomly), as nnU-Net's load_pretrained_weights skips them",
                    cfg.num_classes
                ));
                Box::new(move |k: &str| k.starts_with(head))
            } else {
                Box::new(|_: &str| false)
            }
        }
        (Task::Segmentation, _) => {
            let theirs = tensors
                .iter()
                .find(|(k, _)| k == "out.conv.conv.weight")
                .map(|(_, t)| t.size());
            let ours = vars.get("out.conv.conv.weight").map(|t| t.size());
            if theirs.is_some() && theirs != ours {
                notes.push(format!(
                    "the export's output head has {} classes, downstream.num_classes is {}: out.* is not loaded (initialised randomly)",
                    theirs.as_ref().map(|s| s[0]).unwrap_or(0),
                    cfg.num_classes
                ));
                Box::new(|k: &str| k.starts_with("out."))
            } else {
                Box::new(|_: &str| false)
            }
        }
    };
    tensors.retain(|(k, _)| !keep_own(k));
    let present: BTreeSet<String> = tensors.iter().map(|(k, _)| k.clone()).collect();
    for (k, v) in &vars {
        if keep_own(k) && !present.contains(k) {
            tensors.push((k.clone(), v.detach().copy()));
        }
    }
    crate::model::state_dict::load_named(vs, tensors, &format!("export {}", path.display()))?;
    Ok(notes)
}

/// The network weights of an nnU-Net export, under the store's names: the
/// second names PyTorch's state dict carries (`aliases`: `all_modules.*`,
/// `decoder.encoder.*`) are dropped once each is checked to hold the same
/// values as its first; any other name must be one of the store's.
fn nnunet_weights(path: &Path, vs: &VarStore, aliases: &[(String, String)]) -> Result<Vec<(String, Tensor)>> {
    let all =
        crate::encoders::torch_pickle::read(path).with_context(|| format!("cannot read export {}", path.display()))?;
    let named: std::collections::HashMap<String, Tensor> = all
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix("network_weights.").map(|k| (k.to_string(), t)))
        .collect();
    ensure!(
        !named.is_empty(),
        "{}: no network_weights (not an nnU-Net checkpoint)",
        path.display()
    );
    let vars = vs.variables();
    let second: std::collections::HashMap<&str, &str> = aliases.iter().map(|(a, n)| (a.as_str(), n.as_str())).collect();
    let mut out = Vec::new();
    for (k, t) in &named {
        if vars.contains_key(k) {
            out.push((k.clone(), t.shallow_clone()));
        } else if let Some(first) = second.get(k.as_str()) {
            match named.get(*first) {
                Some(f) if f.size() == t.size() && f.equal(t) => {}
                Some(_) => bail!(
                    "{}: {k} and {first} name one tensor but hold different values",
                    path.display()
                ),
                None => bail!(
                    "{}: {k} is there but {first}, the tensor it names, is not",
                    path.display()
                ),
            }
        } else {
            bail!("{}: {k} is not a tensor of the configured network", path.display());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_backbone_where_med3d_export_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("swinunetr.safetensors");
        let card = serde_json::json!({
            "format": "med3d-export-card/1",
            "variant": "full",
            "monai": {"class": "monai.networks.nets.SwinUNETR", "kwargs": {"feature_size": 12}},
            "training": {"pretrain_config": {"backbone": {"feature_size": 24, "depths": [2, 2, 2, 2]}}},
        });
        std::fs::write(card_path(&export), card.to_string()).unwrap();
        let c = read_card(&export).unwrap();
        assert_eq!(c.variant, Variant::Full);
        assert_eq!(c.backbone["feature_size"], 24);

        // a card at the top level wins
        let card = serde_json::json!({"variant": "encoder", "backbone": {"feature_size": 48}});
        std::fs::write(card_path(&export), card.to_string()).unwrap();
        assert_eq!(read_card(&export).unwrap().backbone["feature_size"], 48);

        let card = serde_json::json!({"variant": "half", "backbone": {"feature_size": 48}});
        std::fs::write(card_path(&export), card.to_string()).unwrap();
        let msg = format!("{:#}", read_card(&export).unwrap_err());
        assert!(
            msg.contains("swinunetr.card.json: variant \"half\" is none of"),
            "{msg}"
        );

        std::fs::write(card_path(&export), r#"{"variant": "full"}"#).unwrap();
        let msg = format!("{:#}", read_card(&export).unwrap_err());
        assert!(msg.contains("swinunetr.card.json: not a model card"), "{msg}");
    }
}
