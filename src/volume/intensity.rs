//! Intensity normalisation to [0, 1]: a fixed HU window for CT (MONAI's
//! `ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)`) and a percentile
//! window for MR (`ScaleIntensityRangePercentiles(lower, upper, 0, 1,
//! clip=True)`, percentiles by linear interpolation as numpy's default).
use anyhow::{bail, Result};
use ndarray::Array3;

/// Maps [lo, hi] linearly to [0, 1] and clips.
pub fn scale_window(data: &mut Array3<f32>, lo: f64, hi: f64) -> Result<()> {
    // NaN bounds fail too.
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        bail!("intensity window [{lo}, {hi}] is empty");
    }
    let (lo, inv) = (lo as f32, (1.0 / (hi - lo)) as f32);
    data.mapv_inplace(|v| ((v - lo) * inv).clamp(0.0, 1.0));
    Ok(())
}

/// `np.percentile(values, q)` with linear interpolation, for several q.
pub fn percentiles(data: &Array3<f32>, qs: &[f64]) -> Vec<f64> {
    let mut v: Vec<f32> = data.iter().copied().collect();
    let n = v.len();
    if n == 0 {
        // bounded: one value per quantile asked for
        return vec![0.0; qs.len()];
    }
    qs.iter()
        .map(|&q| {
            let pos = (q / 100.0).clamp(0.0, 1.0) * (n as f64 - 1.0);
            let lo = pos.floor() as usize;
            let frac = pos - lo as f64;
            let (_, &mut a, rest) = v.select_nth_unstable_by(lo, f32::total_cmp);
            let a = f64::from(a);
            if frac == 0.0 || rest.is_empty() {
                a
            } else {
                let b = f64::from(rest.iter().copied().fold(f32::INFINITY, f32::min));
                a + (b - a) * frac
            }
        })
        .collect()
}

/// Percentile window: returns the (lo, hi) intensities that were used.
pub fn scale_percentiles(data: &mut Array3<f32>, lower: f64, upper: f64) -> Result<(f64, f64)> {
    if !(0.0..=100.0).contains(&lower) || !(0.0..=100.0).contains(&upper) || lower >= upper {
        bail!("percentiles ({lower}, {upper}) must satisfy 0 <= lower < upper <= 100");
    }
    let p = percentiles(data, &[lower, upper]);
    let (lo, hi) = (p[0], p[1]);
    if hi > lo {
        scale_window(data, lo, hi)?;
    } else {
        // A constant image: MONAI's ScaleIntensityRange maps it to b_min.
        data.fill(0.0);
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let d = Array3::from_shape_vec((1, 1, 5), vec![4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        // np.percentile([1,2,3,4,5], [0, 10, 50, 99.5]) = [1, 1.4, 3, 4.98]
        let p = percentiles(&d, &[0.0, 10.0, 50.0, 99.5]);
        for (a, b) in p.iter().zip([1.0, 1.4, 3.0, 4.98]) {
            assert!((a - b).abs() < 1e-12, "{p:?}");
        }
    }

    #[test]
    fn ct_window_clips() {
        let mut d = Array3::from_shape_vec((1, 1, 4), vec![-2000.0, -1000.0, 0.0, 3000.0]).unwrap();
        scale_window(&mut d, -1000.0, 1000.0).unwrap();
        assert_eq!(d.as_slice().unwrap(), &[0.0, 0.0, 0.5, 1.0]);
    }
}
