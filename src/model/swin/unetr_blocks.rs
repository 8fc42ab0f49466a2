//! The convolutional side of SwinUNETR, as MONAI builds it: `UnetResBlock`
//! (two 3x3x3 convs with instance norm and leaky ReLU, plus a 1x1x1
//! projection on the skip path when the channel count changes),
//! `UnetrBasicBlock`, `UnetrUpBlock` and `UnetOutBlock`.
//!
//! MONAI's `norm_name="instance"` is `nn.InstanceNorm3d` with its defaults
//! (no affine parameters, no running statistics), so these blocks hold conv
//! weights only, under MONAI's nesting (`layer.conv1.conv.weight`,
//! `transp_conv.conv.weight`, `conv_block.conv3.conv.weight`, ...).
use tch::nn::Path;
use tch::Tensor;

use super::layers::{Conv3d, ConvTranspose3d};

/// `InstanceNorm3d(affine=False, track_running_stats=False)`, eps 1e-5.
pub fn instance_norm(x: &Tensor) -> Tensor {
    x.instance_norm(None::<Tensor>, None, None, None, true, 0.1, 1e-5, true)
}

/// `LeakyReLU(negative_slope=0.01)`, MONAI's `UnetResBlock` default.
fn lrelu(x: &Tensor) -> Tensor {
    x.leaky_relu()
}

/// MONAI's `UnetResBlock` with kernel 3 and stride 1 (all SwinUNETR uses).
#[derive(Debug)]
pub struct UnetResBlock {
    conv1: Conv3d,
    conv2: Conv3d,
    conv3: Option<Conv3d>,
}

impl UnetResBlock {
    pub fn new(p: &Path, in_ch: i64, out_ch: i64) -> Self {
        UnetResBlock {
            conv1: Conv3d::new(&(p / "conv1" / "conv"), in_ch, out_ch, 3, 1, 1, false),
            conv2: Conv3d::new(&(p / "conv2" / "conv"), out_ch, out_ch, 3, 1, 1, false),
            conv3: (in_ch != out_ch).then(|| Conv3d::new(&(p / "conv3" / "conv"), in_ch, out_ch, 1, 1, 0, false)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let out = lrelu(&instance_norm(&self.conv1.forward(x)));
        let out = instance_norm(&self.conv2.forward(&out));
        let residual = match &self.conv3 {
            Some(c) => instance_norm(&c.forward(x)),
            None => x.shallow_clone(),
        };
        lrelu(&(out + residual))
    }
}

/// MONAI's `UnetrBasicBlock(res_block=True)`: a `UnetResBlock` under `layer`.
#[derive(Debug)]
pub struct UnetrBasicBlock {
    layer: UnetResBlock,
}

impl UnetrBasicBlock {
    pub fn new(p: &Path, in_ch: i64, out_ch: i64) -> Self {
        UnetrBasicBlock {
            layer: UnetResBlock::new(&(p / "layer"), in_ch, out_ch),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.layer.forward(x)
    }
}

/// MONAI's `UnetrUpBlock(res_block=True, upsample_kernel_size=2)`: a 2x
/// transposed conv (no bias), concatenation with the skip features, then a
/// `UnetResBlock` from 2*out to out channels.
#[derive(Debug)]
pub struct UnetrUpBlock {
    transp_conv: ConvTranspose3d,
    conv_block: UnetResBlock,
}

impl UnetrUpBlock {
    pub fn new(p: &Path, in_ch: i64, out_ch: i64) -> Self {
        UnetrUpBlock {
            transp_conv: ConvTranspose3d::new(&(p / "transp_conv" / "conv"), in_ch, out_ch, 2, false),
            conv_block: UnetResBlock::new(&(p / "conv_block"), 2 * out_ch, out_ch),
        }
    }

    pub fn forward(&self, x: &Tensor, skip: &Tensor) -> Tensor {
        let up = self.transp_conv.forward(x);
        self.conv_block.forward(&Tensor::cat(&[&up, skip], 1))
    }
}

/// MONAI's `UnetOutBlock`: a 1x1x1 conv with bias.
#[derive(Debug)]
pub struct UnetOutBlock {
    conv: Conv3d,
}

impl UnetOutBlock {
    pub fn new(p: &Path, in_ch: i64, out_ch: i64) -> Self {
        UnetOutBlock {
            conv: Conv3d::new(&(p / "conv" / "conv"), in_ch, out_ch, 1, 1, 0, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.conv.forward(x)
    }
}
