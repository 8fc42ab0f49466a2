//! NRRD headers: the text part of an attached `.nrrd` or a detached
//! `.nhdr`, parsed into the fields med3d uses (type, sizes, encoding,
//! byte order, space directions and origin, kinds, the data file) and
//! every `key:=value` pair; the affine it implies. Reading the data part
//! is the parent module's.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::super::affine::Mat4;
use super::super::nifti::DataType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoding {
    Raw,
    Gzip,
    Ascii,
}

/// A parsed header: the fields med3d uses, and every `key:=value` pair.
#[derive(Debug, Clone)]
pub struct NrrdHeader {
    pub dtype: DataType,
    pub sizes: Vec<usize>,
    pub(super) encoding: Encoding,
    pub(super) big_endian: bool,
    /// Per axis: its direction (in the header's space), None for non-space
    /// axes (`none`: a list of layers, vector components).
    pub directions: Vec<Option<[f64; 3]>>,
    pub origin: [f64; 3],
    /// The header's `space`, lower-cased (empty when it has none).
    pub space: String,
    pub kinds: Vec<String>,
    pub key_values: BTreeMap<String, String>,
    pub(super) data_file: Option<PathBuf>,
    pub(super) byte_skip: i64,
    pub(super) line_skip: usize,
    /// Where the data start in the file itself (attached headers).
    pub(super) data_offset: usize,
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

/// The most bytes of a header file read (of a `.nrrd`, the header part).
pub(super) const HEADER_MAX: u64 = 1 << 20;

pub(super) fn read_header_and_bytes(path: &Path) -> Result<(NrrdHeader, Vec<u8>)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut head = Vec::new();
    (&mut f)
        .take(HEADER_MAX)
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
