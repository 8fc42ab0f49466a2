//! The building blocks of dynamic_network_architectures' U-Nets:
//! `ConvDropoutNormReLU`, `StackedConvBlocks`, `BasicBlockD` and a stage of
//! either; each records the second names PyTorch's state dict gives its
//! tensors (see [`super::net`]).
use tch::nn::{Init, Path};
use tch::Tensor;

use super::spec::{Dropout, Nonlin, Norm, UnetSpec};

/// `ConvDropoutNormReLU`: conv -> dropout -> norm -> nonlin (or conv ->
/// dropout -> nonlin -> norm with `nonlin_first`).
#[derive(Debug)]
pub(super) struct ConvBlock {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: [i64; 3],
    padding: [i64; 3],
    dropout: Option<Dropout>,
    norm: Option<(Norm, Option<Tensor>, Option<Tensor>)>,
    nonlin: Option<Nonlin>,
    nonlin_first: bool,
}

/// What a block is built with besides its channels and shape.
pub(super) struct Ops<'a> {
    pub spec: &'a UnetSpec,
    pub aliases: Vec<(String, String)>,
    /// The full name of every variable created, in order.
    pub names: Vec<String>,
}

impl Ops<'_> {
    pub fn var(&mut self, p: &Path, name: &str, dims: &[i64], init: Init) -> Tensor {
        self.names.push(p.path(name));
        p.var(name, dims, init)
    }
}

pub(super) fn he_std(fan_in: i64) -> f64 {
    let a = Nonlin::HE_SLOPE;
    (2.0 / (1.0 + a * a)).sqrt() / (fan_in as f64).sqrt()
}

impl ConvBlock {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &Path,
        ops: &mut Ops,
        cin: i64,
        cout: i64,
        kernel: [i64; 3],
        stride: [i64; 3],
        bias: bool,
        dropout: bool,
        nonlin: bool,
        zero_norm: bool,
    ) -> ConvBlock {
        let spec = ops.spec;
        let fan_in = cin * kernel.iter().product::<i64>();
        let weight = ops.var(
            &(p / "conv"),
            "weight",
            &[cout, cin, kernel[0], kernel[1], kernel[2]],
            Init::Randn {
                mean: 0.0,
                stdev: he_std(fan_in),
            },
        );
        let bias = bias.then(|| ops.var(&(p / "conv"), "bias", &[cout], Init::Const(0.0)));
        let dropout = if dropout { spec.dropout } else { None };
        let nonlin = if nonlin { spec.nonlin } else { None };
        let norm = spec.norm.map(|n| {
            let (w, b) = if n.affine {
                let v = if zero_norm { 0.0 } else { 1.0 };
                (
                    Some(ops.var(&(p / "norm"), "weight", &[cout], Init::Const(v))),
                    Some(ops.var(&(p / "norm"), "bias", &[cout], Init::Const(0.0))),
                )
            } else {
                (None, None)
            };
            (n, w, b)
        });
        // all_modules: [conv, dropout?, norm?, nonlin?], the last two
        // swapped under nonlin_first when both are there.
        let mut norm_index = 1 + i64::from(dropout.is_some());
        if spec.nonlin_first && nonlin.is_some() {
            norm_index += 1;
        }
        let base = path_name(p);
        let mut alias = |module: &str, index: i64, params: &[&str]| {
            for param in params {
                ops.aliases.push((
                    format!("{base}.all_modules.{index}.{param}"),
                    format!("{base}.{module}.{param}"),
                ));
            }
        };
        alias(
            "conv",
            0,
            if bias.is_some() {
                &["weight", "bias"]
            } else {
                &["weight"]
            },
        );
        if norm.as_ref().is_some_and(|(n, _, _)| n.affine) {
            alias("norm", norm_index, &["weight", "bias"]);
        }
        ConvBlock {
            weight,
            bias,
            stride,
            padding: kernel.map(|k| (k - 1) / 2),
            dropout,
            norm,
            nonlin,
            nonlin_first: spec.nonlin_first,
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.conv3d(
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            [1, 1, 1],
            1,
        );
        if let Some(d) = self.dropout {
            y = if d.channels {
                y.feature_dropout(d.p, train)
            } else {
                y.dropout(d.p, train)
            };
        }
        let norm = |y: Tensor| match &self.norm {
            Some((n, w, b)) => y.instance_norm(w.as_ref(), b.as_ref(), None, None, true, 0.1, n.eps, true),
            None => y,
        };
        let act = |y: Tensor| match &self.nonlin {
            Some(a) => a.apply(&y),
            None => y,
        };
        if self.nonlin_first {
            norm(act(y))
        } else {
            act(norm(y))
        }
    }
}

/// The dotted name of a path (tch joins components with '.').
pub(super) fn path_name(p: &Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// `StackedConvBlocks`: `convs.0` (with the stride), `convs.1..`.
#[derive(Debug)]
pub(super) struct StackedConvs(Vec<ConvBlock>);

impl StackedConvs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &Path,
        ops: &mut Ops,
        n: i64,
        cin: i64,
        cout: i64,
        kernel: [i64; 3],
        stride: [i64; 3],
    ) -> StackedConvs {
        let bias = ops.spec.conv_bias;
        StackedConvs(
            (0..n)
                .map(|i| {
                    let (ci, st) = if i == 0 { (cin, stride) } else { (cout, [1, 1, 1]) };
                    ConvBlock::new(&(p / "convs" / i), ops, ci, cout, kernel, st, bias, true, true, false)
                })
                .collect(),
        )
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = self.0[0].forward(x, train);
        for c in &self.0[1..] {
            y = c.forward(&y, train);
        }
        y
    }
}

/// `BasicBlockD` (ResNet-D): conv1 (strided) -> conv2 (norm, no nonlin),
/// plus the skip (average pool when strided, then a 1x1x1 conv + norm when
/// the width changes), then the nonlinearity.
#[derive(Debug)]
pub(super) struct BasicBlockD {
    conv1: ConvBlock,
    conv2: ConvBlock,
    pool: Option<[i64; 3]>,
    project: Option<ConvBlock>,
    nonlin: Option<Nonlin>,
}

impl BasicBlockD {
    pub fn new(p: &Path, ops: &mut Ops, cin: i64, cout: i64, kernel: [i64; 3], stride: [i64; 3]) -> BasicBlockD {
        let bias = ops.spec.conv_bias;
        let conv1 = ConvBlock::new(&(p / "conv1"), ops, cin, cout, kernel, stride, bias, true, true, false);
        let conv2 = ConvBlock::new(
            &(p / "conv2"),
            ops,
            cout,
            cout,
            kernel,
            [1, 1, 1],
            bias,
            false,
            false,
            true,
        );
        let strided = stride.iter().any(|&s| s != 1);
        let pool = strided.then_some(stride);
        let project = (cin != cout).then(|| {
            let index = i64::from(strided);
            ConvBlock::new(
                &(p / "skip" / index),
                ops,
                cin,
                cout,
                [1, 1, 1],
                [1, 1, 1],
                false,
                false,
                false,
                false,
            )
        });
        BasicBlockD {
            conv1,
            conv2,
            pool,
            project,
            nonlin: ops.spec.nonlin,
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut residual = match self.pool {
            Some(s) => x.avg_pool3d(s, s, [0, 0, 0], false, true, None),
            None => x.shallow_clone(),
        };
        if let Some(c) = &self.project {
            residual = c.forward(&residual, train);
        }
        let out = self.conv2.forward(&self.conv1.forward(x, train), train) + residual;
        match &self.nonlin {
            Some(a) => a.apply(&out),
            None => out,
        }
    }
}

#[derive(Debug)]
pub(super) enum Stage {
    Plain(StackedConvs),
    Residual(Vec<BasicBlockD>),
}

impl Stage {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Stage::Plain(s) => s.forward(x, train),
            Stage::Residual(blocks) => {
                let mut y = blocks[0].forward(x, train);
                for b in &blocks[1..] {
                    y = b.forward(&y, train);
                }
                y
            }
        }
    }
}
