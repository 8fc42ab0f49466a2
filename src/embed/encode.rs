//! `med3d encode` (hidden): embeddings of given texts or images, written as
//! a `.npy`, with timings on stdout as JSON. For parity tests against the
//! Python references and for the benchmark; the stage itself is `embed`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::artifacts::npy;
use crate::encoders::{
    pixels, weights, Env, ImageEncoder, ImageModel, ImagePlan, ImageSpec, TextEncoder, TextModel, TextPlan, TextSpec,
    CLIP_MEAN, CLIP_STD,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EncodeKind {
    /// Text embeddings of a JSON array of strings.
    Text,
    /// Image embeddings of a JSON array of PNG paths.
    Image,
    /// The image tower's preprocessed inputs [N, 3, S, S] (no model needed).
    Pixels,
}

/// Which frozen tower `encode` runs (text: either; image: BiomedCLIP's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EncodeModel {
    Minilm,
    Biomedclip,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EncodeArgs {
    #[arg(long, value_enum)]
    pub kind: EncodeKind,
    #[arg(long, value_enum, default_value = "minilm")]
    pub model: EncodeModel,
    /// Weights file, model folder or hub id (default: the model's hub id).
    #[arg(long)]
    pub weights: Option<String>,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long)]
    pub heads: Option<i64>,
    /// JSON array of texts or PNG paths.
    #[arg(long)]
    pub input: PathBuf,
    /// Output .npy (float32).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: crate::embed::DeviceChoice,
    /// libtorch intra-op threads (default: libtorch's own choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Encode the inputs this many times (timing); the output is the last pass.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Encode the first batch once before timing (warm caches and threads).
    #[arg(long)]
    pub warmup: bool,
    /// Image side for --kind pixels.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    #[arg(long)]
    pub hf_cache: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct EncodeReport {
    pub count: usize,
    pub dim: usize,
    pub device: String,
    pub threads: i32,
    pub load_seconds: f64,
    /// Wall time of the encoding passes, inputs read and preprocessed included.
    pub seconds: f64,
    pub per_second: f64,
    /// Inputs per second of the fastest pass.
    pub best_per_second: f64,
}

fn write_npy(path: &Path, t: &Tensor) -> Result<Vec<usize>> {
    let t = t.to_kind(Kind::Float).contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let v: Vec<f32> = Vec::<f32>::try_from(t.view([-1])).context("cannot read tensor back")?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    crate::fsutil::atomic_write(path, &npy::to_bytes(npy::NpyDtype::F32, &shape, &bytes))?;
    Ok(shape)
}

pub fn encode(a: &EncodeArgs) -> Result<EncodeReport> {
    if let Some(n) = a.threads {
        tch::set_num_threads(n);
    }
    let device = a.device.resolve("--device")?;
    let items: Vec<String> =
        serde_json::from_slice(&std::fs::read(&a.input).with_context(|| format!("cannot read {}", a.input.display()))?)
            .with_context(|| format!("{}: expected a JSON array of strings", a.input.display()))?;
    let env = Env {
        hub_caches: weights::hub_caches(a.hf_cache.as_deref()),
        hash_memo: None,
    };
    let t0 = std::time::Instant::now();
    let batch = a.batch_size.max(1);
    let mut rounds: Vec<f64> = Vec::new();
    let (out, load_seconds) = match a.kind {
        EncodeKind::Text => {
            let model = match a.model {
                EncodeModel::Minilm => TextModel::Minilm,
                EncodeModel::Biomedclip => TextModel::Biomedclip,
            };
            let spec = TextSpec {
                model,
                weights: a.weights.clone(),
                tokenizer: a.tokenizer.clone(),
                max_tokens: a.max_tokens,
                heads: a.heads,
            };
            let enc = TextEncoder::load(&TextPlan::new(&spec, &env)?, device)?;
            let load = t0.elapsed().as_secs_f64();
            let refs: Vec<&str> = items.iter().map(String::as_str).collect();
            if a.warmup {
                let _ = enc.embed(&refs[..batch.min(refs.len())])?;
            }
            let mut out = Tensor::zeros([0, enc.dim], (Kind::Float, tch::Device::Cpu));
            for _ in 0..a.repeat.max(1) {
                let t1 = std::time::Instant::now();
                out = enc.embed_many(&refs, batch)?;
                rounds.push(t1.elapsed().as_secs_f64());
            }
            (out, load)
        }
        EncodeKind::Image => {
            if a.model != EncodeModel::Biomedclip {
                bail!("--model minilm is a text tower; the image tower is --model biomedclip");
            }
            let spec = ImageSpec {
                model: ImageModel::Biomedclip,
                weights: a.weights.clone(),
                mean: None,
                std: None,
            };
            let enc = ImageEncoder::load(&ImagePlan::new(&spec, &env)?, device)?;
            let load = t0.elapsed().as_secs_f64();
            let run_batch = |c: &[String]| -> Result<Tensor> {
                let xs = c
                    .iter()
                    .map(|p| enc.input_png(Path::new(p)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(enc.embed_inputs(&Tensor::stack(&xs, 0)))
            };
            if a.warmup && !items.is_empty() {
                let _ = run_batch(&items[..batch.min(items.len())])?;
            }
            let mut out = Tensor::zeros([0, enc.dim], (Kind::Float, tch::Device::Cpu));
            for _ in 0..a.repeat.max(1) {
                let t1 = std::time::Instant::now();
                let parts = items.chunks(batch).map(run_batch).collect::<Result<Vec<_>>>()?;
                if !parts.is_empty() {
                    out = Tensor::cat(&parts, 0);
                }
                rounds.push(t1.elapsed().as_secs_f64());
            }
            (out, load)
        }
        EncodeKind::Pixels => {
            let xs = items
                .iter()
                .map(|p| {
                    pixels::read_png(Path::new(p)).and_then(|i| pixels::to_input(&i, a.image_size, CLIP_MEAN, CLIP_STD))
                })
                .collect::<Result<Vec<_>>>()?;
            let s = a.image_size as i64;
            let out = if xs.is_empty() {
                Tensor::zeros([0, 3, s, s], (Kind::Float, tch::Device::Cpu))
            } else {
                Tensor::stack(&xs, 0)
            };
            rounds.push(t0.elapsed().as_secs_f64());
            (out, 0.0)
        }
    };
    let shape = write_npy(&a.out, &out)?;
    let count = items.len() * rounds.len();
    let seconds: f64 = rounds.iter().sum();
    let fastest = rounds.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(EncodeReport {
        count,
        dim: shape.get(1).copied().unwrap_or(0),
        device: format!("{device:?}"),
        threads: tch::get_num_threads(),
        load_seconds,
        seconds,
        per_second: if seconds > 0.0 { count as f64 / seconds } else { 0.0 },
        best_per_second: if fastest > 0.0 && fastest.is_finite() {
            items.len() as f64 / fastest
        } else {
            0.0
        },
    })
}
