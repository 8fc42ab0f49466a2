//! The Swin transformer encoder of SwinUNETR (MONAI's `swinViT`): patch
//! embedding, four stages of shifted-window attention blocks each ending in
//! patch merging, and (with `use_v2`) a residual conv block in front of each
//! stage. Every step follows `monai/networks/nets/swin_unetr.py` operation
//! by operation (padding to whole windows after `norm1`, the cyclic shift,
//! the -100 region mask, the relative-position index sliced to `[:n, :n]`
//! when a window is clipped to a small feature map), because parity with
//! MONAI is what lets checkpoints move both ways without conversion.
use tch::nn::{Init, Path};
use tch::{Device, Kind, Tensor};

use super::config::{Downsample, SwinUnetrConfig};
use super::layers::{drop_path, dropout, Conv3d, LayerNorm, Linear};
use super::unetr_blocks::UnetrBasicBlock;

pub type Dims3 = [i64; 3];

/// MONAI's `get_window_size`: along a side no longer than the window, the
/// window shrinks to the side and the shift drops to 0.
pub fn window_and_shift(size: Dims3, window: Dims3, shift: Dims3) -> (Dims3, Dims3) {
    let (mut w, mut s) = (window, shift);
    for i in 0..3 {
        if size[i] <= window[i] {
            w[i] = size[i];
            s[i] = 0;
        }
    }
    (w, s)
}

fn round_up(size: Dims3, window: Dims3) -> Dims3 {
    [0, 1, 2].map(|i| (size[i] + window[i] - 1) / window[i] * window[i])
}

/// [b, d, h, w, c] -> [b * windows, wd * wh * ww, c], windows in raster order.
pub fn window_partition(x: &Tensor, ws: Dims3) -> Tensor {
    let s = x.size();
    let (b, d, h, w, c) = (s[0], s[1], s[2], s[3], s[4]);
    x.view([b, d / ws[0], ws[0], h / ws[1], ws[1], w / ws[2], ws[2], c].as_slice())
        .permute([0, 1, 3, 5, 2, 4, 6, 7])
        .contiguous()
        .view([-1, ws[0] * ws[1] * ws[2], c])
}

/// Inverse of [`window_partition`] for a volume of `dims` = [b, d, h, w].
pub fn window_reverse(windows: &Tensor, ws: Dims3, dims: [i64; 4]) -> Tensor {
    let [b, d, h, w] = dims;
    windows
        .view([b, d / ws[0], h / ws[1], w / ws[2], ws[0], ws[1], ws[2], -1].as_slice())
        .permute([0, 1, 4, 2, 5, 3, 6, 7])
        .contiguous()
        .view([b, d, h, w, -1])
}

/// MONAI's `compute_mask`: [windows, n, n] with -100 between tokens that the
/// cyclic shift brought together from different regions, 0 elsewhere.
///
/// MONAI labels regions by assigning over Python slices
/// `[:-w]`, `[-w:-s]`, `[-s:]` per axis, later ones overwriting earlier
/// ones; with s = 0 the last slice is the whole axis, so the axis has one
/// region. The per-axis label below is that same final assignment.
pub fn shifted_window_mask(dims: Dims3, ws: Dims3, ss: Dims3, kind: Kind, device: Device) -> Tensor {
    let label = |axis: usize, i: i64| -> i64 {
        let (n, w, s) = (dims[axis], ws[axis], ss[axis]);
        if s == 0 || i >= n - s {
            2
        } else if i >= n - w {
            1
        } else {
            0
        }
    };
    let mut labels = Vec::with_capacity((dims[0] * dims[1] * dims[2]) as usize);
    for z in 0..dims[0] {
        for y in 0..dims[1] {
            for x in 0..dims[2] {
                labels.push(label(0, z) * 9 + label(1, y) * 3 + label(2, x));
            }
        }
    }
    let img = Tensor::from_slice(&labels).view([1, dims[0], dims[1], dims[2], 1]);
    let windows = window_partition(&img, ws).squeeze_dim(-1).to_device(device);
    let differs = windows.unsqueeze(1).ne_tensor(&windows.unsqueeze(2));
    Tensor::zeros(differs.size(), (kind, device)).masked_fill(&differs, -100.0)
}

/// The `relative_position_index` buffer of MONAI's `WindowAttention`:
/// entry (i, j) indexes the bias table by the offset between tokens i and j
/// of a window.
pub fn relative_position_index(window: Dims3) -> Tensor {
    let [a, b, c] = window;
    let coords: Vec<Dims3> = (0..a)
        .flat_map(|z| (0..b).flat_map(move |y| (0..c).map(move |x| [z, y, x])))
        .collect();
    let mut index = Vec::with_capacity(coords.len() * coords.len());
    for ci in &coords {
        for cj in &coords {
            let r = [0, 1, 2].map(|k| ci[k] - cj[k] + window[k] - 1);
            index.push(r[0] * (2 * b - 1) * (2 * c - 1) + r[1] * (2 * c - 1) + r[2]);
        }
    }
    let n = coords.len() as i64;
    Tensor::from_slice(&index).view([n, n])
}

/// MONAI's `WindowAttention`: multi-head self-attention inside each window
/// with a learned relative-position bias.
#[derive(Debug)]
pub struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    relative_position_bias_table: Tensor,
    relative_position_index: Tensor,
    num_heads: i64,
    scale: f64,
    attn_drop: f64,
    proj_drop: f64,
    fused: bool,
}

impl WindowAttention {
    fn new(p: &Path, dim: i64, num_heads: i64, window: Dims3, cfg: &SwinUnetrConfig) -> Self {
        let table_len = window.iter().map(|w| 2 * w - 1).product::<i64>();
        // MONAI draws the table from trunc_normal_(std=0.02) truncated at
        // +-2 (absolute), i.e. at 100 standard deviations: a plain normal.
        let table = p.var(
            "relative_position_bias_table",
            &[table_len, num_heads],
            Init::Randn { mean: 0.0, stdev: 0.02 },
        );
        let index = p.add(
            "relative_position_index",
            relative_position_index(window).to_device(p.device()),
            false,
        );
        WindowAttention {
            qkv: Linear::new(&(p / "qkv"), dim, 3 * dim, cfg.qkv_bias),
            proj: Linear::new(&(p / "proj"), dim, dim, true),
            relative_position_bias_table: table,
            relative_position_index: index,
            num_heads,
            scale: ((dim / num_heads) as f64).powf(-0.5),
            attn_drop: cfg.attn_drop_rate,
            proj_drop: cfg.drop_rate,
            fused: cfg.fused_attention,
        }
    }

    /// `x`: [batch * windows, n, c]; `mask`: [windows, n, n] for shifted blocks.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Tensor {
        let s = x.size();
        let (bw, n, c) = (s[0], s[1], s[2]);
        let heads = self.num_heads;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([bw, n, 3, heads, c / heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let index = self
            .relative_position_index
            .slice(0, 0, n, 1)
            .slice(1, 0, n, 1)
            .reshape([-1]);
        let bias = self
            .relative_position_bias_table
            .index_select(0, &index)
            .reshape([n, n, -1])
            .permute([2, 0, 1]);
        // SDPA on CUDA (its fused kernels), and on the CPU only where no
        // gradient is taken: there it runs the flash kernel (2.3x the
        // explicit path on a 500 x 3 x 343 x 4 window batch), whereas with a
        // gradient it falls back to the math path, whose safe softmax adds
        // isneginf + all + where passes over the whole score tensor (~10% of
        // a CPU training step, bench/train_step_bench.py; both paths side by
        // side: bench/attention_paths.py). MONAI's own rule is the same
        // minus CUDA training.
        let sdpa = self.fused && (x.device().is_cuda() || !(q.requires_grad() || bias.requires_grad()));
        let out = if sdpa {
            let bias = match mask {
                Some(m) => {
                    let nw = m.size()[0];
                    (bias.view([1, 1, heads, n, n]) + m.reshape([1, nw, 1, n, n]))
                        .expand([bw / nw, nw, heads, n, n], false)
                        .reshape([bw, heads, n, n])
                }
                None => bias.unsqueeze(0),
            };
            let p = if train { self.attn_drop } else { 0.0 };
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(bias.to_kind(q.kind())), p, false, self.scale, false)
        } else {
            let attn = (q * self.scale).matmul(&k.transpose(-2, -1));
            // MONAI adds the bias, then the mask, each over the whole score
            // tensor; adding their sum (one small [nw, heads, n, n] tensor)
            // is one pass fewer and changes nothing where the mask is 0.
            let attn = match mask {
                Some(m) => {
                    let nw = m.size()[0];
                    let bm = bias.unsqueeze(0) + m.unsqueeze(1);
                    (attn.view([bw / nw, nw, heads, n, n]) + bm.unsqueeze(0)).view([-1, heads, n, n])
                }
                None => attn + bias.unsqueeze(0),
            };
            let attn = dropout(&attn.softmax(-1, attn.kind()), self.attn_drop, train);
            attn.matmul(&v)
        };
        let out = self.proj.forward(&out.transpose(1, 2).reshape([bw, n, c]));
        dropout(&out, self.proj_drop, train)
    }
}

/// MONAI's `SwinTransformerBlock`: (shifted) window attention and an MLP,
/// each pre-normed and residual.
#[derive(Debug)]
pub struct SwinTransformerBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    linear1: Linear,
    linear2: Linear,
    window: Dims3,
    shift: Dims3,
    drop: f64,
    drop_path: f64,
}

impl SwinTransformerBlock {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &Path,
        dim: i64,
        num_heads: i64,
        window: Dims3,
        shift: Dims3,
        drop_path: f64,
        cfg: &SwinUnetrConfig,
    ) -> Self {
        let hidden = (dim as f64 * cfg.mlp_ratio) as i64;
        SwinTransformerBlock {
            norm1: LayerNorm::new(&(p / "norm1"), dim),
            attn: WindowAttention::new(&(p / "attn"), dim, num_heads, window, cfg),
            norm2: LayerNorm::new(&(p / "norm2"), dim),
            linear1: Linear::new(&(p / "mlp" / "linear1"), dim, hidden, true),
            linear2: Linear::new(&(p / "mlp" / "linear2"), hidden, dim, true),
            window,
            shift,
            drop: cfg.drop_rate,
            drop_path,
        }
    }

    /// `x`: [b, d, h, w, c] (channels last).
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Tensor {
        let s = x.size();
        let (b, d, h, w, c) = (s[0], s[1], s[2], s[3], s[4]);
        let (ws, ss) = window_and_shift([d, h, w], self.window, self.shift);
        let shifted = ss.iter().any(|&v| v > 0);
        let pad = [d, h, w]
            .iter()
            .zip(ws)
            .map(|(&n, w)| (w - n % w) % w)
            .collect::<Vec<_>>();
        let padded = pad.iter().any(|&v| v > 0);

        let mut y = self.norm1.forward(x);
        if padded {
            y = y.constant_pad_nd([0, 0, 0, pad[2], 0, pad[1], 0, pad[0]]);
        }
        let (dp, hp, wp) = (d + pad[0], h + pad[1], w + pad[2]);
        if shifted {
            y = y.roll([-ss[0], -ss[1], -ss[2]], [1, 2, 3]);
        }
        let windows = window_partition(&y, ws);
        let attended = self.attn.forward(&windows, if shifted { mask } else { None }, train);
        y = window_reverse(&attended.view([-1, ws[0], ws[1], ws[2], c]), ws, [b, dp, hp, wp]);
        if shifted {
            y = y.roll([ss[0], ss[1], ss[2]], [1, 2, 3]);
        }
        if padded {
            y = y.slice(1, 0, d, 1).slice(2, 0, h, 1).slice(3, 0, w, 1).contiguous();
        }
        let x = x + drop_path(&y, self.drop_path, train);

        let m = self.linear1.forward(&self.norm2.forward(&x)).gelu("none");
        let m = self.linear2.forward(&dropout(&m, self.drop, train));
        &x + drop_path(&dropout(&m, self.drop, train), self.drop_path, train)
    }
}

/// MONAI's `PatchMerging` ("merging") and `PatchMergingV2` ("mergingv2"):
/// concatenate the eight voxels of each 2x2x2 cell, LayerNorm, and project
/// 8c -> 2c. The two differ only in the order of the eight voxels.
#[derive(Debug)]
pub struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
    order: Downsample,
}

/// (d, h, w) offsets in the order MONAI concatenates them.
const MERGING_ORDER: [Dims3; 8] = [
    [0, 0, 0],
    [1, 0, 0],
    [0, 1, 0],
    [0, 0, 1],
    [1, 1, 0],
    [1, 0, 1],
    [0, 1, 1],
    [1, 1, 1],
];
/// `itertools.product(range(2), range(2), range(2))`.
const MERGING_V2_ORDER: [Dims3; 8] = [
    [0, 0, 0],
    [0, 0, 1],
    [0, 1, 0],
    [0, 1, 1],
    [1, 0, 0],
    [1, 0, 1],
    [1, 1, 0],
    [1, 1, 1],
];

impl PatchMerging {
    fn new(p: &Path, dim: i64, order: Downsample) -> Self {
        PatchMerging {
            norm: LayerNorm::new(&(p / "norm"), 8 * dim),
            reduction: Linear::new(&(p / "reduction"), 8 * dim, 2 * dim, false),
            order,
        }
    }

    /// `x`: [b, d, h, w, c] -> [b, d/2, h/2, w/2, 2c] (odd sides zero-padded).
    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (d, h, w) = (s[1], s[2], s[3]);
        let x = if d % 2 == 1 || h % 2 == 1 || w % 2 == 1 {
            x.constant_pad_nd([0, 0, 0, w % 2, 0, h % 2, 0, d % 2])
        } else {
            x.shallow_clone()
        };
        let order = match self.order {
            Downsample::Merging => &MERGING_ORDER,
            Downsample::MergingV2 => &MERGING_V2_ORDER,
        };
        let parts: Vec<Tensor> = order
            .iter()
            .map(|&[i, j, k]| x.slice(1, i, None, 2).slice(2, j, None, 2).slice(3, k, None, 2))
            .collect();
        self.reduction.forward(&self.norm.forward(&Tensor::cat(&parts, -1)))
    }
}

/// MONAI's `BasicLayer`: one stage of blocks alternating plain and shifted
/// windows, then patch merging.
#[derive(Debug)]
pub struct BasicLayer {
    blocks: Vec<SwinTransformerBlock>,
    downsample: PatchMerging,
    window: Dims3,
    shift: Dims3,
}

impl BasicLayer {
    fn new(p: &Path, dim: i64, depth: i64, num_heads: i64, drop_paths: &[f64], cfg: &SwinUnetrConfig) -> Self {
        let window = cfg.window_size;
        let shift = window.map(|w| w / 2);
        let blocks = (0..depth)
            .map(|i| {
                let block_shift = if i % 2 == 0 { [0; 3] } else { shift };
                SwinTransformerBlock::new(
                    &(p / "blocks" / i),
                    dim,
                    num_heads,
                    window,
                    block_shift,
                    drop_paths[i as usize],
                    cfg,
                )
            })
            .collect();
        BasicLayer {
            blocks,
            downsample: PatchMerging::new(&(p / "downsample"), dim, cfg.downsample),
            window,
            shift,
        }
    }

    /// `x`: [b, c, d, h, w] -> [b, 2c, d/2, h/2, w/2].
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let s = x.size();
        let (b, d, h, w) = (s[0], s[2], s[3], s[4]);
        let (ws, ss) = window_and_shift([d, h, w], self.window, self.shift);
        let mask = ss
            .iter()
            .any(|&v| v > 0)
            .then(|| shifted_window_mask(round_up([d, h, w], ws), ws, ss, x.kind(), x.device()));
        let mut y = x.permute([0, 2, 3, 4, 1]);
        for block in &self.blocks {
            y = block.forward(&y, mask.as_ref(), train);
        }
        let y = self.downsample.forward(&y.reshape([b, d, h, w, -1]));
        y.permute([0, 4, 1, 2, 3])
    }
}

/// MONAI's `PatchEmbed`: a strided conv cutting the volume into
/// patch_size^3 patches (zero-padding sides that do not divide), with an
/// optional LayerNorm (`patch_norm`).
#[derive(Debug)]
pub struct PatchEmbed {
    proj: Conv3d,
    norm: Option<LayerNorm>,
    patch: i64,
}

impl PatchEmbed {
    fn new(p: &Path, cfg: &SwinUnetrConfig) -> Self {
        let patch = cfg.patch_size;
        PatchEmbed {
            proj: Conv3d::new(&(p / "proj"), cfg.in_channels, cfg.feature_size, patch, patch, 0, true),
            norm: cfg.patch_norm.then(|| LayerNorm::new(&(p / "norm"), cfg.feature_size)),
            patch,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let pad = [s[2], s[3], s[4]].map(|n| (self.patch - n % self.patch) % self.patch);
        let x = if pad.iter().any(|&v| v > 0) {
            x.constant_pad_nd([0, pad[2], 0, pad[1], 0, pad[0]])
        } else {
            x.shallow_clone()
        };
        let y = self.proj.forward(&x);
        match &self.norm {
            Some(norm) => {
                let s = y.size();
                norm.forward(&y.flatten(2, -1).transpose(1, 2))
                    .transpose(1, 2)
                    .reshape([-1, s[1], s[2], s[3], s[4]])
            }
            None => y,
        }
    }
}

/// MONAI's `SwinTransformer` as SwinUNETR builds it (`swinViT`): four
/// stages, with `layers{i}.0` the i-th stage and, with `use_v2`,
/// `layers{i}c.0` the residual conv block run before it.
#[derive(Debug)]
pub struct SwinTransformer {
    patch_embed: PatchEmbed,
    layers: Vec<BasicLayer>,
    layers_c: Vec<UnetrBasicBlock>,
    drop: f64,
}

impl SwinTransformer {
    pub fn new(p: &Path, cfg: &SwinUnetrConfig) -> Self {
        let total: i64 = cfg.depths.iter().sum();
        // torch.linspace(0, rate, total) in float32, read back with .item().
        let rates: Vec<f64> = (0..total)
            .map(|i| {
                if total > 1 {
                    (cfg.dropout_path_rate as f32 * i as f32 / (total - 1) as f32) as f64
                } else {
                    0.0
                }
            })
            .collect();
        let mut layers = Vec::new();
        let mut layers_c = Vec::new();
        let mut start = 0usize;
        for (i, (&depth, &heads)) in cfg.depths.iter().zip(&cfg.num_heads).enumerate() {
            let dim = cfg.feature_size << i;
            let stage = format!("layers{}", i + 1);
            let end = start + depth as usize;
            layers.push(BasicLayer::new(
                &(p / stage.as_str() / 0),
                dim,
                depth,
                heads,
                &rates[start..end],
                cfg,
            ));
            start = end;
            if cfg.use_v2 {
                layers_c.push(UnetrBasicBlock::new(&(p / format!("{stage}c") / 0), dim, dim));
            }
        }
        SwinTransformer {
            patch_embed: PatchEmbed::new(&(p / "patch_embed"), cfg),
            layers,
            layers_c,
            drop: cfg.drop_rate,
        }
    }

    /// The five hidden states MONAI's `swinViT` returns: the patch embedding
    /// and the output of each stage, each LayerNorm-ed over channels (no
    /// affine) when `normalize`. The stages themselves run on the
    /// unnormalised features.
    pub fn forward(&self, x: &Tensor, normalize: bool, train: bool) -> Vec<Tensor> {
        let mut h = dropout(&self.patch_embed.forward(x), self.drop, train);
        let mut out = vec![proj_out(&h, normalize)];
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(conv) = self.layers_c.get(i) {
                h = conv.forward(&h);
            }
            h = layer.forward(&h, train);
            out.push(proj_out(&h, normalize));
        }
        out
    }
}

fn proj_out(x: &Tensor, normalize: bool) -> Tensor {
    if !normalize {
        return x.shallow_clone();
    }
    let channels = x.size()[1];
    x.permute([0, 2, 3, 4, 1])
        .layer_norm([channels], None::<Tensor>, None, 1e-5, true)
        .permute([0, 4, 1, 2, 3])
}
