//! The experiment config (experiments/*.yaml): one typed file per run, with
//! unknown keys rejected so a typo names itself instead of becoming a
//! silent default. Relative paths resolve against the current directory.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::artifacts::cache::{Plane, PreprocessConfig, RoiMode};

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

impl Experiment {
    pub fn load(path: &Path) -> Result<Experiment> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut e: Experiment =
            serde_yaml::from_str(&text).with_context(|| format!("{}: invalid experiment config", path.display()))?;
        e.pretrain
            .resolve()
            .with_context(|| format!("{}: invalid pretrain section", path.display()))?;
        if let Some(d) = e.downstream.as_mut() {
            d.resolve()
                .with_context(|| format!("{}: invalid downstream section", path.display()))?;
        }
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

    /// Where `med3d run` exports the run's weights: the whole SwinUNETR
    /// (`<run>/export/swinunetr.safetensors`, what finetune starts from) or
    /// its encoder (`<run>/export/encoder.safetensors`).
    pub fn export_path(&self, encoder_only: bool) -> PathBuf {
        if encoder_only {
            self.run_dir().join("export").join("encoder.safetensors")
        } else {
            self.run_dir().join(crate::downstream::RUN_EXPORT)
        }
    }

    /// Where `med3d run` exports an nnU-Net backbone's run for nnU-Net
    /// (`<run>/export/nnunet_pretrained.pth`).
    pub fn nnunet_export_path(&self) -> PathBuf {
        self.run_dir().join("export").join("nnunet_pretrained.pth")
    }

    /// The export `med3d run` fine-tunes from: the whole network, in the
    /// format of its backbone.
    pub fn finetune_export(&self) -> PathBuf {
        match self.pretrain.backbone {
            crate::model::backbone::BackboneConfig::SwinUnetr(_) => self.export_path(false),
            crate::model::backbone::BackboneConfig::Nnunet(_) => self.nnunet_export_path(),
        }
    }

    /// `med3d run`'s fine-tuning run, `<workdir>/finetune/<name>`.
    pub fn finetune_dir(&self) -> PathBuf {
        self.workdir.join("finetune").join(&self.name)
    }

    /// The cache of `downstream.test_manifest`, `<workdir>/cache_test`.
    pub fn test_cache_dir(&self) -> PathBuf {
        self.workdir.join("cache_test")
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
