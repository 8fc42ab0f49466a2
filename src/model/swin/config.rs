//! SwinUNETR's constructor arguments, as MONAI names them: the one
//! definition both the assembled network (`swin_unetr`) and its encoder
//! (`transformer`) read.
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Deserializer, Serialize};

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
    /// `use_flash_attention`) where it is the faster path: on CUDA, and on
    /// the CPU when no gradient is taken (CPU training keeps the explicit
    /// path, which is faster there). Same result up to rounding; off
    /// reproduces MONAI's default arithmetic.
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
