//! Spatial cropping and padding that keep the affine true: foreground
//! bounding box (MONAI's `CropForeground`), symmetric pad + centre crop to a
//! fixed size (`ResizeWithPadOrCrop`), and resize (trilinear,
//! align_corners=False, as `torch.nn.functional.interpolate`).
use anyhow::{bail, Result};
use ndarray::{s, Array3};

use super::affine::{apply4, Mat4};
use super::resample::{interp_axes, Interp};
use super::Volume;

/// Half-open box [start, end) per axis.
pub type BBox = [(usize, usize); 3];

/// Bounding box of voxels strictly above `threshold`; None when there are
/// none.
pub fn foreground_bbox(data: &Array3<f32>, threshold: f32) -> Option<BBox> {
    let sh = data.shape();
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let mut any = false;
    for ((i, j, k), &v) in data.indexed_iter() {
        if v > threshold {
            any = true;
            let idx = [i, j, k];
            for a in 0..3 {
                lo[a] = lo[a].min(idx[a]);
                hi[a] = hi[a].max(idx[a] + 1);
            }
        }
    }
    let _ = sh;
    any.then(|| [(lo[0], hi[0]), (lo[1], hi[1]), (lo[2], hi[2])])
}

fn shift_origin(affine: &Mat4, start: [f64; 3]) -> Mat4 {
    let o = apply4(affine, start);
    let mut a = *affine;
    for r in 0..3 {
        a[r][3] = o[r];
    }
    a
}

/// Crops to `bbox` (which must lie inside the volume).
pub fn crop(vol: &Volume, bbox: &BBox) -> Volume {
    let d = vol
        .data
        .slice(s![bbox[0].0..bbox[0].1, bbox[1].0..bbox[1].1, bbox[2].0..bbox[2].1])
        .to_owned();
    let start = [bbox[0].0 as f64, bbox[1].0 as f64, bbox[2].0 as f64];
    Volume {
        data: d,
        affine: shift_origin(&vol.affine, start),
    }
}

/// The (pad_before, crop_start) per axis that `ResizeWithPadOrCrop`
/// (symmetric padding, then a centre crop) applies to reach `roi`.
pub fn pad_crop_plan(shape: [usize; 3], roi: [usize; 3]) -> [(usize, usize); 3] {
    std::array::from_fn(|a| {
        let pad_before = roi[a].saturating_sub(shape[a]) / 2;
        let padded = shape[a].max(roi[a]);
        let crop_start = (padded / 2).saturating_sub(roi[a] / 2);
        (pad_before, crop_start)
    })
}

/// Symmetric zero padding then a centre crop, to exactly `roi`.
pub fn pad_or_crop(vol: &Volume, roi: [usize; 3]) -> Volume {
    let shape = vol.shape();
    let plan = pad_crop_plan(shape, roi);
    let mut out = Array3::<f32>::zeros(roi);
    // output index o corresponds to input index o + crop_start - pad_before
    let mut src = [(0usize, 0usize); 3];
    let mut dst = [(0usize, 0usize); 3];
    let mut origin = [0f64; 3];
    for a in 0..3 {
        let (pad, cs) = plan[a];
        let off = cs as i64 - pad as i64; // input = output + off
        origin[a] = off as f64;
        let o0 = (-off).max(0) as usize;
        let o1 = ((shape[a] as i64 - off).min(roi[a] as i64)).max(o0 as i64) as usize;
        dst[a] = (o0, o1);
        src[a] = ((o0 as i64 + off) as usize, (o1 as i64 + off) as usize);
    }
    out.slice_mut(s![dst[0].0..dst[0].1, dst[1].0..dst[1].1, dst[2].0..dst[2].1])
        .assign(
            &vol.data
                .slice(s![src[0].0..src[0].1, src[1].0..src[1].1, src[2].0..src[2].1]),
        );
    Volume {
        data: out,
        affine: shift_origin(&vol.affine, origin),
    }
}

/// Resizes to `shape` (half-pixel centres, as interpolate(align_corners=False)).
pub fn resize(vol: &Volume, shape: [usize; 3], interp: Interp) -> Result<Volume> {
    if shape.contains(&0) {
        bail!("cannot resize to an empty shape {shape:?}");
    }
    let in_shape = vol.shape();
    let tables = std::array::from_fn(|a| {
        let n_in = in_shape[a];
        let scale = n_in as f64 / shape[a] as f64;
        Some(
            (0..shape[a])
                .map(|j| match interp {
                    Interp::Nearest => {
                        // torch 'nearest': floor(j * scale)
                        let i = ((j as f64 * scale).floor() as usize).min(n_in - 1);
                        (i, i, 0.0)
                    }
                    Interp::Linear => {
                        let s = ((j as f64 + 0.5) * scale - 0.5).max(0.0);
                        let i0 = (s.floor() as usize).min(n_in - 1);
                        let i1 = (i0 + 1).min(n_in - 1);
                        (i0, i1, (s - i0 as f64) as f32)
                    }
                })
                .collect(),
        )
    });
    let data = interp_axes(&vol.data, &tables)?;
    let mut affine = vol.affine;
    let scale: [f64; 3] = std::array::from_fn(|a| in_shape[a] as f64 / shape[a] as f64);
    let origin: [f64; 3] = std::array::from_fn(|a| (scale[a] - 1.0) / 2.0);
    let o = apply4(&vol.affine, origin);
    for r in 0..3 {
        for c in 0..3 {
            affine[r][c] = vol.affine[r][c] * scale[c];
        }
        affine[r][3] = o[r];
    }
    Ok(Volume { data, affine })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::affine::identity4;

    #[test]
    fn pad_crop_plan_matches_monai_centre_rule() {
        // pad 5 -> 8: before = 1; crop 9 -> 4: start = 9/2 - 4/2 = 2
        assert_eq!(pad_crop_plan([5, 9, 4], [8, 4, 4]), [(1, 0), (0, 2), (0, 0)]);
    }

    #[test]
    fn pad_or_crop_moves_voxels_and_origin_together() {
        let data = Array3::from_shape_fn((5, 9, 4), |(i, j, k)| (i * 100 + j * 10 + k) as f32 + 1.0);
        let vol = Volume {
            data,
            affine: identity4(),
        };
        let out = pad_or_crop(&vol, [8, 4, 4]);
        assert_eq!(out.data[[0, 0, 0]], 0.0); // padding
        assert_eq!(out.data[[1, 0, 0]], 21.0); // input (0, 2, 0)
        assert_eq!(out.affine[0][3], -1.0);
        assert_eq!(out.affine[1][3], 2.0);
    }

    #[test]
    fn foreground_bbox_is_half_open() {
        let mut d = Array3::<f32>::zeros((4, 4, 4));
        d[[1, 2, 3]] = 1.0;
        d[[2, 2, 1]] = 0.5;
        assert_eq!(foreground_bbox(&d, 0.0), Some([(1, 3), (2, 3), (1, 4)]));
        assert_eq!(foreground_bbox(&Array3::zeros((2, 2, 2)), 0.0), None);
    }
}
