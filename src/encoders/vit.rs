//! Vision Transformer (Dosovitskiy et al. 2021) as timm's
//! `VisionTransformer` lays it out (`cls_token`, `pos_embed`,
//! `patch_embed.proj`, `blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
//! `norm`): pre-norm blocks, a class token, learned absolute positions,
//! LayerNorm eps 1e-6, exact GELU; the output is the normed class token
//! (timm's `global_pool='token'`), as in open_clip's timm towers
//! (BiomedCLIP's `visual.trunk`).
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use tch::{nn, Tensor};

use super::weights::{count_layers, shape_of};

#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub image_size: i64,
    pub patch_size: i64,
    pub width: i64,
    pub depth: i64,
    pub heads: i64,
    pub mlp_width: i64,
    pub in_channels: i64,
}

impl VitConfig {
    /// Sizes read off the checkpoint under `prefix` (e.g. `visual.trunk`);
    /// heads are 64 wide as in every ViT size timm names (Ti/S/B/L/H).
    pub fn infer(tensors: &HashMap<String, Tensor>, prefix: &str, file: &Path) -> Result<VitConfig> {
        let k = |s: &str| format!("{prefix}.{s}");
        let conv = shape_of(tensors, &k("patch_embed.proj.weight"), file)?;
        let pos = shape_of(tensors, &k("pos_embed"), file)?;
        let fc1 = shape_of(tensors, &k("blocks.0.mlp.fc1.weight"), file)?;
        shape_of(tensors, &k("cls_token"), file)?;
        let (width, in_channels, patch) = (conv[0], conv[1], conv[2]);
        let grid = ((pos[1] - 1) as f64).sqrt().round() as i64;
        if grid * grid != pos[1] - 1 {
            bail!(
                "{}: {} has {} positions, not a square grid plus a class token",
                file.display(),
                k("pos_embed"),
                pos[1]
            );
        }
        Ok(VitConfig {
            image_size: grid * patch,
            patch_size: patch,
            width,
            depth: count_layers(tensors, &k("blocks")) as i64,
            heads: (width / 64).max(1),
            mlp_width: fc1[0],
            in_channels,
        })
    }
}

struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

pub struct Vit {
    patch: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    pub config: VitConfig,
}

impl Vit {
    pub fn new(p: &nn::Path, c: &VitConfig) -> Vit {
        let ln = nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        let w = c.width;
        let n = (c.image_size / c.patch_size).pow(2) + 1;
        let block = |b: nn::Path| Block {
            norm1: nn::layer_norm(&b / "norm1", vec![w], ln),
            qkv: nn::linear(&b / "attn" / "qkv", w, 3 * w, Default::default()),
            proj: nn::linear(&b / "attn" / "proj", w, w, Default::default()),
            norm2: nn::layer_norm(&b / "norm2", vec![w], ln),
            fc1: nn::linear(&b / "mlp" / "fc1", w, c.mlp_width, Default::default()),
            fc2: nn::linear(&b / "mlp" / "fc2", c.mlp_width, w, Default::default()),
        };
        let blocks = p / "blocks";
        Vit {
            patch: nn::conv2d(
                p / "patch_embed" / "proj",
                c.in_channels,
                w,
                c.patch_size,
                nn::ConvConfig {
                    stride: c.patch_size,
                    ..Default::default()
                },
            ),
            cls_token: p.zeros("cls_token", &[1, 1, w]),
            pos_embed: p.zeros("pos_embed", &[1, n, w]),
            blocks: (0..c.depth).map(|i| block(&blocks / i)).collect(),
            norm: nn::layer_norm(p / "norm", vec![w], ln),
            config: c.clone(),
        }
    }

    /// Normed class token [B, width] of images [B, C, S, S] (already
    /// resized and normalised).
    pub fn forward(&self, images: &Tensor) -> Tensor {
        use tch::nn::Module;
        let x = self.patch.forward(images).flatten(2, 3).transpose(1, 2);
        let b = x.size()[0];
        let (w, h) = (self.config.width, self.config.heads);
        let mut x = Tensor::cat(&[self.cls_token.expand([b, 1, w], false), x], 1) + &self.pos_embed;
        let t = x.size()[1];
        for blk in &self.blocks {
            let qkv = blk
                .qkv
                .forward(&blk.norm1.forward(&x))
                .view([b, t, 3, h, w / h])
                .permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
            let a = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
            let a = a.transpose(1, 2).contiguous().view([b, t, w]);
            x += blk.proj.forward(&a);
            let y = blk.fc2.forward(&blk.fc1.forward(&blk.norm2.forward(&x)).gelu("none"));
            x += y;
        }
        self.norm.forward(&x).select(1, 0)
    }
}
