//! Frozen 2D encoders that give the alignment targets: text towers (BERT
//! family: all-MiniLM-L6-v2, BiomedCLIP's PubMedBERT) and an image tower
//! (BiomedCLIP's ViT-B/16), in tch, loading upstream checkpoints by their
//! own key names. See `weights` for where files come from.
pub mod bert;
pub mod pixels;
pub mod tokenizer;
pub mod torch_pickle;
pub mod vit;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use bert::{Bert, BertConfig};
use tokenizer::TextTokenizer;
use vit::{Vit, VitConfig};
use weights::{load_into, read_tensors, resolve, ModelFiles};

/// Which text tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextModel {
    /// sentence-transformers/all-MiniLM-L6-v2: mean pooling, L2-normalised, 384-d.
    Minilm,
    /// BiomedCLIP's text tower: PubMedBERT, [CLS], MLP projection to 512-d.
    Biomedclip,
}

/// Which image tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageModel {
    /// BiomedCLIP's image tower: timm ViT-B/16 at 224, linear projection to 512-d.
    Biomedclip,
}

pub const MINILM_HUB_ID: &str = "sentence-transformers/all-MiniLM-L6-v2";
pub const BIOMEDCLIP_HUB_ID: &str = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224";
/// OpenAI CLIP's normalisation, which BiomedCLIP's preprocess config names.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

const MINILM_FILES: &[&str] = &["model.safetensors", "pytorch_model.bin"];
const OPEN_CLIP_FILES: &[&str] = &[
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    pub model: TextModel,
    /// Weights file, model folder, or hub id in a local hub cache; default:
    /// the model's hub id.
    #[serde(default)]
    pub weights: Option<String>,
    /// tokenizer.json or vocab.txt; default: the one beside the weights.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Context length in tokens, [CLS] and [SEP] included (both models: 256).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Attention heads, when no config.json says (default: width / 64).
    #[serde(default)]
    pub heads: Option<i64>,
}

impl Default for TextSpec {
    fn default() -> Self {
        TextSpec {
            model: TextModel::Minilm,
            weights: None,
            tokenizer: None,
            max_tokens: None,
            heads: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub model: ImageModel,
    #[serde(default)]
    pub weights: Option<String>,
    #[serde(default)]
    pub mean: Option<[f32; 3]>,
    #[serde(default)]
    pub std: Option<[f32; 3]>,
}

/// What an embedding table is made with; stored in its metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// `minilm`, `biomedclip-text`, `biomedclip-image`.
    pub encoder: String,
    pub weights: String,
    pub weights_sha256: String,
    /// Tokenizer file and context (text), or the preprocessing (image).
    pub input: String,
    pub input_sha256: String,
    pub l2_normalized: bool,
    /// Everything above that changes the numbers, hashed, with the med3d
    /// version: the key that decides whether stored embeddings are current.
    pub key: String,
}

impl Identity {
    fn new(encoder: &str, weights: &Path, weights_sha: String, input: String, input_sha: String, l2: bool) -> Identity {
        let key = crate::fsutil::sha256_bytes(
            format!("{encoder}|{weights_sha}|{input_sha}|{input}|{l2}|{}", crate::VERSION).as_bytes(),
        );
        Identity {
            encoder: encoder.to_string(),
            weights: weights.display().to_string(),
            weights_sha256: weights_sha,
            input,
            input_sha256: input_sha,
            l2_normalized: l2,
            key,
        }
    }
}

/// Where resolved model files are searched and hashes remembered.
pub struct Env {
    pub hub_caches: Vec<PathBuf>,
    /// JSON memo of weights hashes (see `weights::sha256_memo`).
    pub hash_memo: Option<PathBuf>,
}

impl Env {
    fn sha(&self, p: &Path) -> Result<String> {
        match &self.hash_memo {
            Some(m) => weights::sha256_memo(p, m),
            None => crate::fsutil::sha256_file(p),
        }
    }
}

/// The VarStore path for a dotted key prefix (`text.transformer`).
fn sub<'a>(root: nn::Path<'a>, prefix: &str) -> nn::Path<'a> {
    prefix.split('.').filter(|s| !s.is_empty()).fold(root, |p, s| p / s)
}

/// The prefix under which a BERT's embeddings sit in a checkpoint
/// (`` for MiniLM's, `bert` for task models, `text.transformer` for open_clip).
fn bert_prefix(tensors: &std::collections::HashMap<String, Tensor>, file: &Path) -> Result<String> {
    const LEAF: &str = "embeddings.word_embeddings.weight";
    let mut found: Vec<&String> = tensors.keys().filter(|k| k.ends_with(LEAF)).collect();
    found.sort();
    match found.first() {
        Some(k) => Ok(k[..k.len() - LEAF.len()].trim_end_matches('.').to_string()),
        None => bail!("{}: no BERT embeddings (no key ending in {LEAF})", file.display()),
    }
}

/// A text encoder's files and identity, known without loading it (so a
/// stage whose stored embeddings are current never reads the weights).
pub struct TextPlan {
    pub spec: TextSpec,
    pub files: ModelFiles,
    pub tokenizer: PathBuf,
    pub max_tokens: usize,
    pub identity: Identity,
}

impl TextPlan {
    pub fn new(spec: &TextSpec, env: &Env) -> Result<TextPlan> {
        let (hub, cands, name, l2) = match spec.model {
            TextModel::Minilm => (MINILM_HUB_ID, MINILM_FILES, "minilm", true),
            TextModel::Biomedclip => (BIOMEDCLIP_HUB_ID, OPEN_CLIP_FILES, "biomedclip-text", false),
        };
        let files = resolve(spec.weights.as_deref().unwrap_or(hub), cands, &env.hub_caches)?;
        let tokenizer = match &spec.tokenizer {
            Some(p) if p.is_file() => p.clone(),
            Some(p) => bail!("tokenizer {}: no such file", p.display()),
            None => files.require(&["tokenizer.json", "vocab.txt"], "tokenizer")?,
        };
        let max_tokens = spec.max_tokens.unwrap_or(256);
        let identity = Identity::new(
            name,
            &files.weights,
            env.sha(&files.weights)?,
            format!("{} (max {max_tokens} tokens)", tokenizer.display()),
            crate::fsutil::sha256_file(&tokenizer)?,
            l2,
        );
        Ok(TextPlan {
            spec: spec.clone(),
            files,
            tokenizer,
            max_tokens,
            identity,
        })
    }
}

pub struct TextEncoder {
    model: TextModel,
    tokenizer: TextTokenizer,
    bert: Bert,
    proj: Option<(nn::Linear, nn::Linear)>,
    _vs: nn::VarStore,
    device: Device,
    pub dim: i64,
}

impl TextEncoder {
    pub fn load(plan: &TextPlan, device: Device) -> Result<TextEncoder> {
        let spec = &plan.spec;
        let file = &plan.files.weights;
        let tensors = read_tensors(file)?;
        let prefix = match spec.model {
            TextModel::Minilm => bert_prefix(&tensors, file)?,
            TextModel::Biomedclip => "text.transformer".to_string(),
        };
        // A config.json beside MiniLM is BERT's own; beside an open_clip
        // checkpoint there is none for the tower (open_clip_config.json).
        let cfg_json = match spec.model {
            TextModel::Minilm => plan.files.find(&["config.json"]),
            TextModel::Biomedclip => None,
        };
        let cfg = BertConfig::infer(&tensors, &prefix, file, cfg_json.as_deref(), spec.heads)?;
        if plan.max_tokens as i64 > cfg.max_position_embeddings || plan.max_tokens < 2 {
            bail!(
                "text max_tokens {} must be within 2..={} (the model's positions)",
                plan.max_tokens,
                cfg.max_position_embeddings
            );
        }
        let tokenizer = TextTokenizer::from_file(&plan.tokenizer, plan.max_tokens)?;
        let vs = nn::VarStore::new(device);
        let bert = Bert::new(&sub(vs.root(), &prefix), &cfg)?;
        let proj = match spec.model {
            TextModel::Minilm => None,
            TextModel::Biomedclip => {
                let p0 = weights::shape_of(&tensors, "text.proj.0.weight", file)?;
                let p2 = weights::shape_of(&tensors, "text.proj.2.weight", file)?;
                let nb = nn::LinearConfig {
                    bias: false,
                    ..Default::default()
                };
                let p = vs.root() / "text" / "proj";
                Some((
                    nn::linear(&p / 0, p0[1], p0[0], nb),
                    nn::linear(&p / 2, p2[1], p2[0], nb),
                ))
            }
        };
        load_into(&vs, &tensors, file)?;
        let dim = match &proj {
            None => cfg.hidden_size,
            Some((_, p2)) => p2.ws.size()[0],
        };
        Ok(TextEncoder {
            model: spec.model,
            tokenizer,
            bert,
            proj,
            _vs: vs,
            device,
            dim,
        })
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Embeddings [N, D] (f32, CPU) of any number of texts, in their order,
    /// computed in batches of similar length (longest first, as
    /// sentence-transformers does) so little is spent on padding.
    pub fn embed_many(&self, texts: &[&str], batch: usize) -> Result<Tensor> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut rows: Vec<Tensor> = Vec::with_capacity(texts.len());
        for group in order.chunks(batch.max(1)) {
            let batch_texts: Vec<&str> = group.iter().map(|&i| texts[i]).collect();
            rows.push(self.embed(&batch_texts)?);
        }
        if rows.is_empty() {
            return self.embed(&[]);
        }
        let sorted = Tensor::cat(&rows, 0);
        let mut inverse = vec![0i64; texts.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as i64;
        }
        Ok(sorted.index_select(0, &Tensor::from_slice(&inverse)))
    }

    /// Embeddings [B, D] (f32, CPU) of a batch of texts.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        if texts.is_empty() {
            return Ok(Tensor::zeros([0, self.dim], (Kind::Float, Device::Cpu)));
        }
        let cleaned: Vec<String>;
        let texts: Vec<&str> = match self.model {
            TextModel::Minilm => texts.to_vec(),
            TextModel::Biomedclip => {
                cleaned = texts.iter().map(|t| whitespace_clean(t)).collect();
                cleaned.iter().map(String::as_str).collect()
            }
        };
        let batch = self.tokenizer.encode(&texts)?;
        let ids = batch.ids.to_device(self.device);
        let mask = batch.mask.to_device(self.device);
        let out = tch::no_grad(|| {
            use tch::nn::Module;
            let h = self.bert.forward(&ids, &mask);
            match &self.proj {
                None => {
                    // sentence-transformers: mean over real tokens, then L2.
                    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
                    let summed = (&h * &m).sum_dim_intlist(1, false, Kind::Float);
                    let count = m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
                    let mean = summed / count;
                    let norm = mean.norm_scalaropt_dim(2.0, 1, true).clamp_min(1e-12);
                    mean / norm
                }
                Some((p0, p2)) => p2.forward(&p0.forward(&h.select(1, 0)).gelu("none")),
            }
        });
        Ok(out.to_device(Device::Cpu).to_kind(Kind::Float))
    }
}

/// open_clip's text cleaning for HF tokenizers (`whitespace`): runs of
/// whitespace to one space, trimmed. (open_clip also runs ftfy and HTML
/// unescaping first; those change only mis-encoded text and entities.)
pub fn whitespace_clean(t: &str) -> String {
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub struct ImagePlan {
    pub spec: ImageSpec,
    pub files: ModelFiles,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub identity: Identity,
}

impl ImagePlan {
    pub fn new(spec: &ImageSpec, env: &Env) -> Result<ImagePlan> {
        let ImageModel::Biomedclip = spec.model;
        let files = resolve(
            spec.weights.as_deref().unwrap_or(BIOMEDCLIP_HUB_ID),
            OPEN_CLIP_FILES,
            &env.hub_caches,
        )?;
        let mean = spec.mean.unwrap_or(CLIP_MEAN);
        let std = spec.std.unwrap_or(CLIP_STD);
        let prep = format!(
            "shortest side to the model's size (Pillow bicubic), centre crop, grey to RGB, mean {mean:?}, std {std:?}"
        );
        let prep_sha = crate::fsutil::sha256_bytes(prep.as_bytes());
        let identity = Identity::new(
            "biomedclip-image",
            &files.weights,
            env.sha(&files.weights)?,
            prep,
            prep_sha,
            false,
        );
        Ok(ImagePlan {
            spec: spec.clone(),
            files,
            mean,
            std,
            identity,
        })
    }
}

pub struct ImageEncoder {
    vit: Vit,
    proj: nn::Linear,
    _vs: nn::VarStore,
    device: Device,
    mean: [f32; 3],
    std: [f32; 3],
    pub image_size: usize,
    pub dim: i64,
}

impl ImageEncoder {
    pub fn load(plan: &ImagePlan, device: Device) -> Result<ImageEncoder> {
        let file = &plan.files.weights;
        let tensors = read_tensors(file)?;
        let cfg = VitConfig::infer(&tensors, "visual.trunk", file)?;
        let head = weights::shape_of(&tensors, "visual.head.proj.weight", file)?;
        let vs = nn::VarStore::new(device);
        let vit = Vit::new(&(vs.root() / "visual" / "trunk"), &cfg);
        let proj = nn::linear(
            vs.root() / "visual" / "head" / "proj",
            head[1],
            head[0],
            nn::LinearConfig {
                bias: false,
                ..Default::default()
            },
        );
        load_into(&vs, &tensors, file)?;
        Ok(ImageEncoder {
            vit,
            proj,
            _vs: vs,
            device,
            mean: plan.mean,
            std: plan.std,
            image_size: cfg.image_size as usize,
            dim: head[0],
        })
    }

    /// The tower's input [3, S, S] for one decoded image.
    pub fn input(&self, img: &pixels::Image8) -> Result<Tensor> {
        pixels::to_input(img, self.image_size, self.mean, self.std)
    }

    /// The tower's input for a PNG file.
    pub fn input_png(&self, path: &Path) -> Result<Tensor> {
        pixels::read_png(path)
            .and_then(|i| self.input(&i))
            .with_context(|| format!("image {}", path.display()))
    }

    /// Embeddings [B, D] (f32, CPU) of preprocessed inputs [B, 3, S, S].
    pub fn embed_inputs(&self, x: &Tensor) -> Tensor {
        use tch::nn::Module;
        let x = x.to_device(self.device);
        tch::no_grad(|| self.proj.forward(&self.vit.forward(&x)))
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
    }
}
