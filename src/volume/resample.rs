//! Resampling to a target voxel spacing, with the output grid MONAI's
//! `Spacing` chooses (same direction cosines, new zooms, corner-anchored
//! origin, shape round(extent / spacing) + 1) and its sampling rule: each
//! output voxel centre is mapped into the input's voxel coordinates and
//! interpolated there, coordinates clamped to the border.
//!
//! When the input-to-output voxel map is axis-aligned (always the case after
//! reorientation to RAS of a non-sheared affine) trilinear interpolation is
//! done as three 1-D passes, which is exact and much cheaper.
use anyhow::{bail, Context, Result};
use ndarray::Array3;

use super::affine::{
    apply4, cholesky_upper, column_norms, identity4, inv3, inv_affine, linear_part, matmul3, matmul4, transpose3, Mat4,
};
use super::Volume;

/// MONAI's tolerance for "already at the target spacing".
const AFFINE_TOL: f64 = 1e-3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interp {
    /// Trilinear (images).
    Linear,
    /// Nearest neighbour, ties to even (labels), as grid_sample does.
    Nearest,
}

/// The most voxels `target_grid` will lay out: far beyond any real scan at a
/// sensible spacing, so a larger grid means an implausible affine (voxels
/// kilometres wide), which is reported instead of an allocation that aborts
/// the whole batch.
pub const MAX_GRID_VOXELS: usize = 1 << 31;

/// The output affine and shape MONAI's `Spacing(pixdim, diagonal=False)`
/// produces for an input affine and shape.
pub fn target_grid(affine: &Mat4, shape: [usize; 3], pixdim: [f64; 3]) -> Result<(Mat4, [usize; 3])> {
    if pixdim.iter().any(|p| !p.is_finite() || *p <= 0.0) {
        bail!("target spacing {pixdim:?} must be positive");
    }
    let orig = column_norms(affine);
    let mut out_d = pixdim;
    for a in 0..3 {
        if (orig[a] - pixdim[a]).abs() <= AFFINE_TOL {
            out_d[a] = orig[a];
        }
    }
    let rzs = linear_part(affine);
    let zs = cholesky_upper(&matmul3(&transpose3(&rzs), &rzs)).context("affine is singular")?;
    let rotation = matmul3(&rzs, &inv3(&zs).context("affine is singular")?);
    let mut new = identity4();
    for i in 0..3 {
        for j in 0..3 {
            new[i][j] = rotation[i][j] * zs[j][j].signum() * out_d[j];
        }
    }
    let to_out = matmul4(&inv_affine(&new).context("target affine is singular")?, affine);
    // bounded: the 8 corners of a grid
    let (mut out_corners, mut world_corners) = (Vec::with_capacity(8), Vec::with_capacity(8));
    for c in 0..8 {
        let p = [
            if c & 1 != 0 { shape[0] as f64 - 1.0 } else { 0.0 },
            if c & 2 != 0 { shape[1] as f64 - 1.0 } else { 0.0 },
            if c & 4 != 0 { shape[2] as f64 - 1.0 } else { 0.0 },
        ];
        out_corners.push(apply4(&to_out, p));
        world_corners.push(apply4(affine, p));
    }
    let mut out_shape = [0usize; 3];
    for a in 0..3 {
        let lo = out_corners.iter().map(|c| c[a]).fold(f64::INFINITY, f64::min);
        let hi = out_corners.iter().map(|c| c[a]).fold(f64::NEG_INFINITY, f64::max);
        out_shape[a] = ((hi - lo) + 1.0).round_ties_even().max(1.0) as usize;
    }
    let voxels = out_shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if voxels.is_none_or(|n| n > MAX_GRID_VOXELS) {
        bail!(
            "resampling to {pixdim:?} mm needs a {out_shape:?} grid (more than {MAX_GRID_VOXELS} voxels): \
             the voxel sizes {orig:?} mm in the affine are implausible"
        );
    }
    // Origin at the input corner that is smallest along every output axis;
    // if no corner is, centre the output grid on the input.
    let offset = (0..8)
        .find(|&i| {
            (0..3).all(|a| {
                let m = out_corners
                    .iter()
                    .map(|c| c[a] - out_corners[i][a])
                    .fold(f64::INFINITY, f64::min);
                m.abs() <= 1e-8 // np.allclose(min_corner, 0) with its default atol
            })
        })
        .map(|i| world_corners[i])
        .unwrap_or_else(|| {
            let mut o = [0.0; 3];
            for (r, or) in o.iter_mut().enumerate() {
                *or = affine[r][3]
                    + (0..3)
                        .map(|c| affine[r][c] * shape[c] as f64 / 2.0 - new[r][c] * out_shape[c] as f64 / 2.0)
                        .sum::<f64>();
            }
            o
        });
    for r in 0..3 {
        new[r][3] = offset[r];
    }
    Ok((new, out_shape))
}

/// Resamples `vol` to the given spacing on MONAI's output grid.
pub fn to_spacing(vol: &Volume, pixdim: [f64; 3], interp: Interp) -> Result<Volume> {
    let (affine, shape) = target_grid(&vol.affine, vol.shape(), pixdim)?;
    resample_to(vol, &affine, shape, interp)
}

/// Samples `vol` on the grid (`out_affine`, `out_shape`).
pub fn resample_to(vol: &Volume, out_affine: &Mat4, out_shape: [usize; 3], interp: Interp) -> Result<Volume> {
    let inv = inv_affine(&vol.affine).context("input affine is singular")?;
    let m = matmul4(&inv, out_affine);
    let scale = m
        .iter()
        .take(3)
        .flat_map(|r| r[..3].iter())
        .fold(0.0f64, |a, v| a.max(v.abs()));
    let axis_aligned = (0..3).all(|i| (0..3).all(|j| i == j || m[i][j].abs() <= 1e-9 * scale.max(1.0)));
    let data = if axis_aligned {
        separable(&vol.data, &m, out_shape, interp)?
    } else {
        general(&vol.data, &m, out_shape, interp)?
    };
    Ok(Volume {
        data,
        affine: *out_affine,
    })
}

/// Nearest voxel of a (non-negative) coordinate. Coordinates that are a
/// half-integer up to float error (2.3 * 25 = 57.49999999999999) are snapped
/// first, then ties go to even as in grid_sample, so label resampling does
/// not depend on the last bit of the affine arithmetic.
fn nearest_index(s: f64) -> usize {
    let snapped = (s * 1e6).round() / 1e6;
    snapped.round_ties_even() as usize
}

/// Per output index along one axis: (lower source index, upper, weight).
pub(crate) fn axis_table(
    n_in: usize,
    n_out: usize,
    scale: f64,
    shift: f64,
    interp: Interp,
) -> Vec<(usize, usize, f32)> {
    let hi = n_in as f64 - 1.0;
    (0..n_out)
        .map(|j| {
            let s = (scale * j as f64 + shift).clamp(0.0, hi);
            match interp {
                Interp::Nearest => {
                    let i = nearest_index(s);
                    (i, i, 0.0)
                }
                Interp::Linear => {
                    let i0 = s.floor() as usize;
                    let i1 = (i0 + 1).min(n_in - 1);
                    (i0, i1, (s - i0 as f64) as f32)
                }
            }
        })
        .collect()
}

fn separable(data: &Array3<f32>, m: &Mat4, out_shape: [usize; 3], interp: Interp) -> Result<Array3<f32>> {
    let in_shape = data.shape();
    let tables: AxisTables = std::array::from_fn(|ax| {
        let identity = out_shape[ax] == in_shape[ax] && m[ax][ax] == 1.0 && m[ax][3] == 0.0;
        (!identity).then(|| axis_table(in_shape[ax], out_shape[ax], m[ax][ax], m[ax][3], interp))
    });
    interp_axes(data, &tables)
}

/// One axis's 1-D interpolation: per output index, (lower input index,
/// upper input index, weight of the upper). None: the axis is unchanged.
pub(crate) type AxisTables = [Option<Vec<(usize, usize, f32)>>; 3];

/// Applies 1-D interpolation tables (None: axis unchanged) axis by axis,
/// shrinking axes first so the intermediate arrays stay small.
pub(crate) fn interp_axes(data: &Array3<f32>, tables: &AxisTables) -> Result<Array3<f32>> {
    let in_shape = data.shape().to_vec();
    let out_len = |ax: usize| tables[ax].as_ref().map_or(in_shape[ax], Vec::len);
    let mut order = [0usize, 1, 2];
    order.sort_by(|&a, &b| {
        let ra = out_len(a) as f64 / in_shape[a] as f64;
        let rb = out_len(b) as f64 / in_shape[b] as f64;
        ra.total_cmp(&rb)
    });
    // The input is read in place by the first pass, never copied.
    let mut cur: Option<Array3<f32>> = None;
    for &ax in &order {
        let Some(table) = &tables[ax] else { continue };
        let src = cur.as_ref().unwrap_or(data);
        cur = Some(interp_axis(src, ax, table)?);
    }
    Ok(cur.unwrap_or_else(|| data.clone()))
}

/// One 1-D pass along `ax`. The array is seen in C order as (outer, n, inner)
/// around that axis, so each output line along `ax` is a blend of two
/// contiguous input lines of `inner` values (or, for the last axis, of two
/// values of the same row).
fn interp_axis(src: &Array3<f32>, ax: usize, table: &[(usize, usize, f32)]) -> Result<Array3<f32>> {
    let src = src.as_standard_layout();
    let sh = src.shape();
    let mut out_shape = [sh[0], sh[1], sh[2]];
    out_shape[ax] = table.len();
    let (n_in, n_out) = (sh[ax], table.len());
    let inner: usize = sh[ax + 1..].iter().product();
    let s = src.as_slice().expect("standard layout");
    // The grid's size was checked against the cap by whoever chose it (the
    // preprocess stage, through `crate::alloc`); this only cannot abort.
    let mut out = grid_buffer(out_shape)?;
    if n_in * inner == 0 {
        return Ok(Array3::from_shape_vec(out_shape, out)?);
    }
    let blend = |x: f32, y: f32, w: f32| x + w * (y - x);
    for (s, d) in s.chunks_exact(n_in * inner).zip(out.chunks_exact_mut(n_out * inner)) {
        if inner == 1 {
            for (o, &(i0, i1, w)) in d.iter_mut().zip(table) {
                *o = if w == 0.0 || i0 == i1 {
                    s[i0]
                } else {
                    blend(s[i0], s[i1], w)
                };
            }
            continue;
        }
        for (d, &(i0, i1, w)) in d.chunks_exact_mut(inner).zip(table) {
            let a = &s[i0 * inner..(i0 + 1) * inner];
            if w == 0.0 || i0 == i1 {
                d.copy_from_slice(a);
            } else {
                let b = &s[i1 * inner..(i1 + 1) * inner];
                for ((o, &x), &y) in d.iter_mut().zip(a).zip(b) {
                    *o = blend(x, y, w);
                }
            }
        }
    }
    Ok(Array3::from_shape_vec(out_shape, out)?)
}

/// A zeroed output grid, allocated fallibly.
fn grid_buffer(shape: [usize; 3]) -> Result<Vec<f32>> {
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .with_context(|| format!("a {shape:?} grid is impossibly large"))?;
    Ok(crate::alloc::like_f32("resampling", &format!("a {shape:?} grid"), n)?)
}

fn general(data: &Array3<f32>, m: &Mat4, out_shape: [usize; 3], interp: Interp) -> Result<Array3<f32>> {
    let n = data.shape();
    let hi = [n[0] as f64 - 1.0, n[1] as f64 - 1.0, n[2] as f64 - 1.0];
    let mut out = Array3::from_shape_vec(out_shape, grid_buffer(out_shape)?)?;
    out.indexed_iter_mut().for_each(|((i, j, k), o)| {
        *o = {
            let p = apply4(m, [i as f64, j as f64, k as f64]);
            let s = [p[0].clamp(0.0, hi[0]), p[1].clamp(0.0, hi[1]), p[2].clamp(0.0, hi[2])];
            match interp {
                Interp::Nearest => data[[nearest_index(s[0]), nearest_index(s[1]), nearest_index(s[2])]],
                Interp::Linear => {
                    let i0 = [s[0].floor() as usize, s[1].floor() as usize, s[2].floor() as usize];
                    let f = [s[0] - i0[0] as f64, s[1] - i0[1] as f64, s[2] - i0[2] as f64];
                    let i1 = [
                        (i0[0] + 1).min(n[0] - 1),
                        (i0[1] + 1).min(n[1] - 1),
                        (i0[2] + 1).min(n[2] - 1),
                    ];
                    let mut acc = 0.0f64;
                    for c in 0..8 {
                        let (x, wx) = if c & 1 != 0 { (i1[0], f[0]) } else { (i0[0], 1.0 - f[0]) };
                        let (y, wy) = if c & 2 != 0 { (i1[1], f[1]) } else { (i0[1], 1.0 - f[1]) };
                        let (z, wz) = if c & 4 != 0 { (i1[2], f[2]) } else { (i0[2], 1.0 - f[2]) };
                        let w = wx * wy * wz;
                        if w != 0.0 {
                            acc += w * f64::from(data[[x, y, z]]);
                        }
                    }
                    acc as f32
                }
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_voxel_sizes_are_an_error_not_an_allocation() {
        // 20 m voxels (an affine off by 10^4) resampled to 2.5 mm: ~10^16 voxels.
        let mut a = identity4();
        for (i, row) in a.iter_mut().take(3).enumerate() {
            row[i] = 2e4;
        }
        let e = target_grid(&a, [33, 41, 25], [2.5; 3]).unwrap_err().to_string();
        assert!(
            e.contains("implausible") && e.contains("[256001, 320001, 192001]"),
            "{e}"
        );
        assert_eq!(target_grid(&a, [33, 41, 25], [2e4; 3]).unwrap().1, [33, 41, 25]);
    }

    #[test]
    fn grid_matches_monai_rule_for_diagonal_affine() {
        // 10 voxels of 1 mm -> 2 mm: round(9 / 2 + 1) = round(5.5) = 6 (ties to even),
        // as MONAI gives (checked against monai 1.6.1)
        let mut a = identity4();
        a[0][3] = -4.0;
        let (new, shape) = target_grid(&a, [10, 7, 3], [2.0, 1.0, 1.5]).unwrap();
        assert_eq!(shape, [6, 7, 2]);
        assert_eq!(new[0][0], 2.0);
        assert_eq!(new[0][3], -4.0);
    }

    /// The straightforward form of `interp_axes` (a blend of whole index_axis
    /// views per output index), which the line-based one must match bit for bit.
    fn interp_axes_reference(data: &Array3<f32>, tables: &AxisTables) -> Array3<f32> {
        use ndarray::{Axis, Zip};
        let in_shape = data.shape().to_vec();
        let out_len = |ax: usize| tables[ax].as_ref().map_or(in_shape[ax], Vec::len);
        let mut order = [0usize, 1, 2];
        order.sort_by(|&a, &b| {
            (out_len(a) as f64 / in_shape[a] as f64).total_cmp(&(out_len(b) as f64 / in_shape[b] as f64))
        });
        let mut cur = data.clone();
        for &ax in &order {
            let Some(table) = &tables[ax] else { continue };
            let mut shape = [cur.shape()[0], cur.shape()[1], cur.shape()[2]];
            shape[ax] = table.len();
            let mut out = Array3::<f32>::zeros(shape);
            for (j, &(i0, i1, w)) in table.iter().enumerate() {
                let mut dst = out.index_axis_mut(Axis(ax), j);
                let a = cur.index_axis(Axis(ax), i0);
                if w == 0.0 || i0 == i1 {
                    dst.assign(&a);
                } else {
                    let b = cur.index_axis(Axis(ax), i1);
                    Zip::from(&mut dst)
                        .and(&a)
                        .and(&b)
                        .for_each(|o, &x, &y| *o = x + w * (y - x));
                }
            }
            cur = out;
        }
        cur
    }

    #[test]
    fn line_passes_match_the_reference_bit_for_bit() {
        let data = Array3::from_shape_fn((23, 17, 29), |(i, j, k)| {
            ((i * 7919 + j * 104729 + k * 31) % 1009) as f32 * 0.37 - 100.0
        });
        let vol = Volume {
            data: data.clone(),
            affine: identity4(),
        };
        for (pixdim, interp) in [
            ([1.7, 0.6, 1.3], Interp::Linear),
            ([0.45, 2.2, 1.0], Interp::Linear),
            ([1.0, 1.0, 0.7], Interp::Nearest),
        ] {
            let (aff, shape) = target_grid(&vol.affine, vol.shape(), pixdim).unwrap();
            let m = matmul4(&inv_affine(&vol.affine).unwrap(), &aff);
            let tables: AxisTables = std::array::from_fn(|ax| {
                let identity = shape[ax] == data.shape()[ax] && m[ax][ax] == 1.0 && m[ax][3] == 0.0;
                (!identity).then(|| axis_table(data.shape()[ax], shape[ax], m[ax][ax], m[ax][3], interp))
            });
            let got = interp_axes(&data, &tables).unwrap();
            let want = interp_axes_reference(&data, &tables);
            assert_eq!(got.shape(), want.shape());
            assert!(
                got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{pixdim:?}"
            );
        }
        // a non-standard-layout input is read correctly too
        let t = data.clone().reversed_axes();
        let tables = [
            Some(axis_table(29, 11, 2.5, 0.3, Interp::Linear)),
            None,
            Some(axis_table(23, 40, 0.5, 0.1, Interp::Linear)),
        ];
        let got = interp_axes(&t.to_owned(), &tables).unwrap();
        assert_eq!(
            got,
            interp_axes_reference(&t.as_standard_layout().into_owned(), &tables)
        );
    }

    #[test]
    fn linear_resampling_reproduces_linear_ramps() {
        let a = identity4();
        let data = Array3::from_shape_fn((9, 5, 4), |(i, j, k)| (i as f32) * 2.0 + j as f32 - 0.5 * k as f32);
        let vol = Volume { data, affine: a };
        let out = to_spacing(&vol, [0.5, 2.0, 1.0], Interp::Linear).unwrap();
        assert_eq!(out.shape(), [17, 3, 4]);
        for ((i, j, k), v) in out.data.indexed_iter() {
            let want = (i as f32 * 0.5) * 2.0 + (j as f32 * 2.0) - 0.5 * k as f32;
            assert!((v - want).abs() < 1e-5, "{i} {j} {k}: {v} vs {want}");
        }
        // the general path agrees with the separable one
        let (aff, shape) = target_grid(&vol.affine, vol.shape(), [0.5, 2.0, 1.0]).unwrap();
        let inv = inv_affine(&vol.affine).unwrap();
        let g = general(&vol.data, &matmul4(&inv, &aff), shape, Interp::Linear).unwrap();
        assert!(g.iter().zip(out.data.iter()).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
