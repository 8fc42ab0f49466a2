//! DICOM ingestion: a folder of single-frame files (searched recursively) or
//! one multi-frame (enhanced) file becomes a `Volume` with the same voxel
//! layout and RAS+ affine a NIfTI conversion (dcm2niix, ITK, MONAI's
//! readers) would give: axis 0 runs along the columns of a slice, axis 1 down
//! its rows, axis 2 along the slice normal (the cross product of the two
//! ImageOrientationPatient vectors), and DICOM's LPS world is flipped to RAS.
//!
//! Three layers, each testable alone:
//! - [`header`] reads a file and keeps only geometry, modality and the values
//!   needed to decode pixels (nothing else from the header leaves it, so no
//!   patient data can reach the cache, logs or prompts);
//! - [`series`] groups slices by SeriesInstanceUID, sorts them along the
//!   normal and checks spacing, duplicates, gaps and orientation: pure, and
//!   fuzzed;
//! - [`pixels`] decodes frames (native or any transfer syntax the pure-Rust
//!   decoders of dicom-rs support) and applies the modality LUT or
//!   RescaleSlope/Intercept exactly once;
//! - [`rle`] is the RLE Lossless decoder [`pixels`] calls.
pub mod header;
pub mod native;
pub mod pixels;
pub mod rle;
pub mod series;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ndarray::Array3;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ReadOptions, Volume};
use header::{FileHeader, ScanOutcome};

/// The ways a DICOM input can be wrong, each with a name that shows up at
/// the start of its message (tests and users match on these).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DicomError {
    #[error("not a DICOM image file: {0}")]
    NotDicom(String),
    #[error("no DICOM image files found under {0}")]
    NoDicomFiles(String),
    #[error("missing PixelData (7FE0,0010) in {0}: the file holds no image")]
    MissingPixelData(String),
    #[error("missing ImagePositionPatient (0020,0032) in {0}: cannot place the slice in space")]
    MissingPosition(String),
    #[error("missing ImageOrientationPatient (0020,0037) in {0}: cannot orient the slice")]
    MissingOrientation(String),
    #[error("missing PixelSpacing (0028,0030) in {0}")]
    MissingPixelSpacing(String),
    #[error("invalid {what} in {label}: {detail}")]
    InvalidAttribute {
        label: String,
        what: &'static str,
        detail: String,
    },
    #[error("inconsistent Rows/Columns within the series: {first} is {rows0}x{cols0} but {other} is {rows1}x{cols1}")]
    InconsistentMatrix {
        first: String,
        rows0: u32,
        cols0: u32,
        other: String,
        rows1: u32,
        cols1: u32,
    },
    #[error("inconsistent PixelSpacing within the series: {first} has {a:?} but {other} has {b:?}")]
    InconsistentPixelSpacing {
        first: String,
        a: [f64; 2],
        other: String,
        b: [f64; 2],
    },
    #[error("mixed orientations within the series: {first} has ImageOrientationPatient {:?} but {other} has {:?}", .orientations[0], .orientations[1])]
    MixedOrientation {
        first: String,
        other: String,
        orientations: Box<[[f64; 6]; 2]>,
    },
    #[error("duplicate slice position: {a} and {b} both lie at {position:.4} mm along the slice normal (repeated acquisitions, echoes or time points need separate series)")]
    DuplicatePosition { a: String, b: String, position: f64 },
    #[error("gap in the slice positions: about {missing} slice(s) missing between {a} and {b} ({step:.4} mm apart where the series steps {spacing:.4} mm)")]
    Gap {
        a: String,
        b: String,
        missing: usize,
        step: f64,
        spacing: f64,
    },
    #[error("non-uniform slice spacing: {a} and {b} are {step:.4} mm apart where the series steps {spacing:.4} mm (tolerance {tolerance:.4} mm)")]
    NonUniformSpacing {
        a: String,
        b: String,
        step: f64,
        spacing: f64,
        tolerance: f64,
    },
    #[error("slice positions do not lie along the slice normal (gantry tilt or sheared stack): {label} is {offset:.4} mm off the line through the first slice")]
    Sheared { label: String, offset: f64 },
    #[error("several series found in {path}; pick one with `series_uid` in the manifest (or `--series` for `med3d info`): {found}")]
    MultipleSeries { path: String, found: String },
    #[error("no series with SeriesInstanceUID {uid} under {path}; found: {found}")]
    SeriesNotFound { uid: String, path: String, found: String },
    #[error("unsupported transfer syntax {name} ({uid}) in {label}")]
    UnsupportedTransferSyntax { name: String, uid: String, label: String },
    #[error("unsupported pixel format in {label}: {detail}")]
    UnsupportedPixelFormat { label: String, detail: String },
    #[error("truncated or corrupt file {label}: {detail}")]
    Truncated { label: String, detail: String },
    #[error("cannot decode the pixel data of {label}: {detail}")]
    Decode { label: String, detail: String },
}

/// What went into the voxels, for the case's provenance record: geometry
/// and decoding values only (no identifiers, dates or names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub modality: Option<String>,
    pub transfer_syntaxes: Vec<String>,
    pub files: usize,
    pub frames: usize,
    /// Distinct (slope, intercept) pairs applied, once, to the stored values.
    pub rescale: Vec<[f64; 2]>,
    /// Whether a Modality LUT Sequence was applied instead of a rescale.
    pub modality_lut: bool,
    /// Slice step along the normal, from the positions (not SliceThickness).
    pub slice_spacing: f64,
    pub pixel_spacing: [f64; 2],
    pub orientation: [f64; 6],
}

/// A series found in a scan: one SeriesInstanceUID.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesSummary {
    pub series_uid: String,
    pub modality: Option<String>,
    pub files: usize,
    pub frames: usize,
    /// Distinct (rows, columns) seen.
    pub matrices: Vec<[u32; 2]>,
    /// Distinct orientations seen (rounded to 4 decimals).
    pub orientations: Vec<[f64; 6]>,
}

/// Everything a scan of a path found.
#[derive(Debug, Default)]
pub struct Scan {
    pub root: PathBuf,
    pub files: Vec<FileHeader>,
    /// Files skipped as not DICOM images, each with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// DICOM files that could not even be parsed far enough to tell their
    /// series; loading any series from this scan fails on them.
    pub broken: Vec<(PathBuf, String)>,
    /// The sha256 of every file listed, in listing order, from the bytes
    /// the scan read; None when one could not be read.
    pub file_sha256: Option<Vec<(PathBuf, String)>>,
}

/// True when `path` should be read as DICOM: a folder, a file with the
/// Part 10 "DICM" marker, or a `.dcm` / `.dicom` / `.ima` name.
pub fn is_dicom_path(path: &Path) -> bool {
    if path.is_dir() {
        return true;
    }
    let by_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["dcm", "dicom", "ima"].iter().any(|x| e.eq_ignore_ascii_case(x)));
    by_name || header::has_dicm_marker(path)
}

fn list_files(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.is_dir() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for e in rd {
            let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
            let p = e.path();
            let ft = e.file_type().with_context(|| format!("cannot stat {}", p.display()))?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() || (ft.is_symlink() && p.is_file()) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the headers of every file under `path` (or of the one file).
pub fn scan(path: &Path) -> Result<Scan> {
    if !path.exists() {
        anyhow::bail!("{}: no such file or folder", path.display());
    }
    let paths = list_files(path)?;
    // Each file is read once: its header parsed and its bytes hashed for
    // the cache's provenance (`source_sha256`), with no second pass.
    let outcomes: Vec<(PathBuf, ScanOutcome, Option<String>)> = paths
        .into_par_iter()
        .map(|p| match std::fs::read(&p) {
            Ok(bytes) => {
                let sha = crate::fsutil::sha256_bytes(&bytes);
                (p.clone(), header::scan_bytes(&p, &bytes), Some(sha))
            }
            Err(e) => (p, ScanOutcome::Skip(format!("unreadable ({e})")), None),
        })
        .collect();
    let mut s = Scan {
        root: path.to_path_buf(),
        ..Default::default()
    };
    let mut hashes = Some(Vec::new());
    for (p, o, sha) in outcomes {
        match (sha, hashes.as_mut()) {
            (Some(h), Some(all)) => all.push((p.clone(), h)),
            _ => hashes = None,
        }
        match o {
            ScanOutcome::Image(h) => s.files.push(*h),
            ScanOutcome::Skip(why) => s.skipped.push((p, why)),
            ScanOutcome::Broken(why) => s.broken.push((p, why)),
        }
    }
    for (p, why) in &s.skipped {
        tracing::warn!("skipped {}: {why}", p.display());
    }
    s.file_sha256 = hashes;
    Ok(s)
}

impl Scan {
    /// One summary per SeriesInstanceUID, sorted by UID.
    pub fn series(&self) -> Vec<SeriesSummary> {
        let mut by: BTreeMap<&str, SeriesSummary> = BTreeMap::new();
        for f in &self.files {
            let s = by.entry(f.series_uid.as_str()).or_insert_with(|| SeriesSummary {
                series_uid: f.series_uid.clone(),
                modality: f.modality.clone(),
                files: 0,
                frames: 0,
                matrices: Vec::new(),
                orientations: Vec::new(),
            });
            s.files += 1;
            s.frames += f.frames.len();
            let m = [f.pixel.rows, f.pixel.cols];
            if !s.matrices.contains(&m) {
                s.matrices.push(m);
            }
            for fr in &f.frames {
                if let Some(o) = fr.geom.orientation {
                    let o = o.map(|v| (v * 1e4).round() / 1e4 + 0.0);
                    if !s.orientations.contains(&o) {
                        s.orientations.push(o);
                    }
                }
            }
        }
        by.into_values().collect()
    }

    fn found_list(&self) -> String {
        self.series()
            .iter()
            .map(|s| format!("{} ({} files, {} frames)", s.series_uid, s.files, s.frames))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The files of the series to load: the one with `uid`, or the only one.
    pub fn select(&self, uid: Option<&str>) -> Result<Vec<&FileHeader>, DicomError> {
        let root = self.root.display().to_string();
        if let Some((p, why)) = self.broken.first() {
            return Err(DicomError::Truncated {
                label: p.display().to_string(),
                detail: why.clone(),
            });
        }
        if self.files.is_empty() {
            if self.root.is_dir() {
                return Err(DicomError::NoDicomFiles(root));
            }
            let why = self.skipped.first().map(|(_, w)| w.clone()).unwrap_or_default();
            return Err(DicomError::NotDicom(format!("{root} ({why})")));
        }
        match uid {
            Some(u) => {
                let chosen: Vec<&FileHeader> = self.files.iter().filter(|f| f.series_uid == u).collect();
                if chosen.is_empty() {
                    return Err(DicomError::SeriesNotFound {
                        uid: u.to_string(),
                        path: root,
                        found: self.found_list(),
                    });
                }
                Ok(chosen)
            }
            None => {
                let first = &self.files[0].series_uid;
                if self.files.iter().any(|f| &f.series_uid != first) {
                    return Err(DicomError::MultipleSeries {
                        path: root,
                        found: self.found_list(),
                    });
                }
                Ok(self.files.iter().collect())
            }
        }
    }
}

/// A loaded DICOM series: the volume and what went into it.
#[derive(Debug, Clone)]
pub struct DicomVolume {
    pub volume: Volume,
    pub provenance: Provenance,
    /// On-disk sample type of the stored values, e.g. "int16".
    pub stored_dtype: String,
}

/// Loads one series (by UID, or the only one) from a folder or file.
pub fn load(path: &Path, series_uid: Option<&str>, limits: &ReadOptions) -> Result<DicomVolume> {
    let scan = crate::volume::source::time("scan", || scan(path))?;
    if let Some(hashes) = &scan.file_sha256 {
        let sha = match path.is_dir() {
            true => series_sha256(path, hashes, series_uid),
            false => hashes.first().map(|(_, h)| h.clone()).unwrap_or_default(),
        };
        crate::volume::source::note_sha256(path, sha);
    }
    load_from_scan(&scan, series_uid, limits)
}

/// Loads one series of an existing scan.
pub fn load_from_scan(scan: &Scan, series_uid: Option<&str>, limits: &ReadOptions) -> Result<DicomVolume> {
    let files = scan.select(series_uid)?;
    // One slice per frame of every file, in a stable order.
    let mut slices: Vec<(usize, usize)> = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        // What cannot be decoded is named before any geometry complaint.
        pixels::check_supported(f)?;
        if let Some(p) = &f.problem {
            return Err(p.clone().into());
        }
        for k in 0..f.frames.len() {
            slices.push((fi, k));
        }
    }
    let labels: Vec<String> = slices
        .iter()
        .map(|&(fi, k)| header::frame_label(files[fi], k))
        .collect();
    let geoms: Vec<series::SliceGeom> = slices.iter().map(|&(fi, k)| files[fi].frames[k].geom.clone()).collect();
    let asm = series::assemble(&geoms, &labels, &series::Tolerance::default())?;
    let data = decode_stack(&scan.root, &files, &slices, &asm.order, asm.shape, limits)?;
    let mut rescale: Vec<[f64; 2]> = Vec::new();
    let mut tss: Vec<String> = Vec::new();
    let mut lut = false;
    for &si in &asm.order {
        let (fi, k) = slices[si];
        let f = files[fi];
        if f.modality_lut.is_some() {
            lut = true;
        } else {
            let r = f.frames[k].rescale;
            if !rescale.contains(&[r.slope, r.intercept]) {
                rescale.push([r.slope, r.intercept]);
            }
        }
        let ts = header::transfer_syntax_name(&f.transfer_syntax);
        if !tss.contains(&ts) {
            tss.push(ts);
        }
    }
    let g0 = &geoms[asm.order[0]];
    let provenance = Provenance {
        modality: files[0].modality.clone(),
        transfer_syntaxes: tss,
        files: files.len(),
        frames: slices.len(),
        rescale,
        modality_lut: lut,
        slice_spacing: asm.slice_spacing,
        pixel_spacing: g0.pixel_spacing.unwrap_or([f64::NAN; 2]),
        orientation: g0.orientation.unwrap_or([f64::NAN; 6]),
    };
    let volume = Volume {
        data,
        affine: asm.affine,
    };
    Ok(DicomVolume {
        volume,
        provenance,
        stored_dtype: files[0].pixel.dtype_name(),
    })
}

/// Frames decoded and transposed at a time: one slab of 32 planes (32 MB
/// for 512 x 512) is decoded in parallel, then written into the C-order
/// volume through 32 x 32 tiles, as the NIfTI reader does; no full-size
/// frame stack and no strided per-voxel scatter.
const SLAB: usize = 32;

/// The volume in C order (data[[x, y, z]] = frame z at row y, column x),
/// frame z being `slices[order[z]]` = (file, frame). Each file is opened
/// once: its parsed object is kept from the first slab that needs it to
/// the last (multi-frame files span slabs).
fn decode_stack(
    root: &Path,
    files: &[&FileHeader],
    slices: &[(usize, usize)],
    order: &[usize],
    [nx, ny, nz]: [usize; 3],
    limits: &ReadOptions,
) -> Result<Array3<f32>> {
    use std::collections::HashMap;
    let per = nx * ny;
    if order.len() != nz || per == 0 {
        anyhow::bail!("{} frames for {nz} slices of {nx}x{ny}", order.len());
    }
    let frame_at = |z: usize| slices[order[z]];
    // the last slice each file serves, to drop its object after it
    let mut last: HashMap<usize, usize> = HashMap::new();
    for z in 0..nz {
        last.insert(frame_at(z).0, z);
    }
    // Nothing is allocated before every file's header has been checked
    // against its pixel data; the volume then against the series' whole
    // supply (compressed files together within the cap: it is per case).
    let (mut native, mut packed, mut declared) = (0u64, 0u64, 0u64);
    for f in files {
        pixels::check_file(f, limits)?;
        declared = declared.saturating_add(pixels::declared_bytes(f));
        let have = pixels::supply(f, limits).bytes();
        if pixels::encapsulated(f) {
            packed = packed.saturating_add(have);
        } else {
            native = native.saturating_add(have);
        }
    }
    let supply = crate::alloc::Supply::held(
        native.saturating_add(packed.min(limits.max_decompressed_bytes)),
        "the series' pixel data (compressed files within the cap on decompressed data) supply",
    );
    let label = root.display().to_string();
    let what = format!("{} frames of {nx}x{ny}", order.len());
    let want = |n: usize, declared: u64| crate::alloc::Want {
        label: &label,
        what: &what,
        n,
        declared,
    };
    let mut data = crate::alloc::zeroed(&want(per * nz, declared), &supply)?;
    let mut slab = crate::alloc::zeroed(&want(per * SLAB.min(nz), 0), &supply)?;
    let mut open: HashMap<usize, native::Opened> = HashMap::new();
    for k0 in (0..nz).step_by(SLAB) {
        let k1 = (k0 + SLAB).min(nz);
        let mut needed: Vec<usize> = (k0..k1)
            .map(|z| frame_at(z).0)
            .filter(|fi| !open.contains_key(fi))
            .collect();
        needed.sort_unstable();
        needed.dedup();
        let opened: Vec<(usize, native::Opened)> = crate::volume::source::time("read", || {
            needed
                .into_par_iter()
                .map(|fi| Ok((fi, native::Opened::open(files[fi])?)))
                .collect::<Result<_>>()
        })?;
        open.extend(opened);
        let planes = &mut slab[..(k1 - k0) * per];
        crate::volume::source::time("decode", || {
            planes
                .par_chunks_mut(per)
                .enumerate()
                .map(|(dz, out)| -> Result<()> {
                    let (fi, k) = frame_at(k0 + dz);
                    match open.get(&fi).context("a frame's file was not opened")? {
                        native::Opened::Parsed(obj) => pixels::decode_frame_into(obj, files[fi], k, limits, out)?,
                        native::Opened::Native(file, off) => {
                            native::decode_frame_at(file, *off, files[fi], k, limits, out)?
                        }
                    }
                    Ok(())
                })
                .collect::<Result<Vec<()>>>()
        })?;
        crate::volume::source::time("transpose", || {
            crate::volume::f_planes_into_c_order(planes, [nx, ny, nz], k0, &mut data)
        });
        open.retain(|fi, _| last.get(fi).is_some_and(|&z| z >= k1));
    }
    Ok(Array3::from_shape_vec((nx, ny, nz), data)?)
}

/// A content hash of the files of a DICOM input, for the cache's skip test:
/// sha256 over the sorted (relative path, file sha256) pairs, and the chosen
/// series UID.
pub fn source_sha256(path: &Path, series_uid: Option<&str>) -> Result<String> {
    let hashes = list_files(path)?
        .into_iter()
        .map(|p| Ok((p.clone(), crate::fsutil::sha256_file(&p)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(series_sha256(path, &hashes, series_uid))
}

/// `source_sha256` from the files' own hashes (in listing order).
fn series_sha256(path: &Path, hashes: &[(PathBuf, String)], series_uid: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (p, file_sha) in hashes {
        let rel = p.strip_prefix(path).unwrap_or(p).to_string_lossy().into_owned();
        h.update(rel.as_bytes());
        h.update([0u8]);
        h.update(file_sha.as_bytes());
        h.update([b'\n']);
    }
    if let Some(u) = series_uid {
        h.update(b"series_uid=");
        h.update(u.as_bytes());
    }
    hex::encode(h.finalize())
}
