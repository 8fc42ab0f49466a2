//! The one place that knows which 3D backbones med3d trains: MONAI's
//! SwinUNETR or an nnU-Net U-Net built from a plans file. Pretraining and
//! export see a [`Backbone`]: a bottleneck feature map that the head reads
//! as tokens, and a one-channel output (the reconstruction).
//!
//! In a config, `backbone:` holds SwinUNETR's arguments (MONAI's names), or
//! `nnunet:` with a plans file:
//! ```yaml
//! backbone:
//!   nnunet:
//!     plans: nnUNet_preprocessed/Dataset001_X/nnUNetResEncUNetMPlans.json
//!     configuration: 3d_fullres
//! ```
//! The plans are read when the experiment is loaded; the configuration's
//! `architecture` (and the input nnU-Net feeds it) is recorded under
//! `resolved`, so a run folder rebuilds its network without the plans file.
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::nn::Path;
use tch::Tensor;

use super::nnunet::plans::{self, PlansConfiguration};
use super::nnunet::{ConvUnet, NetClass, UnetSpec};
use super::swin_unetr::{SwinUnetr, SwinUnetrConfig};

fn default_configuration() -> String {
    "3d_fullres".into()
}

/// An nnU-Net network named by its plans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NnunetConfig {
    /// The plans file (`nnUNet_preprocessed/<dataset>/<plans_name>.json`).
    pub plans: PathBuf,
    /// The configuration in it (nnUNetv2_train's second argument).
    #[serde(default = "default_configuration")]
    pub configuration: String,
    /// Set `preprocess.spacing`, `preprocess.roi` (the patch size) and,
    /// for CT plans, `preprocess.ct_window` (the foreground's 0.5 / 99.5
    /// percentiles) from the plans, in med3d's axis order, so pretraining
    /// sees the grid and clipping nnU-Net's fine-tuning uses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preprocess_from_plans: bool,
    /// What the plans give for that configuration, read by
    /// [`BackboneConfig::resolve`]; recorded with the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<PlansConfiguration>,
}

/// The input nnU-Net feeds the network, in med3d's axis order (RAS x, y, z).
#[derive(Debug, Clone, PartialEq)]
pub struct PlansInput {
    pub spacing: [f64; 3],
    pub patch_size: [i64; 3],
    /// CT plans: the clipping window of nnU-Net's CTNormalization.
    pub ct_window: Option<[f64; 2]>,
}

impl NnunetConfig {
    fn resolved(&self) -> Result<&PlansConfiguration> {
        self.resolved.as_ref().with_context(|| {
            format!(
                "backbone.nnunet: the plans {} were not read (load the config through the experiment file)",
                self.plans.display()
            )
        })
    }

    /// The network with `input_channels` in and `num_classes` out.
    pub fn spec(&self, input_channels: i64, num_classes: i64) -> Result<UnetSpec> {
        let r = self.resolved()?;
        UnetSpec::from_architecture(&r.architecture, input_channels, num_classes).with_context(|| {
            format!(
                "backbone.nnunet: {} configuration {}",
                self.plans.display(),
                self.configuration
            )
        })
    }

    /// For each network axis, the med3d volume axis (RAS: 0 = x, 1 = y,
    /// 2 = z) it reads. nnU-Net's readers give arrays in the file's voxel
    /// order reversed (z, y, x for a RAS-stored image), then apply the
    /// plans' `transpose_forward`; med3d's cached volumes are RAS.
    pub fn network_axes(&self) -> Result<[usize; 3]> {
        let r = self.resolved()?;
        let t = if r.transpose_forward.is_empty() {
            vec![0, 1, 2]
        } else {
            r.transpose_forward.clone()
        };
        Ok([2 - t[0] as usize, 2 - t[1] as usize, 2 - t[2] as usize])
    }

    /// The plans' spacing, patch size and CT window in med3d's axes.
    pub fn plans_input(&self) -> Result<PlansInput> {
        let r = self.resolved()?;
        let axes = self.network_axes()?;
        let mut spacing = [0.0; 3];
        let mut patch_size = [0i64; 3];
        for (net_axis, vol_axis) in axes.iter().enumerate() {
            spacing[*vol_axis] = r.spacing[net_axis];
            patch_size[*vol_axis] = r.patch_size[net_axis];
        }
        let ct = r.normalization_schemes.first().is_some_and(|s| s == "CTNormalization");
        let ct_window = if ct {
            let p = r
                .foreground_intensity_properties_per_channel
                .as_ref()
                .and_then(|v| v.get("0"))
                .context("backbone.nnunet: CT plans without foreground_intensity_properties_per_channel.0")?;
            let get = |k: &str| {
                p.get(k)
                    .and_then(serde_json::Value::as_f64)
                    .with_context(|| format!("foreground_intensity_properties_per_channel.0.{k}: missing"))
            };
            Some([get("percentile_00_5")?, get("percentile_99_5")?])
        } else {
            None
        };
        Ok(PlansInput {
            spacing,
            patch_size,
            ct_window,
        })
    }
}

/// Which backbone, with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum BackboneConfig {
    SwinUnetr(SwinUnetrConfig),
    Nnunet(NnunetConfig),
}

impl Default for BackboneConfig {
    fn default() -> Self {
        BackboneConfig::SwinUnetr(SwinUnetrConfig::default())
    }
}

impl Serialize for BackboneConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Tagged<'a> {
            nnunet: &'a NnunetConfig,
        }
        match self {
            // Flat, as before there was a choice: old runs keep their hash.
            BackboneConfig::SwinUnetr(c) => c.serialize(s),
            BackboneConfig::Nnunet(c) => Tagged { nnunet: c }.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for BackboneConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        let nnunet = v.as_object().and_then(|o| o.get("nnunet"));
        match nnunet {
            Some(n) => {
                if v.as_object().is_some_and(|o| o.len() > 1) {
                    return Err(D::Error::custom(
                        "backbone: `nnunet` names the whole network; SwinUNETR's keys do not go beside it",
                    ));
                }
                serde_json::from_value(n.clone())
                    .map(BackboneConfig::Nnunet)
                    .map_err(|e| D::Error::custom(format!("backbone.nnunet: {e}")))
            }
            None => serde_json::from_value(v)
                .map(BackboneConfig::SwinUnetr)
                .map_err(|e| D::Error::custom(format!("backbone: {e}"))),
        }
    }
}

impl BackboneConfig {
    /// Reads what the config points to (an nnU-Net plans file).
    pub fn resolve(&mut self) -> Result<()> {
        if let BackboneConfig::Nnunet(n) = self {
            n.resolved = Some(plans::read(&n.plans, &n.configuration).context("backbone.nnunet.plans")?);
        }
        Ok(())
    }

    /// Checks the arguments for a network of one image channel in and
    /// `out_channels` out.
    pub fn validate(&self, out_channels: i64) -> Result<()> {
        match self {
            BackboneConfig::SwinUnetr(c) => {
                c.validate()?;
                ensure!(
                    c.in_channels == 1 && c.out_channels == out_channels,
                    "backbone: in_channels must be 1 and out_channels {out_channels}, got {} and {}",
                    c.in_channels,
                    c.out_channels
                );
                Ok(())
            }
            BackboneConfig::Nnunet(n) => {
                let r = n.resolved()?;
                ensure!(
                    r.normalization_schemes.len() <= 1,
                    "backbone.nnunet: the plans have {} input channels ({:?}); med3d's caches hold one",
                    r.normalization_schemes.len(),
                    r.normalization_schemes
                );
                n.spec(1, out_channels).map(|_| ())
            }
        }
    }

    /// The network's name, as its library calls it.
    pub fn name(&self) -> &'static str {
        match self {
            BackboneConfig::SwinUnetr(_) => "SwinUNETR",
            BackboneConfig::Nnunet(n) => match n.spec(1, 1).map(|s| s.class) {
                Ok(NetClass::PlainConvUnet) => "PlainConvUNet",
                _ => "ResidualEncoderUNet",
            },
        }
    }

    /// Channels of the bottleneck the head reads.
    pub fn bottleneck_channels(&self) -> Result<i64> {
        match self {
            BackboneConfig::SwinUnetr(c) => Ok(c.bottleneck_channels()),
            BackboneConfig::Nnunet(n) => Ok(n.spec(1, 1)?.bottleneck_channels()),
        }
    }

    /// Each side of an input (med3d's x, y, z) must be a multiple of this.
    pub fn size_multiple(&self) -> Result<[i64; 3]> {
        match self {
            BackboneConfig::SwinUnetr(c) => Ok([c.size_multiple(); 3]),
            BackboneConfig::Nnunet(n) => {
                let m = n.spec(1, 1)?.size_multiple();
                let axes = n.network_axes()?;
                let mut out = [1i64; 3];
                for (net_axis, vol_axis) in axes.iter().enumerate() {
                    out[*vol_axis] = m[net_axis];
                }
                Ok(out)
            }
        }
    }

    /// Checks a [batch, 1, x, y, z] input shape (med3d's axis order).
    pub fn check_input(&self, shape: &[i64]) -> Result<()> {
        match self {
            BackboneConfig::SwinUnetr(c) => c.check_input(shape),
            BackboneConfig::Nnunet(_) => {
                let m = self.size_multiple()?;
                ensure!(
                    shape.len() == 5 && shape[1] == 1,
                    "{} expects input [batch, 1, x, y, z], got {shape:?}",
                    self.name()
                );
                ensure!(
                    shape[2..].iter().zip(m).all(|(s, m)| *s > 0 && s % m == 0),
                    "input sides {:?} must be multiples of {m:?} (the plans' strides multiplied per axis, in med3d's x, y, z)",
                    &shape[2..]
                );
                Ok(())
            }
        }
    }

    /// What to lower when a step does not fit in memory.
    pub fn width_knob(&self) -> String {
        match self {
            BackboneConfig::SwinUnetr(c) => format!("backbone.feature_size ({})", c.feature_size),
            BackboneConfig::Nnunet(n) => {
                format!("the features_per_stage of {} ({})", n.plans.display(), n.configuration)
            }
        }
    }
}

/// The backbone's output that pretraining reads.
#[derive(Debug)]
pub struct BackboneOutput {
    /// [b, C, d, h, w]: the deepest feature map.
    pub bottleneck: Tensor,
    /// [b, out_channels, X, Y, Z] in med3d's axis order.
    pub logits: Tensor,
}

#[derive(Debug)]
pub enum Backbone {
    SwinUnetr(Box<SwinUnetr>),
    Nnunet { net: Box<ConvUnet>, axes: [usize; 3] },
}

impl Backbone {
    /// Creates the parameters under `p` (the store's root: the library's
    /// own state-dict keys), one image channel in, `out_channels` out.
    pub fn new(p: &Path, cfg: &BackboneConfig, out_channels: i64) -> Result<Backbone> {
        match cfg {
            BackboneConfig::SwinUnetr(c) => {
                let c = SwinUnetrConfig {
                    out_channels,
                    ..c.clone()
                };
                Ok(Backbone::SwinUnetr(Box::new(SwinUnetr::new(p, &c)?)))
            }
            BackboneConfig::Nnunet(n) => Ok(Backbone::Nnunet {
                net: Box::new(ConvUnet::new(p, &n.spec(1, out_channels)?)?),
                axes: n.network_axes()?,
            }),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<BackboneOutput> {
        match self {
            Backbone::SwinUnetr(s) => {
                let out = s.forward_t(x, train)?;
                Ok(BackboneOutput {
                    bottleneck: out.bottleneck().shallow_clone(),
                    logits: out.logits,
                })
            }
            Backbone::Nnunet { net, axes } => {
                let to_net = [0, 1, 2 + axes[0] as i64, 2 + axes[1] as i64, 2 + axes[2] as i64];
                let mut back = [0i64, 1, 0, 0, 0];
                for (net_axis, vol_axis) in axes.iter().enumerate() {
                    back[2 + vol_axis] = 2 + net_axis as i64;
                }
                let out = net.forward_t(&x.permute(to_net), train)?;
                Ok(BackboneOutput {
                    bottleneck: out.bottleneck().shallow_clone(),
                    logits: out.logits.permute(back),
                })
            }
        }
    }

    /// (second name, store name) of tensors PyTorch's state dict names twice.
    pub fn aliases(&self) -> &[(String, String)] {
        match self {
            Backbone::SwinUnetr(_) => &[],
            Backbone::Nnunet { net, .. } => net.aliases(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swin_serialises_flat_and_nnunet_tagged() {
        let s: BackboneConfig = serde_yaml::from_str("feature_size: 24").unwrap();
        assert!(matches!(&s, BackboneConfig::SwinUnetr(c) if c.feature_size == 24));
        let flat = serde_json::to_value(&s).unwrap();
        assert_eq!(
            flat,
            serde_json::to_value(SwinUnetrConfig {
                feature_size: 24,
                ..Default::default()
            })
            .unwrap()
        );
        let n: BackboneConfig = serde_yaml::from_str("nnunet: {plans: p.json}").unwrap();
        assert!(matches!(&n, BackboneConfig::Nnunet(c) if c.configuration == "3d_fullres"));
        let back: BackboneConfig = serde_json::from_value(serde_json::to_value(&n).unwrap()).unwrap();
        assert_eq!(back, n);
        let e = serde_yaml::from_str::<BackboneConfig>("feature_sise: 24")
            .unwrap_err()
            .to_string();
        assert!(e.contains("feature_sise"), "{e}");
        let e = serde_yaml::from_str::<BackboneConfig>("nnunet: {plans: p.json, configuraton: x}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("configuraton"), "{e}");
        let e = serde_yaml::from_str::<BackboneConfig>("{nnunet: {plans: p.json}, feature_size: 24}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("beside"), "{e}");
    }
}
