//! The command line's shape: every subcommand and its arguments (clap).
//! `main.rs` parses it and dispatches.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "med3d",
    version,
    about = "Pretrain 3D medical image encoders with language (Med3DInsight)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Describe an image (NIfTI file, DICOM file or folder): shape, spacing,
    /// affine, orientation, intensities; lists a folder's series when it holds several.
    Info {
        path: PathBuf,
        /// DICOM: the SeriesInstanceUID to describe when a folder holds several.
        #[arg(long)]
        series: Option<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Cap, in MiB, on what compressed input (gzip, JPEG/RLE/JPEG 2000
        /// frames) may decompress to; plain data are bounded by the file.
        #[arg(long, default_value_t = med3dinsight::volume::ReadOptions::DEFAULT_MIB)]
        max_decompressed_mib: u64,
    },
    /// Write an image (DICOM folder or file, or NIfTI) as the float32 NIfTI
    /// med3d sees: the voxels and RAS+ affine every stage works from.
    Convert {
        input: PathBuf,
        /// Output .nii or .nii.gz.
        output: PathBuf,
        /// DICOM: the SeriesInstanceUID to read when a folder holds several.
        #[arg(long)]
        series: Option<String>,
        /// 4D NIfTI / NRRD: the volume to take.
        #[arg(long)]
        volume_index: Option<usize>,
        /// 3D Slicer segmentations whose segments overlap: error, first or last.
        #[arg(long, value_enum, default_value = "error")]
        label_overlap: med3dinsight::volume::nrrd::Overlap,
        /// Cap, in MiB, on what compressed input (gzip, JPEG/RLE/JPEG 2000
        /// frames) may decompress to; plain data are bounded by the file.
        #[arg(long, default_value_t = med3dinsight::volume::ReadOptions::DEFAULT_MIB)]
        max_decompressed_mib: u64,
    },
    /// Turn the volumes of a manifest into a slice cache.
    Preprocess {
        /// Dataset manifest (YAML, MSD or nnU-Net v2 dataset.json); default: the config's.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Experiment config (its `preprocess` section is used).
        #[arg(long)]
        config: PathBuf,
        /// Cache folder; default: <workdir>/cache from the config.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Process only shard i of n (1-based), e.g. 3/8.
        #[arg(long)]
        shard: Option<String>,
        /// Cases processed at once (memory grows with this); default: all cores.
        #[arg(long)]
        workers: Option<usize>,
        /// Override a config key, after the file and its `extends`:
        /// `--set pretrain.optimizer.lr=1e-4` (repeatable; the value is YAML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Caption every slice of a cache (descriptor or an OpenAI-compatible server).
    Caption {
        /// Cache folder; default: <workdir>/cache from the config.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Experiment config (its `caption` section is used).
        #[arg(long)]
        config: PathBuf,
        /// Caption only the slices of shard i of n (1-based, by case, as preprocess).
        #[arg(long)]
        shard: Option<String>,
        /// Captions file; default: <cache>/captions.jsonl.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config key, after the file and its `extends`:
        /// `--set pretrain.optimizer.lr=1e-4` (repeatable; the value is YAML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Write an HTML contact sheet of slices beside their captions.
    Inspect {
        #[arg(long)]
        cache: PathBuf,
        /// Captions file; default: <cache>/captions.jsonl.
        #[arg(long)]
        captions: Option<PathBuf>,
        /// HTML file to write.
        #[arg(long)]
        out: PathBuf,
        /// At most this many slices per section.
        #[arg(long, default_value_t = 120)]
        limit: usize,
    },
    /// Embed captions (and slices, with an image encoder) with frozen 2D encoders.
    Embed {
        /// Cache folder; default: <workdir>/cache from the config.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Experiment config (its `embed` section is used).
        #[arg(long)]
        config: PathBuf,
        /// Captions file; default: <cache>/captions.jsonl.
        #[arg(long)]
        captions: Option<PathBuf>,
        /// Tables folder; default: <cache>/embeddings (what pretraining reads).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config key, after the file and its `extends`:
        /// `--set pretrain.optimizer.lr=1e-4` (repeatable; the value is YAML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Pretrain SwinUNETR + PSAT on a cache's volumes and embeddings.
    Pretrain {
        /// Cache folder (volumes, index, embeddings); default: <workdir>/cache.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Experiment config (its `pretrain` section is used).
        #[arg(long)]
        config: PathBuf,
        /// Run folder (checkpoints, metrics, loss plot); default: <workdir>/runs/<name>.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue from the run folder's newest checkpoint (a fresh start when it has none).
        #[arg(long)]
        resume: bool,
        /// Override a config key, after the file and its `extends`:
        /// `--set pretrain.optimizer.lr=1e-4` (repeatable; the value is YAML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Write a checkpoint's weights for downstream networks (MONAI SwinUNETR
    /// or its encoder), with a model card beside them.
    Export {
        /// Run folder written by `med3d pretrain`.
        #[arg(long)]
        run: PathBuf,
        /// Checkpoint step; default: the latest.
        #[arg(long)]
        step: Option<u64>,
        #[arg(long, value_enum, default_value = "monai-swinunetr")]
        format: med3dinsight::export::Format,
        /// monai-swinunetr: only the encoder (MONAI's SwinTransformer, `swinViT.` removed).
        #[arg(long)]
        encoder_only: bool,
        /// The .safetensors file to write; the card goes beside it as <stem>.card.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fine-tune a segmentation or classification network (the config's
    /// `downstream` section) from an export or from scratch.
    Finetune {
        /// An export (.safetensors with its .card.json beside it) or `scratch`.
        #[arg(long)]
        init: String,
        /// Labelled cache; default: <workdir>/cache from the config.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Labelled manifest to preprocess into the cache first.
        #[arg(long)]
        manifest: Option<PathBuf>,
        #[arg(long)]
        config: PathBuf,
        /// Run folder (model.safetensors, metrics.jsonl, finetune.json).
        #[arg(long)]
        out: PathBuf,
        /// Override a config key, after the file and its `extends`:
        /// `--set pretrain.optimizer.lr=1e-4` (repeatable; the value is YAML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Score a fine-tuned run on a cache (Dice and HD95, or accuracy and AUC).
    Evaluate {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        cache: PathBuf,
        /// Take the sliding-window settings from this config's downstream section.
        #[arg(long)]
        config: Option<PathBuf>,
        /// JSON report; default: <run>/evaluate.json.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config key, after the file and its `extends`:
        /// `--set pretrain.optimizer.lr=1e-4` (repeatable; the value is YAML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// How well a pretraining run's 3D read-outs align with a cache's 2D
    /// target embeddings: retrieval (all slices; same plane and bin),
    /// modality gap, plane and position read-outs.
    EvaluateAlignment(med3dinsight::train::alignment_eval::Request),
    /// What a bug report needs: med3d, libtorch, CUDA (compiled, loaded,
    /// usable), the driver and GPUs, NCCL/Gloo, threads, and any mismatch.
    Doctor {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Embeddings of given texts or images as .npy (parity tests, benchmarks).
    #[command(hide = true)]
    Encode(med3dinsight::embed::encode::EncodeArgs),
    /// Run every stage of an experiment in order, skipping what is done.
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        workers: Option<usize>,
        /// Override a config key, after the file and its `extends`:
        /// `--set pretrain.optimizer.lr=1e-4` (repeatable; the value is YAML).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}
