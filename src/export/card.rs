//! The model card written beside every export (`<out>.card.json`): what
//! the file holds, the exact constructor arguments a MONAI user passes to
//! load it strictly, the input the weights expect (spacing, grid,
//! intensities, from the run's preprocess config), the data and training
//! that made them, and the checkpoint they came from.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::artifacts::cache::PreprocessConfig;
use crate::model::swin_unetr::SwinUnetrConfig;
use crate::train::PretrainConfig;

/// The parts of a card that `med3d finetune --init` reads: the variant
/// and the backbone. Lenient where cards made elsewhere differ: the
/// backbone may sit at the top (hand-made and MONAI-side cards) or where
/// `med3d export` records it (`training.pretrain_config.backbone`).
#[derive(Debug, Deserialize)]
pub struct InitCard {
    pub variant: Variant,
    pub backbone: serde_json::Value,
}

/// `model.safetensors` -> `model.card.json`.
pub fn card_path(export: &Path) -> PathBuf {
    export.with_extension("card.json")
}

pub fn read_card(export: &Path) -> Result<InitCard> {
    let path = card_path(export);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the model card {} of export {}",
            path.display(),
            export.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    // `med3d export` keeps the backbone with the pretraining config it
    // records; hand-made cards (and MONAI-side ones) put it at the top.
    let backbone = v
        .get("backbone")
        .or_else(|| v.pointer("/training/pretrain_config/backbone"))
        .cloned();
    match (v.get("variant").and_then(|x| x.as_str()), backbone) {
        (Some(variant), Some(backbone)) => Ok(InitCard {
            variant: serde_json::from_value(serde_json::Value::from(variant)).map_err(|_| {
                anyhow::anyhow!(
                    "{}: variant {variant:?} is none of \"full\", \"encoder\", \"nnunet\", \"training_state\"",
                    path.display()
                )
            })?,
            backbone,
        }),
        _ => bail!(
            "{}: not a model card (needs `variant` and `backbone` or `training.pretrain_config.backbone`)",
            path.display()
        ),
    }
}

/// Bumped whenever the card's fields change meaning.
pub const CARD_FORMAT: &str = "med3d-export-card/1";

/// What an export file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The whole SwinUNETR (encoder and decoder), MONAI's keys.
    Full,
    /// `swinViT` alone, prefix removed: MONAI's `SwinTransformer`.
    Encoder,
    /// The whole variable store as trained (backbone, head, alignment).
    TrainingState,
    /// An nnU-Net network's state dict under `network_weights`, as
    /// `torch.save` writes it (nnU-Net's `-pretrained_weights`).
    Nnunet,
    /// The same, with nnssl's adaptation plan (`nnssl_adaptation_plan`).
    Nnssl,
}

impl Variant {
    /// The name a card records (`variant`).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Full => "full",
            Variant::Encoder => "encoder",
            Variant::TrainingState => "training_state",
            Variant::Nnunet => "nnunet",
            Variant::Nnssl => "nnssl",
        }
    }

    /// Whether the file holds an nnU-Net network under `network_weights`.
    pub fn holds_nnunet_network(self) -> bool {
        matches!(self, Variant::Nnunet | Variant::Nnssl)
    }
}

/// How nnU-Net builds and loads the network of an `nnunet` export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NnunetModel {
    pub plans_name: String,
    pub dataset_name: String,
    pub configuration: String,
    /// The plans' `architecture` the weights fit.
    pub architecture: Value,
    /// Axis order and patch size nnU-Net feeds it (its own order).
    pub patch_size: Vec<i64>,
    pub spacing: Vec<f64>,
    /// The fine-tuning command, with the dataset and fold to fill in.
    pub command: String,
    pub note: String,
}

/// The nnU-Net entry of a card for an nnU-Net backbone exported to `out`.
pub fn nnunet_model(n: &crate::model::backbone::NnunetConfig, out: &Path, variant: Variant) -> Result<NnunetModel> {
    let r = n
        .resolved
        .as_ref()
        .context("the run's nnU-Net backbone records no plans (run.json from an older med3d?)")?;
    Ok(NnunetModel {
        plans_name: r.plans_name.clone(),
        dataset_name: r.dataset_name.clone(),
        configuration: r.configuration.clone(),
        architecture: r.architecture.clone(),
        patch_size: r.patch_size.clone(),
        spacing: r.spacing.clone(),
        command: format!(
            "nnUNetv2_train {} {} FOLD -p {} -pretrained_weights {}",
            r.dataset_name,
            r.configuration,
            r.plans_name,
            out.display()
        ),
        note: if variant == Variant::Nnssl {
            "nnssl's checkpoint layout: torch.load(file, weights_only=True) is {'network_weights': the state dict \
             of the network nnU-Net builds from these plans, 'nnssl_adaptation_plan': the plan nnU-Net's \
             pretrained fine-tuning reads (nnUNetv2_preprocess_like_nnssl, nnUNetv2_train_pretrained; nnU-Net's \
             master branch after 2.8.1, see its documentation finetuning_from_nnssl_checkpoints.md)}; the \
             command above (-pretrained_weights, in every nnU-Net v2 release) reads network_weights alone"
        } else {
            "torch.load(file)['network_weights'] is the state dict of the network nnU-Net builds from these \
             plans (every key, aliases included); nnU-Net's load_pretrained_weights loads all of it but \
             the seg_layers, which fine-tuning builds for its own classes"
        }
        .into(),
    })
}

/// The Python class and constructor arguments that load the file strictly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonaiModel {
    /// e.g. `monai.networks.nets.SwinUNETR`.
    pub class: String,
    pub kwargs: Value,
    /// Keyword arguments of `forward` that the weights were trained with.
    pub forward_kwargs: Value,
    pub note: String,
}

/// What the network was fed during pretraining.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub channels: i64,
    /// The preprocess section of the cache the run trained on (spacing in
    /// mm after reorientation to RAS, ROI, intensity windows mapped to
    /// [0, 1]); absent when the cache's `cache.json` could not be read.
    pub preprocess: Option<PreprocessConfig>,
    /// The grid the volumes were resized to before the network (pretrain
    /// `input_size`); absent: the cached ROI itself.
    pub model_input_size: Option<[i64; 3]>,
    /// Each side of an input must be a multiple of this (SwinUNETR:
    /// patch_size^5; nnU-Net: the product of the strides, on every axis).
    pub size_multiple: i64,
    pub orientation: String,
    pub intensity_range: [f64; 2],
}

/// Where the training data came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataProvenance {
    pub cache: Option<PathBuf>,
    /// Hash of the slice index and embeddings the run trained on.
    pub data_hash: String,
    pub cases: Option<usize>,
    pub usable_slices: Option<usize>,
    /// (target table, width) the alignment used.
    pub targets: Vec<(String, i64)>,
}

/// How far training went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Training {
    pub step: u64,
    pub total_steps: u64,
    pub config_hash: String,
    /// The metrics line of the exported step (or the last one before it):
    /// total loss, its terms, learning rate, gradient norm.
    pub final_metrics: Option<BTreeMap<String, Value>>,
    pub pretrain_config: PretrainConfig,
}

/// The checkpoint an export came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub run: PathBuf,
    pub checkpoint: PathBuf,
    /// sha256 of the checkpoint's model.safetensors.
    pub model_sha256: String,
    /// The med3d version that trained it.
    pub trained_with: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Card {
    pub format: String,
    pub variant: Variant,
    /// The exported file's name (beside this card) and its sha256.
    pub file: String,
    pub file_sha256: String,
    pub tensors: usize,
    pub parameters: i64,
    pub monai: Option<MonaiModel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnunet: Option<NnunetModel>,
    pub input: InputSpec,
    pub data: DataProvenance,
    pub training: Training,
    pub source: Source,
    pub med3d_version: String,
}

/// `monai.networks.nets.SwinUNETR(**kwargs)` for this backbone.
pub fn swin_unetr_kwargs(c: &SwinUnetrConfig) -> Value {
    json!({
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "feature_size": c.feature_size,
        "depths": c.depths,
        "num_heads": c.num_heads,
        "window_size": c.window_size,
        "patch_size": c.patch_size,
        "mlp_ratio": c.mlp_ratio,
        "qkv_bias": c.qkv_bias,
        "drop_rate": c.drop_rate,
        "attn_drop_rate": c.attn_drop_rate,
        "dropout_path_rate": c.dropout_path_rate,
        "normalize": c.normalize,
        "patch_norm": c.patch_norm,
        "spatial_dims": 3,
        "downsample": c.downsample,
        "use_v2": c.use_v2,
    })
}

/// `monai.networks.nets.swin_unetr.SwinTransformer(**kwargs)`: the encoder
/// SwinUNETR builds from the same config (its `swinViT`).
pub fn swin_transformer_kwargs(c: &SwinUnetrConfig) -> Value {
    json!({
        "in_chans": c.in_channels,
        "embed_dim": c.feature_size,
        "window_size": c.window_size,
        "patch_size": [c.patch_size, c.patch_size, c.patch_size],
        "depths": c.depths,
        "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_ratio,
        "qkv_bias": c.qkv_bias,
        "drop_rate": c.drop_rate,
        "attn_drop_rate": c.attn_drop_rate,
        "drop_path_rate": c.dropout_path_rate,
        "patch_norm": c.patch_norm,
        "spatial_dims": 3,
        "downsample": c.downsample,
        "use_v2": c.use_v2,
    })
}

/// The MONAI entry of a card, `None` for the training-state variant.
pub fn monai_model(variant: Variant, c: &SwinUnetrConfig) -> Option<MonaiModel> {
    match variant {
        Variant::Full => Some(MonaiModel {
            class: "monai.networks.nets.SwinUNETR".into(),
            kwargs: swin_unetr_kwargs(c),
            forward_kwargs: json!({}),
            note:
                "model = SwinUNETR(**kwargs); model.load_state_dict(safetensors.torch.load_file(file), strict=True); \
                   out_channels is that of pretraining (the reconstruction): for another task build with your \
                   out_channels and load all keys but out.conv.conv.*"
                    .into(),
        }),
        Variant::Encoder => Some(MonaiModel {
            class: "monai.networks.nets.swin_unetr.SwinTransformer".into(),
            kwargs: swin_transformer_kwargs(c),
            forward_kwargs: json!({ "normalize": c.normalize }),
            note: "encoder = SwinTransformer(**kwargs); encoder.load_state_dict(safetensors.torch.load_file(file), \
                   strict=True); hidden = encoder(x, **forward_kwargs): five hidden states, the last the \
                   bottleneck (16 x embed_dim channels at 1/32 resolution); the same keys with a `swinViT.` \
                   prefix load into SwinUNETR.swinViT"
                .into(),
        }),
        Variant::TrainingState | Variant::Nnunet | Variant::Nnssl => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_are_what_cards_record() {
        for v in [
            Variant::Full,
            Variant::Encoder,
            Variant::TrainingState,
            Variant::Nnunet,
            Variant::Nnssl,
        ] {
            assert_eq!(serde_json::to_value(v).unwrap(), v.name());
            assert_eq!(serde_json::from_value::<Variant>(v.name().into()).unwrap(), v);
        }
    }

    #[test]
    fn encoder_kwargs_are_what_swin_unetr_passes_its_swin_vit() {
        let c = SwinUnetrConfig {
            feature_size: 48,
            window_size: [7, 6, 5],
            dropout_path_rate: 0.1,
            ..Default::default()
        };
        let k = swin_transformer_kwargs(&c);
        assert_eq!(k["embed_dim"], 48);
        assert_eq!(k["patch_size"], json!([2, 2, 2]));
        assert_eq!(k["window_size"], json!([7, 6, 5]));
        assert_eq!(k["drop_path_rate"], 0.1);
        assert_eq!(k["downsample"], "merging");
        let f = swin_unetr_kwargs(&c);
        assert_eq!(f["feature_size"], 48);
        assert_eq!(f["dropout_path_rate"], 0.1);
        assert!(monai_model(Variant::TrainingState, &c).is_none());
    }
}
