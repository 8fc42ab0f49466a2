//! The few torch.nn layers SwinUNETR is made of (Linear, Conv3d,
//! ConvTranspose3d, LayerNorm), with PyTorch's default initialisation and
//! parameter names, so that a model built here has the state-dict keys and
//! the starting distribution of the same model built in PyTorch.
use tch::nn::{Init, Path};
use tch::Tensor;

/// PyTorch's default for Linear and Conv weights and biases,
/// `kaiming_uniform_(a=sqrt(5))`, is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn torch_default(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// `torch.nn.Linear`: `weight` [out, in], optional `bias` [out].
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: &Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let init = torch_default(in_dim);
        Linear {
            weight: p.var("weight", &[out_dim, in_dim], init),
            bias: bias.then(|| p.var("bias", &[out_dim], init)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `torch.nn.Conv3d` with a cubic kernel, dilation 1, one group.
#[derive(Debug)]
pub struct Conv3d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv3d {
    pub fn new(p: &Path, in_ch: i64, out_ch: i64, kernel: i64, stride: i64, padding: i64, bias: bool) -> Self {
        let init = torch_default(in_ch * kernel * kernel * kernel);
        Conv3d {
            weight: p.var("weight", &[out_ch, in_ch, kernel, kernel, kernel], init),
            bias: bias.then(|| p.var("bias", &[out_ch], init)),
            stride,
            padding,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv3d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride; 3],
            [self.padding; 3],
            [1i64; 3],
            1,
        )
    }
}

/// `torch.nn.ConvTranspose3d` with kernel == stride and no padding: the
/// exact 2x upsampling of the UNETR decoder. Weight is [in, out, k, k, k];
/// PyTorch takes fan_in from dimension 1 of that weight (out * k^3), and so
/// do we.
#[derive(Debug)]
pub struct ConvTranspose3d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
}

impl ConvTranspose3d {
    pub fn new(p: &Path, in_ch: i64, out_ch: i64, kernel: i64, bias: bool) -> Self {
        let init = torch_default(out_ch * kernel * kernel * kernel);
        ConvTranspose3d {
            weight: p.var("weight", &[in_ch, out_ch, kernel, kernel, kernel], init),
            bias: bias.then(|| p.var("bias", &[out_ch], init)),
            stride: kernel,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv_transpose3d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride; 3],
            [0i64; 3],
            [0i64; 3],
            1,
            [1i64; 3],
        )
    }
}

/// `torch.nn.LayerNorm(dim)` over the last dimension, eps 1e-5, affine.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: i64) -> Self {
        LayerNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), 1e-5, true)
    }
}

/// MONAI's `DropPath` (stochastic depth, scaled by the keep probability):
/// drops whole samples of the residual branch.
pub fn drop_path(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - p;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let mask = Tensor::empty(shape.as_slice(), (x.kind(), x.device())).bernoulli_float_(keep);
    if keep > 0.0 {
        x * (mask / keep)
    } else {
        x * mask
    }
}

/// `F.dropout`, skipped entirely at rate 0 so that evaluation and parity runs
/// do no extra work.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        x.shallow_clone()
    } else {
        x.dropout(p, train)
    }
}
