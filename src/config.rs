//! The experiment config (experiments/*.yaml): one typed file per run, with
//! unknown keys rejected so a typo names itself instead of becoming a
//! silent default. Relative paths resolve against the current directory.
//!
//! A preset may start from another with `extends: OTHER.yaml` (a path
//! relative to the extending file): the other file is read (and its own
//! `extends` resolved first), then every key the extending file gives
//! replaces the inherited one, mappings key by key and anything else
//! whole, as nnU-Net's plans inherit. A cycle, a missing file or an
//! unknown key is an error naming the files.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::artifacts::run;

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
    /// The command line's `--set KEY=VALUE` overrides applied on top of
    /// the file, as given (recorded in run.json); not a key of the file.
    #[serde(skip)]
    pub overrides: Vec<String>,
}

/// One `--set key.path=value`: the value parsed as YAML (a scalar or a
/// flow sequence / mapping), the path's keys separated by dots.
fn parse_override(s: &str) -> Result<(Vec<String>, serde_yaml::Value)> {
    let Some((key, value)) = s.split_once('=') else {
        anyhow::bail!("--set {s:?}: expected KEY=VALUE, e.g. pretrain.optimizer.lr=1e-4");
    };
    let keys: Vec<String> = key.trim().split('.').map(str::to_string).collect();
    anyhow::ensure!(
        keys.iter().all(|k| !k.is_empty()),
        "--set {s:?}: the key must be dot-separated names, e.g. pretrain.optimizer.lr"
    );
    anyhow::ensure!(
        keys[0] != EXTENDS,
        "--set {s:?}: `extends` cannot be set from the command line"
    );
    let value: serde_yaml::Value =
        serde_yaml::from_str(value).with_context(|| format!("--set {s:?}: the value is not a YAML value"))?;
    Ok((keys, value))
}

/// The overrides as one mapping tree, later ones winning.
fn overrides_tree(overrides: &[String]) -> Result<serde_yaml::Value> {
    use serde_yaml::{Mapping, Value};
    let mut root = Value::Mapping(Mapping::new());
    for o in overrides {
        let (keys, value) = parse_override(o)?;
        let mut at = &mut root;
        for k in &keys[..keys.len() - 1] {
            if !at.is_mapping() {
                *at = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(m) = at else {
                unreachable!("made a mapping above")
            };
            at = m
                .entry(Value::from(k.as_str()))
                .or_insert(Value::Mapping(Mapping::new()));
        }
        if !at.is_mapping() {
            *at = Value::Mapping(Mapping::new());
        }
        if let Value::Mapping(m) = at {
            m.insert(Value::from(keys[keys.len() - 1].as_str()), value);
        }
    }
    Ok(root)
}

/// The key that names the preset a config starts from.
const EXTENDS: &str = "extends";

/// The config at `path` with its `extends` chain merged in, and the chain's
/// files (the config first). `stack` holds the files being resolved, to
/// name a cycle.
fn resolve_extends(path: &Path, stack: &mut Vec<PathBuf>) -> Result<(serde_yaml::Value, Vec<String>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}: invalid experiment config", path.display()))?;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if stack.contains(&canonical) {
        let mut names: Vec<String> = stack.iter().map(|p| p.display().to_string()).collect();
        names.push(canonical.display().to_string());
        anyhow::bail!("`extends` makes a cycle: {}", names.join(" -> "));
    }
    lift_sections(&mut value, path)?;
    let Some(map) = value.as_mapping_mut() else {
        anyhow::bail!("{}: an experiment config is a mapping of sections", path.display());
    };
    let Some(parent) = map.remove(EXTENDS) else {
        return Ok((value, vec![path.display().to_string()]));
    };
    let Some(parent) = parent.as_str() else {
        anyhow::bail!(
            "{}: `extends` must be a path to another experiment file",
            path.display()
        );
    };
    let parent = path.parent().unwrap_or(Path::new(".")).join(parent);
    stack.push(canonical);
    let (base, mut chain) =
        resolve_extends(&parent, stack).with_context(|| format!("{}: extends {}", path.display(), parent.display()))?;
    stack.pop();
    chain.insert(0, path.display().to_string());
    Ok((merge(base, value), chain))
}

/// `over` on top of `base`: mappings key by key, anything else replaced.
fn merge(base: serde_yaml::Value, over: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match (base, over) {
        (Value::Mapping(mut b), Value::Mapping(o)) => {
            for (k, v) in o {
                let merged = match b.remove(&k) {
                    Some(old) => merge(old, v),
                    None => v,
                };
                b.insert(k, merged);
            }
            Value::Mapping(b)
        }
        (_, over) => over,
    }
}

/// [`crate::runtime::run_block::lift_run_keys`] for the sections of an experiment file that have a
/// `run` block.
fn lift_sections(value: &mut serde_yaml::Value, path: &Path) -> Result<bool> {
    use crate::downstream::DownstreamRun;
    use crate::train::PretrainRun;
    let mut any = false;
    for (name, keys, nested) in [
        ("pretrain", PretrainRun::KEYS, PretrainRun::NESTED_KEYS),
        ("downstream", DownstreamRun::KEYS, &[][..]),
    ] {
        let Some(section) = value.get_mut(name) else { continue };
        let mut json: serde_json::Value = serde_yaml::from_value(section.clone())
            .with_context(|| format!("{}: invalid {name} section", path.display()))?;
        let moved = crate::runtime::run_block::lift_run_keys(&mut json, name, keys, nested)
            .with_context(|| format!("{}", path.display()))?;
        if !moved.is_empty() {
            tracing::warn!(
                "{}: {name}: {} moved under {name}.run (they do not change results); write them there",
                path.display(),
                moved.join(", ")
            );
            *section = serde_yaml::to_value(json)?;
            any = true;
        }
    }
    Ok(any)
}

impl Experiment {
    pub fn load(path: &Path) -> Result<Experiment> {
        Experiment::load_with(path, &[])
    }

    /// The config at `path` with `--set KEY=VALUE` overrides applied on
    /// top (after `extends`), before validation: an unknown key or a wrong
    /// type is the same named error as in the file.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Experiment> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let plain: serde_yaml::Value =
            serde_yaml::from_str(&text).with_context(|| format!("{}: invalid experiment config", path.display()))?;
        // Each file of an `extends` chain has its flat operational keys
        // moved into `run` before the merge, so a child's flat key
        // overrides its parent's `run` entry.
        let (value, chain, lifted) = if plain.get(EXTENDS).is_none() {
            let mut plain = plain;
            let lifted = lift_sections(&mut plain, path)?;
            (plain, vec![path.display().to_string()], lifted)
        } else {
            let (v, chain) = resolve_extends(path, &mut Vec::new())?;
            (v, chain, true)
        };
        let (value, chain) = if overrides.is_empty() {
            (value, chain)
        } else {
            let mut tree = overrides_tree(overrides)?;
            lift_sections(&mut tree, Path::new("--set"))?;
            let mut chain = chain;
            chain.insert(0, format!("--set {}", overrides.join(" --set ")));
            (merge(value, tree), chain)
        };
        let mut e: Experiment = if chain.len() == 1 && !lifted {
            // straight from the text, so that errors carry its line numbers
            serde_yaml::from_str(&text).with_context(|| format!("{}: invalid experiment config", path.display()))?
        } else {
            serde_yaml::from_value(value).with_context(|| {
                format!(
                    "{}: invalid experiment config (resolved from {})",
                    path.display(),
                    chain.join(" <- ")
                )
            })?
        };
        e.overrides = overrides.to_vec();
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
        run::default_run(&self.workdir, &self.name)
    }

    /// Where `med3d run` exports the run's weights: the whole SwinUNETR
    /// (what finetune starts from) or its encoder.
    pub fn export_path(&self, encoder_only: bool) -> PathBuf {
        let what = if encoder_only {
            run::ExportFile::Encoder
        } else {
            run::ExportFile::SwinUnetr
        };
        run::export_file(&self.run_dir(), what)
    }

    /// Where `med3d run` exports an nnU-Net backbone's run for nnU-Net.
    pub fn nnunet_export_path(&self) -> PathBuf {
        run::export_file(&self.run_dir(), run::ExportFile::Nnunet)
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
        run::default_finetune(&self.workdir, &self.name)
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
    fn extends_merges_key_by_key_and_names_cycles_and_typos() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let base = d.path().join("base.yaml");
        std::fs::write(
            &base,
            "name: base\nmanifest: m.yaml\nworkdir: w\npretrain:\n  batch_size: 6\n  align: {loss: pot, eps: 0.05}\n  optimizer: {lr: 0.5}\n",
        )
        .unwrap();
        // a grandchild two files down, the middle one in another folder
        std::fs::write(
            sub.join("mid.yaml"),
            "extends: ../base.yaml\npretrain:\n  align: {loss: ot}\n",
        )
        .unwrap();
        let top = d.path().join("top.yaml");
        std::fs::write(
            &top,
            "extends: sub/mid.yaml\nname: top\npretrain: {optimizer: {lr: 0.25}}\n",
        )
        .unwrap();
        let e = Experiment::load(&top).unwrap();
        let p = &e.pretrain;
        assert_eq!(e.name, "top");
        assert_eq!(e.workdir, Path::new("w"));
        // mappings merge key by key: eps from base, loss from mid, lr from top
        assert_eq!((p.align.loss, p.align.eps), (crate::train::config::AlignLoss::Ot, 0.05));
        assert_eq!((p.batch_size, p.optimizer.lr), (6, 0.25));
        // the same settings written out in one file hash the same
        let flat = d.path().join("flat.yaml");
        std::fs::write(
            &flat,
            "name: top\nmanifest: m.yaml\nworkdir: w\npretrain:\n  batch_size: 6\n  align: {loss: ot, eps: 0.05}\n  optimizer: {lr: 0.25}\n",
        )
        .unwrap();
        assert_eq!(Experiment::load(&flat).unwrap().pretrain.hash(), p.hash());

        // a typo in the extending file names the key and the files
        std::fs::write(&top, "extends: sub/mid.yaml\npretrain: {optimizer: {lrr: 0.25}}\n").unwrap();
        let err = format!("{:#}", Experiment::load(&top).unwrap_err());
        assert!(
            err.contains("lrr") && err.contains("top.yaml") && err.contains("mid.yaml"),
            "{err}"
        );
        // a missing parent
        std::fs::write(&top, "extends: nowhere.yaml\n").unwrap();
        let err = format!("{:#}", Experiment::load(&top).unwrap_err());
        assert!(
            err.contains("nowhere.yaml") && err.contains("cannot read config"),
            "{err}"
        );
        // a cycle
        std::fs::write(&base, "extends: top.yaml\nname: base\n").unwrap();
        std::fs::write(&top, "extends: sub/mid.yaml\n").unwrap();
        let err = format!("{:#}", Experiment::load(&top).unwrap_err());
        assert!(err.contains("cycle") && err.contains("base.yaml"), "{err}");
        // not a path
        std::fs::write(&top, "extends: [a, b]\n").unwrap();
        let err = format!("{:#}", Experiment::load(&top).unwrap_err());
        assert!(err.contains("`extends` must be a path"), "{err}");
    }

    #[test]
    fn operational_keys_given_flat_move_into_run_and_keep_the_hash() {
        let d = tempfile::tempdir().unwrap();
        let head = "name: x\nmanifest: m.yaml\nworkdir: w\n";
        let old = d.path().join("old.yaml");
        std::fs::write(
            &old,
            format!(
                "{head}pretrain:\n  device: cpu\n  workers: 3\n  checkpoint_every: 7\n  align: {{eps: 0.05, cpu_solver_max_batch: 0}}\n\
                 downstream:\n  threads: 2\n  keep_freed_memory: false\n"
            ),
        )
        .unwrap();
        let new = d.path().join("new.yaml");
        std::fs::write(
            &new,
            format!(
                "{head}pretrain:\n  align: {{eps: 0.05}}\n  run: {{device: cpu, workers: 3, checkpoint_every: 7, cpu_solver_max_batch: 0}}\n\
                 downstream:\n  run: {{threads: 2, keep_freed_memory: false}}\n"
            ),
        )
        .unwrap();
        let (a, b) = (Experiment::load(&old).unwrap(), Experiment::load(&new).unwrap());
        assert_eq!(a.pretrain, b.pretrain);
        assert_eq!(a.downstream, b.downstream);
        assert_eq!(b.pretrain.run.workers, 3);
        assert_eq!(b.pretrain.run.cpu_solver_max_batch, 0);
        assert_eq!(b.downstream.as_ref().unwrap().run.threads, 2);
        // operational settings stay out of the hash
        assert_eq!(
            a.pretrain.hash(),
            crate::train::PretrainConfig {
                align: a.pretrain.align.clone(),
                ..Default::default()
            }
            .hash()
        );
        // given both ways: named
        std::fs::write(&old, format!("{head}pretrain:\n  workers: 3\n  run: {{workers: 4}}\n")).unwrap();
        let err = format!("{:#}", Experiment::load(&old).unwrap_err());
        assert!(
            err.contains("pretrain.workers and pretrain.run.workers") && err.contains("old.yaml"),
            "{err}"
        );
        // a child's flat key overrides its parent's run entry, key by key
        std::fs::write(
            &new,
            format!("{head}pretrain:\n  run: {{workers: 4, checkpoint_every: 9}}\n"),
        )
        .unwrap();
        std::fs::write(&old, "extends: new.yaml\npretrain:\n  checkpoint_every: 2\n").unwrap();
        let r = Experiment::load(&old).unwrap().pretrain.run;
        assert_eq!((r.workers, r.checkpoint_every), (4, 2));
        // a typo inside run is named like any other
        std::fs::write(&old, format!("{head}pretrain:\n  run: {{wrokers: 4}}\n")).unwrap();
        let err = format!("{:#}", Experiment::load(&old).unwrap_err());
        assert!(err.contains("wrokers"), "{err}");
    }

    #[test]
    fn set_overrides_apply_before_validation_and_name_their_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("e.yaml");
        std::fs::write(
            &p,
            "name: x\nmanifest: m.yaml\nworkdir: w\npretrain:\n  optimizer: {lr: 0.5, weight_decay: 0.1}\n  run: {workers: 4}\n",
        )
        .unwrap();
        let set = |o: &[&str]| Experiment::load_with(&p, &o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let e = set(&[
            "pretrain.optimizer.lr=1e-4",
            "pretrain.input_size=[64, 64, 96]",
            "pretrain.psat={layers: 2, heads: 4}",
            "name=sweep-1",
            "pretrain.checkpoint_every=3",
            "downstream.num_classes=3",
        ])
        .unwrap();
        let o = &e.pretrain.optimizer;
        // key by key: weight_decay kept from the file
        assert_eq!((o.lr, o.weight_decay), (1e-4, 0.1));
        assert_eq!(e.pretrain.input_size, Some([64, 64, 96]));
        assert_eq!((e.pretrain.psat.layers, e.pretrain.psat.heads), (2, 4));
        assert_eq!(e.name, "sweep-1");
        // a flat operational key lands in run beside the file's
        assert_eq!((e.pretrain.run.workers, e.pretrain.run.checkpoint_every), (4, 3));
        assert_eq!(e.downstream.as_ref().unwrap().num_classes, 3);
        assert_eq!(e.overrides.len(), 6);
        assert_ne!(e.pretrain.hash(), Experiment::load(&p).unwrap().pretrain.hash());
        // the last of two wins
        let e = set(&["pretrain.batch_size=3", "pretrain.batch_size=5"]).unwrap();
        assert_eq!(e.pretrain.batch_size, 5);
        // an unknown key, a wrong type, an invalid value, a malformed --set
        for (o, want) in [
            ("pretrain.optimizer.lrr=1", "lrr"),
            ("pretrain.batch_size=many", "batch_size"),
            ("pretrain.batch_size=1", "pretrain.batch_size must be at least 2"),
            ("pretrain.optimizer.lr", "expected KEY=VALUE"),
            ("pretrain..lr=1", "dot-separated"),
            ("extends=other.yaml", "`extends` cannot be set"),
        ] {
            let err = format!("{:#}", set(&[o]).unwrap_err());
            assert!(err.contains(want), "--set {o}: {err}");
            assert!(err.contains("e.yaml") || err.contains("--set"), "--set {o}: {err}");
        }
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
