//! `PlainConvUNet` and `ResidualEncoderUNet` as `dynamic_network_architectures`
//! 0.4 builds them (nnU-Net v2's networks), 3D, under its state-dict keys.
//!
//! The variable store holds each tensor once, under the module path that
//! names it (`encoder.stages.1.blocks.0.conv1.conv.weight`). PyTorch's
//! state dict of the same network names some tensors twice, because the
//! same module is registered under two attributes:
//! `ConvDropoutNormReLU` keeps its conv and norm both as `conv` / `norm`
//! and inside `all_modules` (`...conv1.all_modules.0.weight`), and
//! `UNetDecoder` keeps the whole encoder as `decoder.encoder`.
//! [`ConvUnet::aliases`] lists those second names, so a state dict written
//! for PyTorch carries every key `mod.state_dict()` has (nnU-Net's
//! `load_pretrained_weights` asserts each one), and one read from PyTorch
//! can be checked to hold the same tensor under both names.
//!
//! Initialisation follows nnU-Net's `InitWeights_He(1e-2)` (Kaiming normal,
//! fan-in, on every conv and transposed conv; biases 0), norms at weight 1
//! and bias 0, and for ResidualEncoderUNet `init_last_bn_before_add_to_0`
//! (each block's second norm at 0, so every block starts as its skip).
use anyhow::{ensure, Result};
use tch::nn::{Init, Path};
use tch::Tensor;

use super::blocks::{he_std, path_name, BasicBlockD, Ops, StackedConvs, Stage};
use super::spec::{NetClass, UnetSpec};

/// What one forward pass produces.
#[derive(Debug)]
pub struct UnetOutput {
    /// Each encoder stage's output; the last is the bottleneck,
    /// [b, features[-1], side / size_multiple].
    pub skips: Vec<Tensor>,
    /// The last decoder stage's features, [b, features[0], side].
    pub decoder_features: Tensor,
    /// `seg_layers[-1]` on them: [b, num_classes, side] (the network's
    /// output without deep supervision).
    pub logits: Tensor,
}

impl UnetOutput {
    pub fn bottleneck(&self) -> &Tensor {
        self.skips.last().expect("a network has at least one stage")
    }
}

/// nnU-Net's network for one [`UnetSpec`].
#[derive(Debug)]
pub struct ConvUnet {
    spec: UnetSpec,
    stem: Option<StackedConvs>,
    stages: Vec<Stage>,
    transpconvs: Vec<(Tensor, Option<Tensor>, [i64; 3])>,
    decoder: Vec<StackedConvs>,
    seg_layers: Vec<(Tensor, Tensor)>,
    aliases: Vec<(String, String)>,
}

impl ConvUnet {
    /// Creates the parameters under `p` (the var store's root gives
    /// dynamic_network_architectures' keys), initialised as nnU-Net
    /// initialises a fresh network.
    pub fn new(p: &Path, spec: &UnetSpec) -> Result<ConvUnet> {
        ensure!(
            spec.n_stages() >= 2,
            "an nnU-Net U-Net needs at least 2 stages, got {}",
            spec.n_stages()
        );
        let mut ops = Ops {
            spec,
            aliases: Vec::new(),
            names: Vec::new(),
        };
        let enc = p / "encoder";
        let f = &spec.features;
        let mut cin = spec.input_channels;
        let stem = match spec.class {
            NetClass::PlainConvUnet => None,
            NetClass::ResidualEncoderUnet => {
                let c = spec.stem_channels.unwrap_or(f[0]);
                let s = StackedConvs::new(&(&enc / "stem"), &mut ops, 1, cin, c, spec.kernels[0], [1, 1, 1]);
                cin = c;
                Some(s)
            }
        };
        let mut stages = Vec::new();
        for s in 0..spec.n_stages() {
            let sp = &enc / "stages" / s as i64;
            let stage = match spec.class {
                NetClass::PlainConvUnet => Stage::Plain(StackedConvs::new(
                    &(&sp / 0),
                    &mut ops,
                    spec.encoder_depth[s],
                    cin,
                    f[s],
                    spec.kernels[s],
                    spec.strides[s],
                )),
                NetClass::ResidualEncoderUnet => Stage::Residual(
                    (0..spec.encoder_depth[s])
                        .map(|b| {
                            let (ci, st) = if b == 0 {
                                (cin, spec.strides[s])
                            } else {
                                (f[s], [1, 1, 1])
                            };
                            BasicBlockD::new(&(&sp / "blocks" / b), &mut ops, ci, f[s], spec.kernels[s], st)
                        })
                        .collect(),
                ),
            };
            stages.push(stage);
            cin = f[s];
        }
        let dec = p / "decoder";
        let n = spec.n_stages();
        let mut transpconvs = Vec::new();
        let mut decoder = Vec::new();
        let mut seg_layers = Vec::new();
        for s in 1..n {
            let below = f[n - s];
            let skip = f[n - s - 1];
            let st = spec.strides[n - s];
            let tp = &dec / "transpconvs" / (s - 1) as i64;
            // ConvTranspose3d's weight is [in, out, k...]; PyTorch's fan-in
            // is dim 1 times the kernel volume.
            let w = ops.var(
                &tp,
                "weight",
                &[below, skip, st[0], st[1], st[2]],
                Init::Randn {
                    mean: 0.0,
                    stdev: he_std(skip * st.iter().product::<i64>()),
                },
            );
            let b = spec.conv_bias.then(|| ops.var(&tp, "bias", &[skip], Init::Const(0.0)));
            transpconvs.push((w, b, st));
            decoder.push(StackedConvs::new(
                &(&dec / "stages" / (s - 1) as i64),
                &mut ops,
                spec.decoder_convs[s - 1],
                2 * skip,
                skip,
                spec.kernels[n - s - 1],
                [1, 1, 1],
            ));
            let sl = &dec / "seg_layers" / (s - 1) as i64;
            let sw = ops.var(
                &sl,
                "weight",
                &[spec.num_classes, skip, 1, 1, 1],
                Init::Randn {
                    mean: 0.0,
                    stdev: he_std(skip),
                },
            );
            let sb = ops.var(&sl, "bias", &[spec.num_classes], Init::Const(0.0));
            seg_layers.push((sw, sb));
        }
        // UNetDecoder holds the encoder as `decoder.encoder`.
        let enc_name = path_name(&enc);
        let dec_name = path_name(&dec);
        let Ops { mut aliases, names, .. } = ops;
        let prefix = format!("{enc_name}.");
        let mut encoder_keys: Vec<String> = names.into_iter().filter(|k| k.starts_with(&prefix)).collect();
        encoder_keys.extend(
            aliases
                .iter()
                .filter(|(a, _)| a.starts_with(&prefix))
                .map(|(a, _)| a.clone()),
        );
        encoder_keys.sort();
        let canonical = |k: &str| -> String {
            aliases
                .iter()
                .find(|(a, _)| a == k)
                .map(|(_, c)| c.clone())
                .unwrap_or_else(|| k.to_string())
        };
        let mirrored: Vec<(String, String)> = encoder_keys
            .iter()
            .map(|k| (format!("{dec_name}.encoder.{}", &k[prefix.len()..]), canonical(k)))
            .collect();
        aliases.extend(mirrored);
        Ok(ConvUnet {
            spec: spec.clone(),
            stem,
            stages,
            transpconvs,
            decoder,
            seg_layers,
            aliases,
        })
    }

    pub fn spec(&self) -> &UnetSpec {
        &self.spec
    }

    /// (second name, variable-store name) of every tensor PyTorch's state
    /// dict names twice.
    pub fn aliases(&self) -> &[(String, String)] {
        &self.aliases
    }

    /// Checks a [batch, channels, d, h, w] input shape.
    pub fn check_input(&self, shape: &[i64]) -> Result<()> {
        ensure!(
            shape.len() == 5 && shape[1] == self.spec.input_channels,
            "{} expects input [batch, {}, d, h, w], got {shape:?}",
            self.spec.class.python_name(),
            self.spec.input_channels
        );
        let m = self.spec.size_multiple();
        ensure!(
            shape[2..].iter().zip(m).all(|(s, m)| s % m == 0),
            "input sides {:?} must be multiples of {m:?} (the product of the plans' strides per axis): crop or pad the volume",
            &shape[2..]
        );
        Ok(())
    }

    /// The whole network (deep supervision off), keeping what pretraining
    /// reads. `train` enables dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<UnetOutput> {
        self.check_input(&x.size())?;
        let mut y = match &self.stem {
            Some(s) => s.forward(x, train),
            None => x.shallow_clone(),
        };
        let mut skips = Vec::with_capacity(self.stages.len());
        for s in &self.stages {
            y = s.forward(&y, train);
            skips.push(y.shallow_clone());
        }
        let n = skips.len();
        let mut low = skips[n - 1].shallow_clone();
        for (s, ((w, b, st), convs)) in self.transpconvs.iter().zip(&self.decoder).enumerate() {
            let up = low.conv_transpose3d(w, b.as_ref(), *st, [0, 0, 0], [0, 0, 0], 1, [1, 1, 1]);
            let cat = Tensor::cat(&[up, skips[n - s - 2].shallow_clone()], 1);
            low = convs.forward(&cat, train);
        }
        let (w, b) = self.seg_layers.last().expect("at least one decoder stage");
        let logits = low.conv3d(w, Some(b), [1, 1, 1], [0, 0, 0], [1, 1, 1], 1);
        Ok(UnetOutput {
            skips,
            decoder_features: low,
            logits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn spec(class: &str, depth_key: &str) -> UnetSpec {
        let a = json!({
            "network_class_name": format!("dynamic_network_architectures.architectures.unet.{class}"),
            "arch_kwargs": {
                "n_stages": 3, "features_per_stage": [4, 8, 8],
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3], [3, 3, 3], [1, 3, 3]],
                "strides": [[1, 1, 1], [2, 2, 2], [1, 2, 2]],
                depth_key: [1, 2, 1], "n_conv_per_stage_decoder": [1, 2],
                "conv_bias": true,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": true},
                "dropout_op": null, "dropout_op_kwargs": null,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]
        });
        UnetSpec::from_architecture(&a, 1, 2).unwrap()
    }

    #[test]
    fn resenc_keys_and_shapes() {
        let vs = VarStore::new(Device::Cpu);
        let net = ConvUnet::new(&vs.root(), &spec("ResidualEncoderUNet", "n_blocks_per_stage")).unwrap();
        let vars = vs.variables();
        for k in [
            "encoder.stem.convs.0.conv.weight",
            "encoder.stages.0.blocks.0.conv1.norm.weight",
            "encoder.stages.1.blocks.0.skip.1.conv.weight",
            "encoder.stages.1.blocks.1.conv2.conv.bias",
            "decoder.transpconvs.0.weight",
            "decoder.stages.1.convs.0.conv.weight",
            "decoder.seg_layers.1.bias",
        ] {
            assert!(vars.contains_key(k), "{k} missing");
        }
        assert!(!vars.contains_key("encoder.stages.1.blocks.0.skip.1.conv.bias"));
        let alias: std::collections::HashMap<_, _> = net.aliases().iter().cloned().collect();
        assert_eq!(
            alias["encoder.stages.1.blocks.0.conv1.all_modules.1.weight"],
            "encoder.stages.1.blocks.0.conv1.norm.weight"
        );
        assert_eq!(
            alias["decoder.encoder.stages.1.blocks.0.conv1.all_modules.1.weight"],
            "encoder.stages.1.blocks.0.conv1.norm.weight"
        );
        assert_eq!(
            alias["decoder.encoder.stem.convs.0.conv.weight"],
            "encoder.stem.convs.0.conv.weight"
        );
        assert!(alias.values().all(|c| vars.contains_key(c)));
        let out = net
            .forward_t(&Tensor::randn([1, 1, 4, 8, 8], (Kind::Float, Device::Cpu)), false)
            .unwrap();
        assert_eq!(out.bottleneck().size(), vec![1, 8, 2, 2, 2]);
        assert_eq!(out.logits.size(), vec![1, 2, 4, 8, 8]);
        assert!(net
            .forward_t(&Tensor::zeros([1, 1, 4, 6, 8], (Kind::Float, Device::Cpu)), false)
            .is_err());
    }

    #[test]
    fn plain_keys() {
        let vs = VarStore::new(Device::Cpu);
        let net = ConvUnet::new(&vs.root(), &spec("PlainConvUNet", "n_conv_per_stage")).unwrap();
        let vars = vs.variables();
        assert!(vars.contains_key("encoder.stages.1.0.convs.1.conv.weight"));
        assert!(vars.contains_key("encoder.stages.0.0.convs.0.norm.bias"));
        let out = net
            .forward_t(&Tensor::randn([2, 1, 4, 8, 8], (Kind::Float, Device::Cpu)), true)
            .unwrap();
        assert_eq!(out.logits.size(), vec![2, 2, 4, 8, 8]);
        assert_eq!(out.skips.len(), 3);
    }
}
