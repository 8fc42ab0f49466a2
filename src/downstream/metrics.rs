//! Downstream metrics with MONAI's semantics, so numbers compare with
//! papers that report MONAI's: per-class Dice (`DiceMetric`,
//! `ignore_empty=True`), the 95th-percentile Hausdorff distance in mm
//! (`HausdorffDistanceMetric(percentile=95)`, symmetric, Euclidean, edge
//! voxels found by 6-neighbour erosion), accuracy, and ROC AUC
//! (`ROCAUCMetric`, one-vs-rest macro average for more than two classes).
//!
//! Empty classes follow MONAI: Dice is NaN when the ground truth lacks the
//! class; HD95 is NaN when the prediction or the ground truth (or both)
//! lacks it. (MONAI's distances are then all infinite, and the percentile
//! of infinities, interpolated by `torch.quantile`, is NaN; only the
//! plain maximum would be infinite.)
use anyhow::{ensure, Result};

/// Dice of class `class` between two label maps of the same length.
pub fn dice(pred: &[u8], gt: &[u8], class: u8) -> f64 {
    let (mut inter, mut p, mut g) = (0u64, 0u64, 0u64);
    for (&a, &b) in pred.iter().zip(gt) {
        let (a, b) = (a == class, b == class);
        p += a as u64;
        g += b as u64;
        inter += (a && b) as u64;
    }
    if g == 0 {
        return f64::NAN;
    }
    2.0 * inter as f64 / (p + g) as f64
}

/// Voxels of `mask` with a 6-neighbour outside it (outside the grid counts
/// as background), as `binary_erosion(mask) ^ mask` in scipy.
fn edges(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = shape;
    let at = |x: usize, y: usize, z: usize| mask[(x * ny + y) * nz + z];
    let mut out = vec![false; mask.len()];
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                if !at(x, y, z) {
                    continue;
                }
                let interior = x > 0
                    && x + 1 < nx
                    && y > 0
                    && y + 1 < ny
                    && z > 0
                    && z + 1 < nz
                    && at(x - 1, y, z)
                    && at(x + 1, y, z)
                    && at(x, y - 1, z)
                    && at(x, y + 1, z)
                    && at(x, y, z - 1)
                    && at(x, y, z + 1);
                out[(x * ny + y) * nz + z] = !interior;
            }
        }
    }
    out
}

/// One axis of the Felzenszwalb-Huttenlocher squared distance transform:
/// `f` holds squared distances (infinite where unknown), sampled every
/// `step` mm; replaced by the lower envelope of the parabolas.
fn edt_1d(f: &mut [f64], step: f64, v: &mut Vec<usize>, z: &mut Vec<f64>, out: &mut Vec<f64>) {
    let n = f.len();
    v.clear();
    z.clear();
    let pos = |i: usize| i as f64 * step;
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        loop {
            let Some(&p) = v.last() else {
                v.push(q);
                z.push(f64::NEG_INFINITY);
                break;
            };
            let s = ((f[q] + pos(q) * pos(q)) - (f[p] + pos(p) * pos(p))) / (2.0 * (pos(q) - pos(p)));
            if s <= z[z.len() - 1] {
                v.pop();
                z.pop();
                continue;
            }
            v.push(q);
            z.push(s);
            break;
        }
    }
    if v.is_empty() {
        return;
    }
    out.clear();
    let mut k = 0;
    for q in 0..n {
        while k + 1 < v.len() && z[k + 1] < pos(q) {
            k += 1;
        }
        let d = pos(q) - pos(v[k]);
        out.push(d * d + f[v[k]]);
    }
    f.copy_from_slice(out);
}

/// Squared Euclidean distance (mm^2) from every voxel to the nearest `true`
/// voxel of `features`; infinite everywhere when there is none.
fn squared_edt(features: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut d: Vec<f64> = features.iter().map(|&f| if f { 0.0 } else { f64::INFINITY }).collect();
    let strides = [shape[1] * shape[2], shape[2], 1];
    let (mut v, mut z, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for axis in 0..3 {
        let n = shape[axis];
        let mut line = vec![0.0; n];
        let others: Vec<usize> = (0..3).filter(|&a| a != axis).collect();
        for i in 0..shape[others[0]] {
            for j in 0..shape[others[1]] {
                let base = i * strides[others[0]] + j * strides[others[1]];
                for (k, l) in line.iter_mut().enumerate() {
                    *l = d[base + k * strides[axis]];
                }
                edt_1d(&mut line, spacing[axis], &mut v, &mut z, &mut out);
                for (k, l) in line.iter().enumerate() {
                    d[base + k * strides[axis]] = *l;
                }
            }
        }
    }
    d
}

/// `torch.quantile` (linear interpolation) of unsorted values.
fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(values.len() - 1);
    let (a, b) = (values[lo], values[hi]);
    if a == b {
        return a;
    }
    a + (b - a) * (pos - lo as f64)
}

/// The `percentile`-th percentile symmetric Hausdorff distance (mm) between
/// the surfaces of class `class` in two label maps of shape `shape`
/// (C order) with voxel `spacing` (mm).
pub fn hausdorff(
    pred: &[u8],
    gt: &[u8],
    shape: [usize; 3],
    spacing: [f64; 3],
    class: u8,
    percentile: f64,
) -> Result<f64> {
    let n: usize = shape.iter().product();
    ensure!(
        pred.len() == n && gt.len() == n,
        "label maps of {} and {} voxels for shape {shape:?}",
        pred.len(),
        gt.len()
    );
    // Work inside the bounding box of both masks plus a one-voxel margin
    // (MONAI crops the same way); distances do not change.
    let mut lo = shape;
    let mut hi = [0usize; 3];
    let mut any = false;
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                let i = (x * shape[1] + y) * shape[2] + z;
                if pred[i] == class || gt[i] == class {
                    any = true;
                    for (a, c) in [x, y, z].into_iter().enumerate() {
                        lo[a] = lo[a].min(c);
                        hi[a] = hi[a].max(c + 1);
                    }
                }
            }
        }
    }
    if !any {
        return Ok(f64::NAN);
    }
    let lo: Vec<usize> = lo.iter().map(|&l| l.saturating_sub(1)).collect();
    let hi: Vec<usize> = hi.iter().zip(shape).map(|(&h, s)| (h + 1).min(s)).collect();
    let sub = [hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]];
    let mut pm = Vec::with_capacity(sub.iter().product());
    let mut gm = Vec::with_capacity(pm.capacity());
    for x in lo[0]..hi[0] {
        for y in lo[1]..hi[1] {
            for z in lo[2]..hi[2] {
                let i = (x * shape[1] + y) * shape[2] + z;
                pm.push(pred[i] == class);
                gm.push(gt[i] == class);
            }
        }
    }
    let (pe, ge) = (edges(&pm, sub), edges(&gm, sub));
    let (p_any, g_any) = (pe.iter().any(|&b| b), ge.iter().any(|&b| b));
    if !p_any || !g_any {
        return Ok(f64::NAN);
    }
    let directed = |from: &[bool], to: &[bool]| -> f64 {
        let d2 = squared_edt(to, sub, spacing);
        let d: Vec<f64> = from
            .iter()
            .zip(&d2)
            .filter(|(f, _)| **f)
            .map(|(_, d)| d.sqrt())
            .collect();
        quantile(d, percentile / 100.0)
    };
    Ok(directed(&pe, &ge).max(directed(&ge, &pe)))
}

/// Fraction of cases whose arg-max class is the true class.
pub fn accuracy(probs: &[Vec<f64>], truth: &[usize]) -> f64 {
    if truth.is_empty() {
        return f64::NAN;
    }
    let right = probs.iter().zip(truth).filter(|(p, &t)| argmax(p) == t).count();
    right as f64 / truth.len() as f64
}

pub fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = i;
        }
    }
    best
}

/// Area under the ROC curve of scores for binary truths (ties count one
/// half, as the trapezoidal rule does); NaN when only one kind is present.
pub fn binary_auc(scores: &[f64], positive: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Mid-ranks over tied scores, then Mann-Whitney U.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = mid;
        }
        i = j + 1;
    }
    let n_pos = positive.iter().filter(|&&p| p).count() as f64;
    let n_neg = positive.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return f64::NAN;
    }
    let rank_sum: f64 = ranks.iter().zip(positive).filter(|(_, &p)| p).map(|(r, _)| r).sum();
    (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
}

/// One-vs-rest ROC AUC per class and their mean (MONAI's `average="macro"`;
/// NaN when a class never or always occurs).
pub fn macro_auc(probs: &[Vec<f64>], truth: &[usize], num_classes: usize) -> (Vec<f64>, f64) {
    let per: Vec<f64> = (0..num_classes)
        .map(|c| {
            let s: Vec<f64> = probs.iter().map(|p| p.get(c).copied().unwrap_or(f64::NAN)).collect();
            let pos: Vec<bool> = truth.iter().map(|&t| t == c).collect();
            binary_auc(&s, &pos)
        })
        .collect();
    let mean = per.iter().sum::<f64>() / per.len().max(1) as f64;
    (per, mean)
}

/// Mean and (population) standard deviation of the finite values, and how
/// many there were; NaN for both when there are none.
pub fn mean_std(values: &[f64]) -> (f64, f64, usize) {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, 0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt(), v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hausdorff_of_two_points_is_their_distance() {
        let shape = [5, 1, 1];
        let pred = [1, 0, 0, 0, 0];
        let gt = [0, 0, 0, 1, 0];
        let d = hausdorff(&pred, &gt, shape, [2.0, 1.0, 1.0], 1, 95.0).unwrap();
        assert!((d - 6.0).abs() < 1e-12, "{d}");
        assert!(hausdorff(&pred, &[0; 5], shape, [1.0; 3], 1, 95.0).unwrap().is_nan());
        assert!(hausdorff(&pred, &gt, shape, [1.0; 3], 2, 95.0).unwrap().is_nan());
    }

    #[test]
    fn auc_counts_ties_as_half() {
        assert_eq!(binary_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), 0.75);
        assert_eq!(binary_auc(&[0.5, 0.5], &[false, true]), 0.5);
        assert!(binary_auc(&[0.5, 0.5], &[true, true]).is_nan());
    }
}
