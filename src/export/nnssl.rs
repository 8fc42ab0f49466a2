//! `med3d export --format nnssl`: the checkpoint dict the DKFZ nnssl
//! framework writes (`network_weights` and `nnssl_adaptation_plan`), which
//! mainline nnU-Net's pretrained fine-tuning reads
//! (`nnUNetv2_preprocess_like_nnssl`, `nnUNetv2_train_pretrained`).
//!
//! The adaptation plan, field by field as nnssl's `AdaptationPlan`
//! serialises it (read in nnssl's `adaptation_planning/adaptation_plan.py`
//! and nnU-Net's `experiment_planning/like_nnssl.py` and
//! `training/nnUNetTrainer/pretraining/pretrainedTrainer.py`):
//! - `architecture_plans`: `arch_class_name` (nnssl's short name,
//!   `ResidualEncoderUNet`), `arch_kwargs` (the plans' own, with classes as
//!   dotted names) and `arch_kwargs_requiring_import` (the plans'
//!   `_kw_requires_import`): nnU-Net rebuilds the network from them;
//! - `pretrain_plan`: nnssl's `Plan` with the one configuration pretraining
//!   used: the spacing and patch (input) size med3d trained at, in nnU-Net's
//!   axis order, with the plans' names, transposition and normalisation;
//! - `pretrain_num_input_channels` 1; `recommended_downstream_patchsize`
//!   the plans' patch size;
//! - `key_to_encoder` `encoder.stages`, `key_to_stem` `encoder.stem`,
//!   `keys_to_in_proj` the stem's first convolution under both of its
//!   names, `key_to_lpe` null (no positional embedding).
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::artifacts::cache::PreprocessConfig;
use crate::model::backbone::NnunetConfig;

/// The prefixes nnU-Net's pretrained trainer loads strictly into
/// `network.encoder.stages` and `network.encoder.stem`.
pub const KEY_TO_ENCODER: &str = "encoder.stages";
pub const KEY_TO_STEM: &str = "encoder.stem";

/// The adaptation plan of a run of the nnU-Net backbone `n`, pretrained on
/// volumes preprocessed with `pre` and fed at `input_size` (med3d's x, y, z;
/// None: the cached grid).
pub fn adaptation_plan(n: &NnunetConfig, pre: &PreprocessConfig, input_size: Option<[i64; 3]>) -> Result<Value> {
    let r = n
        .resolved
        .as_ref()
        .context("the run's nnU-Net backbone records no plans (run.json from an older med3d?)")?;
    let arch = &r.architecture;
    let class = arch
        .get("network_class_name")
        .and_then(Value::as_str)
        .context("the plans' architecture has no network_class_name")?;
    let short = class.rsplit('.').next().unwrap_or(class);
    if short != "ResidualEncoderUNet" {
        bail!(
            "--format nnssl: the run's network is {short}; nnssl's adaptation plan names an encoder stem \
             (`encoder.stem`), which only ResidualEncoderUNet has: export it with --format nnunet"
        );
    }
    let kwargs = arch
        .get("arch_kwargs")
        .context("the plans' architecture has no arch_kwargs")?;
    let requiring = arch.get("_kw_requires_import").cloned().unwrap_or_else(|| json!([]));

    // med3d's axes (RAS x, y, z) -> nnU-Net's network axes
    let axes = n.network_axes()?;
    let to_net_f = |v: [f64; 3]| -> Vec<f64> { axes.iter().map(|&a| v[a]).collect() };
    let to_net_i = |v: [i64; 3]| -> Vec<i64> { axes.iter().map(|&a| v[a]).collect() };
    let roi = pre.roi.map(|x| x as i64);
    let spacing = to_net_f(pre.spacing);
    let patch = to_net_i(input_size.unwrap_or(roi));
    let forward: Vec<i64> = if r.transpose_forward.is_empty() {
        vec![0, 1, 2]
    } else {
        r.transpose_forward.clone()
    };
    let mut backward = vec![0i64; forward.len()];
    for (i, &f) in forward.iter().enumerate() {
        let slot = backward
            .get_mut(f as usize)
            .context("the plans' transpose_forward is not a permutation of 0, 1, 2")?;
        *slot = i as i64;
    }
    let spacing_style = if spacing.iter().all(|&s| s == 1.0) {
        "onemmiso"
    } else {
        "median"
    };
    let channels = r.normalization_schemes.len().max(1);
    let configuration = json!({
        "data_identifier": format!("med3d_{}", r.configuration),
        "preprocessor_name": "med3d",
        "spacing_style": spacing_style,
        "normalization_schemes": r.normalization_schemes,
        "use_mask_for_norm": vec![false; channels],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": false, "order": 1, "order_z": 1, "force_separate_z": false},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": true, "order": 1, "order_z": 1, "force_separate_z": false},
        "spacing": spacing,
        "patch_size": patch,
    });
    Ok(json!({
        "architecture_plans": {
            "arch_class_name": short,
            "arch_kwargs": kwargs,
            "arch_kwargs_requiring_import": requiring,
        },
        "pretrain_plan": {
            "dataset_name": r.dataset_name,
            "plans_name": r.plans_name,
            "original_median_spacing_after_transp": r.spacing,
            "image_reader_writer": "NibabelIOWithReorient",
            "transpose_forward": forward,
            "transpose_backward": backward,
            "configurations": {r.configuration.clone(): configuration},
            "experiment_planner_used": format!("med3d {} (from the plans {})", crate::VERSION, r.plans_name),
        },
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": r.patch_size,
        "key_to_encoder": KEY_TO_ENCODER,
        "key_to_stem": KEY_TO_STEM,
        "keys_to_in_proj": [format!("{KEY_TO_STEM}.convs.0.conv"), format!("{KEY_TO_STEM}.convs.0.all_modules.0")],
        "key_to_lpe": Value::Null,
    }))
}
