//! The config hash's canonical form: which settings of the `pretrain`
//! section the hash covers, written out field by field.
use serde::Serialize;

use super::{
    AlignConfig, AugmentConfig, BackboneConfig, DeviceChoice, HeadKind, LossWeights, OptimConfig, Precision,
    PretrainConfig, PsatConfig, Sampling,
};

/// The config hash's input, written out field by field: what the hash
/// covers is decided here, not by serde attributes on the config. Its
/// layout is frozen at the one med3d wrote before the `run` block existed
/// (2026-12-07), so that runs started then keep resuming:
/// - the operational settings held these constant values in it;
/// - settings added since are appended only when they differ from the
///   value that reproduces earlier runs (`all_gather_embeddings` off,
///   `target_noise` 0). A new math setting joins the same way; a new
///   operational setting goes into [`PretrainRun`] and not here.
#[derive(Serialize)]
pub(super) struct Hashed<'a> {
    seed: u64,
    device: DeviceChoice,
    precision: Precision,
    threads: usize,
    backbone: &'a BackboneConfig,
    head: HeadKind,
    psat: &'a PsatConfig,
    align: &'a AlignConfig,
    weights: &'a LossWeights,
    optimizer: &'a OptimConfig,
    batch_size: usize,
    epochs: f64,
    max_steps: Option<u64>,
    sampling: Sampling,
    input_size: Option<[i64; 3]>,
    augment: &'a AugmentConfig,
    workers: usize,
    prefetch: usize,
    checkpoint_every: u64,
    keep_checkpoints: usize,
    max_nonfinite: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    all_gather_embeddings: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_noise: Option<f64>,
}

impl<'a> Hashed<'a> {
    pub(super) fn of(c: &'a PretrainConfig) -> Hashed<'a> {
        Hashed {
            seed: c.seed,
            device: DeviceChoice::Auto,
            precision: c.precision,
            threads: 0,
            backbone: &c.backbone,
            head: c.head,
            psat: &c.psat,
            align: &c.align,
            weights: &c.weights,
            optimizer: &c.optimizer,
            batch_size: c.batch_size,
            epochs: c.epochs,
            max_steps: c.max_steps,
            sampling: c.sampling,
            input_size: c.input_size,
            augment: &c.augment,
            workers: 1,
            prefetch: 1,
            checkpoint_every: 1,
            keep_checkpoints: 1,
            max_nonfinite: 1,
            all_gather_embeddings: c.all_gather_embeddings.then_some(true),
            target_noise: (c.target_noise != 0.0).then_some(c.target_noise),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::Hashed;

    #[test]
    fn hash_ignores_the_run_block_but_not_the_math() {
        let a = PretrainConfig::default();
        let mut b = a.clone();
        b.run = PretrainRun {
            device: DeviceChoice::Cpu,
            threads: 1,
            workers: 7,
            prefetch: 5,
            checkpoint_every: 3,
            keep_checkpoints: 9,
            max_nonfinite: 2,
            dist_timeout_s: 20.0,
            keep_freed_memory: false,
            cpu_solver_max_batch: 0,
        };
        assert_eq!(a.hash(), b.hash());
        b.optimizer.lr = 2e-5;
        assert_ne!(a.hash(), b.hash());
        let mut c = a.clone();
        c.target_noise = 0.2;
        assert_ne!(a.hash(), c.hash());
        let mut c = a.clone();
        c.all_gather_embeddings = true;
        assert_ne!(a.hash(), c.hash());
        // absent and 0 are the same run
        let d: PretrainConfig = serde_yaml::from_str("target_noise: 0\n").unwrap();
        assert_eq!(a.hash(), d.hash());
        let mut e = a.clone();
        e.run.dist_timeout_s = 0.0;
        assert!(format!("{:#}", e.validate().unwrap_err()).contains("pretrain.run.dist_timeout_s"));
    }

    /// Every setting of the section is either in the hash or in `run`: a
    /// new field must be placed in one of them on purpose.
    #[test]
    fn every_setting_is_hashed_or_operational() {
        let cfg = serde_json::to_value(PretrainConfig::default()).unwrap();
        let hashed = PretrainConfig {
            all_gather_embeddings: true,
            target_noise: 0.5,
            ..Default::default()
        };
        let canon = serde_json::to_value(Hashed::of(&hashed)).unwrap();
        for key in cfg.as_object().unwrap().keys() {
            assert!(
                key == "run" || canon.get(key).is_some(),
                "pretrain.{key} is neither in the hash's canonical form nor in pretrain.run"
            );
        }
        let run = serde_json::to_value(PretrainRun::default()).unwrap();
        let nested: Vec<&str> = PretrainRun::NESTED_KEYS.iter().map(|(_, k)| *k).collect();
        for key in run.as_object().unwrap().keys() {
            assert!(
                PretrainRun::KEYS.contains(&key.as_str()) || nested.contains(&key.as_str()),
                "pretrain.run.{key} is missing from PretrainRun::KEYS (configs that give it flat)"
            );
        }
    }

    /// The hashes of run records written by main on 2026-12-07, before the
    /// `run` block: changing them makes every run of that time refuse to
    /// resume.
    #[test]
    fn configs_of_2026_12_07_keep_their_hash() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/run-2026-12-07");
        for (file, hash) in [
            (
                "demo-run.json",
                "041444103e56effae5f7d1bb8a5676e979268f47b969687a7d1c225c130cf5ce",
            ),
            (
                "demoB-run.json",
                "aad7e81622b68085e7e77fdbc42b6c7b4e6c5c324b812861bc39e403c7754d20",
            ),
        ] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["config_hash"], hash, "{file}: the fixture's own record");
            let mut config = v["config"].clone();
            let moved = crate::runtime::run_block::lift_run_keys(
                &mut config,
                "pretrain",
                PretrainRun::KEYS,
                PretrainRun::NESTED_KEYS,
            )
            .unwrap();
            assert!(moved.iter().any(|k| k == "workers"), "{file}: {moved:?}");
            let c: PretrainConfig = serde_json::from_value(config).unwrap();
            assert_eq!(c.hash(), hash, "{file}");
        }
    }
}
