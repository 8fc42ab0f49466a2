//! The experiment's `downstream:` section: which task, the network (whose
//! backbone must match the export's model card), patches, optimiser,
//! augmentation, validation split and sliding-window settings. Unknown keys
//! are errors.
use std::path::PathBuf;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use super::sliding::SlidingWindow;

/// Where fine-tuning's weights come from: `scratch`, or an export file
/// (written as that word or the file's path, in configs, on the command
/// line and in finetune.json).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    Scratch,
    Export(PathBuf),
}

impl Init {
    pub fn parse(s: &str) -> Init {
        if s == "scratch" {
            Init::Scratch
        } else {
            Init::Export(PathBuf::from(s))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Init::Scratch => "scratch".into(),
            Init::Export(p) => p.display().to_string(),
        }
    }
}

impl Serialize for Init {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.describe())
    }
}

impl<'de> Deserialize<'de> for Init {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Init, D::Error> {
        Ok(Init::parse(&String::deserialize(d)?))
    }
}
use crate::model::backbone::BackboneConfig;
use crate::model::swin_unetr::SwinUnetrConfig;
use crate::runtime::optim::OptimConfig;
use crate::runtime::DeviceChoice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// The backbone (SwinUNETR, or an nnU-Net U-Net) with `num_classes`
    /// output channels, Dice + cross-entropy.
    Segmentation,
    /// The Swin encoder, global average pooling of its deepest hidden
    /// state, a linear head, cross-entropy.
    Classification,
}

/// Random transforms applied to each training sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamAugment {
    /// Probability of flipping each axis (image and label together).
    pub flip_prob: f64,
    /// Intensity x -> x (1 + a) + b, a in [-scale, scale], b in [-shift, shift].
    pub intensity_scale: f64,
    pub intensity_shift: f64,
    /// Chance of a random elastic deformation (image and label together):
    /// a displacement field drawn uniformly in [-magnitude, magnitude]
    /// voxels on a grid of `elastic_points` per axis, upsampled smoothly.
    pub elastic_prob: f64,
    pub elastic_magnitude: f64,
    pub elastic_points: i64,
}

impl Default for DownstreamAugment {
    fn default() -> Self {
        DownstreamAugment {
            flip_prob: 0.5,
            intensity_scale: 0.1,
            intensity_shift: 0.1,
            elastic_prob: 0.0,
            elastic_magnitude: 4.0,
            elastic_points: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamConfig {
    pub task: Task,
    /// Segmentation: label values 0..num_classes (0 = background);
    /// classification: case classes 0..num_classes.
    pub num_classes: i64,
    /// MONAI SwinUNETR arguments (in_channels 1; out_channels is set from
    /// num_classes), or `nnunet:` with a plans file (segmentation only).
    pub backbone: BackboneConfig,
    /// Weights when `med3d run` has no export of its own: an export file or
    /// `scratch`.
    pub init: Option<Init>,
    /// Segmentation training patch; classification input grid (the whole
    /// volume is resized to it). Multiples of 32.
    pub patch_size: [i64; 3],
    /// Segmentation: chance that a patch is centred on a foreground voxel
    /// (MONAI RandCropByPosNegLabeld's pos / (pos + neg)).
    pub pos_fraction: f64,
    pub batch_size: usize,
    pub steps: u64,
    pub optimizer: OptimConfig,
    pub seed: u64,
    pub augment: DownstreamAugment,
    /// Fraction of the cache's cases held out for `evaluate` (by a seeded
    /// shuffle); 0 trains on every case.
    pub val_fraction: f64,
    /// A labelled manifest evaluated instead of the held-out cases (`med3d
    /// run` preprocesses it into `<workdir>/cache_test`).
    pub test_manifest: Option<PathBuf>,
    pub sliding_window: SlidingWindow,
    /// Operational settings: where and how the run goes, not what it
    /// learns.
    pub run: DownstreamRun,
}

/// `downstream.run`: the operational settings of fine-tuning and
/// evaluation (see [`crate::runtime::run_block`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownstreamRun {
    pub device: DeviceChoice,
    /// libtorch CPU threads; 0 keeps libtorch's default.
    pub threads: usize,
    /// On the CPU: keep freed memory for reuse (as
    /// `pretrain.run.keep_freed_memory`).
    pub keep_freed_memory: bool,
}

impl Default for DownstreamRun {
    fn default() -> Self {
        DownstreamRun {
            device: DeviceChoice::Auto,
            threads: 0,
            keep_freed_memory: true,
        }
    }
}

impl DownstreamRun {
    /// The keys configs written before the block gave under `downstream`.
    pub const KEYS: &'static [&'static str] = &["device", "threads", "keep_freed_memory"];
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        DownstreamConfig {
            task: Task::Segmentation,
            num_classes: 2,
            backbone: BackboneConfig::default(),
            init: None,
            patch_size: [96, 96, 96],
            pos_fraction: 0.5,
            batch_size: 2,
            steps: 100,
            optimizer: OptimConfig {
                lr: 1e-4,
                ..OptimConfig::default()
            },
            seed: 0,
            augment: DownstreamAugment::default(),
            val_fraction: 0.0,
            test_manifest: None,
            sliding_window: SlidingWindow::default(),
            run: DownstreamRun::default(),
        }
    }
}

impl DownstreamConfig {
    /// Reads the files the config points to (an nnU-Net backbone's plans).
    pub fn resolve(&mut self) -> Result<()> {
        self.backbone.resolve().map_err(|e| e.context("downstream"))
    }

    pub fn validate(&self) -> Result<()> {
        match &self.backbone {
            BackboneConfig::SwinUnetr(c) => {
                ensure!(
                    c.in_channels == 1,
                    "downstream.backbone.in_channels must be 1 (one image channel), got {}",
                    c.in_channels
                );
                self.swin_config()?.validate()?;
            }
            BackboneConfig::Nnunet(_) => {
                ensure!(
                    self.task == Task::Segmentation,
                    "downstream.backbone.nnunet: only task: segmentation is supported with an nnU-Net backbone"
                );
                self.backbone
                    .validate(self.num_classes)
                    .map_err(|e| e.context("downstream.backbone"))?;
            }
        }
        ensure!(
            self.num_classes >= 2,
            "downstream.num_classes must be at least 2 (background and one class, or two classes), got {}",
            self.num_classes
        );
        ensure!(
            self.num_classes <= 256 || self.task == Task::Classification,
            "downstream.num_classes must be at most 256 for segmentation (labels are 8-bit), got {}",
            self.num_classes
        );
        let m = self.backbone.size_multiple()?;
        ensure!(
            self.patch_size.iter().zip(m).all(|(&s, m)| s > 0 && s % m == 0),
            "downstream.patch_size must be positive multiples of {m:?}, got {:?}",
            self.patch_size
        );
        let [a, b, c] = self.patch_size;
        self.backbone
            .check_input(&[1, 1, a, b, c])
            .map_err(|e| anyhow::anyhow!("downstream.patch_size {:?}: {e}", self.patch_size))?;
        if let Some([a, b, c]) = self.sliding_window.roi {
            self.backbone
                .check_input(&[1, 1, a, b, c])
                .map_err(|e| anyhow::anyhow!("downstream.sliding_window.roi: {e}"))?;
        }
        ensure!(
            (0.0..=1.0).contains(&self.pos_fraction),
            "downstream.pos_fraction must be in [0, 1], got {}",
            self.pos_fraction
        );
        ensure!(self.batch_size >= 1, "downstream.batch_size must be at least 1");
        ensure!(
            (0.0..1.0).contains(&self.val_fraction),
            "downstream.val_fraction must be in [0, 1), got {}",
            self.val_fraction
        );
        ensure!(
            self.optimizer.lr > 0.0 && self.optimizer.lr.is_finite(),
            "downstream.optimizer.lr must be positive, got {}",
            self.optimizer.lr
        );
        ensure!(
            self.optimizer.accumulate == 1,
            "downstream.optimizer.accumulate is not supported (use batch_size), got {}",
            self.optimizer.accumulate
        );
        let a = &self.augment;
        ensure!(
            (0.0..=1.0).contains(&a.flip_prob) && a.intensity_scale >= 0.0 && a.intensity_shift >= 0.0,
            "downstream.augment: flip_prob must be in [0, 1] and intensity_scale/shift non-negative"
        );
        ensure!(
            (0.0..=1.0).contains(&a.elastic_prob) && a.elastic_magnitude >= 0.0 && a.elastic_points >= 2,
            "downstream.augment: elastic_prob must be in [0, 1], elastic_magnitude non-negative, elastic_points at least 2"
        );
        self.sliding_window.validate()?;
        Ok(())
    }

    /// The SwinUNETR this task trains (out_channels = num_classes); an
    /// error for another backbone.
    pub fn swin_config(&self) -> Result<SwinUnetrConfig> {
        match &self.backbone {
            BackboneConfig::SwinUnetr(c) => Ok(SwinUnetrConfig {
                out_channels: self.num_classes,
                ..c.clone()
            }),
            other => anyhow::bail!(
                "downstream: this needs a SwinUNETR backbone, the config has {}",
                other.name()
            ),
        }
    }

    pub fn roi(&self) -> [i64; 3] {
        self.sliding_window.roi.unwrap_or(self.patch_size)
    }
}
