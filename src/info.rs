//! `med3d info`: what a file holds, as nibabel would report it (shape, voxel
//! size, datatype, affine, orientation code) plus intensity statistics of the
//! scaled voxels over every volume of the file.
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::volume::{affine, nifti};

#[derive(Debug, Serialize)]
pub struct Info {
    pub path: String,
    pub format: String,
    pub shape: Vec<usize>,
    /// World voxel size (norms of the affine's columns), mm.
    pub spacing: [f64; 3],
    /// The header's pixdim for every dimension (nibabel's `get_zooms()`).
    pub zooms: Vec<f64>,
    pub dtype: String,
    pub affine: [[f64; 4]; 4],
    pub orientation: String,
    pub scl_slope: f64,
    pub scl_inter: f64,
    /// Statistics over the finite scaled voxels.
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    /// Voxels that are NaN or infinite (excluded from the statistics).
    pub nonfinite: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Stats {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    pub nonfinite: usize,
}

/// Min, max, mean and population std (numpy's ddof=0) in f64.
pub fn stats(values: &[f32]) -> Stats {
    let (mut n, mut sum, mut min, mut max, mut bad) = (0usize, 0.0f64, f64::INFINITY, f64::NEG_INFINITY, 0usize);
    for &v in values {
        if v.is_finite() {
            let v = f64::from(v);
            n += 1;
            sum += v;
            min = min.min(v);
            max = max.max(v);
        } else {
            bad += 1;
        }
    }
    if n == 0 {
        return Stats { min: f64::NAN, max: f64::NAN, mean: f64::NAN, std: f64::NAN, nonfinite: bad };
    }
    let mean = sum / n as f64;
    let var = values.iter().filter(|v| v.is_finite()).map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64;
    Stats { min, max, mean, std: var.sqrt(), nonfinite: bad }
}

pub fn info(path: &Path) -> Result<Info> {
    let img = nifti::read(path)?;
    let h = &img.header;
    let aff = h.affine();
    let s = stats(&img.data);
    Ok(Info {
        path: path.display().to_string(),
        format: format!("NIfTI-{}{}", h.version, if h.single_file { "" } else { " (header/image pair)" }),
        shape: img.shape.clone(),
        spacing: affine::column_norms(&aff),
        zooms: (1..=h.dim[0] as usize).map(|i| h.pixdim[i]).collect(),
        dtype: img.dtype.name().to_string(),
        affine: aff,
        orientation: affine::axcodes(&aff).unwrap_or_else(|| "singular".into()),
        scl_slope: h.scl_slope,
        scl_inter: h.scl_inter,
        min: s.min,
        max: s.max,
        mean: s.mean,
        std: s.std,
        nonfinite: s.nonfinite,
    })
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.path)?;
        writeln!(f, "  format       {}", self.format)?;
        writeln!(f, "  shape        {:?}", self.shape)?;
        writeln!(f, "  spacing mm   [{:.6}, {:.6}, {:.6}]", self.spacing[0], self.spacing[1], self.spacing[2])?;
        writeln!(f, "  dtype        {}", self.dtype)?;
        writeln!(f, "  orientation  {}", self.orientation)?;
        writeln!(f, "  affine")?;
        for r in &self.affine {
            writeln!(f, "    [{:>12.6} {:>12.6} {:>12.6} {:>12.6}]", r[0], r[1], r[2], r[3])?;
        }
        writeln!(f, "  scaling      slope {} inter {}", self.scl_slope, self.scl_inter)?;
        write!(f, "  intensity    min {} max {} mean {:.6} std {:.6}", self.min, self.max, self.mean, self.std)?;
        if self.nonfinite > 0 {
            write!(f, " ({} NaN/Inf voxels excluded)", self.nonfinite)?;
        }
        Ok(())
    }
}
