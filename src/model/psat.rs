//! The plane-slice-aware transformer (PSAT) of docs/method.md: learnable queries
//! attend to the 3D encoder's bottleneck tokens through a DETR-style decoder
//! (post-norm: self-attention, cross-attention, feed-forward, each with a
//! residual and LayerNorm; final LayerNorm). A learnable (plane, slice-bin)
//! embedding is added to every memory token and every query, so the output
//! says "what the volume looks like at plane P, position s". Query 0 is read
//! out by one linear projection per alignment target.
//!
//! Variable names follow `torch.nn.TransformerDecoder(batch_first=True)`
//! (`layers.{i}.self_attn.in_proj_weight`, `...multihead_attn...`,
//! `linear1`, `linear2`, `norm1..3`, and `norm` for the final LayerNorm), so
//! the decoder can be checked against PyTorch's own and its weights move
//! between the two with no renaming.
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::Tensor;

/// How a slice position becomes a bin of the plane-slice embedding table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinMode {
    /// floor(position * bins) of the normalised position in [0, 1]
    /// (resolution independent).
    Normalized,
    /// The authors' rule: slice index / 2 (128 bins for a 256-wide volume).
    IndexDiv2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PsatConfig {
    pub layers: i64,
    pub heads: i64,
    /// Feed-forward width; 0 means 4 x the token width.
    pub ffn: i64,
    pub queries: i64,
    pub bins: i64,
    pub bin_mode: BinMode,
    pub dropout: f64,
}

impl Default for PsatConfig {
    /// The paper preset (docs/method.md), with the normal feed-forward width.
    fn default() -> Self {
        PsatConfig {
            layers: 6,
            heads: 8,
            ffn: 0,
            queries: 300,
            bins: 128,
            bin_mode: BinMode::Normalized,
            dropout: 0.1,
        }
    }
}

/// torch.nn.MultiheadAttention (batch_first) with packed in-projection.
#[derive(Debug)]
pub struct MultiheadAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    heads: i64,
    dropout: f64,
}

impl MultiheadAttention {
    pub fn new(vs: nn::Path, dim: i64, heads: i64, dropout: f64) -> Self {
        let bound = (6.0 / (dim + 3 * dim) as f64).sqrt();
        let in_proj_weight = vs.var(
            "in_proj_weight",
            &[3 * dim, dim],
            nn::Init::Uniform { lo: -bound, up: bound },
        );
        let in_proj_bias = vs.zeros("in_proj_bias", &[3 * dim]);
        let out_proj = nn::linear(&vs / "out_proj", dim, dim, Default::default());
        MultiheadAttention {
            in_proj_weight,
            in_proj_bias,
            out_proj,
            heads,
            dropout,
        }
    }

    /// query [B, Lq, D], key/value [B, Lk, D] -> [B, Lq, D].
    pub fn forward(&self, query: &Tensor, key: &Tensor, value: &Tensor, train: bool) -> Tensor {
        let d = *query.size().last().unwrap_or(&0);
        let w = self.in_proj_weight.chunk(3, 0);
        let b = self.in_proj_bias.chunk(3, 0);
        let split = |x: &Tensor, i: usize| {
            let (bsz, len) = (x.size()[0], x.size()[1]);
            x.linear(&w[i], Some(&b[i]))
                .view([bsz, len, self.heads, d / self.heads])
                .transpose(1, 2)
        };
        let (q, k, v) = (split(query, 0), split(key, 1), split(value, 2));
        let p = if train { self.dropout } else { 0.0 };
        let o = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, p, false, None, false);
        let (bsz, lq) = (query.size()[0], query.size()[1]);
        self.out_proj.forward(&o.transpose(1, 2).reshape([bsz, lq, d]))
    }
}

/// One post-norm decoder layer (torch.nn.TransformerDecoderLayer, relu).
#[derive(Debug)]
pub struct DecoderLayer {
    self_attn: MultiheadAttention,
    multihead_attn: MultiheadAttention,
    linear1: nn::Linear,
    linear2: nn::Linear,
    norm1: nn::LayerNorm,
    norm2: nn::LayerNorm,
    norm3: nn::LayerNorm,
    dropout: f64,
}

fn layer_norm(vs: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(
        vs,
        vec![dim],
        nn::LayerNormConfig {
            eps: 1e-5,
            ..Default::default()
        },
    )
}

impl DecoderLayer {
    pub fn new(vs: nn::Path, dim: i64, heads: i64, ffn: i64, dropout: f64) -> Self {
        DecoderLayer {
            self_attn: MultiheadAttention::new(&vs / "self_attn", dim, heads, dropout),
            multihead_attn: MultiheadAttention::new(&vs / "multihead_attn", dim, heads, dropout),
            linear1: nn::linear(&vs / "linear1", dim, ffn, Default::default()),
            linear2: nn::linear(&vs / "linear2", ffn, dim, Default::default()),
            norm1: layer_norm(&vs / "norm1", dim),
            norm2: layer_norm(&vs / "norm2", dim),
            norm3: layer_norm(&vs / "norm3", dim),
            dropout,
        }
    }

    pub fn forward(&self, x: &Tensor, memory: &Tensor, train: bool) -> Tensor {
        let drop = |t: Tensor| t.dropout(self.dropout, train);
        let x = self.norm1.forward(&(x + drop(self.self_attn.forward(x, x, x, train))));
        let x = self
            .norm2
            .forward(&(&x + drop(self.multihead_attn.forward(&x, memory, memory, train))));
        let ff = self
            .linear2
            .forward(&self.linear1.forward(&x).relu().dropout(self.dropout, train));
        self.norm3.forward(&(&x + drop(ff)))
    }
}

/// The DETR-style decoder stack with its final LayerNorm.
#[derive(Debug)]
pub struct Decoder {
    layers: Vec<DecoderLayer>,
    norm: nn::LayerNorm,
}

impl Decoder {
    pub fn new(vs: nn::Path, dim: i64, layers: i64, heads: i64, ffn: i64, dropout: f64) -> Self {
        let lv = &vs / "layers";
        Decoder {
            layers: (0..layers)
                .map(|i| DecoderLayer::new(&lv / i, dim, heads, ffn, dropout))
                .collect(),
            norm: layer_norm(&vs / "norm", dim),
        }
    }

    pub fn forward(&self, queries: &Tensor, memory: &Tensor, train: bool) -> Tensor {
        let mut x = queries.shallow_clone();
        for l in &self.layers {
            x = l.forward(&x, memory, train);
        }
        self.norm.forward(&x)
    }
}

/// PSAT: plane-slice embedding, learnable queries, decoder, read-outs.
#[derive(Debug)]
pub struct Psat {
    pub cfg: PsatConfig,
    plane_slice: nn::Embedding,
    query: nn::Embedding,
    decoder: Decoder,
    heads_out: Vec<(String, nn::Linear)>,
}

impl Psat {
    /// `dim`: the memory token width (the bottleneck channels); `targets`:
    /// (name, width) of each alignment target, e.g. ("text", 384).
    pub fn new(vs: nn::Path, dim: i64, cfg: &PsatConfig, targets: &[(&str, i64)]) -> Self {
        let ffn = if cfg.ffn > 0 { cfg.ffn } else { 4 * dim };
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: 1.0 },
            ..Default::default()
        };
        Psat {
            cfg: cfg.clone(),
            plane_slice: nn::embedding(&vs / "plane_slice_embed", 3 * cfg.bins, dim, emb),
            query: nn::embedding(&vs / "query_embed", cfg.queries, dim, emb),
            decoder: Decoder::new(&vs / "decoder", dim, cfg.layers, cfg.heads, ffn, cfg.dropout),
            heads_out: targets
                .iter()
                .map(|(name, width)| {
                    (
                        name.to_string(),
                        nn::linear(&vs / "proj" / *name, dim, *width, Default::default()),
                    )
                })
                .collect(),
        }
    }

    /// Bin of each (position in [0, 1], slice index) under the config's rule.
    pub fn bins(&self, positions: &[f64], indices: &[i64]) -> Vec<i64> {
        let n = self.cfg.bins;
        match self.cfg.bin_mode {
            BinMode::Normalized => positions
                .iter()
                .map(|p| ((p.clamp(0.0, 1.0) * n as f64) as i64).min(n - 1))
                .collect(),
            BinMode::IndexDiv2 => indices.iter().map(|i| (i / 2).clamp(0, n - 1)).collect(),
        }
    }

    /// memory [B, N, D] (bottleneck tokens), planes [B] in {0, 1, 2}, bins
    /// [B] -> one embedding per target, each [B, width], not normalised.
    pub fn forward(&self, memory: &Tensor, planes: &Tensor, bins: &Tensor, train: bool) -> Vec<(String, Tensor)> {
        let b = memory.size()[0];
        let idx = planes * self.cfg.bins + bins;
        let ps = self.plane_slice.forward(&idx).unsqueeze(1); // [B, 1, D]
        let q = self.query.ws.unsqueeze(0).expand([b, -1, -1], false) + &ps;
        let mem = memory + &ps;
        let out = self.decoder.forward(&q, &mem, train);
        let q0 = out.select(1, 0);
        self.heads_out
            .iter()
            .map(|(name, lin)| (name.clone(), lin.forward(&q0)))
            .collect()
    }
}

/// L2 normalisation along the last dimension.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true).clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn read_out_depends_on_plane_and_position() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = PsatConfig {
            layers: 2,
            heads: 4,
            queries: 5,
            bins: 8,
            ..Default::default()
        };
        let p = Psat::new(vs.root(), 32, &cfg, &[("text", 16), ("image", 12)]);
        let mem = Tensor::randn([1, 10, 32], (Kind::Float, Device::Cpu)).repeat([3, 1, 1]);
        let planes = Tensor::from_slice(&[0i64, 1, 0]);
        let bins = Tensor::from_slice(&p.bins(&[0.1, 0.1, 0.9], &[0, 0, 0]));
        let out = p.forward(&mem, &planes, &bins, false);
        assert_eq!(out[0].1.size(), vec![3, 16]);
        assert_eq!(out[1].1.size(), vec![3, 12]);
        let t = &out[0].1;
        // same volume, different plane or position -> different embeddings
        assert!((t.get(0) - t.get(1)).abs().max().double_value(&[]) > 1e-3);
        assert!((t.get(0) - t.get(2)).abs().max().double_value(&[]) > 1e-3);
        assert_eq!(p.bins(&[0.0, 0.999, 1.0], &[]), vec![0, 7, 7]);
    }
}
