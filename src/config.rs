//! The experiment config (experiments/*.yaml): one typed file per run, with
//! unknown keys rejected so a typo names itself instead of becoming a
//! silent default. Relative paths resolve against the current directory.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    /// Dataset manifest (data-manifests/*.yaml or a dataset.json).
    pub manifest: PathBuf,
    /// Where the stages write: `<workdir>/cache`, later captions, runs.
    pub workdir: PathBuf,
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// Absent: the offline `descriptor` backend with default settings.
    #[serde(default)]
    pub caption: crate::caption::CaptionConfig,
    /// Absent: text embeddings with all-MiniLM-L6-v2, no image encoder.
    #[serde(default)]
    pub embed: crate::embed::EmbedConfig,
    /// Absent: the paper preset's settings (a GPU-sized run).
    #[serde(default)]
    pub pretrain: crate::train::PretrainConfig,
    /// Absent: `med3d run` stops after pretraining.
    #[serde(default)]
    pub downstream: Option<crate::downstream::DownstreamConfig>,
}

/// How a volume is brought to a fixed grid after the foreground crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoiMode {
    /// Symmetric zero-pad, then centre crop (MONAI ResizeWithPadOrCrop).
    CropPad,
    /// Trilinear resize of the whole foreground box (aspect not kept).
    Resize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plane {
    Sagittal,
    Coronal,
    Axial,
}

impl Plane {
    pub const ALL: [Plane; 3] = [Plane::Axial, Plane::Coronal, Plane::Sagittal];

    /// The RAS array axis a plane's position runs along.
    pub fn axis(self) -> usize {
        match self {
            Plane::Sagittal => 0,
            Plane::Coronal => 1,
            Plane::Axial => 2,
        }
    }

    /// Index used by the plane-slice embedding (METHOD.md: 0, 1, 2).
    pub fn id(self) -> usize {
        match self {
            Plane::Axial => 0,
            Plane::Coronal => 1,
            Plane::Sagittal => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Plane::Sagittal => "sagittal",
            Plane::Coronal => "coronal",
            Plane::Axial => "axial",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// Target voxel spacing in mm (x, y, z after reorientation to RAS).
    pub spacing: [f64; 3],
    /// Output grid size (paper: 128^3).
    pub roi: [usize; 3],
    pub roi_mode: RoiMode,
    /// CT window in HU mapped to [0, 1].
    pub ct_window: [f64; 2],
    /// MR percentile window mapped to [0, 1].
    pub mr_percentiles: [f64; 2],
    /// Foreground is intensity > this, after normalisation.
    pub foreground_threshold: f32,
    /// Slices cut per plane, spread over the foreground extent.
    pub slices_per_plane: usize,
    pub planes: Vec<Plane>,
    /// For 4D inputs: which volume to take (required when there are several).
    pub volume_index: Option<usize>,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            spacing: [1.5, 1.5, 1.5],
            roi: [128, 128, 128],
            roi_mode: RoiMode::CropPad,
            ct_window: [-1000.0, 1000.0],
            mr_percentiles: [0.5, 99.5],
            foreground_threshold: 0.0,
            slices_per_plane: 16,
            planes: Plane::ALL.to_vec(),
            volume_index: None,
        }
    }
}

impl PreprocessConfig {
    /// Identity of everything that changes preprocess output, for skipping
    /// unchanged cases on rerun.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(&(crate::preprocess::CACHE_FORMAT, self)).unwrap_or_default();
        crate::fsutil::sha256_bytes(&json)
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.spacing.iter().all(|s| s.is_finite() && *s > 0.0),
            "preprocess.spacing must be positive, got {:?}",
            self.spacing
        );
        anyhow::ensure!(
            self.roi.iter().all(|&r| r > 0),
            "preprocess.roi must be positive, got {:?}",
            self.roi
        );
        anyhow::ensure!(
            self.ct_window[1] > self.ct_window[0],
            "preprocess.ct_window must be [low, high] with low < high"
        );
        anyhow::ensure!(
            0.0 <= self.mr_percentiles[0]
                && self.mr_percentiles[0] < self.mr_percentiles[1]
                && self.mr_percentiles[1] <= 100.0,
            "preprocess.mr_percentiles must be [lower, upper] within 0..100"
        );
        anyhow::ensure!(
            !self.planes.is_empty(),
            "preprocess.planes must name at least one plane"
        );
        Ok(())
    }
}

impl Experiment {
    pub fn load(path: &Path) -> Result<Experiment> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let e: Experiment =
            serde_yaml::from_str(&text).with_context(|| format!("{}: invalid experiment config", path.display()))?;
        e.preprocess
            .validate()
            .with_context(|| format!("{}: invalid preprocess section", path.display()))?;
        e.caption
            .validate()
            .with_context(|| format!("{}: invalid caption section", path.display()))?;
        e.embed
            .validate()
            .with_context(|| format!("{}: invalid embed section", path.display()))?;
        e.pretrain
            .validate()
            .with_context(|| format!("{}: invalid pretrain section", path.display()))?;
        if let Some(d) = &e.downstream {
            d.validate()
                .with_context(|| format!("{}: invalid downstream section", path.display()))?;
        }
        Ok(e)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.workdir.join("cache")
    }

    /// The default pretraining run folder, `<workdir>/runs/<name>`.
    pub fn run_dir(&self) -> PathBuf {
        self.workdir.join("runs").join(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("e.yaml");
        std::fs::write(
            &p,
            "name: x\nmanifest: m.yaml\nworkdir: w\npreprocess:\n  spacingg: [1, 1, 1]\n",
        )
        .unwrap();
        let e = format!("{:#}", Experiment::load(&p).unwrap_err());
        assert!(e.contains("spacingg") && e.contains("e.yaml"), "{e}");
    }

    #[test]
    fn downstream_errors_name_the_key_and_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("e.yaml");
        let base = "name: x\nmanifest: m.yaml\nworkdir: w\ndownstream:\n";
        std::fs::write(&p, format!("{base}  task: segmentation\n  num_clases: 3\n")).unwrap();
        let e = format!("{:#}", Experiment::load(&p).unwrap_err());
        assert!(e.contains("num_clases") && e.contains("e.yaml"), "{e}");
        std::fs::write(&p, format!("{base}  patch_size: [32, 32, 32]\n")).unwrap();
        let e = format!("{:#}", Experiment::load(&p).unwrap_err());
        assert!(e.contains("downstream.patch_size") && e.contains("e.yaml"), "{e}");
        std::fs::write(&p, format!("{base}  task: segmentation\n  num_classes: 3\n")).unwrap();
        assert_eq!(Experiment::load(&p).unwrap().downstream.unwrap().num_classes, 3);
    }
}
