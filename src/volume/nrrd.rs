//! NRRD input (teem's format, 3D Slicer's and ITK's native one): attached
//! (`.nrrd`) and detached (`.nhdr` + data file) headers, raw, gzip and ascii
//! encodings, either byte order, every scalar type; `space directions` /
//! `space origin` (or `spacings`) to a RAS+ affine the way ITK and 3D Slicer
//! read them; and 3D Slicer segmentations (`.seg.nrrd`) as label maps.
//!
//! Sizes are checked before memory is reserved: a raw data part must hold
//! the declared voxels (file length), and gzip data inflate at most to the
//! declared size and the cap on decompressed data.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use ndarray::Array3;

use super::nifti::{decode_into, DataType};
use super::{affine::Mat4, ReadOptions, Volume};
use crate::alloc::{self, Supply, Want};

/// Whether a path names a NRRD file (by its extension).
pub fn is_nrrd_path(path: &Path) -> bool {
    let n = path.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".nrrd") || n.ends_with(".nhdr")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Raw,
    Gzip,
    Ascii,
}

/// A parsed header: the fields med3d uses, and every `key:=value` pair.
#[derive(Debug, Clone)]
pub struct NrrdHeader {
    pub dtype: DataType,
    pub sizes: Vec<usize>,
    encoding: Encoding,
    big_endian: bool,
    /// Per axis: its direction (in the header's space), None for non-space
    /// axes (`none`: a list of layers, vector components).
    pub directions: Vec<Option<[f64; 3]>>,
    pub origin: [f64; 3],
    /// The header's `space`, lower-cased (empty when it has none).
    pub space: String,
    pub kinds: Vec<String>,
    pub key_values: BTreeMap<String, String>,
    data_file: Option<PathBuf>,
    byte_skip: i64,
    line_skip: usize,
    /// Where the data start in the file itself (attached headers).
    data_offset: usize,
}

/// An NRRD image: header and voxels (file order: first axis fastest).
#[derive(Debug, Clone)]
pub struct NrrdImage {
    pub path: PathBuf,
    pub header: NrrdHeader,
    pub data: Vec<f32>,
}

fn dtype_of(t: &str) -> Result<DataType> {
    Ok(match t {
        "signed char" | "int8" | "int8_t" => DataType::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => DataType::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => DataType::I16,
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => DataType::U16,
        "int" | "signed int" | "int32" | "int32_t" => DataType::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => DataType::U32,
        "longlong"
        | "long long"
        | "long long int"
        | "signed long long"
        | "signed long long int"
        | "int64"
        | "int64_t" => DataType::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => DataType::U64,
        "float" => DataType::F32,
        "double" => DataType::F64,
        "block" => bail!("type `block` (opaque bytes) is not an image"),
        other => bail!("unknown type {other:?}"),
    })
}

/// `(a,b,c)` to a vector.
fn vector(s: &str) -> Result<[f64; 3]> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .with_context(|| format!("{s:?} is not a vector like (1,0,0)"))?;
    let v: Vec<f64> = inner
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{s:?} is not a vector of numbers"))?;
    ensure!(
        v.len() == 3 && v.iter().all(|x| x.is_finite()),
        "{s:?}: only 3D spaces with finite coordinates are read"
    );
    Ok([v[0], v[1], v[2]])
}

/// Splits `space directions`: vectors and `none`s, separated by spaces.
fn directions(s: &str) -> Result<Vec<Option<[f64; 3]>>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("none") {
            out.push(None);
            rest = r.trim_start();
        } else {
            let end = rest.find(')').context("an unclosed vector")? + 1;
            out.push(Some(vector(&rest[..end])?));
            rest = rest[end..].trim_start();
        }
    }
    Ok(out)
}

/// Parses the header lines (the text before the first blank line, or the
/// whole of a detached header). `dir` resolves a detached data file.
fn parse_header(text: &str, dir: &Path) -> Result<NrrdHeader> {
    let mut lines = text.lines();
    let magic = lines.next().unwrap_or("");
    ensure!(
        magic.starts_with("NRRD000") && magic.len() == 8,
        "not a NRRD file: the first line is {:?}, expected NRRD0001..NRRD0005",
        magic.chars().take(40).collect::<String>()
    );
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    let mut key_values = BTreeMap::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once(":=") {
            key_values.insert(k.to_string(), v.to_string());
        } else if let Some((k, v)) = line.split_once(": ") {
            fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        } else {
            bail!("header line {line:?} is neither `field: value` nor `key:=value`");
        }
    }
    let get = |k: &str| fields.get(k).map(String::as_str);
    let need = |k: &str| get(k).with_context(|| format!("the header has no `{k}` field"));
    let dtype = dtype_of(&need("type")?.to_ascii_lowercase()).context("field `type`")?;
    let dimension: usize = need("dimension")?
        .parse()
        .context("field `dimension` is not a number")?;
    ensure!((1..=16).contains(&dimension), "field `dimension` is {dimension}");
    let sizes: Vec<usize> = need("sizes")?
        .split_whitespace()
        .map(|v| v.parse::<usize>())
        .collect::<Result<_, _>>()
        .context("field `sizes` is not a list of counts")?;
    ensure!(
        sizes.len() == dimension && sizes.iter().all(|&s| s >= 1),
        "field `sizes` ({:?}) must hold {dimension} counts of at least 1",
        sizes
    );
    let encoding = match need("encoding")?.to_ascii_lowercase().as_str() {
        "raw" => Encoding::Raw,
        "gzip" | "gz" => Encoding::Gzip,
        "ascii" | "text" | "txt" => Encoding::Ascii,
        other => bail!("encoding {other:?} is not read (raw, gzip and ascii are)"),
    };
    let big_endian = match get("endian").map(str::to_ascii_lowercase).as_deref() {
        Some("big") => true,
        Some("little") => false,
        None if dtype.size() == 1 || encoding == Encoding::Ascii => false,
        None => bail!(
            "the header has no `endian` field, which {}-byte samples need",
            dtype.size()
        ),
        Some(other) => bail!("field `endian` is {other:?}"),
    };
    let space = get("space").map(str::to_ascii_lowercase).unwrap_or_default();
    let (dirs, origin) = match get("space directions") {
        Some(d) => {
            let dirs = directions(d).context("field `space directions`")?;
            ensure!(
                dirs.len() == dimension,
                "field `space directions` has {} entries for {dimension} axes",
                dirs.len()
            );
            let origin = match get("space origin") {
                Some(o) => vector(o).context("field `space origin`")?,
                None => [0.0; 3],
            };
            (dirs, origin)
        }
        None => {
            // no space: `spacings` (or unit steps) along the first 3 axes
            let sp: Vec<f64> = match get("spacings") {
                Some(s) => s
                    .split_whitespace()
                    .map(|v| v.parse::<f64>().unwrap_or(f64::NAN))
                    .collect(),
                None => vec![1.0; dimension],
            };
            let mut dirs = Vec::new();
            let mut spatial = 0;
            for s in sp.iter().take(dimension) {
                if s.is_finite() && spatial < 3 {
                    let mut v = [0.0; 3];
                    v[spatial] = *s;
                    dirs.push(Some(v));
                    spatial += 1;
                } else {
                    dirs.push(None);
                }
            }
            // bounded: `dimension` is at most 16
            dirs.resize(dimension, None);
            (dirs, [0.0; 3])
        }
    };
    let kinds = get("kinds")
        .map(|k| k.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let data_file = get("data file").or_else(|| get("datafile")).map(|f| {
        let p = Path::new(f);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    });
    if let Some(f) = &data_file {
        ensure!(
            !f.to_string_lossy().starts_with("LIST") && !f.to_string_lossy().contains('%'),
            "detached data in several files (`data file: LIST` or a format string) is not read"
        );
    }
    let byte_skip: i64 = get("byte skip")
        .map(|v| v.parse())
        .transpose()
        .context("field `byte skip`")?
        .unwrap_or(0);
    ensure!(byte_skip >= -1, "field `byte skip` is {byte_skip}");
    let line_skip: usize = get("line skip")
        .map(|v| v.parse())
        .transpose()
        .context("field `line skip`")?
        .unwrap_or(0);
    Ok(NrrdHeader {
        dtype,
        sizes,
        encoding,
        big_endian,
        directions: dirs,
        origin,
        space,
        kinds,
        key_values,
        data_file,
        byte_skip,
        line_skip,
        data_offset: 0,
    })
}

impl NrrdHeader {
    /// Voxels the header declares, and their bytes, if that fits.
    pub fn count(&self) -> Option<(usize, usize)> {
        let n = self.sizes.iter().try_fold(1usize, |a, &s| a.checked_mul(s))?;
        Some((n, n.checked_mul(self.dtype.size())?))
    }

    /// The axes with a space direction, in order.
    pub fn spatial_axes(&self) -> Vec<usize> {
        (0..self.sizes.len())
            .filter(|&a| self.directions[a].is_some())
            .collect()
    }

    /// Voxel (of the spatial axes) to RAS+ world mm, as ITK / 3D Slicer read
    /// `space directions` and `space origin`: world = origin + sum_a i_a
    /// dir_a, in the header's space, then to RAS.
    pub fn affine(&self) -> Result<Mat4> {
        let axes = self.spatial_axes();
        ensure!(
            axes.len() == 3,
            "{} spatial axes: only 3D images (3 axes with space directions) are read",
            axes.len()
        );
        // RAS = diag(flip) * space coordinates
        let flip: [f64; 3] = match self.space.as_str() {
            "left-posterior-superior" | "lps" | "3d-left-handed" => [-1.0, -1.0, 1.0],
            "right-anterior-superior" | "ras" | "3d-right-handed" | "scanner-xyz" | "" => [1.0, 1.0, 1.0],
            "left-anterior-superior" | "las" => [-1.0, 1.0, 1.0],
            other => bail!("space {other:?} is not read (LPS, RAS, LAS and scanner-xyz are)"),
        };
        let mut m = [[0.0; 4]; 4];
        for (c, &a) in axes.iter().enumerate() {
            let d = self.directions[a].unwrap_or_default();
            for r in 0..3 {
                m[r][c] = flip[r] * d[r] + 0.0; // no -0
            }
        }
        for r in 0..3 {
            m[r][3] = flip[r] * self.origin[r] + 0.0;
        }
        m[3][3] = 1.0;
        Ok(m)
    }
}

/// Reads a header: of a `.nhdr`, the whole file; of a `.nrrd`, the lines up
/// to the first blank one (at most 1 MiB).
pub fn read_header(path: &Path) -> Result<NrrdHeader> {
    Ok(read_header_and_bytes(path)?.0)
}

fn read_header_and_bytes(path: &Path) -> Result<(NrrdHeader, Vec<u8>)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut head = Vec::new();
    (&mut f)
        .take(1 << 20)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let end = head.windows(2).position(|w| w == b"\n\n");
    let dir = path.parent().unwrap_or(Path::new("."));
    let text_end = end.unwrap_or(head.len());
    let text = String::from_utf8_lossy(&head[..text_end]);
    let mut h = parse_header(&text, dir).with_context(|| format!("{}: invalid NRRD header", path.display()))?;
    if h.data_file.is_none() {
        let Some(e) = end else {
            bail!(
                "{}: invalid NRRD header: no blank line ends it and it names no `data file`",
                path.display()
            );
        };
        h.data_offset = e + 2;
    }
    Ok((h, head))
}

/// Reads an NRRD image whole, its voxels in file order.
pub fn read(path: &Path, limits: &ReadOptions) -> Result<NrrdImage> {
    let (h, _) = read_header_and_bytes(path)?;
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
    let mut f = std::fs::File::open(&data_path)
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
            let mut gz = flate2::read::MultiGzDecoder::new(f);
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
