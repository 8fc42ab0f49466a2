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
        e.preprocess_from_plans()
            .with_context(|| format!("{}: pretrain.backbone.nnunet.preprocess_from_plans", path.display()))?;
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

    /// With `pretrain.backbone.nnunet.preprocess_from_plans`: the plans'
    /// spacing, patch size (as the ROI, and no resize before the network)
    /// and CT window replace those of the preprocess section.
    fn preprocess_from_plans(&mut self) -> Result<()> {
        let crate::model::backbone::BackboneConfig::Nnunet(n) = &self.pretrain.backbone else {
            return Ok(());
        };
        if !n.preprocess_from_plans {
            return Ok(());
        }
        let p = n.plans_input()?;
        self.preprocess.spacing = p.spacing;
        self.preprocess.roi = p.patch_size.map(|s| s as usize);
        if let Some(w) = p.ct_window {
            self.preprocess.ct_window = w;
        }
        anyhow::ensure!(
            self.pretrain.input_size.is_none() || self.pretrain.input_size == Some(p.patch_size),
            "pretrain.input_size {:?} contradicts the plans' patch size {:?} (x, y, z); leave it out",
            self.pretrain.input_size,
            p.patch_size
        );
        Ok(())
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

    #[test]
    fn preprocessing_can_follow_the_plans() {
        let d = tempfile::tempdir().unwrap();
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/tiny_ResEncUNetPlans.json");
        // the tiny plans as CT plans, their axes transposed
        let mut plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tiny).unwrap()).unwrap();
        plans["transpose_forward"] = serde_json::json!([1, 0, 2]);
        let c = &mut plans["configurations"]["3d_fullres"];
        c["normalization_schemes"] = serde_json::json!(["CTNormalization"]);
        c["spacing"] = serde_json::json!([3.0, 0.8, 0.7]);
        plans["foreground_intensity_properties_per_channel"] = serde_json::json!({"0": {"percentile_00_5": -958.0, "percentile_99_5": 1304.0, "mean": 60.0, "std": 200.0}});
        let pp = d.path().join("ct_plans.json");
        std::fs::write(&pp, plans.to_string()).unwrap();
        let p = d.path().join("e.yaml");
        let write = |extra: &str| {
            std::fs::write(
                &p,
                format!(
                    "name: x\nmanifest: m.yaml\nworkdir: w\npretrain:\n  backbone:\n    nnunet: {{plans: {}, preprocess_from_plans: true}}\n{extra}",
                    pp.display()
                ),
            )
            .unwrap()
        };
        write("");
        let e = Experiment::load(&p).unwrap();
        // nnU-Net's axes are (z, y, x) permuted by [1, 0, 2]: (y, z, x)
        assert_eq!(e.preprocess.spacing, [0.7, 3.0, 0.8]);
        assert_eq!(e.preprocess.roi, [32, 16, 32]);
        assert_eq!(e.preprocess.ct_window, [-958.0, 1304.0]);
        write("  input_size: [64, 64, 64]\n");
        let err = format!("{:#}", Experiment::load(&p).unwrap_err());
        assert!(
            err.contains("input_size") && err.contains("preprocess_from_plans"),
            "{err}"
        );
    }
}
