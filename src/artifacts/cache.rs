//! The slice cache, defined once: where every file of a cache lives, and
//! the typed reader and writer of `cache.json`, each case's `case.json`
//! and the slice index (with the hash that ties embeddings to it). Every
//! stage reads a cache through here.
//!
//! ```text
//! cache/cache.json                      format, tool version, config, config hash
//! cache/index.jsonl                     one row per slice, all cases
//! cache/cases/<id>/image.npy            float16 (X, Y, Z), RAS, values in [0, 1]
//! cache/cases/<id>/label.npy            uint8 (X, Y, Z), when the case has a label
//! cache/cases/<id>/slices/<plane>_<index>.png
//! cache/cases/<id>/slices.jsonl         this case's rows of the index
//! cache/cases/<id>/case.json            provenance and geometry (the case's commit marker)
//! cache/captions.jsonl                  caption records (artifacts::captions)
//! cache/embeddings/<table>.safetensors  embedding tables (artifacts::embeddings)
//! cache/<stage>-report[-shard-i-of-n].json
//! ```
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::atomic_write_if_changed;
use crate::volume::{self, Modality, Volume};

/// Bumped whenever the cache's files change meaning.
pub const CACHE_FORMAT: u32 = 1;

pub fn cache_json(cache: &Path) -> PathBuf {
    cache.join("cache.json")
}

pub fn index_path(cache: &Path) -> PathBuf {
    cache.join("index.jsonl")
}

pub fn cases_dir(cache: &Path) -> PathBuf {
    cache.join("cases")
}

pub fn case_dir(cache: &Path, id: &str) -> PathBuf {
    cases_dir(cache).join(id)
}

pub fn case_json(cache: &Path, id: &str) -> PathBuf {
    case_dir(cache, id).join(CASE_JSON)
}

pub fn image_npy(cache: &Path, id: &str) -> PathBuf {
    case_dir(cache, id).join(IMAGE_NPY)
}

pub fn label_npy(cache: &Path, id: &str) -> PathBuf {
    case_dir(cache, id).join(LABEL_NPY)
}

pub fn slices_jsonl(cache: &Path, id: &str) -> PathBuf {
    case_dir(cache, id).join(SLICES_JSONL)
}

/// File names inside a case folder (preprocess writes them into a
/// temporary folder first, then renames the folder into place).
pub const CASE_JSON: &str = "case.json";
pub const IMAGE_NPY: &str = "image.npy";
pub const LABEL_NPY: &str = "label.npy";
pub const SLICES_JSONL: &str = "slices.jsonl";
pub const SLICES_DIR: &str = "slices";

/// The default captions file of a cache.
pub fn captions_path(cache: &Path) -> PathBuf {
    cache.join("captions.jsonl")
}

pub fn embeddings_dir(cache: &Path) -> PathBuf {
    cache.join("embeddings")
}

/// `embeddings/<name>.safetensors` (`text`, `image`).
pub fn table_path(cache: &Path, name: &str) -> PathBuf {
    table_in(&embeddings_dir(cache), name)
}

/// Table `name` in a tables folder (`embeddings/`, or one `embed --out` wrote).
pub fn table_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.safetensors"))
}

/// A stage's report beside `dir`'s other files: `<stage>-report<shard suffix>.json`.
pub fn report_path(dir: &Path, stage: &str, shard: Shard) -> PathBuf {
    dir.join(format!("{stage}-report{}.json", shard.suffix()))
}

/// sha256 of the index's slice ids in order: an embedding table records
/// it, so a table made for another index is refused.
pub fn index_sha256(rows: &[SliceRow]) -> String {
    crate::fsutil::sha256_bytes(
        rows.iter()
            .map(|r| r.slice_id.as_str())
            .collect::<Vec<_>>()
            .join("\n")
            .as_bytes(),
    )
}

/// How a volume is brought to a fixed grid after the foreground crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoiMode {
    /// Symmetric zero-pad, then centre crop (MONAI ResizeWithPadOrCrop).
    CropPad,
    /// Trilinear resize of the whole foreground box (aspect not kept).
    Resize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plane {
    Sagittal,
    Coronal,
    Axial,
}

impl Plane {
    pub const ALL: [Plane; 3] = [Plane::Axial, Plane::Coronal, Plane::Sagittal];

    /// The RAS array axis a plane's position runs along.
    pub fn axis(self) -> usize {
        match self {
            Plane::Sagittal => 0,
            Plane::Coronal => 1,
            Plane::Axial => 2,
        }
    }

    /// Index used by the plane-slice embedding (docs/method.md: 0, 1, 2).
    pub fn id(self) -> usize {
        match self {
            Plane::Axial => 0,
            Plane::Coronal => 1,
            Plane::Sagittal => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Plane::Sagittal => "sagittal",
            Plane::Coronal => "coronal",
            Plane::Axial => "axial",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// Target voxel spacing in mm (x, y, z after reorientation to RAS).
    pub spacing: [f64; 3],
    /// Output grid size (paper: 128^3).
    pub roi: [usize; 3],
    pub roi_mode: RoiMode,
    /// CT window in HU mapped to [0, 1].
    pub ct_window: [f64; 2],
    /// MR percentile window mapped to [0, 1].
    pub mr_percentiles: [f64; 2],
    /// Foreground is intensity > this, after normalisation.
    pub foreground_threshold: f32,
    /// Slices cut per plane, spread over the foreground extent.
    pub slices_per_plane: usize,
    pub planes: Vec<Plane>,
    /// For 4D inputs: which volume to take (required when there are several).
    pub volume_index: Option<usize>,
    /// Cap, in MiB, on what one compressed input (a .gz file, the JPEG /
    /// RLE / JPEG 2000 frames of a DICOM file) may decompress to. A read
    /// limit, not an output setting: not recorded in cache.json nor in the
    /// config hash, so raising it re-preprocesses nothing.
    #[serde(skip_serializing)]
    pub max_decompressed_mib: u64,
    /// 3D Slicer segmentations (`.seg.nrrd` labels) whose segments overlap:
    /// `error` (the case fails naming them), `first` or `last` (that
    /// segment wins). Part of the config hash unless it is the default.
    #[serde(skip_serializing_if = "is_default_overlap")]
    pub label_overlap: crate::volume::nrrd::Overlap,
}

fn is_default_overlap(o: &crate::volume::nrrd::Overlap) -> bool {
    *o == crate::volume::nrrd::Overlap::default()
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            spacing: [1.5, 1.5, 1.5],
            roi: [128, 128, 128],
            roi_mode: RoiMode::CropPad,
            ct_window: [-1000.0, 1000.0],
            mr_percentiles: [0.5, 99.5],
            foreground_threshold: 0.0,
            slices_per_plane: 16,
            planes: Plane::ALL.to_vec(),
            volume_index: None,
            max_decompressed_mib: crate::volume::ReadOptions::DEFAULT_MIB,
            label_overlap: Default::default(),
        }
    }
}

/// The preprocess hash's input, written out field by field: what it
/// covers is decided here, not by serde attributes on the config. Frozen
/// at the layout of 2026-12-07 (caches made then are not redone):
/// settings added since are appended only when they differ from the value
/// that reproduces earlier caches (`label_overlap` at its default).
#[derive(Serialize)]
struct HashedPreprocess<'a> {
    spacing: [f64; 3],
    roi: [usize; 3],
    roi_mode: RoiMode,
    ct_window: [f64; 2],
    mr_percentiles: [f64; 2],
    foreground_threshold: f32,
    slices_per_plane: usize,
    planes: &'a [Plane],
    volume_index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label_overlap: Option<crate::volume::nrrd::Overlap>,
}

impl<'a> HashedPreprocess<'a> {
    fn of(c: &'a PreprocessConfig) -> HashedPreprocess<'a> {
        HashedPreprocess {
            spacing: c.spacing,
            roi: c.roi,
            roi_mode: c.roi_mode,
            ct_window: c.ct_window,
            mr_percentiles: c.mr_percentiles,
            foreground_threshold: c.foreground_threshold,
            slices_per_plane: c.slices_per_plane,
            planes: &c.planes,
            volume_index: c.volume_index,
            label_overlap: (c.label_overlap != Default::default()).then_some(c.label_overlap),
        }
    }
}

impl PreprocessConfig {
    /// Identity of everything that changes preprocess output, for skipping
    /// unchanged cases on rerun.
    /// The sha256 of the canonical form [`HashedPreprocess`]: the read
    /// limit `max_decompressed_mib` is not in it.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(&(CACHE_FORMAT, HashedPreprocess::of(self))).unwrap_or_default();
        crate::fsutil::sha256_bytes(&json)
    }

    pub fn read_limits(&self) -> crate::volume::ReadOptions {
        crate::volume::ReadOptions {
            label_overlap: self.label_overlap,
            ..crate::volume::ReadOptions::mib(self.max_decompressed_mib)
        }
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.max_decompressed_mib > 0,
            "preprocess.max_decompressed_mib must be at least 1"
        );
        anyhow::ensure!(
            self.spacing.iter().all(|s| s.is_finite() && *s > 0.0),
            "preprocess.spacing must be positive, got {:?}",
            self.spacing
        );
        anyhow::ensure!(
            self.roi.iter().all(|&r| r > 0),
            "preprocess.roi must be positive, got {:?}",
            self.roi
        );
        anyhow::ensure!(
            self.ct_window[1] > self.ct_window[0],
            "preprocess.ct_window must be [low, high] with low < high"
        );
        anyhow::ensure!(
            0.0 <= self.mr_percentiles[0]
                && self.mr_percentiles[0] < self.mr_percentiles[1]
                && self.mr_percentiles[1] <= 100.0,
            "preprocess.mr_percentiles must be [lower, upper] within 0..100"
        );
        anyhow::ensure!(
            !self.planes.is_empty(),
            "preprocess.planes must name at least one plane"
        );
        Ok(())
    }
}

/// Which 1/n of the cases this process handles (`--shard i/n`, 1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    pub fn parse(s: &str) -> Result<Shard> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("--shard {s:?} must look like i/n, e.g. 2/8"))?;
        let (index, count): (usize, usize) = (
            i.trim()
                .parse()
                .with_context(|| format!("--shard {s:?}: {i:?} is not a number"))?,
            n.trim()
                .parse()
                .with_context(|| format!("--shard {s:?}: {n:?} is not a number"))?,
        );
        if count == 0 || index == 0 || index > count {
            bail!("--shard {s:?}: need 1 <= i <= n");
        }
        Ok(Shard { index, count })
    }

    /// Deterministic membership: by a hash of the case id, so adding cases
    /// does not move the others between shards.
    pub fn owns(&self, id: &str) -> bool {
        if self.count == 1 {
            return true;
        }
        let h = crate::fsutil::sha256_bytes(id.as_bytes());
        let v = u64::from_str_radix(&h[..15], 16).unwrap_or(0);
        (v % self.count as u64) as usize == self.index - 1
    }

    /// `-shard-i-of-n` in report file names (empty for the whole set).
    pub fn suffix(&self) -> String {
        if self.count == 1 {
            String::new()
        } else {
            format!("-shard-{}-of-{}", self.index, self.count)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceFile {
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Geometry {
    pub shape: [usize; 3],
    pub spacing: [f64; 3],
    pub affine: [[f64; 4]; 4],
    pub orientation: String,
}

impl Geometry {
    pub fn of(v: &Volume) -> Geometry {
        Geometry {
            shape: v.shape(),
            spacing: v.spacing(),
            affine: v.affine,
            orientation: v.orientation().unwrap_or_else(|| "???".into()),
        }
    }
}

/// `cases/<id>/case.json`: what was read, how it was processed, what was written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaseRecord {
    pub id: String,
    pub modality: Modality,
    pub class: Option<i64>,
    pub image: SourceFile,
    pub label: Option<SourceFile>,
    pub config_hash: String,
    pub med3d_version: String,
    pub source_geometry: Geometry,
    pub geometry: Geometry,
    /// The intensities mapped to 0 and 1.
    pub intensity_window: [f64; 2],
    pub foreground_bbox: [[usize; 2]; 3],
    pub slices: usize,
    /// For DICOM sources: transfer syntax, rescale applied, slice spacing
    /// (geometry and decoding values only; nothing that identifies anyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<volume::dicom::Provenance>,
}

/// One row of the slice index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SliceRow {
    /// `<case>/<plane>/<index>`: the key captions and embeddings use.
    pub slice_id: String,
    pub case: String,
    pub plane: Plane,
    pub index: usize,
    /// index / (n - 1) along the plane's axis of the processed volume.
    pub position: f64,
    /// Relative to the cache folder.
    pub png: String,
}

/// `cache.json`: the settings a cache was made with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheInfo {
    pub format: u32,
    pub med3d_version: String,
    pub config_hash: String,
    pub preprocess: PreprocessConfig,
}

impl CacheInfo {
    /// Reads `cache.json`; an unreadable file or field is an error naming it.
    pub fn read(cache: &Path) -> Result<CacheInfo> {
        let p = cache_json(cache);
        let bytes =
            std::fs::read(&p).with_context(|| format!("cannot read {} (run `med3d preprocess` first)", p.display()))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{}: not a med3d cache.json", p.display()))?;
        // The preprocess settings fill in defaults when a user's config
        // leaves keys out; a cache.json that lacks one is damaged, and a
        // default (a foreground threshold of 0, say) would silently change
        // what later stages read.
        let want = serde_json::to_value(PreprocessConfig::default())?;
        for key in want.as_object().into_iter().flat_map(|o| o.keys()) {
            if v.pointer(&format!("/preprocess/{key}")).is_none() {
                anyhow::bail!(
                    "{}: key `preprocess.{key}` is missing: the file is damaged or was not written by med3d \
                     (rerun `med3d preprocess` to rewrite it)",
                    p.display()
                );
            }
        }
        serde_json::from_value(v).with_context(|| format!("{}: not a med3d cache.json", p.display()))
    }

    /// Writes `cache.json`, leaving it alone when unchanged.
    pub fn write(&self, cache: &Path) -> Result<()> {
        atomic_write_if_changed(&cache_json(cache), &serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}

/// Reads a committed case record, if there is one.
pub fn read_case_record(cache: &Path, id: &str) -> Option<CaseRecord> {
    let bytes = std::fs::read(case_json(cache, id)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Rebuilds `index.jsonl` from every committed case, under a lock so that
/// shards finishing together do not interleave.
pub fn rebuild_index(cache: &Path) -> Result<usize> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join(".index.lock"))
        .with_context(|| format!("cannot open lock in {}", cache.display()))?;
    lock.lock().context("cannot lock the cache index")?;
    let mut ids: Vec<String> = match std::fs::read_dir(cases_dir(cache)) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.contains(".tmp-"))
            .collect(),
        Err(_) => Vec::new(),
    };
    ids.sort();
    let mut out = String::new();
    let mut n = 0;
    for id in ids {
        if read_case_record(cache, &id).is_none() {
            continue;
        }
        let rows = std::fs::read_to_string(slices_jsonl(cache, &id))?;
        n += rows.lines().count();
        out.push_str(&rows);
    }
    atomic_write_if_changed(&index_path(cache), out.as_bytes())?;
    drop(lock);
    Ok(n)
}

/// Slice rows as the cache stores them: one JSON object per line (a
/// case's slices.jsonl, and index.jsonl, their concatenation).
pub fn slice_rows_jsonl(rows: &[SliceRow]) -> Result<String> {
    let mut out = String::new();
    for r in rows {
        out.push_str(&serde_json::to_string(r)?);
        out.push('\n');
    }
    Ok(out)
}

/// Writes a whole slice index at once (a cache assembled outside
/// `preprocess`, as test fixtures are); `preprocess` builds its index with
/// [`rebuild_index`].
pub fn write_index(cache: &Path, rows: &[SliceRow]) -> Result<()> {
    crate::fsutil::atomic_write(&index_path(cache), slice_rows_jsonl(rows)?.as_bytes())
}

/// Reads the slice index of a cache.
pub fn read_index(cache: &Path) -> Result<Vec<SliceRow>> {
    let p = index_path(cache);
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("cannot read {} (run `med3d preprocess` first)", p.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: bad index row", p.display(), i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash of demo.yaml's preprocess settings as main wrote it in
    /// cache.json on 2026-12-07: changing it would redo every cache.
    #[test]
    fn preprocess_settings_of_2026_12_07_keep_their_hash() {
        let c = PreprocessConfig {
            spacing: [2.0, 2.0, 2.0],
            roi: [96, 96, 96],
            slices_per_plane: 8,
            ..Default::default()
        };
        assert_eq!(
            c.hash(),
            "49db446281a09c63ea420ba7ef22f623cd9bf835ed109f14f4820186aa4e301e"
        );
        let d = PreprocessConfig {
            max_decompressed_mib: 1,
            ..c.clone()
        };
        assert_eq!(c.hash(), d.hash(), "a read limit is not in the hash");
        let e = PreprocessConfig {
            label_overlap: crate::volume::nrrd::Overlap::First,
            ..c.clone()
        };
        assert_ne!(c.hash(), e.hash());
        // every recorded setting is hashed
        let rec = serde_json::to_value(&e).unwrap();
        let canon = serde_json::to_value(HashedPreprocess::of(&e)).unwrap();
        for key in rec.as_object().unwrap().keys() {
            assert!(canon.get(key).is_some(), "preprocess.{key} is recorded but not hashed");
        }
    }

    /// A cache.json that lacks a preprocess key is an error naming the file
    /// and the key, not a default that would silently change later stages.
    #[test]
    fn cache_json_missing_a_key_names_it() {
        let d = tempfile::tempdir().unwrap();
        let info = CacheInfo {
            format: CACHE_FORMAT,
            med3d_version: "test".into(),
            config_hash: "h".into(),
            preprocess: PreprocessConfig {
                foreground_threshold: 0.25,
                ..Default::default()
            },
        };
        info.write(d.path()).unwrap();
        assert_eq!(CacheInfo::read(d.path()).unwrap().preprocess.foreground_threshold, 0.25);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(cache_json(d.path())).unwrap()).unwrap();
        v["preprocess"].as_object_mut().unwrap().remove("foreground_threshold");
        std::fs::write(cache_json(d.path()), serde_json::to_vec(&v).unwrap()).unwrap();
        let e = format!("{:#}", CacheInfo::read(d.path()).unwrap_err());
        assert!(
            e.contains("cache.json") && e.contains("`preprocess.foreground_threshold` is missing"),
            "{e}"
        );
    }
}
