//! `med3d info`: what a file holds, as nibabel would report it (shape, voxel
//! size, datatype, affine, orientation code) plus intensity statistics of the
//! scaled voxels over every volume of the file. DICOM inputs (a folder or a
//! file) get the same report for one series, or a list of the series found.
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::volume::{affine, dicom, nifti, nrrd, ReadOptions};

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
    /// DICOM inputs: how the voxels were assembled and decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dicom: Option<dicom::Provenance>,
    /// DICOM folders: files skipped as not DICOM images, with the reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// 3D Slicer segmentations: the segments' names, class 1, 2, ... in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<String>,
}

/// What `med3d info` reports: one image, or the series of a DICOM folder
/// that holds several (when none was picked).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Described {
    Image(Box<Info>),
    Series {
        path: String,
        format: String,
        series: Vec<dicom::SeriesSummary>,
        skipped: Vec<String>,
    },
}

/// Describes a NIfTI file, a DICOM file, or one series of a DICOM folder
/// (`series`, or the only one; with several and none picked, lists them).
pub fn describe(path: &Path, series: Option<&str>, limits: &ReadOptions) -> Result<Described> {
    if !dicom::is_dicom_path(path) {
        if series.is_some() {
            anyhow::bail!("{}: --series is for DICOM inputs", path.display());
        }
        if nrrd::is_nrrd_path(path) {
            return Ok(Described::Image(Box::new(nrrd_info(path, limits)?)));
        }
        return Ok(Described::Image(Box::new(info(path, limits)?)));
    }
    let scan = dicom::scan(path)?;
    let skipped: Vec<String> = scan
        .skipped
        .iter()
        .map(|(p, why)| format!("{}: {why}", p.display()))
        .collect();
    let found = scan.series();
    if series.is_none() && found.len() > 1 {
        return Ok(Described::Series {
            path: path.display().to_string(),
            format: "DICOM".into(),
            series: found,
            skipped,
        });
    }
    let d = dicom::load_from_scan(&scan, series, limits).with_context(|| format!("DICOM input {}", path.display()))?;
    // The voxels were read through the bounded decode (`crate::alloc`);
    // the statistics walk them where they are, with no second copy.
    let v = &d.volume;
    let s = stats(v.data.iter().copied());
    let p = &d.provenance;
    let [slope, inter] = p.rescale.first().copied().unwrap_or([1.0, 0.0]);
    Ok(Described::Image(Box::new(Info {
        path: path.display().to_string(),
        format: format!(
            "DICOM ({} files, {} frames; {})",
            p.files,
            p.frames,
            p.transfer_syntaxes.join(", ")
        ),
        shape: v.shape().to_vec(),
        spacing: v.spacing(),
        zooms: vec![p.pixel_spacing[1], p.pixel_spacing[0], p.slice_spacing],
        dtype: d.stored_dtype.clone(),
        affine: v.affine,
        orientation: v.orientation().unwrap_or_else(|| "singular".into()),
        scl_slope: slope,
        scl_inter: inter,
        min: s.min,
        max: s.max,
        mean: s.mean,
        std: s.std,
        nonfinite: s.nonfinite,
        dicom: Some(d.provenance),
        skipped,
        segments: Vec::new(),
    })))
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
pub fn stats(values: impl Iterator<Item = f32> + Clone) -> Stats {
    let (mut n, mut sum, mut min, mut max, mut bad) = (0usize, 0.0f64, f64::INFINITY, f64::NEG_INFINITY, 0usize);
    for v in values.clone() {
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
        return Stats {
            min: f64::NAN,
            max: f64::NAN,
            mean: f64::NAN,
            std: f64::NAN,
            nonfinite: bad,
        };
    }
    let mean = sum / n as f64;
    let var = values
        .filter(|v| v.is_finite())
        .map(|v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n as f64;
    Stats {
        min,
        max,
        mean,
        std: var.sqrt(),
        nonfinite: bad,
    }
}

/// Describes an NRRD file: its sizes (every axis), the affine of its three
/// spatial axes, statistics over all its voxels, and a segmentation's
/// segment names.
pub fn nrrd_info(path: &Path, limits: &ReadOptions) -> Result<Info> {
    let img = nrrd::read(path, limits)?;
    let h = &img.header;
    let aff = h.affine().with_context(|| path.display().to_string())?;
    let s = stats(img.data.iter().copied());
    let segs = nrrd::segments(h);
    Ok(Info {
        path: path.display().to_string(),
        format: format!(
            "NRRD{}",
            if segs.is_empty() {
                ""
            } else {
                " (3D Slicer segmentation)"
            }
        ),
        shape: h.sizes.clone(),
        spacing: affine::column_norms(&aff),
        zooms: affine::column_norms(&aff).to_vec(),
        dtype: h.dtype.name().to_string(),
        affine: aff,
        orientation: affine::axcodes(&aff).unwrap_or_else(|| "singular".into()),
        scl_slope: 1.0,
        scl_inter: 0.0,
        min: s.min,
        max: s.max,
        mean: s.mean,
        std: s.std,
        nonfinite: s.nonfinite,
        dicom: None,
        skipped: Vec::new(),
        segments: segs.into_iter().map(|(n, _, _)| n).collect(),
    })
}

pub fn info(path: &Path, limits: &ReadOptions) -> Result<Info> {
    let img = nifti::read(path, limits)?;
    let h = &img.header;
    let aff = h.affine();
    let s = stats(img.data.iter().copied());
    Ok(Info {
        path: path.display().to_string(),
        format: format!(
            "NIfTI-{}{}",
            h.version,
            if h.single_file { "" } else { " (header/image pair)" }
        ),
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
        dicom: None,
        skipped: Vec::new(),
        segments: Vec::new(),
    })
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.path)?;
        writeln!(f, "  format       {}", self.format)?;
        writeln!(f, "  shape        {:?}", self.shape)?;
        writeln!(
            f,
            "  spacing mm   [{:.6}, {:.6}, {:.6}]",
            self.spacing[0], self.spacing[1], self.spacing[2]
        )?;
        writeln!(f, "  dtype        {}", self.dtype)?;
        writeln!(f, "  orientation  {}", self.orientation)?;
        writeln!(f, "  affine")?;
        for r in &self.affine {
            writeln!(f, "    [{:>12.6} {:>12.6} {:>12.6} {:>12.6}]", r[0], r[1], r[2], r[3])?;
        }
        writeln!(f, "  scaling      slope {} inter {}", self.scl_slope, self.scl_inter)?;
        write!(
            f,
            "  intensity    min {} max {} mean {:.6} std {:.6}",
            self.min, self.max, self.mean, self.std
        )?;
        if self.nonfinite > 0 {
            write!(f, " ({} NaN/Inf voxels excluded)", self.nonfinite)?;
        }
        if let Some(d) = &self.dicom {
            write!(f, "\n  modality     {}", d.modality.as_deref().unwrap_or("?"))?;
            write!(
                f,
                "\n  rescale      {:?}{}",
                d.rescale,
                if d.modality_lut { " (modality LUT applied)" } else { "" }
            )?;
        }
        for s in &self.skipped {
            write!(f, "\n  skipped      {s}")?;
        }
        for (i, s) in self.segments.iter().enumerate() {
            write!(f, "\n  segment {:<4} {s}", i + 1)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Described {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Described::Image(i) => i.fmt(f),
            Described::Series {
                path, series, skipped, ..
            } => {
                writeln!(f, "{path}: {} DICOM series; pick one with --series UID", series.len())?;
                for s in series {
                    let m: Vec<String> = s.matrices.iter().map(|m| format!("{}x{}", m[0], m[1])).collect();
                    write!(
                        f,
                        "\n  {}\n    modality {}  files {}  frames {}  rows x cols {}  orientations {}",
                        s.series_uid,
                        s.modality.as_deref().unwrap_or("?"),
                        s.files,
                        s.frames,
                        m.join(", "),
                        s.orientations.len()
                    )?;
                }
                for s in skipped {
                    write!(f, "\n  skipped  {s}")?;
                }
                Ok(())
            }
        }
    }
}
