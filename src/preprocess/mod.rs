//! The preprocess stage: manifest -> cache/. Per case: load, reorient to RAS,
//! resample to the target spacing, normalise intensities, crop to the
//! foreground, bring to the fixed ROI, then write the volume, the label, the
//! 2D slices and a provenance record. Cases run in parallel; a failing case
//! is reported and the others go on.
//!
//! Cache layout (all written atomically; `case.json` is written last and is
//! the commit marker of a case):
//! ```text
//! cache/cache.json                      format, tool version, config, config hash
//! cache/index.jsonl                     one row per slice, all cases
//! cache/cases/<id>/image.npy            float16 (X, Y, Z), RAS, values in [0, 1]
//! cache/cases/<id>/label.npy            uint8 (X, Y, Z), when the case has a label
//! cache/cases/<id>/slices/<plane>_<index>.png
//! cache/cases/<id>/slices.jsonl         this case's rows of the index
//! cache/cases/<id>/case.json            provenance and geometry
//! cache/preprocess-report[-shard-i-of-n].json
//! ```
pub mod slices;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::artifacts::cache::{self, CacheInfo, PreprocessConfig, RoiMode};
use crate::artifacts::npy;
use crate::fsutil::{atomic_write, sweep_stale_tmp, tmp_path};
use crate::manifest::{Case, Manifest};
use crate::volume::{self, crop, intensity, orient, resample, Modality, Volume};

pub use crate::artifacts::cache::{
    read_case_record, read_index, rebuild_index, CaseRecord, Geometry, Shard, SliceRow, SourceFile, CACHE_FORMAT,
};
pub use crate::VERSION;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Summary {
    pub shard: String,
    pub total: usize,
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub failures: Vec<Failure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub case: String,
    pub error: String,
}

/// Everything that comes out of processing one case, before it is written.
pub struct Processed {
    pub image: Volume,
    pub label: Option<Volume>,
    pub source_geometry: Geometry,
    pub intensity_window: [f64; 2],
    pub foreground_bbox: crop::BBox,
    pub dicom: Option<volume::dicom::Provenance>,
}

/// Time spent on each step of a case, logged at debug level
/// (`MED3D_LOG=med3dinsight=debug`), for profiling.
struct Lap<'a> {
    case: &'a str,
    start: std::time::Instant,
}

impl<'a> Lap<'a> {
    fn start(case: &'a str) -> Self {
        Lap {
            case,
            start: std::time::Instant::now(),
        }
    }

    fn done(&mut self, step: &str) {
        let ms = self.start.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(case = self.case, step, ms = format!("{ms:.1}"), "step done");
        self.start = std::time::Instant::now();
    }
}

/// The per-case transform chain; pure (reads files, writes nothing).
pub fn process_volume(case: &Case, cfg: &PreprocessConfig) -> Result<Processed> {
    let mut lap = Lap::start(&case.id);
    let limits = cfg.read_limits();
    let loaded = volume::load_image(&case.image, case.series_uid.as_deref(), cfg.volume_index, &limits)?;
    let (image, dicom) = (loaded.volume, loaded.dicom);
    let label = match &case.label {
        Some(p) => {
            let l = volume::load(p, cfg.volume_index, &limits)?;
            if l.shape() != image.shape() {
                bail!(
                    "{}: label shape {:?} differs from image shape {:?} ({})",
                    p.display(),
                    l.shape(),
                    image.shape(),
                    case.image.display()
                );
            }
            let far = l
                .affine
                .iter()
                .flatten()
                .zip(image.affine.iter().flatten())
                .any(|(a, b)| (a - b).abs() > 1e-3 * (1.0 + b.abs()));
            if far {
                bail!(
                    "{}: label affine differs from the image's ({})",
                    p.display(),
                    case.image.display()
                );
            }
            if let Some(v) = l.data.iter().find(|v| v.fract() != 0.0 || **v < 0.0 || **v > 255.0) {
                bail!("{}: label value {v} is not an integer class in 0..=255", p.display());
            }
            Some(l)
        }
        None => None,
    };
    lap.done("load");
    let source_geometry = Geometry::of(&image);
    let tr = orient::ras_transform(&image).with_context(|| format!("{}", case.image.display()))?;
    let image = orient::apply_owned(image, &tr);
    let label = label.map(|l| orient::apply_owned(l, &tr));
    lap.done("orient");
    let (grid, shape) = resample::target_grid(&image.affine, image.shape(), cfg.spacing)
        .with_context(|| format!("{}", case.image.display()))?;
    // The resampled grid is sized by the header's geometry, not by the
    // file: a few bytes of affine can ask for gigabytes. It falls under the
    // same cap as what compressed data may expand to.
    let grid_bytes = shape
        .iter()
        .try_fold(4u64, |a, &d| a.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    let what = format!(
        "resampling to {:?} mm (voxel size {:?} mm in the affine) on a {shape:?} grid of float32",
        cfg.spacing,
        image.spacing()
    );
    let image_label = case.image.display().to_string();
    let want = crate::alloc::Want {
        label: &image_label,
        what: &what,
        n: 0,
        declared: grid_bytes,
    };
    limits.expansion().check(&want)?;
    let mut image = resample::resample_to(&image, &grid, shape, resample::Interp::Linear)?;
    let label = label
        .map(|l| resample::resample_to(&l, &grid, shape, resample::Interp::Nearest))
        .transpose()?;
    lap.done("resample");
    let window = match case.modality {
        Modality::CT => {
            intensity::scale_window(&mut image.data, cfg.ct_window[0], cfg.ct_window[1])?;
            cfg.ct_window
        }
        Modality::MR => {
            let (lo, hi) = intensity::scale_percentiles(&mut image.data, cfg.mr_percentiles[0], cfg.mr_percentiles[1])?;
            [lo, hi]
        }
    };
    lap.done("intensity");
    let bbox = crop::foreground_bbox(&image.data, cfg.foreground_threshold).with_context(|| {
        format!(
            "{}: no voxel is above the foreground threshold {} after normalisation",
            case.image.display(),
            cfg.foreground_threshold
        )
    })?;
    let image = crop::crop(&image, &bbox);
    let label = label.map(|l| crop::crop(&l, &bbox));
    let (image, label) = match cfg.roi_mode {
        RoiMode::CropPad => (
            crop::pad_or_crop(&image, cfg.roi),
            label.map(|l| crop::pad_or_crop(&l, cfg.roi)),
        ),
        RoiMode::Resize => (
            crop::resize(&image, cfg.roi, resample::Interp::Linear)?,
            label
                .map(|l| crop::resize(&l, cfg.roi, resample::Interp::Nearest))
                .transpose()?,
        ),
    };
    lap.done("crop");
    Ok(Processed {
        image,
        label,
        source_geometry,
        intensity_window: window,
        foreground_bbox: bbox,
        dicom,
    })
}

pub(crate) fn process_case(case: &Case, cfg: &PreprocessConfig, cfg_hash: &str, cache: &Path) -> Result<bool> {
    let mut lap = Lap::start(&case.id);
    // A rerun hashes the sources first, to skip an unchanged case without
    // reading it; a case with no record to match (a first run, or a changed
    // config) is processed anyway, and its sources are hashed by the readers
    // as they read them, with no second pass (`volume::source`).
    let prior = read_case_record(cache, &case.id)
        .filter(|rec| rec.config_hash == cfg_hash && rec.class == case.class && rec.modality == case.modality);
    let mut known: Vec<(PathBuf, String)> = Vec::new();
    if let Some(rec) = prior {
        let image = volume::source_sha256(&case.image, case.series_uid.as_deref())?;
        let label = case.label.as_deref().map(|l| volume::source_sha256(l, None)).transpose()?;
        if rec.image.sha256 == image && rec.label.as_ref().map(|l| &l.sha256) == label.as_ref() {
            return Ok(false);
        }
        known.push((case.image.clone(), image));
        if let (Some(p), Some(h)) = (&case.label, label) {
            known.push((p.clone(), h));
        }
        lap.done("hash");
    }
    let (p, read) = volume::source::record(|| process_volume(case, cfg));
    let p = p?;
    for (step, d) in read.steps() {
        let ms = d.as_secs_f64() * 1e3;
        tracing::debug!(case = case.id.as_str(), step, ms = format!("{ms:.1}"), "read step");
    }
    lap = Lap::start(&case.id);
    let sha_of = |path: &Path, series_uid: Option<&str>| -> Result<String> {
        if let Some((_, h)) = known.iter().find(|(k, _)| k == path) {
            return Ok(h.clone());
        }
        if let Some(h) = read.sha256_of(path) {
            return Ok(h.to_string());
        }
        // a reader that did not read the file whole, in order (one that
        // needed only a part of it): the second pass
        volume::source_sha256(path, series_uid)
    };
    let image_src = SourceFile {
        path: case.image.clone(),
        sha256: sha_of(&case.image, case.series_uid.as_deref())?,
    };
    let label_src = match &case.label {
        Some(l) => Some(SourceFile {
            path: l.clone(),
            sha256: sha_of(l, None)?,
        }),
        None => None,
    };
    lap.done("hash");
    lap = Lap::start(&case.id);

    let final_dir = cache::case_dir(cache, &case.id);
    let work = tmp_path(&final_dir);
    std::fs::create_dir_all(work.join("slices")).with_context(|| format!("cannot create {}", work.display()))?;
    let shape = p.image.shape();
    // Store float16, and cut the slices from the stored values, so a slice's
    // pixels are exactly what training reads at that plane and position.
    let halfs: Vec<half::f16> = p.image.data.iter().map(|&v| half::f16::from_f32(v)).collect();
    let bytes: Vec<u8> = halfs.iter().flat_map(|h| h.to_le_bytes()).collect();
    std::fs::write(
        work.join(cache::IMAGE_NPY),
        npy::to_bytes(npy::NpyDtype::F16, &shape, &bytes),
    )?;
    let stored = ndarray::Array3::from_shape_vec(shape, halfs.iter().map(|h| h.to_f32()).collect())?;
    if let Some(l) = &p.label {
        let lb: Vec<u8> = l.data.iter().map(|&v| v.round().clamp(0.0, 255.0) as u8).collect();
        std::fs::write(
            work.join(cache::LABEL_NPY),
            npy::to_bytes(npy::NpyDtype::U8, &shape, &lb),
        )?;
    }
    let fg = crop::foreground_bbox(&stored, cfg.foreground_threshold).unwrap_or([
        (0, shape[0]),
        (0, shape[1]),
        (0, shape[2]),
    ]);
    lap.done("write");
    let mut rows = Vec::new();
    let mut planes = cfg.planes.clone();
    planes.sort_by_key(|p| p.id());
    planes.dedup();
    for plane in planes {
        let ax = plane.axis();
        for idx in slices::positions(fg[ax].0, fg[ax].1, cfg.slices_per_plane) {
            let name = format!("{}_{:03}.png", plane.name(), idx);
            let png = slices::png_bytes(&slices::view(&stored, plane, idx))?;
            std::fs::write(work.join("slices").join(&name), png)?;
            rows.push(SliceRow {
                slice_id: format!("{}/{}/{}", case.id, plane.name(), idx),
                case: case.id.clone(),
                plane,
                index: idx,
                position: slices::normalised(idx, shape[ax]),
                png: format!("cases/{}/slices/{}", case.id, name),
            });
        }
    }
    std::fs::write(work.join(cache::SLICES_JSONL), cache::slice_rows_jsonl(&rows)?)?;
    let rec = CaseRecord {
        id: case.id.clone(),
        modality: case.modality,
        class: case.class,
        image: image_src,
        label: label_src,
        config_hash: cfg_hash.to_string(),
        med3d_version: VERSION.to_string(),
        source_geometry: p.source_geometry,
        geometry: Geometry::of(&p.image),
        intensity_window: p.intensity_window,
        foreground_bbox: p.foreground_bbox.map(|(a, b)| [a, b]),
        slices: rows.len(),
        dicom: p.dicom,
    };
    std::fs::write(work.join(cache::CASE_JSON), serde_json::to_vec_pretty(&rec)?)?;
    lap.done("slices");
    // Swap the finished folder into place: old -> aside, new -> in, drop old.
    // A kill in between leaves no committed case.json, so a rerun redoes it.
    // Durable before it is visible: a crash after the rename finds the
    // whole case, never a committed case.json over missing data.
    crate::fsutil::sync_tree(&work)?;
    if final_dir.exists() {
        let aside = tmp_path(&final_dir);
        std::fs::rename(&final_dir, &aside)?;
        std::fs::rename(&work, &final_dir)?;
        std::fs::remove_dir_all(&aside)?;
    } else {
        std::fs::rename(&work, &final_dir)?;
    }
    crate::fsutil::sync_parent(&final_dir)?;
    lap.done("commit");
    Ok(true)
}

/// Runs the stage over a manifest's cases (this shard's share).
pub fn run(manifest: &Manifest, cfg: &PreprocessConfig, cache: &Path, shard: Shard, workers: usize) -> Result<Summary> {
    cfg.validate()?;
    std::fs::create_dir_all(cache::cases_dir(cache))
        .with_context(|| format!("cannot create cache folder {}", cache.display()))?;
    sweep_stale_tmp(cache)?;
    sweep_stale_tmp(&cache::cases_dir(cache))?;
    let cfg_hash = cfg.hash();
    CacheInfo {
        format: CACHE_FORMAT,
        med3d_version: VERSION.into(),
        config_hash: cfg_hash.clone(),
        preprocess: cfg.clone(),
    }
    .write(cache)?;

    let cases: Vec<&Case> = manifest.cases.iter().filter(|c| shard.owns(&c.id)).collect();
    let bar = crate::progress::bar(cases.len() as u64, "preprocess");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(workers.max(1)).build()?;
    let results: Vec<(String, Result<bool>)> = pool.install(|| {
        cases
            .par_iter()
            .map(|c| {
                // Last line of defence: a panic anywhere in one case (a
                // reader's bug on a damaged file) fails that case only.
                let r = crate::runtime::guard::boundary(|| process_case(c, cfg, &cfg_hash, cache))
                    .with_context(|| format!("case {} ({})", c.id, c.image.display()));
                match &r {
                    Ok(true) => tracing::info!(case = %c.id, "processed"),
                    Ok(false) => tracing::info!(case = %c.id, "unchanged, skipped"),
                    Err(e) => tracing::error!(case = %c.id, "failed: {e:#}"),
                }
                bar.inc(1);
                (c.id.clone(), r)
            })
            .collect()
    });
    bar.finish_and_clear();
    let mut s = Summary {
        shard: format!("{}/{}", shard.index, shard.count),
        total: cases.len(),
        ..Default::default()
    };
    for (id, r) in results {
        match r {
            Ok(true) => s.done += 1,
            Ok(false) => s.skipped += 1,
            Err(e) => {
                s.failed += 1;
                s.failures.push(Failure {
                    case: id,
                    error: format!("{e:#}"),
                });
            }
        }
    }
    rebuild_index(cache)?;
    atomic_write(
        &cache::report_path(cache, "preprocess", shard),
        &serde_json::to_vec_pretty(&s)?,
    )?;
    Ok(s)
}
