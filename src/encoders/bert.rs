//! BERT encoder (Devlin et al. 2019) as Hugging Face `transformers`'
//! `BertModel` lays it out: variable paths are its state-dict keys
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`,
//! ...), so MiniLM's safetensors and BiomedCLIP's PubMedBERT tower load as
//! they are. Post-norm layers, absolute positions, token type 0.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;
use tch::{nn, Kind, Tensor};

use super::weights::{count_layers, shape_of};

/// The fields of a Hugging Face `config.json` that change the computation;
/// the rest of that file is ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "two")]
    pub type_vocab_size: i64,
    #[serde(default = "eps12")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn two() -> i64 {
    2
}
fn eps12() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

impl BertConfig {
    /// Sizes read off the checkpoint under `prefix` (e.g. `text.transformer`);
    /// heads, epsilon and activation from `config.json` when there is one,
    /// else `heads` or BERT's 64-wide heads, 1e-12 and exact GELU.
    pub fn infer(
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        file: &Path,
        config_json: Option<&Path>,
        heads: Option<i64>,
    ) -> Result<BertConfig> {
        let k = |s: &str| {
            if prefix.is_empty() {
                s.to_string()
            } else {
                format!("{prefix}.{s}")
            }
        };
        let word = shape_of(tensors, &k("embeddings.word_embeddings.weight"), file)?;
        let pos = shape_of(tensors, &k("embeddings.position_embeddings.weight"), file)?;
        let types = shape_of(tensors, &k("embeddings.token_type_embeddings.weight"), file)?;
        let inter = shape_of(tensors, &k("encoder.layer.0.intermediate.dense.weight"), file)?;
        let layers = count_layers(tensors, &k("encoder.layer")) as i64;
        let from_json: Option<BertConfig> = match config_json {
            Some(p) => {
                let bytes = std::fs::read(p)?;
                Some(serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
            }
            None => None,
        };
        let hidden = word[1];
        let heads = heads
            .or(from_json.as_ref().map(|c| c.num_attention_heads))
            .unwrap_or(hidden / 64);
        if heads <= 0 || hidden % heads != 0 {
            bail!(
                "{}: hidden size {hidden} is not divisible into {heads} heads",
                file.display()
            );
        }
        Ok(BertConfig {
            vocab_size: word[0],
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: inter[0],
            max_position_embeddings: pos[0],
            type_vocab_size: types[0],
            layer_norm_eps: from_json.as_ref().map(|c| c.layer_norm_eps).unwrap_or(1e-12),
            hidden_act: from_json.map(|c| c.hidden_act).unwrap_or_else(gelu),
        })
    }
}

/// `gelu` is the exact (erf) form; `gelu_new` / `gelu_pytorch_tanh` the tanh one.
pub fn activation(name: &str) -> Result<&'static str> {
    match name {
        "gelu" => Ok("none"),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok("tanh"),
        other => bail!("BERT activation {other:?} is not supported (gelu, gelu_new)"),
    }
}

struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attn_out: nn::Linear,
    attn_norm: nn::LayerNorm,
    inter: nn::Linear,
    out: nn::Linear,
    out_norm: nn::LayerNorm,
}

pub struct Bert {
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    emb_norm: nn::LayerNorm,
    layers: Vec<Layer>,
    heads: i64,
    gelu: &'static str,
    pub config: BertConfig,
}

impl Bert {
    pub fn new(p: &nn::Path, c: &BertConfig) -> Result<Bert> {
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        let h = c.hidden_size;
        let e = p / "embeddings";
        let layer = |l: nn::Path| {
            let a = &l / "attention";
            Layer {
                query: nn::linear(&a / "self" / "query", h, h, Default::default()),
                key: nn::linear(&a / "self" / "key", h, h, Default::default()),
                value: nn::linear(&a / "self" / "value", h, h, Default::default()),
                attn_out: nn::linear(&a / "output" / "dense", h, h, Default::default()),
                attn_norm: nn::layer_norm(&a / "output" / "LayerNorm", vec![h], ln),
                inter: nn::linear(
                    &l / "intermediate" / "dense",
                    h,
                    c.intermediate_size,
                    Default::default(),
                ),
                out: nn::linear(&l / "output" / "dense", c.intermediate_size, h, Default::default()),
                out_norm: nn::layer_norm(&l / "output" / "LayerNorm", vec![h], ln),
            }
        };
        let enc = p / "encoder" / "layer";
        Ok(Bert {
            word: nn::embedding(&e / "word_embeddings", c.vocab_size, h, Default::default()),
            position: nn::embedding(
                &e / "position_embeddings",
                c.max_position_embeddings,
                h,
                Default::default(),
            ),
            token_type: nn::embedding(&e / "token_type_embeddings", c.type_vocab_size, h, Default::default()),
            emb_norm: nn::layer_norm(&e / "LayerNorm", vec![h], ln),
            layers: (0..c.num_hidden_layers).map(|i| layer(&enc / i)).collect(),
            heads: c.num_attention_heads,
            gelu: activation(&c.hidden_act)?,
            config: c.clone(),
        })
    }

    /// Last hidden states [B, T, H] for token ids and a 0/1 attention mask [B, T].
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        use tch::nn::Module;
        let (b, t) = ids.size2().unwrap_or((0, 0));
        let dev = ids.device();
        let pos = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0);
        let types = Tensor::zeros([b, t], (Kind::Int64, dev));
        let mut x = self.word.forward(ids) + self.position.forward(&pos) + self.token_type.forward(&types);
        x = self.emb_norm.forward(&x);
        // Keys at padded positions are hidden from every query.
        let keep = mask.gt(0).view([b, 1, 1, t]);
        let h = self.config.hidden_size;
        let d = h / self.heads;
        let split = |y: Tensor| y.view([b, t, self.heads, d]).transpose(1, 2);
        for l in &self.layers {
            let q = split(l.query.forward(&x));
            let k = split(l.key.forward(&x));
            let v = split(l.value.forward(&x));
            let ctx = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&keep), 0.0, false, None, false);
            let ctx = ctx.transpose(1, 2).contiguous().view([b, t, h]);
            x = l.attn_norm.forward(&(l.attn_out.forward(&ctx) + &x));
            let y = l.out.forward(&l.inter.forward(&x).gelu(self.gelu));
            x = l.out_norm.forward(&(y + &x));
        }
        x
    }
}
