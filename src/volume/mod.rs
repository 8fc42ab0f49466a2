//! The one image type every stage passes around: voxels on a 3D grid plus the
//! voxel-to-world affine (RAS+ mm). Spacing and orientation are derived from
//! the affine, so they can never disagree with it. Labels are `Volume`s too,
//! and every geometric operation takes the label along (MONAI's dict
//! transforms), so a crop applied to one is applied to the other.
pub mod affine;
pub mod crop;
pub mod dicom;
pub mod gzip;
pub mod intensity;
pub mod nifti;
pub mod nrrd;
pub mod orient;
pub mod resample;
pub mod source;

use std::path::Path;

use anyhow::{bail, Context, Result};
use ndarray::Array3;

pub use affine::Mat4;

/// Imaging modality; decides how intensities are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Modality {
    CT,
    MR,
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Modality::CT => "CT",
            Modality::MR => "MR",
        })
    }
}

/// A 3D scalar image: `data[[i, j, k]]` is voxel (i, j, k), in C order (the
/// last index fastest), which is the array layout nibabel/MONAI users see
/// after `np.ascontiguousarray`.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub data: Array3<f32>,
    pub affine: Mat4,
}

impl Volume {
    pub fn shape(&self) -> [usize; 3] {
        let s = self.data.shape();
        [s[0], s[1], s[2]]
    }

    /// Voxel size in mm along each array axis.
    pub fn spacing(&self) -> [f64; 3] {
        affine::column_norms(&self.affine)
    }

    /// Orientation code such as "RAS"; None for a singular affine.
    pub fn orientation(&self) -> Option<String> {
        affine::axcodes(&self.affine)
    }

    /// Builds a volume from a decoded NIfTI image. 4D (and higher) images
    /// need `volume_index` to pick one 3D volume.
    pub fn from_nifti(img: nifti::NiftiImage, volume_index: Option<usize>) -> Result<Volume> {
        let shape = &img.shape;
        let (nx, ny, nz) = (shape[0], *shape.get(1).unwrap_or(&1), *shape.get(2).unwrap_or(&1));
        let nvol: usize = shape.iter().skip(3).product();
        let t = match (nvol, volume_index) {
            (1, None) => 0,
            (n, Some(t)) if t < n => t,
            (n, Some(t)) => bail!(
                "{}: volume_index {t} is out of range; the image has {n} volumes",
                img.path.display()
            ),
            (n, None) => bail!(
                "{}: image is {}D with {n} volumes {:?}; set `preprocess.volume_index` to pick one",
                img.path.display(),
                shape.len(),
                shape
            ),
        };
        let per = nx * ny * nz;
        let start = t * per;
        if img.data.len() < start + per {
            bail!("{}: voxel count does not match the header", img.path.display());
        }
        let vox = match img.layout {
            // File order is first-axis-fastest: an F-ordered (nx, ny, nz) array.
            nifti::Layout::File => f_to_c_order(&img.data[start..start + per], [nx, ny, nz], &img.path)?,
            nifti::Layout::CPerVolume if img.data.len() == per => img.data,
            // bounded: a copy of voxels already read
            nifti::Layout::CPerVolume => img.data[start..start + per].to_vec(),
        };
        let data = Array3::from_shape_vec((nx, ny, nz), vox)
            .with_context(|| format!("{}: voxel count does not match the header", img.path.display()))?;
        Ok(Volume {
            data,
            affine: img.header.affine(),
        })
    }

    /// Checks that downstream geometry is well defined: finite voxels, a
    /// non-singular affine, positive spacing in the header.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if affine::inv_affine(&self.affine).is_none() {
            bail!(
                "{}: the voxel-to-world affine is singular: {:?}",
                path.display(),
                self.affine
            );
        }
        let bad = self.data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            bail!("{}: {bad} voxels are NaN or infinite", path.display());
        }
        Ok(())
    }
}

/// How inputs are read: how far one may expand in memory, and how a
/// segmentation's overlapping segments merge. Plain data are
/// bounded by the file itself: nothing is reserved for more voxels, values
/// or frames than the bytes present can hold. Compressed data (a gzipped
/// NIfTI, an encapsulated DICOM frame) can legitimately expand many times,
/// so what they decode to is bounded by this cap instead, checked before the
/// memory is reserved (and, for gzip, while inflating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    pub max_decompressed_bytes: u64,
    /// How a 3D Slicer segmentation's overlapping segments become one label map.
    pub label_overlap: nrrd::Overlap,
}

impl ReadOptions {
    /// The default cap, 4 GiB: a 512x512x2000 float32 CT is 2 GiB.
    pub const DEFAULT_MIB: u64 = 4096;

    pub fn mib(mib: u64) -> ReadOptions {
        ReadOptions {
            max_decompressed_bytes: mib.saturating_mul(1 << 20),
            label_overlap: nrrd::Overlap::Error,
        }
    }

    /// The error text for `what` (named with its file) decoding past the cap.
    pub fn exceeded(&self, what: &str) -> String {
        crate::alloc::cap_exceeded(what, self.max_decompressed_bytes)
    }

    /// The cap as an allocation supply (for data whose inflated size is
    /// known only by inflating them).
    pub fn cap(&self) -> crate::alloc::Supply {
        crate::alloc::Supply::cap(self.max_decompressed_bytes)
    }

    /// The cap as the most one case may expand to (a resampled grid).
    pub fn expansion(&self) -> crate::alloc::Supply {
        crate::alloc::Supply::expansion(self.max_decompressed_bytes)
    }
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions::mib(ReadOptions::DEFAULT_MIB)
    }
}

/// A loaded image and, for DICOM inputs, what went into its voxels.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub volume: Volume,
    pub dicom: Option<dicom::Provenance>,
}

/// Reads an image: a DICOM folder or file (the series `series_uid`, or the
/// only one there is) or a NIfTI file (4D needs `volume_index`).
pub fn load_image(
    path: &Path,
    series_uid: Option<&str>,
    volume_index: Option<usize>,
    limits: &ReadOptions,
) -> Result<Loaded> {
    if dicom::is_dicom_path(path) {
        let d = dicom::load(path, series_uid, limits).with_context(|| format!("DICOM input {}", path.display()))?;
        d.volume.validate(path)?;
        return Ok(Loaded {
            volume: d.volume,
            dicom: Some(d.provenance),
        });
    }
    if let Some(uid) = series_uid {
        bail!(
            "{}: series_uid {uid} is set, but this is not a DICOM folder or file",
            path.display()
        );
    }
    if nrrd::is_nrrd_path(path) {
        return Ok(Loaded {
            volume: nrrd::load(path, volume_index, limits.label_overlap, limits)?,
            dicom: None,
        });
    }
    Ok(Loaded {
        volume: load_nifti(path, volume_index, limits)?,
        dicom: None,
    })
}

/// Reads a NIfTI file or a single-series DICOM input into a `Volume`.
pub fn load(path: &Path, volume_index: Option<usize>, limits: &ReadOptions) -> Result<Volume> {
    Ok(load_image(path, None, volume_index, limits)?.volume)
}

/// Content hash of an image source for the cache's skip test: the file's
/// sha256, or for a DICOM folder a hash over its files and the chosen series.
pub fn source_sha256(path: &Path, series_uid: Option<&str>) -> Result<String> {
    if path.is_dir() {
        dicom::source_sha256(path, series_uid)
    } else {
        crate::fsutil::sha256_file(path)
    }
}

/// Reorders an F-ordered (first axis fastest) `shape` array into C order
/// (last axis fastest). A transpose of the (i, k) planes, done in tiles so
/// that every cache line read and written is used whole: ndarray's generic
/// `as_standard_layout` walks the source with a stride of a whole plane and
/// was half of the load time of a 512x512x300 CT.
fn f_to_c_order(src: &[f32], shape: [usize; 3], path: &Path) -> Result<Vec<f32>> {
    debug_assert_eq!(src.len(), shape.iter().product::<usize>());
    let what = format!("a {shape:?} volume in C order");
    let mut dst = crate::alloc::like_f32(&path.display().to_string(), &what, src.len())?;
    f_planes_into_c_order(src, shape, 0, &mut dst);
    Ok(dst)
}

/// Writes `planes`, the k-planes k0.. of an F-ordered `shape` volume (each
/// plane nx * ny values, x fastest), into their places in `dst`, the same
/// volume in C order; as many planes as `planes` holds whole (and the
/// volume has left).
pub(crate) fn f_planes_into_c_order(planes: &[f32], [nx, ny, nz]: [usize; 3], k0: usize, dst: &mut [f32]) {
    let plane = nx * ny;
    if plane == 0 {
        return;
    }
    let k1 = (k0 + planes.len() / plane).min(nz);
    tiled_f_to_c([nx, ny, nz], k0..k1, dst, |k, j, i0, row| {
        let start = (k - k0) * plane + j * nx + i0;
        row.copy_from_slice(&planes[start..start + row.len()]);
    });
}

/// The F-to-C transpose of the k-planes `ks` of a `shape` volume into
/// `dst` (C order), through a 32 x 32 tile: `fill(k, j, i0, row)` writes
/// source values (i0.., j, k) into `row` (contiguous reads, converted as
/// the caller needs), and each C-order row piece is written in whole from
/// a tile column (contiguous writes). Gathering every value straight from
/// 32 planes was 3x slower.
pub(crate) fn tiled_f_to_c(
    [nx, ny, nz]: [usize; 3],
    ks: std::ops::Range<usize>,
    dst: &mut [f32],
    mut fill: impl FnMut(usize, usize, usize, &mut [f32]),
) {
    const T: usize = 32;
    let mut tile = [[0f32; T]; T];
    for j in 0..ny {
        for i0 in (0..nx).step_by(T) {
            let i1 = (i0 + T).min(nx);
            for kt in ks.clone().step_by(T) {
                let kt1 = (kt + T).min(ks.end);
                for k in kt..kt1 {
                    fill(k, j, i0, &mut tile[k - kt][..i1 - i0]);
                }
                for i in i0..i1 {
                    let row = (i * ny + j) * nz;
                    for (d, t) in dst[row + kt..row + kt1].iter_mut().zip(&tile) {
                        *d = t[i - i0];
                    }
                }
            }
        }
    }
}

/// Reads a NIfTI file (any of the supported names) into a `Volume`, after
/// checking its header for the geometry problems that would make the
/// result meaningless.
pub fn load_nifti(path: &Path, volume_index: Option<usize>, limits: &ReadOptions) -> Result<Volume> {
    let img = nifti::read_as(path, nifti::Layout::CPerVolume, limits)?;
    let h = &img.header;
    for (i, &p) in h.pixdim[1..=3].iter().enumerate() {
        if (i as i64) < h.dim[0] && (!p.is_finite() || p <= 0.0) {
            bail!(
                "{}: pixdim[{}] = {p}: voxel spacing must be positive",
                path.display(),
                i + 1
            );
        }
    }
    let vol = Volume::from_nifti(img, volume_index)?;
    vol.validate(path)?;
    Ok(vol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ShapeBuilder;

    #[test]
    fn f_to_c_order_matches_ndarray() {
        for shape in [[37, 5, 41], [1, 3, 4], [3, 1, 1], [2, 70, 1], [64, 33, 65]] {
            let n = shape.iter().product();
            let src: Vec<f32> = (0..n).map(|v| v as f32).collect();
            let want = Array3::from_shape_vec((shape[0], shape[1], shape[2]).f(), src.clone()).unwrap();
            let got = Array3::from_shape_vec(shape, f_to_c_order(&src, shape, Path::new("t")).unwrap()).unwrap();
            assert_eq!(got, want, "{shape:?}");
        }
    }

    #[test]
    fn f_planes_written_slab_by_slab_match_the_whole_transpose() {
        // slabs of 3 planes over 8 (the last one short), tiles cut by 32
        for (shape, step) in [([37, 5, 8], 3), ([70, 3, 40], 33), ([4, 4, 1], 1)] {
            let plane = shape[0] * shape[1];
            let n = plane * shape[2];
            let src: Vec<f32> = (0..n).map(|v| v as f32).collect();
            let mut dst = vec![f32::NAN; n];
            for k0 in (0..shape[2]).step_by(step) {
                let k1 = (k0 + step).min(shape[2]);
                f_planes_into_c_order(&src[k0 * plane..k1 * plane], shape, k0, &mut dst);
            }
            assert_eq!(
                dst,
                f_to_c_order(&src, shape, Path::new("t")).unwrap(),
                "{shape:?} by {step}"
            );
        }
    }
}
