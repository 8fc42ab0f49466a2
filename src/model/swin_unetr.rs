//! SwinUNETR (Hatamizadeh et al. 2022) exactly as MONAI 1.6 builds it
//! (`monai.networks.nets.SwinUNETR`, 3D): a Swin transformer encoder whose
//! five hidden states feed a UNETR convolutional decoder.
//!
//! Variable-store paths are MONAI's state-dict keys (`swinViT.layers1.0.
//! blocks.0.attn.qkv.weight`, `encoder1.layer.conv1.conv.weight`, ...,
//! including the `relative_position_index` buffers), so a MONAI state dict
//! saved as safetensors loads here with no renaming, and ours loads into
//! MONAI with `strict=True` (see [`crate::model::state_dict`]).
//!
//! Besides the logits, [`SwinUnetrOutput`] exposes what pretraining needs:
//! the encoder's hidden states (the last is the bottleneck, 16 x
//! feature_size channels at 1/32 resolution) and the decoder's last
//! features (feature_size channels at full resolution).
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Deserializer, Serialize};
use tch::nn::Path;
use tch::Tensor;

use super::swin::transformer::SwinTransformer;
use super::swin::unetr_blocks::{UnetOutBlock, UnetrBasicBlock, UnetrUpBlock};

/// Patch merging between Swin stages (MONAI's `downsample`): the two differ
/// in the order the eight voxels of a 2x2x2 cell are concatenated, so their
/// weights are not interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Downsample {
    /// `PatchMerging`, MONAI's default (the v0.9 layout of the released
    /// SwinUNETR checkpoints).
    #[serde(rename = "merging")]
    Merging,
    /// `PatchMergingV2`.
    #[serde(rename = "mergingv2")]
    MergingV2,
}

/// The arguments of MONAI's `SwinUNETR(...)` that a 3D model uses, with
/// MONAI's names and defaults (`norm_name="instance"`,
/// `spatial_dims=3` and plain windowed attention are fixed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwinUnetrConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Channels of the first stage; MONAI requires a multiple of 12.
    pub feature_size: i64,
    /// Blocks per stage; exactly four stages.
    pub depths: Vec<i64>,
    pub num_heads: Vec<i64>,
    /// Attention window per axis (a single number means a cube).
    #[serde(deserialize_with = "one_or_three")]
    pub window_size: [i64; 3],
    /// Patch side of the embedding; inputs must be divisible by patch^5.
    pub patch_size: i64,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub drop_rate: f64,
    pub attn_drop_rate: f64,
    pub dropout_path_rate: f64,
    /// LayerNorm each hidden state over channels before the decoder uses it.
    pub normalize: bool,
    pub patch_norm: bool,
    pub downsample: Downsample,
    /// SwinUNETR-v2: a residual conv block before each Swin stage.
    pub use_v2: bool,
    /// Compute window attention with `scaled_dot_product_attention` (MONAI's
    /// `use_flash_attention`, here also when training). Same result up to
    /// rounding; off reproduces MONAI's default arithmetic.
    pub fused_attention: bool,
}

impl Default for SwinUnetrConfig {
    fn default() -> Self {
        SwinUnetrConfig {
            in_channels: 1,
            out_channels: 1,
            feature_size: 24,
            depths: vec![2, 2, 2, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: [7, 7, 7],
            patch_size: 2,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_rate: 0.0,
            attn_drop_rate: 0.0,
            dropout_path_rate: 0.0,
            normalize: true,
            patch_norm: false,
            downsample: Downsample::Merging,
            use_v2: false,
            fused_attention: false,
        }
    }
}

fn one_or_three<'de, D: Deserializer<'de>>(d: D) -> Result<[i64; 3], D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Sides {
        One(i64),
        Three([i64; 3]),
    }
    Ok(match Sides::deserialize(d)? {
        Sides::One(n) => [n; 3],
        Sides::Three(s) => s,
    })
}

impl SwinUnetrConfig {
    /// Rejects what MONAI rejects at construction, and what would otherwise
    /// fail deep inside a forward pass.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.in_channels >= 1,
            "in_channels must be at least 1, got {}",
            self.in_channels
        );
        ensure!(
            self.out_channels >= 1,
            "out_channels must be at least 1, got {}",
            self.out_channels
        );
        ensure!(
            self.feature_size > 0 && self.feature_size % 12 == 0,
            "feature_size must be a positive multiple of 12 (as in MONAI), got {}",
            self.feature_size
        );
        ensure!(
            self.depths.len() == 4 && self.num_heads.len() == 4,
            "SwinUNETR has four stages: depths and num_heads need four entries each, got {:?} and {:?}",
            self.depths,
            self.num_heads
        );
        ensure!(
            self.depths.iter().all(|&d| d >= 1),
            "every stage needs at least one block, got depths {:?}",
            self.depths
        );
        for (i, &heads) in self.num_heads.iter().enumerate() {
            let dim = self.feature_size << i;
            ensure!(
                heads >= 1 && dim % heads == 0,
                "stage {} has {dim} channels, not divisible by num_heads[{i}] = {heads}",
                i + 1
            );
        }
        ensure!(
            self.window_size.iter().all(|&w| w >= 1),
            "window_size must be positive, got {:?}",
            self.window_size
        );
        ensure!(
            self.patch_size >= 1,
            "patch_size must be positive, got {}",
            self.patch_size
        );
        ensure!(
            self.mlp_ratio > 0.0,
            "mlp_ratio must be positive, got {}",
            self.mlp_ratio
        );
        for (name, rate) in [
            ("drop_rate", self.drop_rate),
            ("attn_drop_rate", self.attn_drop_rate),
            ("dropout_path_rate", self.dropout_path_rate),
        ] {
            ensure!((0.0..=1.0).contains(&rate), "{name} must be in [0, 1], got {rate}");
        }
        Ok(())
    }

    /// Each input side must be a multiple of this (patch_size^5: the patch
    /// embedding and four patch mergings).
    pub fn size_multiple(&self) -> i64 {
        self.patch_size.pow(5)
    }

    /// Channels of the bottleneck hidden state (16 x feature_size).
    pub fn bottleneck_channels(&self) -> i64 {
        self.feature_size * 16
    }

    /// Checks a [batch, channels, d, h, w] input shape.
    pub fn check_input(&self, shape: &[i64]) -> Result<()> {
        if shape.len() != 5 || shape[1] != self.in_channels {
            bail!(
                "SwinUNETR expects input [batch, {}, d, h, w], got {shape:?}",
                self.in_channels
            );
        }
        let m = self.size_multiple();
        let bad: Vec<i64> = shape[2..].iter().copied().filter(|s| s % m != 0).collect();
        if !bad.is_empty() {
            bail!(
                "input sides {:?} must all be divisible by {m} (patch_size^5); {bad:?} are not: crop or pad the volume",
                &shape[2..]
            );
        }
        // Instance norm over a single voxel is undefined (PyTorch raises,
        // libtorch silently returns zeros), and encoder10 normalises the
        // bottleneck at 1/32 resolution.
        let bottleneck: i64 = shape[2..].iter().map(|s| s / m).product();
        if bottleneck < 2 {
            bail!(
                "input sides {:?} leave a single voxel at the bottleneck (1/{m} resolution), where instance norm is \
                 undefined; use at least one side of {}",
                &shape[2..],
                2 * m
            );
        }
        Ok(())
    }
}

/// What one forward pass produces.
#[derive(Debug)]
pub struct SwinUnetrOutput {
    /// `swinViT`'s five hidden states: entry i is [b, feature_size * 2^i,
    /// side / 2^(i+1)] (normalised over channels when `normalize`); entry 4
    /// is the bottleneck, [b, 16 * feature_size, side / 32].
    pub hidden_states: Vec<Tensor>,
    /// The decoder's last features (`decoder1`'s output), [b, feature_size,
    /// side], before the 1x1x1 output conv.
    pub decoder_features: Tensor,
    /// `out` applied to `decoder_features`: [b, out_channels, side].
    pub logits: Tensor,
}

impl SwinUnetrOutput {
    /// The bottleneck hidden state, [b, 16 * feature_size, side / 32].
    pub fn bottleneck(&self) -> &Tensor {
        &self.hidden_states[4]
    }
}

/// MONAI's `SwinUNETR`, 3D.
#[derive(Debug)]
pub struct SwinUnetr {
    config: SwinUnetrConfig,
    swin_vit: SwinTransformer,
    encoder1: UnetrBasicBlock,
    encoder2: UnetrBasicBlock,
    encoder3: UnetrBasicBlock,
    encoder4: UnetrBasicBlock,
    encoder10: UnetrBasicBlock,
    decoder5: UnetrUpBlock,
    decoder4: UnetrUpBlock,
    decoder3: UnetrUpBlock,
    decoder2: UnetrUpBlock,
    decoder1: UnetrUpBlock,
    out: UnetOutBlock,
}

impl SwinUnetr {
    /// Creates the parameters under `p` (use the var store's root for keys
    /// that equal MONAI's), initialised as PyTorch initialises a fresh
    /// MONAI model.
    pub fn new(p: &Path, config: &SwinUnetrConfig) -> Result<Self> {
        config.validate()?;
        let f = config.feature_size;
        Ok(SwinUnetr {
            swin_vit: SwinTransformer::new(&(p / "swinViT"), config),
            encoder1: UnetrBasicBlock::new(&(p / "encoder1"), config.in_channels, f),
            encoder2: UnetrBasicBlock::new(&(p / "encoder2"), f, f),
            encoder3: UnetrBasicBlock::new(&(p / "encoder3"), 2 * f, 2 * f),
            encoder4: UnetrBasicBlock::new(&(p / "encoder4"), 4 * f, 4 * f),
            encoder10: UnetrBasicBlock::new(&(p / "encoder10"), 16 * f, 16 * f),
            decoder5: UnetrUpBlock::new(&(p / "decoder5"), 16 * f, 8 * f),
            decoder4: UnetrUpBlock::new(&(p / "decoder4"), 8 * f, 4 * f),
            decoder3: UnetrUpBlock::new(&(p / "decoder3"), 4 * f, 2 * f),
            decoder2: UnetrUpBlock::new(&(p / "decoder2"), 2 * f, f),
            decoder1: UnetrUpBlock::new(&(p / "decoder1"), f, f),
            out: UnetOutBlock::new(&(p / "out"), f, config.out_channels),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &SwinUnetrConfig {
        &self.config
    }

    /// The encoder alone (MONAI's `swinViT(x, normalize)`): five hidden
    /// states, the last being the bottleneck. `train` enables dropout.
    pub fn encode(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.config.check_input(&x.size())?;
        Ok(self.swin_vit.forward(x, self.config.normalize, train))
    }

    /// The whole network, as MONAI's `forward`, keeping the intermediate
    /// results pretraining reads. `train` enables dropout and drop-path
    /// (no-ops at MONAI's default rates of 0).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<SwinUnetrOutput> {
        let hidden = self.encode(x, train)?;
        let enc0 = self.encoder1.forward(x);
        let enc1 = self.encoder2.forward(&hidden[0]);
        let enc2 = self.encoder3.forward(&hidden[1]);
        let enc3 = self.encoder4.forward(&hidden[2]);
        let dec4 = self.encoder10.forward(&hidden[4]);
        let dec3 = self.decoder5.forward(&dec4, &hidden[3]);
        let dec2 = self.decoder4.forward(&dec3, &enc3);
        let dec1 = self.decoder3.forward(&dec2, &enc2);
        let dec0 = self.decoder2.forward(&dec1, &enc1);
        let features = self.decoder1.forward(&dec0, &enc0);
        Ok(SwinUnetrOutput {
            logits: self.out.forward(&features),
            decoder_features: features,
            hidden_states: hidden,
        })
    }

    /// Logits only, in evaluation mode.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x, false)?.logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::swin::transformer::{relative_position_index, shifted_window_mask};
    use tch::nn::{OptimizerConfig, VarStore};
    use tch::{Device, Kind};

    fn small(in_channels: i64, out_channels: i64) -> SwinUnetrConfig {
        SwinUnetrConfig {
            in_channels,
            out_channels,
            feature_size: 12,
            ..SwinUnetrConfig::default()
        }
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.expect_err("should be rejected"))
    }

    #[test]
    fn config_and_input_checks_reject_what_monai_cannot_run() {
        let bad = |f: fn(&mut SwinUnetrConfig)| {
            let mut c = SwinUnetrConfig::default();
            f(&mut c);
            err_text(c.validate())
        };
        assert!(bad(|c| c.feature_size = 20).contains("multiple of 12"));
        assert!(bad(|c| c.depths = vec![2, 2, 2]).contains("four stages"));
        assert!(bad(|c| c.num_heads = vec![5, 6, 12, 24]).contains("num_heads[0] = 5"));
        assert!(bad(|c| c.dropout_path_rate = 1.5).contains("dropout_path_rate"));

        let c = small(1, 2);
        assert!(c.check_input(&[2, 1, 32, 32, 64]).is_ok());
        assert!(err_text(c.check_input(&[1, 1, 48, 64, 64])).contains("[48] are not"));
        assert!(err_text(c.check_input(&[1, 2, 64, 64, 64])).contains("[batch, 1, d, h, w]"));
        // 32^3 leaves one voxel at the bottleneck, where MONAI's
        // InstanceNorm3d raises.
        assert!(err_text(c.check_input(&[1, 1, 32, 32, 32])).contains("single voxel"));
    }

    #[test]
    fn config_reads_monai_argument_names_from_yaml() {
        let c: SwinUnetrConfig =
            serde_yaml::from_str("feature_size: 48\nwindow_size: 5\ndownsample: mergingv2\nuse_v2: true\n").unwrap();
        assert_eq!(c.feature_size, 48);
        assert_eq!(c.window_size, [5, 5, 5]);
        assert_eq!(c.downsample, Downsample::MergingV2);
        assert!(c.use_v2 && c.normalize && c.qkv_bias);
        let c: SwinUnetrConfig = serde_yaml::from_str("window_size: [7, 6, 5]\n").unwrap();
        assert_eq!(c.window_size, [7, 6, 5]);
        assert!(serde_yaml::from_str::<SwinUnetrConfig>("featuresize: 48\n").is_err());
    }

    #[test]
    fn variables_are_monai_state_dict_entries() {
        let vs = VarStore::new(Device::Cpu);
        let cfg = SwinUnetrConfig {
            use_v2: true,
            downsample: Downsample::MergingV2,
            ..small(1, 2)
        };
        SwinUnetr::new(&vs.root(), &cfg).unwrap();
        let vars = vs.variables();
        // len(SwinUNETR(1, 2, feature_size=12, use_v2=True,
        // downsample="mergingv2").state_dict()) in MONAI 1.6.1
        assert_eq!(vars.len(), 167);
        let shape = |k: &str| vars.get(k).unwrap_or_else(|| panic!("missing {k}")).size();
        assert_eq!(shape("swinViT.patch_embed.proj.weight"), [12, 1, 2, 2, 2]);
        assert_eq!(
            shape("swinViT.layers1.0.blocks.1.attn.relative_position_bias_table"),
            [2197, 3]
        );
        assert_eq!(shape("swinViT.layers2.0.blocks.0.mlp.linear1.weight"), [96, 24]);
        assert_eq!(shape("swinViT.layers4.0.downsample.reduction.weight"), [192, 768]);
        assert_eq!(shape("swinViT.layers4c.0.layer.conv1.conv.weight"), [96, 96, 3, 3, 3]);
        assert_eq!(shape("encoder1.layer.conv3.conv.weight"), [12, 1, 1, 1, 1]);
        assert_eq!(shape("decoder5.transp_conv.conv.weight"), [192, 96, 2, 2, 2]);
        assert_eq!(shape("decoder1.conv_block.conv3.conv.weight"), [12, 24, 1, 1, 1]);
        assert_eq!(shape("out.conv.conv.bias"), [2]);
        let index = &vars["swinViT.layers3.0.blocks.0.attn.relative_position_index"];
        assert_eq!((index.size(), index.kind()), (vec![343, 343], Kind::Int64));
        // the index buffers are state, not parameters
        assert_eq!(vs.trainable_variables().len(), 167 - 8);
    }

    #[test]
    fn relative_position_index_follows_monai() {
        // Token 0 of a 2x2x2 window is (0,0,0); offsets (0 - c) + 1 per axis
        // index a 3x3x3 table as 9 * dz + 3 * dy + dx.
        let index = relative_position_index([2, 2, 2]);
        let row: Vec<i64> = Vec::try_from(index.get(0)).unwrap();
        assert_eq!(row, [13, 12, 10, 9, 4, 3, 1, 0]);
        let diagonal: Vec<i64> = Vec::try_from(index.diagonal(0, 0, 1)).unwrap();
        assert_eq!(diagonal, [13; 8]);
    }

    #[test]
    fn shifted_window_mask_separates_wrapped_regions() {
        // Depth 4, window 2, shift 1: regions along d are [0, 0, 1, 2], so
        // the second window pairs tokens from regions 1 and 2.
        let mask = shifted_window_mask([4, 1, 1], [2, 1, 1], [1, 0, 0], Kind::Float, Device::Cpu);
        let v: Vec<f32> = Vec::try_from(mask.flatten(0, -1)).unwrap();
        assert_eq!(v, [0.0, 0.0, 0.0, 0.0, 0.0, -100.0, -100.0, 0.0]);
    }

    #[test]
    fn small_model_trains_on_cpu() {
        tch::set_num_threads(1);
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let model = SwinUnetr::new(&vs.root(), &small(1, 1)).unwrap();
        let x = Tensor::randn([1, 1, 32, 32, 64], (Kind::Float, Device::Cpu));
        let target = x.sigmoid();

        let out = model.forward_t(&x, true).unwrap();
        let shapes: Vec<Vec<i64>> = out.hidden_states.iter().map(|h| h.size()).collect();
        assert_eq!(
            shapes,
            [
                vec![1, 12, 16, 16, 32],
                vec![1, 24, 8, 8, 16],
                vec![1, 48, 4, 4, 8],
                vec![1, 96, 2, 2, 4],
                vec![1, 192, 1, 1, 2],
            ]
        );
        assert_eq!(out.decoder_features.size(), [1, 12, 32, 32, 64]);
        assert_eq!(out.logits.size(), [1, 1, 32, 32, 64]);
        // normalize=True: every hidden state is zero-mean over channels
        let mean = out
            .bottleneck()
            .mean_dim(1, false, Kind::Float)
            .abs()
            .max()
            .double_value(&[]);
        assert!(mean < 1e-5, "bottleneck channel mean {mean}");

        let mut opt = tch::nn::Adam::default().build(&vs, 1e-3).unwrap();
        let mut losses = Vec::new();
        for _ in 0..4 {
            let loss = (model.forward_t(&x, true).unwrap().logits - &target)
                .square()
                .mean(Kind::Float);
            opt.backward_step(&loss);
            losses.push(loss.double_value(&[]));
        }
        eprintln!("losses {losses:?}");
        assert!(losses.iter().all(|l| l.is_finite()));
        assert!(
            losses[3] < 0.7 * losses[0],
            "loss should fall by 30% in 3 Adam steps: {losses:?}"
        );
    }
}
