//! Reorientation to RAS+ by axis permutation and flips only (no
//! interpolation), as nibabel's `as_closest_canonical` and MONAI's
//! `Orientation(axcodes="RAS")` do.
use anyhow::{Context, Result};
use ndarray::Axis;

use super::affine::{identity4, io_orientation, matmul4};
use super::Volume;

/// For each output (RAS) axis: the input axis it comes from and whether that
/// axis is flipped.
pub fn ras_transform(vol: &Volume) -> Result<[(usize, bool); 3]> {
    let ornt = io_orientation(&vol.affine).context("cannot orient a volume with a singular affine")?;
    let mut out = [(usize::MAX, false); 3];
    for (in_ax, &(world_ax, sign)) in ornt.iter().enumerate() {
        out[world_ax] = (in_ax, sign < 0);
    }
    Ok(out)
}

/// Returns `vol` reoriented so that its array axes run R, A, S.
pub fn to_ras(vol: &Volume) -> Result<Volume> {
    let tr = ras_transform(vol)?;
    Ok(apply(vol, &tr))
}

/// Applies a permutation/flip from `ras_transform` (so a label can follow
/// its image exactly).
pub fn apply(vol: &Volume, tr: &[(usize, bool); 3]) -> Volume {
    if tr.iter().enumerate().all(|(a, &(i, f))| a == i && !f) {
        return vol.clone();
    }
    let mut view = vol.data.view();
    for &(in_ax, flip) in tr {
        if flip {
            view.invert_axis(Axis(in_ax));
        }
    }
    let permuted = view.permuted_axes([tr[0].0, tr[1].0, tr[2].0]);
    let data = permuted.as_standard_layout().into_owned();
    Volume {
        data,
        affine: matmul4(&vol.affine, &index_map(vol.shape(), tr)),
    }
}

/// `apply` taking the volume: when the axes keep their order (flips only,
/// the common case of LPS/LAS scans) the voxels are flipped in place, with
/// no second full-size array; otherwise as `apply`.
pub fn apply_owned(mut vol: Volume, tr: &[(usize, bool); 3]) -> Volume {
    let shape = vol.shape();
    let permutes = tr.iter().enumerate().any(|(a, &(i, _))| a != i);
    let Some(data) = vol.data.as_slice_mut().filter(|_| !permutes) else {
        return apply(&vol, tr);
    };
    flip_in_place(data, shape, [tr[0].1, tr[1].1, tr[2].1]);
    vol.affine = matmul4(&vol.affine, &index_map(shape, tr));
    vol
}

/// Reverses the chosen axes of a C-order (nx, ny, nz) array in place, by
/// swapping whole contiguous runs where the axis allows.
fn flip_in_place(data: &mut [f32], [nx, ny, nz]: [usize; 3], [fx, fy, fz]: [bool; 3]) {
    let plane = ny * nz;
    if fx {
        for i in 0..nx / 2 {
            let (lo, hi) = data.split_at_mut((nx - 1 - i) * plane);
            lo[i * plane..(i + 1) * plane].swap_with_slice(&mut hi[..plane]);
        }
    }
    if fy || fz {
        for p in data.chunks_exact_mut(plane) {
            if fy {
                for j in 0..ny / 2 {
                    let (lo, hi) = p.split_at_mut((ny - 1 - j) * nz);
                    lo[j * nz..(j + 1) * nz].swap_with_slice(&mut hi[..nz]);
                }
            }
            if fz {
                p.chunks_exact_mut(nz).for_each(|row| row.reverse());
            }
        }
    }
}

/// The index transform of a permutation/flip: new voxel index o maps to old
/// index old[i] = flip ? n_i - 1 - o[a] : o[a].
fn index_map(in_shape: [usize; 3], tr: &[(usize, bool); 3]) -> [[f64; 4]; 4] {
    let mut t = identity4();
    t[0][0] = 0.0;
    t[1][1] = 0.0;
    t[2][2] = 0.0;
    for (a, &(i, flip)) in tr.iter().enumerate() {
        if flip {
            t[i][a] = -1.0;
            t[i][3] = in_shape[i] as f64 - 1.0;
        } else {
            t[i][a] = 1.0;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::affine::apply4;
    use ndarray::Array3;

    #[test]
    fn reoriented_voxels_keep_their_world_position() {
        // LPS-ish, permuted: i -> -y, j -> +z, k -> -x
        let affine = [
            [0.0, 0.0, -1.5, 10.0],
            [-2.0, 0.0, 0.0, 20.0],
            [0.0, 3.0, 0.0, -5.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let data = Array3::from_shape_fn((4, 5, 6), |(i, j, k)| (i * 100 + j * 10 + k) as f32);
        let vol = Volume { data, affine };
        let ras = to_ras(&vol).unwrap();
        // flips only, in place, equal to the copying way
        let flips = ras_transform(&vol).unwrap().map(|(_, f)| f);
        let tr = [(0, flips[0]), (1, flips[1]), (2, flips[2])];
        for t in [
            tr,
            [(0, true), (1, false), (2, false)],
            [(0, false), (1, true), (2, true)],
        ] {
            let (a, b) = (apply(&vol, &t), apply_owned(vol.clone(), &t));
            assert_eq!((a.data, a.affine), (b.data, b.affine), "{t:?}");
        }
        assert_eq!(ras.orientation().unwrap(), "RAS");
        assert_eq!(ras.shape(), [6, 4, 5]);
        for (idx, &v) in ras.data.indexed_iter() {
            let w = apply4(&ras.affine, [idx.0 as f64, idx.1 as f64, idx.2 as f64]);
            let (i, j, k) = ((v / 100.0) as usize, ((v as usize) / 10) % 10, (v as usize) % 10);
            let w0 = apply4(&vol.affine, [i as f64, j as f64, k as f64]);
            for d in 0..3 {
                assert!((w[d] - w0[d]).abs() < 1e-9);
            }
        }
    }
}
