//! What data-parallel training does with a group, DDP's way: every rank
//! starts from rank 0's parameters and buffers, and before each optimiser
//! step the gradients are averaged over ranks in buckets (flatten ~25 MB
//! of gradients, all-reduce, divide by the world size, copy back), so every
//! rank takes the same step.
use anyhow::{Context, Result};
use tch::Tensor;

use super::Dist;

/// DDP's default bucket size.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Replaces every variable of `vars` (parameters and buffers, any order:
/// they are visited by name) with rank 0's values.
pub fn broadcast_variables(dist: &Dist, vars: &[(String, Tensor)]) -> Result<()> {
    let mut vars: Vec<&(String, Tensor)> = vars.iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in vars {
        tch::no_grad(|| dist.broadcast(t, 0)).with_context(|| format!("broadcasting {name} from rank 0"))?;
    }
    Ok(())
}

/// Averages the gradients of `params` over the ranks (all ranks must pass
/// the same names in the same order). A gradient that is undefined on this
/// rank counts as zeros and is defined afterwards.
pub fn average_gradients(dist: &Dist, params: &[(String, Tensor)], bucket_bytes: usize) -> Result<()> {
    let mut start = 0;
    while start < params.len() {
        let kind = params[start].1.kind();
        let mut end = start;
        let mut bytes = 0usize;
        while end < params.len() && params[end].1.kind() == kind && (end == start || bytes < bucket_bytes) {
            bytes += params[end].1.numel() * params[end].1.kind().elt_size_in_bytes();
            end += 1;
        }
        reduce_bucket(dist, &params[start..end]).with_context(|| {
            format!(
                "averaging the gradients of {} .. {}",
                params[start].0,
                params[end - 1].0
            )
        })?;
        start = end;
    }
    Ok(())
}

fn reduce_bucket(dist: &Dist, bucket: &[(String, Tensor)]) -> Result<()> {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = bucket
            .iter()
            .map(|(_, p)| {
                let g = p.grad();
                if g.defined() {
                    g.reshape([-1])
                } else {
                    Tensor::zeros([p.numel() as i64], (p.kind(), p.device()))
                }
            })
            .collect();
        let flat = Tensor::cat(&grads, 0);
        dist.all_reduce_sum(&flat)?;
        let flat = flat / dist.world_size as f64;
        let mut at = 0i64;
        for (_, p) in bucket {
            let n = p.numel() as i64;
            let avg = flat.narrow(0, at, n).view_as(p);
            at += n;
            let mut g = p.grad();
            if g.defined() {
                g.copy_(&avg);
            } else {
                super::set_grad(p, &avg.copy())?;
            }
        }
        Ok(())
    })
}
