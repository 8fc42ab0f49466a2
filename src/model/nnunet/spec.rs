//! nnU-Net's description of a network (a plans file's
//! `configurations.<name>.architecture`: `network_class_name`,
//! `arch_kwargs`, `_kw_requires_import`), read into [`UnetSpec`]: every
//! per-stage value expanded to one entry per stage, every op named by its
//! class and checked against what [`super::net::ConvUnet`] builds. An
//! unknown or unsupported key is an error naming it.
use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

/// The two U-Nets of `dynamic_network_architectures` that nnU-Net plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetClass {
    /// `PlainConvUNet`: stacked conv-norm-nonlin blocks per stage.
    PlainConvUnet,
    /// `ResidualEncoderUNet` (ResEnc M/L/XL): a stem, then residual
    /// `BasicBlockD` stages; the decoder as `PlainConvUNet`'s.
    ResidualEncoderUnet,
}

impl NetClass {
    pub fn python_name(self) -> &'static str {
        match self {
            NetClass::PlainConvUnet => "PlainConvUNet",
            NetClass::ResidualEncoderUnet => "ResidualEncoderUNet",
        }
    }
}

/// `InstanceNorm3d` (nnU-Net's default; no running statistics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    pub eps: f64,
    pub affine: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Nonlin {
    LeakyRelu { negative_slope: f64 },
    Relu,
    Gelu,
}

impl Nonlin {
    pub fn apply(&self, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Nonlin::LeakyRelu { negative_slope } => {
                if *negative_slope == 0.01 {
                    x.leaky_relu()
                } else {
                    // torch: x > 0 ? x : slope * x (also its gradient at 0).
                    x.where_self(&x.gt(0.0), &(x * *negative_slope))
                }
            }
            Nonlin::Relu => x.relu(),
            Nonlin::Gelu => x.gelu("none"),
        }
    }

    /// The `a` of `kaiming_normal_` in nnU-Net's `InitWeights_He(1e-2)`:
    /// always 1e-2, whatever the nonlinearity.
    pub const HE_SLOPE: f64 = 1e-2;
}

/// `Dropout` / `Dropout3d` (whole channels) with probability `p`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub channels: bool,
}

/// One network, every per-stage value expanded.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetSpec {
    pub class: NetClass,
    pub input_channels: i64,
    pub num_classes: i64,
    pub features: Vec<i64>,
    pub kernels: Vec<[i64; 3]>,
    pub strides: Vec<[i64; 3]>,
    /// Convs (PlainConvUNet) or residual blocks (ResidualEncoderUNet) per
    /// encoder stage.
    pub encoder_depth: Vec<i64>,
    /// Convs per decoder stage (n_stages - 1 entries).
    pub decoder_convs: Vec<i64>,
    pub conv_bias: bool,
    pub norm: Option<Norm>,
    pub dropout: Option<Dropout>,
    pub nonlin: Option<Nonlin>,
    /// conv -> nonlin -> norm instead of conv -> norm -> nonlin (PlainConvUNet only).
    pub nonlin_first: bool,
    /// ResidualEncoderUNet's stem width (default: features[0]).
    pub stem_channels: Option<i64>,
}

impl UnetSpec {
    pub fn n_stages(&self) -> usize {
        self.features.len()
    }

    /// The product of the strides on each axis: every input side must be
    /// a multiple of it.
    pub fn size_multiple(&self) -> [i64; 3] {
        let mut m = [1i64; 3];
        for s in &self.strides {
            for a in 0..3 {
                m[a] *= s[a];
            }
        }
        m
    }

    /// Channels of the last encoder stage (the bottleneck).
    pub fn bottleneck_channels(&self) -> i64 {
        *self.features.last().unwrap_or(&0)
    }

    /// Reads nnU-Net's `architecture` object (`network_class_name`,
    /// `arch_kwargs`, `_kw_requires_import`), as in plans files.
    pub fn from_architecture(arch: &Value, input_channels: i64, num_classes: i64) -> Result<UnetSpec> {
        let obj = arch.as_object().context("architecture: expected an object")?;
        for k in obj.keys() {
            ensure!(
                matches!(k.as_str(), "network_class_name" | "arch_kwargs" | "_kw_requires_import"),
                "architecture.{k}: unknown key (expected network_class_name, arch_kwargs, _kw_requires_import)"
            );
        }
        let name = obj
            .get("network_class_name")
            .and_then(Value::as_str)
            .context("architecture.network_class_name: missing or not a string")?;
        let class = match name.rsplit('.').next().unwrap_or(name) {
            "PlainConvUNet" => NetClass::PlainConvUnet,
            "ResidualEncoderUNet" => NetClass::ResidualEncoderUnet,
            other => bail!(
                "architecture.network_class_name: {other} is not supported (med3d builds PlainConvUNet and ResidualEncoderUNet)"
            ),
        };
        let kw = obj
            .get("arch_kwargs")
            .and_then(Value::as_object)
            .context("architecture.arch_kwargs: missing or not an object")?;
        Self::from_kwargs(class, kw, input_channels, num_classes).map_err(|e| e.context("architecture.arch_kwargs"))
    }

    fn from_kwargs(
        class: NetClass,
        kw: &Map<String, Value>,
        input_channels: i64,
        num_classes: i64,
    ) -> Result<UnetSpec> {
        let depth_key = match class {
            NetClass::PlainConvUnet => "n_conv_per_stage",
            NetClass::ResidualEncoderUnet => "n_blocks_per_stage",
        };
        let common = [
            "n_stages",
            "features_per_stage",
            "conv_op",
            "kernel_sizes",
            "strides",
            "n_conv_per_stage_decoder",
            "conv_bias",
            "norm_op",
            "norm_op_kwargs",
            "dropout_op",
            "dropout_op_kwargs",
            "nonlin",
            "nonlin_kwargs",
            "deep_supervision",
        ];
        let own: &[&str] = match class {
            NetClass::PlainConvUnet => &["n_conv_per_stage", "nonlin_first"],
            NetClass::ResidualEncoderUnet => &["n_blocks_per_stage", "block", "bottleneck_channels", "stem_channels"],
        };
        for k in kw.keys() {
            ensure!(
                common.contains(&k.as_str()) || own.contains(&k.as_str()),
                "{k}: not an argument of {} (or not one med3d knows)",
                class.python_name()
            );
        }
        let n = kw
            .get("n_stages")
            .and_then(Value::as_i64)
            .context("n_stages: missing or not an integer")?;
        ensure!((1..=12).contains(&n), "n_stages: {n} is outside 1..=12");
        let n = n as usize;
        let conv_op = op_name(kw, "conv_op")?.context("conv_op: missing")?;
        ensure!(
            conv_op == "Conv3d",
            "conv_op: {conv_op} is not a 3D convolution (med3d pretrains 3D networks: use a 3d_* configuration)"
        );
        let features = per_stage_int(kw, "features_per_stage", n)?;
        let kernels = per_stage_triple(kw, "kernel_sizes", n)?;
        let strides = per_stage_triple(kw, "strides", n)?;
        let encoder_depth = per_stage_int(kw, depth_key, n)?;
        let decoder_convs = if n > 1 {
            per_stage_int(kw, "n_conv_per_stage_decoder", n - 1)?
        } else {
            Vec::new()
        };
        for (k, v) in [("features_per_stage", &features), (depth_key, &encoder_depth)] {
            ensure!(
                v.iter().all(|&x| (1..=4096).contains(&x)),
                "{k}: every entry must be in 1..=4096, got {v:?}"
            );
        }
        ensure!(
            decoder_convs.iter().all(|&x| (1..=64).contains(&x)),
            "n_conv_per_stage_decoder: every entry must be in 1..=64, got {decoder_convs:?}"
        );
        for (k, v) in [("kernel_sizes", &kernels), ("strides", &strides)] {
            ensure!(
                v.iter().flatten().all(|&x| (1..=15).contains(&x)),
                "{k}: every entry must be in 1..=15, got {v:?}"
            );
        }
        ensure!(
            kernels.iter().flatten().all(|k| k % 2 == 1),
            "kernel_sizes: nnU-Net pads (k - 1) / 2, so only odd kernels keep the size; got {kernels:?}"
        );
        let conv_bias = match kw.get("conv_bias") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => bail!("conv_bias: expected true or false, got {v}"),
        };
        let norm = match op_name(kw, "norm_op")? {
            None => None,
            Some("InstanceNorm3d") => {
                let a = kwargs(kw, "norm_op_kwargs")?;
                check_keys(&a, "norm_op_kwargs", &["eps", "affine", "momentum", "track_running_stats"])?;
                ensure!(
                    !a.get("track_running_stats").and_then(Value::as_bool).unwrap_or(false),
                    "norm_op_kwargs.track_running_stats: running statistics are not supported"
                );
                Some(Norm {
                    eps: num(&a, "norm_op_kwargs", "eps")?.unwrap_or(1e-5),
                    affine: flag(&a, "norm_op_kwargs", "affine")?.unwrap_or(false),
                })
            }
            Some(other) => bail!(
                "norm_op: {other} is not supported (med3d builds InstanceNorm3d, nnU-Net's default; batch norm's running statistics are not carried)"
            ),
        };
        let dropout = match op_name(kw, "dropout_op")? {
            None => None,
            Some(name @ ("Dropout" | "Dropout3d")) => {
                let a = kwargs(kw, "dropout_op_kwargs")?;
                check_keys(&a, "dropout_op_kwargs", &["p", "inplace"])?;
                let p = num(&a, "dropout_op_kwargs", "p")?.unwrap_or(0.5);
                ensure!((0.0..1.0).contains(&p), "dropout_op_kwargs.p: {p} is outside [0, 1)");
                (p > 0.0).then_some(Dropout {
                    p,
                    channels: name == "Dropout3d",
                })
            }
            Some(other) => bail!("dropout_op: {other} is not supported (Dropout or Dropout3d)"),
        };
        let nonlin = match op_name(kw, "nonlin")? {
            None => None,
            Some(name) => {
                let a = kwargs(kw, "nonlin_kwargs")?;
                match name {
                    "LeakyReLU" => {
                        check_keys(&a, "nonlin_kwargs", &["negative_slope", "inplace"])?;
                        Some(Nonlin::LeakyRelu {
                            negative_slope: num(&a, "nonlin_kwargs", "negative_slope")?.unwrap_or(0.01),
                        })
                    }
                    "ReLU" => {
                        check_keys(&a, "nonlin_kwargs", &["inplace"])?;
                        Some(Nonlin::Relu)
                    }
                    "GELU" => {
                        check_keys(&a, "nonlin_kwargs", &[])?;
                        Some(Nonlin::Gelu)
                    }
                    other => bail!("nonlin: {other} is not supported (LeakyReLU, ReLU, GELU)"),
                }
            }
        };
        let nonlin_first = flag(kw, "", "nonlin_first")?.unwrap_or(false);
        if let Some(b) = op_name(kw, "block")? {
            ensure!(
                b == "BasicBlockD",
                "block: {b} is not supported (ResidualEncoderUNet with BasicBlockD, as nnU-Net's ResEnc plans)"
            );
        }
        if let Some(v) = kw.get("bottleneck_channels").filter(|v| !v.is_null()) {
            bail!("bottleneck_channels: {v} is only used by BottleneckD blocks, which med3d does not build");
        }
        let stem_channels = match kw.get("stem_channels") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let c = v.as_i64().context("stem_channels: expected an integer")?;
                ensure!((1..=4096).contains(&c), "stem_channels: {c} is outside 1..=4096");
                Some(c)
            }
        };
        ensure!(
            (1..=64).contains(&input_channels) && (1..=4096).contains(&num_classes),
            "input channels {input_channels} / classes {num_classes} out of range"
        );
        Ok(UnetSpec {
            class,
            input_channels,
            num_classes,
            features,
            kernels,
            strides,
            encoder_depth,
            decoder_convs,
            conv_bias,
            norm,
            dropout,
            nonlin,
            nonlin_first,
            stem_channels,
        })
    }
}

/// The class name at the end of an op's dotted path (`torch.nn.modules.
/// conv.Conv3d` -> `Conv3d`); None when absent or null.
fn op_name<'a>(kw: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match kw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.rsplit('.').next().unwrap_or(s))),
        Some(v) => bail!("{key}: expected a dotted class name, got {v}"),
    }
}

fn kwargs(kw: &Map<String, Value>, key: &str) -> Result<Map<String, Value>> {
    match kw.get(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(v) => bail!("{key}: expected an object, got {v}"),
    }
}

fn check_keys(a: &Map<String, Value>, key: &str, allowed: &[&str]) -> Result<()> {
    for k in a.keys() {
        ensure!(
            allowed.contains(&k.as_str()),
            "{key}.{k}: not supported (known: {allowed:?})"
        );
    }
    Ok(())
}

fn num(a: &Map<String, Value>, key: &str, name: &str) -> Result<Option<f64>> {
    match a.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .with_context(|| format!("{key}.{name}: expected a number, got {v}")),
    }
}

fn flag(a: &Map<String, Value>, key: &str, name: &str) -> Result<Option<bool>> {
    let dotted = if key.is_empty() {
        name.to_string()
    } else {
        format!("{key}.{name}")
    };
    match a.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => bail!("{dotted}: expected true or false, got {v}"),
    }
}

/// An int or a list of n ints (dynamic_network_architectures' rule).
fn per_stage_int(kw: &Map<String, Value>, key: &str, n: usize) -> Result<Vec<i64>> {
    let v = kw.get(key).with_context(|| format!("{key}: missing"))?;
    if let Some(x) = v.as_i64() {
        return Ok(vec![x; n]);
    }
    let list = v
        .as_array()
        .with_context(|| format!("{key}: expected an integer or a list, got {v}"))?;
    ensure!(list.len() == n, "{key}: {} entries for {n} stages", list.len());
    list.iter()
        .map(|x| x.as_i64().with_context(|| format!("{key}: {x} is not an integer")))
        .collect()
}

/// An int, or a list of n entries each an int or a list of 3 ints.
fn per_stage_triple(kw: &Map<String, Value>, key: &str, n: usize) -> Result<Vec<[i64; 3]>> {
    let v = kw.get(key).with_context(|| format!("{key}: missing"))?;
    let triple = |x: &Value| -> Result<[i64; 3]> {
        if let Some(i) = x.as_i64() {
            return Ok([i; 3]);
        }
        let a = x
            .as_array()
            .filter(|a| a.len() == 3)
            .with_context(|| format!("{key}: {x} is neither an integer nor 3 integers"))?;
        let mut out = [0i64; 3];
        for (o, e) in out.iter_mut().zip(a) {
            *o = e.as_i64().with_context(|| format!("{key}: {e} is not an integer"))?;
        }
        Ok(out)
    };
    if v.is_i64() {
        return Ok(vec![triple(v)?; n]);
    }
    let list = v
        .as_array()
        .with_context(|| format!("{key}: expected an integer or a list, got {v}"))?;
    ensure!(list.len() == n, "{key}: {} entries for {n} stages", list.len());
    list.iter().map(triple).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resenc() -> Value {
        json!({
            "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": {
                "n_stages": 3, "features_per_stage": [4, 8, 16],
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3], [3, 3, 3], [1, 3, 3]],
                "strides": [1, [2, 2, 2], [1, 2, 2]],
                "n_blocks_per_stage": [1, 2, 2], "n_conv_per_stage_decoder": 1,
                "conv_bias": true,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": true},
                "dropout_op": null, "dropout_op_kwargs": null,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]
        })
    }

    #[test]
    fn resenc_kwargs_expand_per_stage() {
        let s = UnetSpec::from_architecture(&resenc(), 1, 2).unwrap();
        assert_eq!(s.class, NetClass::ResidualEncoderUnet);
        assert_eq!(s.strides, vec![[1, 1, 1], [2, 2, 2], [1, 2, 2]]);
        assert_eq!(s.decoder_convs, vec![1, 1]);
        assert_eq!(s.size_multiple(), [2, 4, 4]);
        assert_eq!(
            s.norm,
            Some(Norm {
                eps: 1e-5,
                affine: true
            })
        );
        assert_eq!(s.nonlin, Some(Nonlin::LeakyRelu { negative_slope: 0.01 }));
        assert_eq!(s.bottleneck_channels(), 16);
    }

    #[test]
    fn unknown_or_unsupported_keys_are_named() {
        let mut a = resenc();
        a["arch_kwargs"]["n_conv_per_stage"] = json!(2);
        let e = format!("{:#}", UnetSpec::from_architecture(&a, 1, 1).unwrap_err());
        assert!(
            e.contains("n_conv_per_stage") && e.contains("ResidualEncoderUNet"),
            "{e}"
        );
        let mut a = resenc();
        a["arch_kwargs"]["norm_op"] = json!("torch.nn.BatchNorm3d");
        let e = format!("{:#}", UnetSpec::from_architecture(&a, 1, 1).unwrap_err());
        assert!(e.contains("norm_op") && e.contains("BatchNorm3d"), "{e}");
        let mut a = resenc();
        a["arch_kwargs"]["conv_op"] = json!("torch.nn.modules.conv.Conv2d");
        let e = format!("{:#}", UnetSpec::from_architecture(&a, 1, 1).unwrap_err());
        assert!(e.contains("conv_op"), "{e}");
        let mut a = resenc();
        a["arch_kwargs"]["strides"] = json!([1, 2]);
        let e = format!("{:#}", UnetSpec::from_architecture(&a, 1, 1).unwrap_err());
        assert!(e.contains("strides") && e.contains("2 entries for 3 stages"), "{e}");
        let mut a = resenc();
        a["network_class_name"] = json!("x.Primus");
        let e = format!("{:#}", UnetSpec::from_architecture(&a, 1, 1).unwrap_err());
        assert!(e.contains("Primus"), "{e}");
        let mut a = resenc();
        a["arch_kwargs"]["n_stages"] = json!(1_000_000);
        assert!(UnetSpec::from_architecture(&a, 1, 1).is_err());
    }
}
