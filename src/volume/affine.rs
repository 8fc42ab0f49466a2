//! Small dense linear algebra on 3x3 / 4x4 voxel-to-world affines, and the
//! orientation logic nibabel uses (`io_orientation`, `aff2axcodes`).

/// A 4x4 homogeneous voxel-to-world matrix, row-major, in RAS+ millimetres.
pub type Mat4 = [[f64; 4]; 4];
pub type Mat3 = [[f64; 3]; 3];

pub fn identity4() -> Mat4 {
    let mut m = [[0.0; 4]; 4];
    for (i, row) in m.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    m
}

pub fn matmul4(a: &Mat4, b: &Mat4) -> Mat4 {
    let mut c = [[0.0; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            c[i][j] = (0..4).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    c
}

pub fn matmul3(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut c = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            c[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    c
}

pub fn transpose3(a: &Mat3) -> Mat3 {
    let mut t = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            t[i][j] = a[j][i];
        }
    }
    t
}

pub fn apply4(m: &Mat4, p: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (i, o) in out.iter_mut().enumerate() {
        *o = m[i][0] * p[0] + m[i][1] * p[1] + m[i][2] * p[2] + m[i][3];
    }
    out
}

pub fn linear_part(m: &Mat4) -> Mat3 {
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            r[i][j] = m[i][j];
        }
    }
    r
}

pub fn det3(m: &Mat3) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Inverse of a 3x3 matrix; `None` when it is (numerically) singular.
pub fn inv3(m: &Mat3) -> Option<Mat3> {
    let d = det3(m);
    let scale = m.iter().flatten().fold(0.0f64, |a, v| a.max(v.abs()));
    if !d.is_finite() || scale == 0.0 || d.abs() <= 1e-12 * scale.powi(3) {
        return None;
    }
    let mut inv = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            let (r0, r1) = ((j + 1) % 3, (j + 2) % 3);
            let (c0, c1) = ((i + 1) % 3, (i + 2) % 3);
            inv[i][j] = (m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]) / d;
        }
    }
    Some(inv)
}

/// Inverse of an affine 4x4 (last row 0 0 0 1); `None` when singular.
pub fn inv_affine(m: &Mat4) -> Option<Mat4> {
    let r = inv3(&linear_part(m))?;
    let mut out = identity4();
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = r[i][j];
        }
        out[i][3] = -(0..3).map(|k| r[i][k] * m[k][3]).sum::<f64>();
    }
    Some(out)
}

/// Voxel sizes: the Euclidean norms of the affine's first three columns.
pub fn column_norms(m: &Mat4) -> [f64; 3] {
    let mut z = [0.0; 3];
    for (j, zj) in z.iter_mut().enumerate() {
        *zj = (0..3).map(|i| m[i][j] * m[i][j]).sum::<f64>().sqrt();
    }
    z
}

/// Orthogonal polar factor of a non-singular 3x3 matrix (what nibabel gets
/// from the SVD as U V^T), by the Newton iteration R <- (R + R^-T) / 2.
pub fn polar_orthogonal(m: &Mat3) -> Option<Mat3> {
    let mut r = *m;
    for _ in 0..100 {
        let inv_t = transpose3(&inv3(&r)?);
        let mut next = [[0.0; 3]; 3];
        let mut delta: f64 = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                next[i][j] = 0.5 * (r[i][j] + inv_t[i][j]);
                delta = delta.max((next[i][j] - r[i][j]).abs());
            }
        }
        r = next;
        if delta < 1e-14 {
            break;
        }
    }
    Some(r)
}

/// For each voxel axis: which world axis (0=x/R, 1=y/A, 2=z/S) it runs
/// along, and whether it runs in the positive (+1) or negative (-1)
/// direction. Mirrors nibabel's `io_orientation`.
pub fn io_orientation(m: &Mat4) -> Option<[(usize, i8); 3]> {
    let mut rs = linear_part(m);
    let zooms = column_norms(m);
    for j in 0..3 {
        let z = if zooms[j] == 0.0 { 1.0 } else { zooms[j] };
        for row in rs.iter_mut() {
            row[j] /= z;
        }
    }
    let mut r = polar_orthogonal(&rs)?;
    let mut out = [(0usize, 1i8); 3];
    for (in_ax, o) in out.iter_mut().enumerate() {
        let col: [f64; 3] = [r[0][in_ax], r[1][in_ax], r[2][in_ax]];
        let (out_ax, _) =
            col.iter().enumerate().fold(
                (0usize, -1.0f64),
                |best, (i, v)| if v.abs() > best.1 { (i, v.abs()) } else { best },
            );
        if col[out_ax] == 0.0 {
            return None;
        }
        *o = (out_ax, if col[out_ax] < 0.0 { -1 } else { 1 });
        for v in r[out_ax].iter_mut() {
            *v = 0.0;
        }
    }
    Some(out)
}

/// Orientation code such as "RAS" or "LPI" (nibabel's `aff2axcodes`).
pub fn axcodes(m: &Mat4) -> Option<String> {
    const POS: [char; 3] = ['R', 'A', 'S'];
    const NEG: [char; 3] = ['L', 'P', 'I'];
    let o = io_orientation(m)?;
    Some(
        o.iter()
            .map(|&(ax, sign)| if sign > 0 { POS[ax] } else { NEG[ax] })
            .collect(),
    )
}

/// Upper-triangular Cholesky factor U with U^T U = a (a symmetric positive
/// definite), as `np.linalg.cholesky(a).T`.
pub fn cholesky_upper(a: &Mat3) -> Option<Mat3> {
    let mut l = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = a[i][i] - s;
                if d <= 0.0 {
                    return None;
                }
                l[i][j] = d.sqrt();
            } else {
                l[i][j] = (a[i][j] - s) / l[j][j];
            }
        }
    }
    Some(transpose3(&l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_roundtrips() {
        let m: Mat4 = [
            [0.0, -2.0, 0.1, 10.0],
            [1.5, 0.0, 0.0, -3.0],
            [0.0, 0.2, 3.0, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let inv = inv_affine(&m).unwrap();
        let id = matmul4(&m, &inv);
        for i in 0..4 {
            for j in 0..4 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((id[i][j] - want).abs() < 1e-12, "{id:?}");
            }
        }
    }

    #[test]
    fn axcodes_of_permuted_flipped_affine() {
        // voxel i -> -y (P), j -> +z (S), k -> -x (L)
        let m: Mat4 = [
            [0.0, 0.0, -1.0, 0.0],
            [-2.0, 0.0, 0.0, 0.0],
            [0.0, 3.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert_eq!(axcodes(&m).unwrap(), "PSL");
        assert_eq!(axcodes(&identity4()).unwrap(), "RAS");
    }

    #[test]
    fn singular_affine_has_no_orientation() {
        let mut m = identity4();
        m[2][2] = 0.0;
        m[2][0] = 0.0;
        assert!(inv_affine(&m).is_none());
        assert!(io_orientation(&m).is_none());
    }

    #[test]
    fn cholesky_matches_definition() {
        let a: Mat3 = [[4.0, 2.0, 0.4], [2.0, 5.0, 1.0], [0.4, 1.0, 3.0]];
        let u = cholesky_upper(&a).unwrap();
        let back = matmul3(&transpose3(&u), &u);
        for i in 0..3 {
            for j in 0..3 {
                assert!((back[i][j] - a[i][j]).abs() < 1e-12);
            }
        }
    }
}
