//! How well two sets of embeddings are aligned, row i of one with row i of
//! the other: retrieval ranks (over all rows, or among the candidates a
//! rule admits), the modality gap (Liang et al. 2022, "Mind the Gap": the
//! distance between the centroids of the L2-normalised rows), and what a
//! set of rows tells about each row's plane and position, read out by
//! leave-one-case-out nearest-centroid classification and k-nearest-
//! neighbour regression (Euclidean, as scikit-learn's NearestCentroid and
//! KNeighborsRegressor with uniform weights).
//!
//! Row-major `[n, d]` f32 matrices, rows L2-normalised by the caller
//! (`normalized`); everything is computed in f64. n is the number of
//! evaluated slices (thousands), so O(n^2 d) loops are fine.
use serde::Serialize;

/// `x` [n, d] with each row divided by its norm (a zero row stays zero).
pub fn normalized(x: &[f32], d: usize) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for row in out.chunks_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The median as numpy takes it (the mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        0.5 * (s[m - 1] + s[m])
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Retrieval of row i of `y` by row i of `x`, by cosine similarity.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Retrieval {
    /// Rows that had at least one wrong candidate to beat.
    pub queries: usize,
    /// Mean candidates per query (the right one included).
    pub mean_candidates: f64,
    pub r_at_1: f64,
    pub r_at_5: f64,
    pub median_rank: f64,
    /// The same three for a ranking drawn at random.
    pub chance_r_at_1: f64,
    pub chance_r_at_5: f64,
    pub chance_median_rank: f64,
}

/// The similarities `x[i] . y[j]`, [n, n] row-major (cosines of normalised rows).
pub fn similarity(x: &[f64], y: &[f64], d: usize) -> Vec<f64> {
    let n = x.len() / d;
    let mut out = Vec::with_capacity(n * n);
    for xi in x.chunks(d) {
        out.extend(y.chunks(d).map(|yj| dot(xi, yj)));
    }
    out
}

/// For each query row i of `sim` [n, n] (`similarity`), the rank (1 = best)
/// of column i among the columns j that `candidate(i, j)` admits (j = i
/// always counts); a tie counts against the query. Queries with no other
/// candidate are left out.
pub fn retrieval(sim: &[f64], n: usize, candidate: impl Fn(usize, usize) -> bool) -> Retrieval {
    let (mut ranks, mut sizes) = (Vec::new(), Vec::new());
    for i in 0..n {
        let row = &sim[i * n..(i + 1) * n];
        let own = row[i];
        let (mut size, mut above) = (1usize, 0usize);
        for j in (0..n).filter(|&j| j != i && candidate(i, j)) {
            size += 1;
            if row[j] >= own {
                above += 1;
            }
        }
        if size > 1 {
            ranks.push((above + 1) as f64);
            sizes.push(size as f64);
        }
    }
    let share = |k: f64| mean(&ranks.iter().map(|&r| (r <= k) as u8 as f64).collect::<Vec<_>>());
    Retrieval {
        queries: ranks.len(),
        mean_candidates: mean(&sizes),
        r_at_1: share(1.0),
        r_at_5: share(5.0),
        median_rank: median(&ranks),
        chance_r_at_1: mean(&sizes.iter().map(|s| 1.0 / s).collect::<Vec<_>>()),
        chance_r_at_5: mean(&sizes.iter().map(|s| s.min(5.0) / s).collect::<Vec<_>>()),
        chance_median_rank: median(&sizes.iter().map(|s| (s + 1.0) / 2.0).collect::<Vec<_>>()),
    }
}

/// ||mean(x) - mean(y)||: the distance between the two sets' centroids.
pub fn modality_gap(x: &[f64], y: &[f64], d: usize) -> f64 {
    let n = (x.len() / d) as f64;
    let (mut cx, mut cy) = (vec![0.0; d], vec![0.0; d]);
    for (r, s) in x.chunks(d).zip(y.chunks(d)) {
        for k in 0..d {
            cx[k] += r[k] / n;
            cy[k] += s[k] / n;
        }
    }
    dist2(&cx, &cy).sqrt()
}

/// (mean of the matched similarities sim[i, i], mean over the pairs i != j).
pub fn pair_cosines(sim: &[f64], n: usize) -> (f64, f64) {
    let (mut on, mut off) = (0.0, 0.0);
    for i in 0..n {
        for j in 0..n {
            let c = sim[i * n + j];
            if i == j {
                on += c;
            } else {
                off += c;
            }
        }
    }
    let pairs = (n * n.saturating_sub(1)) as f64;
    (on / n as f64, if pairs > 0.0 { off / pairs } else { f64::NAN })
}

/// Leave-one-case-out nearest-centroid classification of `label` from the
/// rows of `x`: (accuracy, share of the most frequent label among the
/// classified rows). Rows of a case are classified by the centroids of the
/// other cases' rows; a label no other case has cannot be predicted.
pub fn loco_centroid_accuracy(x: &[f64], d: usize, case: &[usize], label: &[i64]) -> (f64, f64) {
    let mut labels: Vec<i64> = label.to_vec();
    labels.sort_unstable();
    labels.dedup();
    let mut cases: Vec<usize> = case.to_vec();
    cases.sort_unstable();
    cases.dedup();
    let (mut right, mut total) = (0usize, 0usize);
    let mut counts = vec![0usize; labels.len()];
    for &c in &cases {
        let mut centroids: Vec<(i64, Vec<f64>)> = Vec::new();
        for &l in &labels {
            let rows: Vec<usize> = (0..case.len()).filter(|&i| case[i] != c && label[i] == l).collect();
            if rows.is_empty() {
                continue;
            }
            let mut m = vec![0.0; d];
            for &i in &rows {
                for k in 0..d {
                    m[k] += x[i * d + k];
                }
            }
            m.iter_mut().for_each(|v| *v /= rows.len() as f64);
            centroids.push((l, m));
        }
        if centroids.is_empty() {
            continue;
        }
        for i in (0..case.len()).filter(|&i| case[i] == c) {
            let xi = &x[i * d..(i + 1) * d];
            let best = centroids
                .iter()
                .map(|(l, m)| (dist2(xi, m), *l))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, l)| l);
            right += (best == Some(label[i])) as usize;
            total += 1;
            counts[labels.binary_search(&label[i]).unwrap_or(0)] += 1;
        }
    }
    let majority = counts.iter().copied().max().unwrap_or(0) as f64 / total.max(1) as f64;
    (right as f64 / total.max(1) as f64, majority)
}

/// Leave-one-case-out k-nearest-neighbour regression of `value` within each
/// `group` (e.g. position within a plane): (mean absolute error, the error
/// of predicting the other cases' mean instead).
pub fn loco_knn_error(x: &[f64], d: usize, case: &[usize], group: &[i64], value: &[f64], k: usize) -> (f64, f64) {
    let (mut err, mut base) = (Vec::new(), Vec::new());
    for i in 0..case.len() {
        let train: Vec<usize> = (0..case.len())
            .filter(|&j| case[j] != case[i] && group[j] == group[i])
            .collect();
        if train.is_empty() {
            continue;
        }
        let xi = &x[i * d..(i + 1) * d];
        let mut near: Vec<(f64, usize)> = train.iter().map(|&j| (dist2(xi, &x[j * d..(j + 1) * d]), j)).collect();
        near.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let kk = k.min(near.len());
        let pred = near[..kk].iter().map(|&(_, j)| value[j]).sum::<f64>() / kk as f64;
        err.push((pred - value[i]).abs());
        base.push((mean(&train.iter().map(|&j| value[j]).collect::<Vec<_>>()) - value[i]).abs());
    }
    (mean(&err), mean(&base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(rows: &[[f32; 2]]) -> Vec<f64> {
        normalized(&rows.iter().flatten().copied().collect::<Vec<_>>(), 2)
    }

    #[test]
    fn identical_sets_retrieve_perfectly_with_no_gap() {
        let x = unit(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]]);
        let r = retrieval(&similarity(&x, &x, 2), 4, |_, _| true);
        assert_eq!((r.queries, r.r_at_1, r.median_rank), (4, 1.0, 1.0));
        assert_eq!(
            (r.chance_r_at_1, r.chance_r_at_5, r.chance_median_rank),
            (0.25, 1.0, 2.5)
        );
        assert!(modality_gap(&x, &x, 2).abs() < 1e-15);
        let (on, _) = pair_cosines(&similarity(&x, &x, 2), 4);
        assert!((on - 1.0).abs() < 1e-12);
    }

    #[test]
    fn reversed_sets_rank_last_and_candidates_restrict() {
        let x = unit(&[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]);
        let y = unit(&[[0.0, 1.0], [0.8, 0.6], [1.0, 0.0]]);
        let sim = similarity(&x, &y, 2);
        let r = retrieval(&sim, 3, |_, _| true);
        // row 0 ranks y0 third, row 1 ranks y1 first, row 2 ranks y2 third
        assert_eq!(r.median_rank, 3.0);
        assert!((r.r_at_1 - 1.0 / 3.0).abs() < 1e-12);
        // only pairs {0, 2}: row 1 has no other candidate
        let r = retrieval(&sim, 3, |i, j| i != 1 && j != 1);
        assert_eq!((r.queries, r.r_at_1, r.median_rank), (2, 0.0, 2.0));
        // a shifted set has a gap of the shift
        let z: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(k, v)| v + if k % 2 == 0 { 0.5 } else { 0.0 })
            .collect();
        assert!((modality_gap(&x, &z, 2) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn leave_one_case_out_readouts() {
        // two clusters by label, three cases: every row classified right
        let x = unit(&[[1.0, 0.1], [0.1, 1.0], [1.0, 0.2], [0.2, 1.0], [1.0, 0.0], [0.0, 1.0]]);
        let case = [0, 0, 1, 1, 2, 2];
        let label = [0, 1, 0, 1, 0, 1];
        assert_eq!(loco_centroid_accuracy(&x, 2, &case, &label), (1.0, 0.5));
        // position = angle: the nearest other case's row predicts it closely
        let pos = [0.1, 0.9, 0.2, 0.8, 0.0, 1.0];
        let (err, base) = loco_knn_error(&x, 2, &case, &[0; 6], &pos, 1);
        assert!(err < 0.15 && base > 0.3, "{err} {base}");
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
