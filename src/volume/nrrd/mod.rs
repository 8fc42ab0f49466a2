//! NRRD input (teem's format, 3D Slicer's and ITK's native one): attached
//! (`.nrrd`) and detached (`.nhdr` + data file) headers, raw, gzip and ascii
//! encodings, either byte order, every scalar type; `space directions` /
//! `space origin` (or `spacings`) to a RAS+ affine the way ITK and 3D Slicer
//! read them; and 3D Slicer segmentations (`.seg.nrrd`) as label maps.
//!
//! Sizes are checked before memory is reserved: a raw data part must hold
//! the declared voxels (file length), and gzip data inflate at most to the
//! declared size and the cap on decompressed data.
//!
//! The header is parsed in [`header`]; this module reads the data part and
//! turns the image into a volume.
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use ndarray::Array3;

use super::nifti::decode_into;
use super::{ReadOptions, Volume};
use crate::alloc::{self, Supply, Want};
use crate::volume::source::{self, HashedFile};

mod header;

pub use header::{read_header, NrrdHeader};
use header::{read_header_and_bytes, Encoding};

/// Whether a path names a NRRD file (by its extension).
pub fn is_nrrd_path(path: &Path) -> bool {
    let n = path.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".nrrd") || n.ends_with(".nhdr")
}

/// An NRRD image: header and voxels (file order: first axis fastest).
#[derive(Debug, Clone)]
pub struct NrrdImage {
    pub path: PathBuf,
    pub header: NrrdHeader,
    pub data: Vec<f32>,
}

/// Reads an NRRD image whole, its voxels in file order.
pub fn read(path: &Path, limits: &ReadOptions) -> Result<NrrdImage> {
    let (h, head) = read_header_and_bytes(path)?;
    // A detached header is the source: its bytes were all read when fewer
    // than the most a header may hold came back.
    if h.data_file.is_some() && (head.len() as u64) < header::HEADER_MAX {
        source::note_whole(path, &head);
    }
    let name = || path.display().to_string();
    let (n, nbytes) = h
        .count()
        .with_context(|| format!("{}: sizes {:?} describe an impossibly large image", name(), h.sizes))?;
    let (data_path, offset) = match &h.data_file {
        Some(p) => (p.clone(), 0usize),
        None => (path.to_path_buf(), h.data_offset),
    };
    let file_len = std::fs::metadata(&data_path)
        .with_context(|| format!("{}: cannot read its data file {}", name(), data_path.display()))?
        .len();
    // An attached header's file is the source: every byte of it goes
    // through once, hashed as it is read (`finish` reads what follows the
    // data). A detached data file is not the source's hash.
    let mut f = HashedFile::open_if(&data_path, h.data_file.is_none())
        .with_context(|| format!("{}: cannot read its data file {}", name(), data_path.display()))?;
    std::io::copy(&mut (&mut f).take(offset as u64), &mut std::io::sink())?;
    // line skip: whole lines before the data (of a detached data file)
    let mut skipped = offset as u64;
    for _ in 0..h.line_skip {
        let mut b = [0u8; 1];
        loop {
            if f.read(&mut b)? == 0 {
                bail!("{}: the data end inside `line skip`", name());
            }
            skipped += 1;
            if b[0] == b'\n' {
                break;
            }
        }
    }
    let raw: Vec<u8> = match h.encoding {
        Encoding::Raw => {
            let left = file_len.saturating_sub(skipped);
            let start = if h.byte_skip == -1 {
                // the data are the file's last bytes
                left.checked_sub(nbytes as u64).with_context(|| {
                    format!(
                        "{}: sizes {:?} need {nbytes} bytes, the file holds {left}",
                        name(),
                        h.sizes
                    )
                })?
            } else {
                h.byte_skip as u64
            };
            let what = format!("sizes {:?} ({})", h.sizes, h.dtype.name());
            let want = Want {
                label: &name(),
                what: &what,
                n: nbytes,
                declared: nbytes as u64,
            };
            let mut raw = alloc::capacity(
                &want,
                &Supply::held(left.saturating_sub(start), "the file's data holds"),
            )?;
            std::io::copy(&mut (&mut f).take(start), &mut std::io::sink())?;
            (&mut f).take(nbytes as u64).read_to_end(&mut raw)?;
            f.finish()?;
            raw
        }
        Encoding::Gzip => {
            ensure!(h.byte_skip >= 0, "{}: `byte skip: -1` is for raw data only", name());
            let what = format!("sizes {:?} ({})", h.sizes, h.dtype.name());
            let want = Want {
                label: &name(),
                what: &what,
                n: 0,
                declared: nbytes as u64,
            };
            limits.cap().check(&want)?;
            let mut gz = crate::volume::gzip::decoder(&mut f);
            std::io::copy(&mut (&mut gz).take(h.byte_skip as u64), &mut std::io::sink())?;
            // bounded: grows with what inflates, up to the declared size (within the cap, above)
            let mut raw = Vec::with_capacity(nbytes.min(file_len.saturating_mul(4) as usize));
            (&mut gz)
                .take(nbytes as u64)
                .read_to_end(&mut raw)
                .with_context(|| format!("{}: gzip data are corrupt or truncated", name()))?;
            ensure!(
                raw.len() == nbytes,
                "{}: sizes {:?} need {nbytes} bytes of data, the gzip stream inflates to {}; it is truncated or its header is wrong",
                name(),
                h.sizes,
                raw.len()
            );
            drop(gz);
            f.finish()?;
            raw
        }
        Encoding::Ascii => {
            let mut text = String::new();
            (&mut f)
                .take(file_len)
                .read_to_string(&mut text)
                .with_context(|| format!("{}: ascii data are not text", name()))?;
            let vals: Vec<f64> = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|s| !s.is_empty())
                .take(n.saturating_add(1))
                .map(|s| s.parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: ascii data hold a value that is not a number", name()))?;
            ensure!(
                vals.len() >= n,
                "{}: sizes {:?} need {n} values, the ascii data hold {}",
                name(),
                h.sizes,
                vals.len()
            );
            return Ok(NrrdImage {
                path: path.to_path_buf(),
                data: vals[..n].iter().map(|&v| v as f32).collect(),
                header: h,
            });
        }
    };
    let mut data = alloc::like_f32(&name(), &format!("sizes {:?}", h.sizes), n)?;
    decode_into(&raw, h.dtype, h.big_endian, None, &mut data);
    Ok(NrrdImage {
        path: path.to_path_buf(),
        header: h,
        data,
    })
}

/// How a segmentation's overlapping layers become one label map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// A voxel in two segments is an error naming them.
    #[default]
    Error,
    /// The segment listed first (lower `Segment<i>`) wins.
    First,
    /// The segment listed last wins.
    Last,
}

/// A 3D Slicer segmentation's segments, in header order: (name, layer,
/// label value).
pub fn segments(h: &NrrdHeader) -> Vec<(String, usize, i64)> {
    (0..)
        .map_while(|i| {
            let get = |k: &str| h.key_values.get(&format!("Segment{i}_{k}"));
            let id = get("ID")?;
            Some((
                get("Name").cloned().unwrap_or_else(|| id.clone()),
                // older files keep each segment in its own layer and say so by omission
                get("Layer").and_then(|v| v.trim().parse().ok()).unwrap_or(i),
                get("LabelValue").and_then(|v| v.trim().parse().ok()).unwrap_or(1),
            ))
        })
        .collect()
}

/// Turns an image into a `Volume`: a 3D image as it is; a 4D one through
/// its non-spatial axis, either a segmentation's layers (merged as
/// `overlap` says) or a volume picked by `volume_index`. A segmentation's
/// classes become 1..=n in the order its segments are listed.
pub fn to_volume(img: NrrdImage, volume_index: Option<usize>, overlap: Overlap) -> Result<Volume> {
    let h = &img.header;
    let name = img.path.display().to_string();
    let affine = h.affine().with_context(|| name.clone())?;
    let axes = h.spatial_axes();
    let dims = [h.sizes[axes[0]], h.sizes[axes[1]], h.sizes[axes[2]]];
    let per = dims[0] * dims[1] * dims[2];
    let others: Vec<usize> = (0..h.sizes.len())
        .filter(|a| !axes.contains(a) && h.sizes[*a] > 1)
        .collect();
    ensure!(
        others.len() <= 1,
        "{name}: {} non-spatial axes (kinds {:?}): one at most is read",
        others.len(),
        h.kinds
    );
    let layers = others.first().map_or(1, |&a| h.sizes[a]);
    // file order: the first axis fastest
    let stride: Vec<usize> = h
        .sizes
        .iter()
        .scan(1usize, |acc, &s| {
            let here = *acc;
            *acc *= s;
            Some(here)
        })
        .collect();
    let ls = others.first().map_or(0, |&a| stride[a]);
    let (si, sj, sk) = (stride[axes[0]], stride[axes[1]], stride[axes[2]]);
    let at = |l: usize, i: usize, j: usize, k: usize| l * ls + i * si + j * sj + k * sk;
    let segs = segments(h);
    // sized from the voxels read (`per` is at most their count)
    let volume = format!("a {dims:?} volume");
    let mut out = alloc::like_f32(&name, &volume, per)?;
    if !segs.is_empty() {
        let class_of = |layer: usize, v: f32| -> Option<usize> {
            segs.iter()
                .position(|&(_, l, lv)| l == layer && lv as f32 == v)
                .map(|s| s + 1)
        };
        let want = Want {
            label: &name,
            what: &volume,
            n: per,
            declared: 0,
        };
        let mut owner: Vec<usize> = alloc::zeroed(&want, &Supply::in_memory::<f32>(img.data.len()))?;
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let c = (i * dims[1] + j) * dims[2] + k;
                    for l in 0..layers {
                        let v = img.data[at(l, i, j, k)];
                        if v == 0.0 {
                            continue;
                        }
                        let Some(cls) = class_of(l, v) else {
                            bail!(
                                "{name}: voxel ({i}, {j}, {k}) of layer {l} has label value {v}, which no segment has"
                            );
                        };
                        if owner[c] != 0 && owner[c] != cls {
                            match overlap {
                                Overlap::Error => bail!(
                                    "{name}: voxel ({i}, {j}, {k}) lies in segments {:?} and {:?}, which overlap; \
                                     set `preprocess.label_overlap` (or `--label-overlap`) to first or last",
                                    segs[owner[c] - 1].0,
                                    segs[cls - 1].0
                                ),
                                Overlap::First => continue,
                                Overlap::Last => {}
                            }
                        }
                        owner[c] = cls;
                    }
                    out[c] = owner[c] as f32;
                }
            }
        }
    } else {
        let t = match (layers, volume_index) {
            (1, None) => 0,
            (n, Some(t)) if t < n => t,
            (n, Some(t)) => bail!("{name}: volume_index {t} is out of range; the image has {n} volumes"),
            (n, None) => bail!(
                "{name}: image has {n} volumes along a non-spatial axis (kinds {:?}); set `preprocess.volume_index` to pick one",
                h.kinds
            ),
        };
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    out[(i * dims[1] + j) * dims[2] + k] = img.data[at(t, i, j, k)];
                }
            }
        }
    }
    let data = Array3::from_shape_vec((dims[0], dims[1], dims[2]), out)?;
    Ok(Volume { data, affine })
}

/// Reads an NRRD file into a `Volume` (see `to_volume`).
pub fn load(path: &Path, volume_index: Option<usize>, overlap: Overlap, limits: &ReadOptions) -> Result<Volume> {
    let img = read(path, limits)?;
    let v = to_volume(img, volume_index, overlap)?;
    v.validate(path)?;
    Ok(v)
}
