//! The experiment's `pretrain` section: model, alignment loss, optimiser,
//! data and run-keeping settings, with the paper preset's values where the
//! paper names one (docs/method.md). Unknown keys are errors.
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::backbone::BackboneConfig;
use crate::model::psat::PsatConfig;
pub use crate::runtime::optim::{OptimConfig, OptimizerKind, Schedule};
pub use crate::runtime::DeviceChoice;

/// Bumped whenever a checkpoint's layout or the meaning of a setting changes.
pub use crate::artifacts::run::FORMAT as PRETRAIN_FORMAT;

mod hash;

/// Which head turns the bottleneck into one embedding per target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// The plane-slice-aware transformer (the method).
    Psat,
    /// Ablation: mean of the bottleneck tokens plus the plane-slice
    /// embedding, one linear read-out per target; no transformer.
    Pool,
}

/// The alignment objective between 3D read-outs and 2D embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlignLoss {
    /// Entropic partial Wasserstein, cross-entropy to I/B (the method).
    Pot,
    /// Ablation: balanced entropic OT (Sinkhorn), same cross-entropy.
    Ot,
    /// Ablation: CLIP-style symmetric InfoNCE.
    Infonce,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignConfig {
    pub loss: AlignLoss,
    /// Entropic regularisation (paper: 0.03).
    pub eps: f64,
    /// Transported mass of the partial plan (paper: 0.95).
    pub mass: f64,
    /// Solver iteration cap (POT's default: 1000).
    pub max_iter: usize,
    /// Early-stop tolerance on the plan's change; 0 runs every iteration.
    pub tol: f64,
    /// InfoNCE temperature (CLIP: 0.07).
    pub temperature: f64,
}

impl Default for AlignConfig {
    fn default() -> Self {
        let s = crate::align::ot::Solver::default();
        AlignConfig {
            loss: AlignLoss::Pot,
            eps: s.reg,
            mass: crate::align::DEFAULT_MASS,
            max_iter: s.max_iter,
            tol: s.tol,
            temperature: 0.07,
        }
    }
}

impl AlignConfig {
    /// The transport objective of an OT loss; None for InfoNCE. Plans of
    /// at most `cpu_max_rows` rows are solved on the CPU when training on
    /// a GPU (`pretrain.run.cpu_solver_max_batch`).
    pub fn transport(&self, cpu_max_rows: i64) -> Option<crate::align::Transport> {
        use crate::align::{ot::Solver, Plan, Transport};
        let plan = match self.loss {
            AlignLoss::Pot => Plan::Partial { mass: self.mass },
            AlignLoss::Ot => Plan::Balanced,
            AlignLoss::Infonce => return None,
        };
        Some(Transport {
            plan,
            solver: Solver {
                reg: self.eps,
                max_iter: self.max_iter,
                tol: self.tol,
            },
            cpu_max_rows,
        })
    }
}

/// Weight of each term of the total loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossWeights {
    pub text: f64,
    /// Used only when the cache has image embeddings.
    pub image: f64,
    /// MSE between the reconstruction and the input.
    pub recon: f64,
}

impl LossWeights {
    /// The weight of the alignment term to `target`.
    pub fn of(&self, target: crate::artifacts::embeddings::TargetKind) -> f64 {
        use crate::artifacts::embeddings::TargetKind;
        match target {
            TargetKind::Text => self.text,
            TargetKind::Image => self.image,
        }
    }
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights {
            text: 1.0,
            image: 1.0,
            recon: 1.0,
        }
    }
}

/// What one epoch visits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Every case once, with one of its slices drawn at random.
    Case,
    /// Every usable slice once.
    Slice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 autocast on CUDA, float32 on the CPU.
    Auto,
    Fp32,
    /// bf16 autocast (CUDA only; float32 on the CPU).
    Bf16,
}

/// Augmentations that keep every slice's plane and position true.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Intensity x -> a x + b, a in [1 - scale, 1 + scale], b in
    /// [-shift, shift], clamped to [0, 1].
    pub intensity_scale: f64,
    pub intensity_shift: f64,
    /// Probability of flipping each axis. The flipped axis's plane maps
    /// its position p to 1 - p (and index i to n - 1 - i); the other planes'
    /// slices are mirrored in-plane, which swaps left and right: leave this
    /// at 0 when captions name sides.
    pub flip_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            intensity_scale: 0.0,
            intensity_shift: 0.0,
            flip_prob: 0.0,
        }
    }
}

/// `pretrain.run`: how a run goes, not what it computes. None of these
/// settings is in the config hash, so a run may resume on another machine,
/// with other loader threads or another checkpoint cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainRun {
    pub device: DeviceChoice,
    /// libtorch CPU threads; 0 keeps libtorch's default.
    pub threads: usize,
    /// Loader threads reading volumes ahead of the model.
    pub workers: usize,
    /// Micro-batches each loader thread may hold ready.
    pub prefetch: usize,
    /// Write a checkpoint every this many optimiser steps (and at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept; older ones are deleted.
    pub keep_checkpoints: usize,
    /// Stop after this many consecutive steps with a non-finite loss or
    /// gradient (each such step is skipped and counted).
    pub max_nonfinite: usize,
    /// Data-parallel runs: seconds a rank waits for the others (the
    /// rendezvous, each collective) before it fails; MED3D_DIST_TIMEOUT_S
    /// overrides it.
    pub dist_timeout_s: f64,
    /// On the CPU: have glibc keep freed memory for reuse instead of
    /// returning large buffers to the kernel (see
    /// `runtime::memory::reuse_freed_memory`): faster steps at a higher
    /// peak. Off where memory is tight (several jobs on one node).
    pub keep_freed_memory: bool,
    /// On a GPU: partial plans of at most this many rows (the batch, or
    /// the gathered global batch) are solved on the CPU by the fused
    /// solver; 0 solves all of them on the GPU (see `align::Transport`).
    /// Changes where the plan is computed, not the plan.
    pub cpu_solver_max_batch: i64,
}

impl Default for PretrainRun {
    fn default() -> Self {
        PretrainRun {
            device: DeviceChoice::Auto,
            threads: 0,
            workers: 2,
            prefetch: 2,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            max_nonfinite: 10,
            dist_timeout_s: crate::dist::DEFAULT_TIMEOUT_S,
            keep_freed_memory: true,
            cpu_solver_max_batch: crate::align::DEFAULT_CPU_MAX_ROWS,
        }
    }
}

impl PretrainRun {
    /// The keys of this block, which configs written before it existed
    /// gave directly under `pretrain` (`align.cpu_solver_max_batch` under
    /// `pretrain.align`); see [`crate::runtime::run_block::lift_run_keys`].
    pub const KEYS: &'static [&'static str] = &[
        "device",
        "threads",
        "workers",
        "prefetch",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite",
        "dist_timeout_s",
        "keep_freed_memory",
    ];
    pub const NESTED_KEYS: &'static [(&'static str, &'static str)] = &[("align", "cpu_solver_max_batch")];
}

/// The `pretrain` section: every setting here but `run` shapes the loss
/// trajectory and is in the config hash ([`PretrainConfig::hash`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Every random draw (init, data order, slices, augmentation, dropout)
    /// derives from (seed, step), so a resumed run replays exactly.
    pub seed: u64,
    pub precision: Precision,
    /// MONAI SwinUNETR arguments (in/out channels 1), or `nnunet:` with a
    /// plans file (see [`crate::model::backbone`]).
    pub backbone: BackboneConfig,
    pub head: HeadKind,
    pub psat: PsatConfig,
    pub align: AlignConfig,
    pub weights: LossWeights,
    pub optimizer: OptimConfig,
    /// Triplets (volume, slice, targets) per micro-batch (paper: 10).
    pub batch_size: usize,
    pub epochs: f64,
    /// Optimiser steps; overrides `epochs` when set.
    pub max_steps: Option<u64>,
    pub sampling: Sampling,
    /// Resize the whole volume (trilinear) to this grid before the model;
    /// positions stay true. Absent: the cached grid, as in the paper.
    pub input_size: Option<[i64; 3]>,
    pub augment: AugmentConfig,
    /// Data-parallel runs (torchrun, srun): gather every rank's read-outs
    /// and targets so the alignment loss spans the global batch of
    /// world_size x batch_size. Off: each rank aligns its own batch, as
    /// the paper's per-GPU batches do.
    pub all_gather_embeddings: bool,
    /// Fraction in [0, 1) of the usable slices whose target rows are
    /// replaced by those of a random other slice (swapped captions), fixed
    /// by the seed for the whole run.
    pub target_noise: f64,
    /// Operational settings, not hashed.
    pub run: PretrainRun,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            seed: 0,
            precision: Precision::Auto,
            backbone: BackboneConfig::default(),
            head: HeadKind::Psat,
            psat: PsatConfig::default(),
            align: AlignConfig::default(),
            weights: LossWeights::default(),
            optimizer: OptimConfig::default(),
            batch_size: 10,
            epochs: 100.0,
            max_steps: None,
            sampling: Sampling::Case,
            input_size: None,
            augment: AugmentConfig::default(),
            all_gather_embeddings: false,
            target_noise: 0.0,
            run: PretrainRun::default(),
        }
    }
}

impl crate::artifacts::run::RunConfig for PretrainConfig {
    fn config_hash(&self) -> String {
        self.hash()
    }

    fn upgrade(config: &mut serde_json::Value) -> Result<Vec<String>> {
        crate::runtime::run_block::lift_run_keys(config, "pretrain", PretrainRun::KEYS, PretrainRun::NESTED_KEYS)
    }
}

impl PretrainConfig {
    /// Reads the files the config points to (an nnU-Net backbone's plans).
    pub fn resolve(&mut self) -> Result<()> {
        self.backbone.resolve().context("pretrain")
    }

    pub fn validate(&self) -> Result<()> {
        self.backbone
            .validate(1)
            .context("pretrain.backbone (one image channel in, its reconstruction out)")?;
        let dim = self.backbone.bottleneck_channels()?;
        if self.head == HeadKind::Psat {
            let p = &self.psat;
            ensure!(p.layers >= 1, "pretrain.psat.layers must be at least 1");
            ensure!(
                p.heads >= 1 && dim % p.heads == 0,
                "pretrain.psat.heads = {} must divide the {} bottleneck's width {dim}",
                p.heads,
                self.backbone.name()
            );
            ensure!(p.queries >= 1, "pretrain.psat.queries must be at least 1");
            ensure!(p.ffn >= 0, "pretrain.psat.ffn must be >= 0 (0: 4 x width)");
            ensure!(
                (0.0..1.0).contains(&p.dropout),
                "pretrain.psat.dropout must be in [0, 1)"
            );
        }
        ensure!(self.psat.bins >= 1, "pretrain.psat.bins must be at least 1");
        let a = &self.align;
        ensure!(a.eps > 0.0, "pretrain.align.eps must be positive, got {}", a.eps);
        ensure!(
            a.mass > 0.0 && a.mass <= 1.0,
            "pretrain.align.mass must be in (0, 1], got {}",
            a.mass
        );
        ensure!(a.max_iter >= 1, "pretrain.align.max_iter must be at least 1");
        ensure!(a.temperature > 0.0, "pretrain.align.temperature must be positive");
        ensure!(
            self.run.cpu_solver_max_batch >= 0,
            "pretrain.run.cpu_solver_max_batch must be >= 0 (0: every plan on the GPU)"
        );
        let w = &self.weights;
        ensure!(
            [w.text, w.image, w.recon].iter().all(|v| v.is_finite() && *v >= 0.0),
            "pretrain.weights must be finite and >= 0"
        );
        let o = &self.optimizer;
        ensure!(o.lr > 0.0 && o.lr.is_finite(), "pretrain.optimizer.lr must be positive");
        ensure!(
            o.min_lr >= 0.0 && o.min_lr <= o.lr,
            "pretrain.optimizer.min_lr must be in [0, lr]"
        );
        ensure!(o.weight_decay >= 0.0, "pretrain.optimizer.weight_decay must be >= 0");
        ensure!(
            o.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "pretrain.optimizer.betas must be in [0, 1)"
        );
        ensure!(o.eps > 0.0, "pretrain.optimizer.eps must be positive");
        ensure!(
            o.clip_grad_norm >= 0.0,
            "pretrain.optimizer.clip_grad_norm must be >= 0"
        );
        ensure!(o.accumulate >= 1, "pretrain.optimizer.accumulate must be at least 1");
        ensure!(
            self.batch_size >= 2,
            "pretrain.batch_size must be at least 2: the alignment losses match each read-out against the batch"
        );
        ensure!(
            self.max_steps.is_some() || (self.epochs > 0.0 && self.epochs.is_finite()),
            "pretrain.epochs must be positive (or set max_steps)"
        );
        ensure!(self.max_steps != Some(0), "pretrain.max_steps must be positive");
        if let Some(s) = self.input_size {
            let m = self.backbone.size_multiple()?;
            ensure!(
                s.iter().zip(m).all(|(&v, m)| v > 0 && v % m == 0),
                "pretrain.input_size {s:?}: the sides must be positive multiples of {m:?} ({}'s downsampling per axis)",
                self.backbone.name()
            );
        }
        let g = &self.augment;
        ensure!(
            (0.0..1.0).contains(&g.intensity_scale) && g.intensity_shift >= 0.0,
            "pretrain.augment: intensity_scale must be in [0, 1) and intensity_shift >= 0"
        );
        ensure!(
            (0.0..=1.0).contains(&g.flip_prob),
            "pretrain.augment.flip_prob must be in [0, 1]"
        );
        ensure!(self.run.workers >= 1, "pretrain.run.workers must be at least 1");
        ensure!(self.run.prefetch >= 1, "pretrain.run.prefetch must be at least 1");
        ensure!(
            self.run.checkpoint_every >= 1,
            "pretrain.run.checkpoint_every must be at least 1"
        );
        ensure!(
            self.run.keep_checkpoints >= 1,
            "pretrain.run.keep_checkpoints must be at least 1"
        );
        ensure!(
            self.run.max_nonfinite >= 1,
            "pretrain.run.max_nonfinite must be at least 1"
        );
        ensure!(
            self.run.dist_timeout_s.is_finite() && self.run.dist_timeout_s > 0.0,
            "pretrain.run.dist_timeout_s must be a positive number of seconds, got {}",
            self.run.dist_timeout_s
        );
        ensure!(
            (0.0..1.0).contains(&self.target_noise),
            "pretrain.target_noise must be a fraction in [0, 1), got {}",
            self.target_noise
        );
        Ok(())
    }

    /// Identity of everything that shapes the loss trajectory: the
    /// sha256 of the canonical form [`hash::Hashed`], so `run` settings (device,
    /// threads, loader threads, checkpoint cadence, ...) may differ
    /// between a run and its resumption.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(&(PRETRAIN_FORMAT, hash::Hashed::of(self))).unwrap_or_default();
        crate::fsutil::sha256_bytes(&json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typo_is_named() {
        let e = serde_yaml::from_str::<PretrainConfig>("optimizer:\n  lrr: 1\n").unwrap_err();
        assert!(e.to_string().contains("lrr"), "{e}");
    }

    #[test]
    fn presets_load_and_ablations_differ_from_the_paper_in_one_knob_only() {
        use crate::config::Experiment;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let load = |n: &str| Experiment::load(&dir.join(format!("{n}.yaml"))).unwrap();
        let paper = load("paper");
        let p = &paper.pretrain;
        assert_eq!(p.backbone.bottleneck_channels().unwrap(), 768);
        assert_eq!((p.psat.layers, p.psat.queries), (6, 300));
        assert_eq!((p.align.loss, p.align.eps, p.align.mass), (AlignLoss::Pot, 0.03, 0.95));
        assert_eq!(
            (p.optimizer.kind, p.optimizer.lr, p.optimizer.weight_decay),
            (OptimizerKind::Adam, 1e-5, 1e-5)
        );
        assert_eq!((p.batch_size, p.epochs, p.max_steps), (10, 100.0, None));
        assert_eq!(paper.preprocess.roi, [128, 128, 128]);
        for (name, undo) in [
            (
                "ot",
                (|c: &mut PretrainConfig| c.align.loss = AlignLoss::Pot) as fn(&mut PretrainConfig),
            ),
            ("infonce", |c| c.align.loss = AlignLoss::Pot),
            ("no-psat", |c| c.head = HeadKind::Psat),
        ] {
            let e = load(name);
            assert_eq!(e.name, name);
            // every other section (workdir, manifest, preprocess, caption,
            // embed) equal: the ablations share the paper's cache
            let rest = |e: &Experiment| {
                let mut v = serde_json::to_value(e).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("name");
                o.remove("pretrain");
                v
            };
            assert_eq!(
                rest(&e),
                rest(&paper),
                "{name} differs from paper.yaml outside pretrain"
            );
            let mut c = e.pretrain.clone();
            assert_ne!(c, paper.pretrain, "{name} ablates nothing");
            undo(&mut c);
            assert_eq!(c, paper.pretrain, "{name} differs from paper.yaml beyond its ablation");
        }
        let demo = load("demo");
        assert!(demo.pretrain.max_steps.is_some() && demo.pretrain.input_size.is_some());
    }

    #[test]
    fn the_resenc_preset_differs_from_brain_tissue_in_the_backbone_and_finetuning_lr_only() {
        use crate::config::Experiment;
        use crate::model::backbone::BackboneConfig;
        // Plans paths in presets are relative to the repository root,
        // where cargo runs tests.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let load = |n: &str| Experiment::load(&root.join("experiments").join(format!("{n}.yaml"))).unwrap();
        let (swin, resenc) = (load("brain-tissue"), load("brain-tissue-resenc"));
        let BackboneConfig::Nnunet(n) = &resenc.pretrain.backbone else {
            panic!("brain-tissue-resenc pretrains an nnU-Net backbone")
        };
        assert_eq!(resenc.pretrain.backbone.name(), "ResidualEncoderUNet");
        assert_eq!(n.spec(1, 1).unwrap().features, vec![8, 16, 32, 64, 80]);
        assert_eq!(resenc.downstream.as_ref().unwrap().backbone, resenc.pretrain.backbone);
        let strip = |e: &Experiment| {
            let mut v = serde_json::to_value(e).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("name");
            o.remove("workdir");
            o["pretrain"].as_object_mut().unwrap().remove("backbone");
            let d = o["downstream"].as_object_mut().unwrap();
            d.remove("backbone");
            d["optimizer"].as_object_mut().unwrap().remove("lr");
            v
        };
        assert_eq!(
            strip(&swin),
            strip(&resenc),
            "the two backbones' experiments differ elsewhere"
        );
        let lr = |e: &Experiment| e.downstream.as_ref().unwrap().optimizer.lr;
        assert_eq!((lr(&swin), lr(&resenc)), (1e-3, 1e-2));
    }

    #[test]
    fn batch_of_one_is_rejected() {
        let c = PretrainConfig {
            batch_size: 1,
            ..Default::default()
        };
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("batch_size"));
    }
}
