//! `med3d convert`: any input med3d reads (a DICOM folder or file, or a
//! NIfTI file) written as a float32 NIfTI-1 file with the voxels and RAS+
//! affine med3d would process, so they can be opened with nibabel, ITK-SNAP
//! or any viewer and checked against another converter. The header carries
//! geometry only: nothing from a DICOM header beyond it is written.
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::fsutil::atomic_write;
use crate::volume::{self, nifti, Volume};

/// NIfTI-1 bytes of a volume: float32, file order (first axis fastest),
/// sform = the volume's affine.
pub fn nifti_bytes(vol: &Volume) -> Vec<u8> {
    let [nx, ny, nz] = vol.shape();
    // bounded: a copy of a volume in memory (a writer)
    let mut raw = Vec::with_capacity(nx * ny * nz * 4);
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                raw.extend_from_slice(&vol.data[[i, j, k]].to_le_bytes());
            }
        }
    }
    nifti::write_nifti1(&[nx, ny, nz], vol.spacing(), &vol.affine, 16, &raw)
}

/// Loads `input` (one series of it, for DICOM) and writes `output` (.nii or
/// .nii.gz), atomically.
pub fn convert(
    input: &Path,
    series_uid: Option<&str>,
    volume_index: Option<usize>,
    limits: &volume::ReadOptions,
    output: &Path,
) -> Result<Volume> {
    let loaded = volume::load_image(input, series_uid, volume_index, limits)?;
    let bytes = nifti_bytes(&loaded.volume);
    let gz = output.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let bytes = if gz {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(&bytes)?;
        enc.finish()?
    } else {
        bytes
    };
    atomic_write(output, &bytes).with_context(|| format!("cannot write {}", output.display()))?;
    Ok(loaded.volume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn written_file_reads_back_identically() {
        let mut affine = volume::affine::identity4();
        affine[0][0] = -0.5;
        affine[1][3] = 12.0;
        affine[2][2] = 3.0;
        let data = Array3::from_shape_fn((3, 4, 2), |(i, j, k)| (i * 100 + j * 10 + k) as f32 - 7.5);
        let vol = Volume { data, affine };
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.nii", "a.nii.gz"] {
            let p = dir.path().join(name);
            let bytes = nifti_bytes(&vol);
            let bytes = if name.ends_with(".gz") {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&bytes).unwrap();
                e.finish().unwrap()
            } else {
                bytes
            };
            std::fs::write(&p, bytes).unwrap();
            let back = volume::load(&p, None, &volume::ReadOptions::default()).unwrap();
            assert_eq!(back, vol);
        }
    }
}
