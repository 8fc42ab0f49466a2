//! What pretraining optimises: the backbone (SwinUNETR or an nnU-Net U-Net,
//! its library's keys at the root of the variable store), a head that reads "the volume at plane P, position s"
//! out of the bottleneck (PSAT under `psat.*`, or the pooling ablation
//! under `pool.*`), one learnable diagonal Mahalanobis weight per target
//! (`align.<target>.metric`), and the loss of docs/method.md:
//! sum_t weight_t * align(x_t, y_t) + weight_recon * MSE(reconstruction, input).
use anyhow::Result;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::{AlignLoss, HeadKind, PretrainConfig};
use crate::align::ot;
use crate::artifacts::embeddings::TargetKind;
use crate::dist::Dist;
use crate::model::backbone::Backbone;
use crate::model::psat::{l2_normalize, BinMode, Psat, PsatConfig};

/// The no-PSAT ablation: pooled bottleneck + plane-slice embedding, linear
/// read-outs.
#[derive(Debug)]
struct PoolHead {
    plane_slice: nn::Embedding,
    proj: Vec<(String, nn::Linear)>,
    bins: i64,
}

#[derive(Debug)]
enum Head {
    Psat(Box<Psat>),
    Pool(PoolHead),
}

/// Bin of each slice under the PSAT config's rule (as `Psat::bins`).
pub fn slice_bins(cfg: &PsatConfig, positions: &[f64], indices: &[i64]) -> Vec<i64> {
    let n = cfg.bins;
    match cfg.bin_mode {
        BinMode::Normalized => positions
            .iter()
            .map(|p| ((p.clamp(0.0, 1.0) * n as f64) as i64).min(n - 1))
            .collect(),
        BinMode::IndexDiv2 => indices.iter().map(|i| (i / 2).clamp(0, n - 1)).collect(),
    }
}

/// Loss values of one micro-batch.
#[derive(Debug)]
pub struct Losses {
    /// The weighted total (differentiable).
    pub total: Tensor,
    /// What this rank differentiates: `total`, except when the alignment
    /// spans the ranks' gathered batch (see `Pretrainer::losses`).
    pub objective: Tensor,
    /// (name, value) of each unweighted term: `text`, `image`, `recon`.
    pub terms: Vec<(String, Tensor)>,
    /// (target, transported mass = sum of the plan), for the OT losses.
    pub mass: Vec<(String, Tensor)>,
    /// (target, share of the plan's mass on the matching pairs).
    pub matched: Vec<(String, Tensor)>,
}

#[derive(Debug)]
pub struct Pretrainer {
    pub backbone: Backbone,
    head: Head,
    metric: Vec<(String, Tensor)>,
    cfg: PretrainConfig,
}

/// The var-store roots of what pretraining adds beside the backbone (the
/// PSAT or pooled head, and the alignment's learnable metrics); every other
/// variable is the backbone's, under its upstream network's own keys.
const PSAT: &str = "psat";
const POOL: &str = "pool";
const ALIGN: &str = "align";

impl Pretrainer {
    /// Whether a variable of the pretraining store belongs to the backbone
    /// (what export writes and downstream networks load).
    pub fn is_backbone_key(key: &str) -> bool {
        ![PSAT, POOL, ALIGN]
            .iter()
            .any(|root| key.strip_prefix(root).is_some_and(|rest| rest.starts_with('.')))
    }

    /// `targets`: (name, width) of each target table.
    pub fn new(root: &nn::Path, cfg: &PretrainConfig, targets: &[(String, i64)]) -> Result<Pretrainer> {
        let backbone = Backbone::new(root, &cfg.backbone, 1)?;
        let dim = cfg.backbone.bottleneck_channels()?;
        let named: Vec<(&str, i64)> = targets.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let head = match cfg.head {
            HeadKind::Psat => Head::Psat(Box::new(Psat::new(root / PSAT, dim, &cfg.psat, &named))),
            HeadKind::Pool => {
                let p = root / POOL;
                let emb = nn::EmbeddingConfig {
                    ws_init: nn::Init::Randn { mean: 0.0, stdev: 1.0 },
                    ..Default::default()
                };
                Head::Pool(PoolHead {
                    plane_slice: nn::embedding(&p / "plane_slice_embed", 3 * cfg.psat.bins, dim, emb),
                    proj: named
                        .iter()
                        .map(|(n, w)| (n.to_string(), nn::linear(&p / "proj" / *n, dim, *w, Default::default())))
                        .collect(),
                    bins: cfg.psat.bins,
                })
            }
        };
        // diag(0.5 (A + A^T) + I) with A ~ U[0, 1) is A_kk + 1 ~ U[1, 2).
        let metric = match cfg.align.loss {
            AlignLoss::Infonce => Vec::new(),
            AlignLoss::Pot | AlignLoss::Ot => named
                .iter()
                .map(|(n, w)| {
                    let v = (root / ALIGN / *n).var("metric", &[*w], nn::Init::Uniform { lo: 1.0, up: 2.0 });
                    (n.to_string(), v)
                })
                .collect(),
        };
        Ok(Pretrainer {
            backbone,
            head,
            metric,
            cfg: cfg.clone(),
        })
    }

    pub fn bins(&self, positions: &[f64], indices: &[i64]) -> Vec<i64> {
        match &self.head {
            Head::Psat(p) => p.bins(positions, indices),
            Head::Pool(_) => slice_bins(&self.cfg.psat, positions, indices),
        }
    }

    /// One embedding per target, [B, width], and the reconstruction.
    fn read_out(
        &self,
        volumes: &Tensor,
        planes: &Tensor,
        bins: &Tensor,
        train: bool,
    ) -> Result<(Vec<(String, Tensor)>, Tensor)> {
        let out = self.backbone.forward_t(volumes, train)?;
        Ok((
            self.head_forward(&tokens(&out.bottleneck), planes, bins, train),
            out.logits,
        ))
    }

    fn head_forward(&self, memory: &Tensor, planes: &Tensor, bins: &Tensor, train: bool) -> Vec<(String, Tensor)> {
        match &self.head {
            Head::Psat(p) => p.forward(memory, planes, bins, train),
            Head::Pool(p) => {
                let pooled =
                    memory.mean_dim([1i64].as_slice(), false, None) + p.plane_slice.forward(&(planes * p.bins + bins));
                p.proj.iter().map(|(n, l)| (n.clone(), l.forward(&pooled))).collect()
            }
        }
    }

    /// The memory tokens [1, N, C] of one volume [1, 1, X, Y, Z] (eval mode).
    pub fn memory(&self, volume: &Tensor) -> Result<Tensor> {
        Ok(tokens(&self.backbone.forward_t(volume, false)?.bottleneck))
    }

    /// Eval-mode read-outs of one volume's `memory` [1, N, C] at R (plane,
    /// bin) queries: (target, [R, width]).
    pub fn read_out_memory(&self, memory: &Tensor, planes: &Tensor, bins: &Tensor) -> Vec<(String, Tensor)> {
        let r = planes.size()[0];
        let m = memory.expand([r, -1, -1], false);
        self.head_forward(&m, planes, bins, false)
    }

    /// The losses of a micro-batch. `volumes` [B, 1, X, Y, Z], `planes` and
    /// `bins` [B] int64, `targets` (name, [B, width]) on the model's device.
    /// `autocast`: run the networks under CUDA autocast (the alignment and
    /// reconstruction losses are always computed in float32).
    ///
    /// `gather`: align over the global batch, every rank's read-outs and
    /// targets in rank order, gradients flowing only into this rank's
    /// rows. Each rank then computes the same alignment loss L; its
    /// gradient reaches the network through this rank's rows alone, so the
    /// ranks' gradients sum to dL/dθ, and the trainer's average divides by
    /// W: the objective carries W x L. The metric weights enter L directly
    /// on every rank, so only rank 0 lets gradient into them (W x dL/dm,
    /// averaged: dL/dm). The reconstruction term stays per rank.
    #[allow(clippy::too_many_arguments)]
    pub fn losses(
        &self,
        volumes: &Tensor,
        planes: &Tensor,
        bins: &Tensor,
        targets: &[(String, Tensor)],
        train: bool,
        autocast: bool,
        gather: Option<&Dist>,
    ) -> Result<Losses> {
        let (emb, recon) = tch::autocast(autocast, || self.read_out(volumes, planes, bins, train))?;
        let recon_loss = recon.to_kind(Kind::Float).mse_loss(volumes, tch::Reduction::Mean);
        let w = &self.cfg.weights;
        let mut total = &recon_loss * w.recon;
        // A tensor of its own: `total` grows in place below.
        let mut objective = gather.map(|_| &recon_loss * w.recon);
        let scale = gather.map(|d| d.world_size as f64).unwrap_or(1.0);
        let mut out = Losses {
            total: Tensor::new(),
            objective: Tensor::new(),
            terms: Vec::new(),
            mass: Vec::new(),
            matched: Vec::new(),
        };
        let a = &self.cfg.align;
        let transport = a.transport(self.cfg.run.cpu_solver_max_batch);
        for (name, e) in &emb {
            let Some((_, y)) = targets.iter().find(|(n, _)| n == name) else {
                anyhow::bail!("no target rows named {name} in the batch");
            };
            let mut x = l2_normalize(&e.to_kind(Kind::Float));
            let mut y = l2_normalize(&y.to_kind(Kind::Float));
            if let Some(d) = gather {
                x = gather_rows(d, &x)?;
                y = gather_rows(d, &y)?.detach();
            }
            let term = match a.loss {
                AlignLoss::Infonce => ot::info_nce(&x, &y, a.temperature),
                AlignLoss::Pot | AlignLoss::Ot => {
                    let transport = transport.ok_or_else(|| anyhow::anyhow!("an OT loss without a transport plan"))?;
                    let m = self
                        .metric
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, m)| m)
                        .ok_or_else(|| anyhow::anyhow!("no metric weights for target {name}"))?;
                    // 0 x m + m is m exactly, with a zero gradient.
                    let m_rank = match gather {
                        Some(d) if d.rank != 0 => m * 0.0 + m.detach(),
                        _ => m.shallow_clone(),
                    };
                    let cost = ot::mahalanobis_cost(&x, &y, &m_rank);
                    let (log_plan, term) = transport.plan_loss(&cost)?;
                    let plan = log_plan.detach().exp();
                    let mass = plan.sum(Kind::Float);
                    out.matched
                        .push((name.clone(), plan.diagonal(0, -2, -1).sum(Kind::Float) / &mass));
                    out.mass.push((name.clone(), mass));
                    term
                }
            };
            let weight = w.of(TargetKind::from_name(name)?);
            total += &term * weight;
            if let Some(o) = objective.as_mut() {
                *o = &*o + &term * (weight * scale);
            }
            out.terms.push((name.clone(), term));
        }
        out.terms.push(("recon".to_string(), recon_loss));
        out.objective = objective.unwrap_or_else(|| total.shallow_clone());
        out.total = total;
        Ok(out)
    }
}

/// [B, C, d, h, w] -> [B, N, C]: the bottleneck as memory tokens.
fn tokens(bottleneck: &Tensor) -> Tensor {
    bottleneck.flatten(2, -1).transpose(1, 2)
}

/// Every rank's rows of `x` [B, D] in rank order [W x B, D]; this rank's
/// block is `x` itself (differentiable), the others are constants.
fn gather_rows(d: &Dist, x: &Tensor) -> Result<Tensor> {
    let all = d.all_gather(x)?;
    let mut parts: Vec<Tensor> = (0..d.world_size as i64).map(|r| all.get(r)).collect();
    parts[d.rank] = x.shallow_clone();
    Ok(Tensor::cat(&parts, 0))
}

// tch's `autocast` turns CUDA autocast on at libtorch's default dtype,
// float16; bfloat16 needs `at::autocast::set_autocast_dtype`, which tch does
// not wrap. Both functions are exported by libtorch_cpu (already linked);
// DeviceType and ScalarType are int8 enums passed by value.
extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_autocast_get_autocast_dtype(device_type: i8) -> i8;
}

/// c10::DeviceType::CUDA.
const DEVICE_CUDA: i8 = 1;
/// c10::ScalarType::BFloat16.
const SCALAR_BF16: i8 = 15;

/// Makes CUDA autocast (on this thread) compute in bfloat16.
pub fn use_bf16_autocast() {
    // SAFETY: plain value arguments; the setter only stores the dtype.
    unsafe { at_autocast_set_autocast_dtype(DEVICE_CUDA, SCALAR_BF16) }
}

/// Whether CUDA autocast would compute in bfloat16 on this thread.
pub fn bf16_autocast_set() -> bool {
    // SAFETY: a getter of a stored enum value.
    unsafe { at_autocast_get_autocast_dtype(DEVICE_CUDA) == SCALAR_BF16 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backbone_keys_are_all_but_the_head_and_the_metrics() {
        for k in [
            "swinViT.layers1.0.blocks.0.attn.qkv.weight",
            "encoder1.layer.conv1.conv.weight",
            "out.conv.conv.bias",
            "psatx.y",
            "alignment.w",
        ] {
            assert!(Pretrainer::is_backbone_key(k), "{k}");
        }
        for k in ["psat.queries", "pool.plane_slice_embed.weight", "align.text.metric"] {
            assert!(!Pretrainer::is_backbone_key(k), "{k}");
        }
    }

    #[test]
    fn autocast_dtype_becomes_bf16() {
        // The default CUDA autocast dtype is float16 (c10::ScalarType 5).
        std::thread::spawn(|| {
            assert!(!bf16_autocast_set());
            use_bf16_autocast();
            assert!(bf16_autocast_set());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn bins_follow_the_psat_rule() {
        let cfg = PsatConfig {
            bins: 4,
            ..Default::default()
        };
        assert_eq!(slice_bins(&cfg, &[0.0, 0.26, 0.99, 1.0], &[]), vec![0, 1, 3, 3]);
        let cfg = PsatConfig {
            bins: 4,
            bin_mode: BinMode::IndexDiv2,
            ..Default::default()
        };
        assert_eq!(slice_bins(&cfg, &[], &[0, 3, 7, 40]), vec![0, 1, 3, 3]);
    }
}
