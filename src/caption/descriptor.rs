//! The offline backend: a deterministic, factual description of a slice
//! computed from the cached volume (never from an MLLM; its records say
//! backend `descriptor`, model `med3d-descriptor-v1`).
//!
//! Per slice, on the stored float16 volume at the slice's plane and index:
//! - plane, slice index, position along the plane's axis in words and %;
//! - modality;
//! - the foreground (value > the cache's `foreground_threshold`): its share
//!   of the slice and its extent in mm along the two in-plane axes;
//! - CT: the share of foreground pixels in four HU bands, with
//!   HU = lo + v * (hi - lo) from the case's intensity window:
//!   air/lung < -400, fat -400..-30, soft tissue -30..300, bone >= 300;
//! - MR (arbitrary units): the 10th, 50th and 90th percentiles of the
//!   foreground's normalised intensities;
//! - axial and coronal: a left-right symmetry score in [0, 1],
//!   1 - sum|a - b| / sum(a + b) over pixel pairs mirrored about the
//!   foreground's left-right midline (1 = mirror image).
use std::path::Path;

use anyhow::{ensure, Context, Result};
use ndarray::{Array3, ArrayView2, Axis};

use super::prompt::axis_words;
use crate::artifacts::cache::CaseRecord;
use crate::artifacts::cache::Plane;
use crate::artifacts::npy;
use crate::volume::Modality;

pub const MODEL: &str = "med3d-descriptor-v1";

/// HU band edges: air/lung | fat | soft tissue | bone.
const HU_EDGES: [f64; 3] = [-400.0, -30.0, 300.0];

/// The stored volume of a case, as f32.
pub fn load_volume(cache: &Path, case: &str) -> Result<Array3<f32>> {
    let p = crate::artifacts::cache::image_npy(cache, case);
    let (vals, shape) = npy::read_volume(&p)?;
    Array3::from_shape_vec((shape[0], shape[1], shape[2]), vals).with_context(|| format!("{}", p.display()))
}

/// The two RAS axes a plane's slice spans, in array order, with their
/// (low, high) direction names.
fn in_plane(plane: Plane) -> [(usize, &'static str); 2] {
    match plane {
        Plane::Axial => [(0, "left-right"), (1, "anterior-posterior")],
        Plane::Coronal => [(0, "left-right"), (2, "superior-inferior")],
        Plane::Sagittal => [(1, "anterior-posterior"), (2, "superior-inferior")],
    }
}

fn region(position: f64, plane: Plane) -> String {
    let (lo, hi) = axis_words(plane);
    let side = |s: &str| {
        if plane == Plane::Sagittal {
            format!("patient's {s}")
        } else {
            s.to_string()
        }
    };
    match position {
        p if p < 0.15 => format!("near the {} end", side(lo)),
        p if p < 0.4 => format!("in the {} part", side(lo)),
        p if p <= 0.6 => "near the middle".to_string(),
        p if p <= 0.85 => format!("in the {} part", side(hi)),
        _ => format!("near the {} end", side(hi)),
    }
}

fn percentile(sorted: &[f32], q: f64) -> f32 {
    let i = ((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1);
    sorted[i]
}

/// Symmetry of `s` (first axis = left-right) about the foreground's midline.
fn symmetry(s: &ArrayView2<f32>, threshold: f32, x0: usize, x1: usize) -> Option<f64> {
    let (mut diff, mut total) = (0.0f64, 0.0f64);
    for x in x0..=x1 {
        let m = x0 + x1 - x;
        if m <= x {
            break;
        }
        for y in 0..s.shape()[1] {
            let a = s[[x, y]];
            let b = s[[m, y]];
            let a = if a > threshold { a as f64 } else { 0.0 };
            let b = if b > threshold { b as f64 } else { 0.0 };
            diff += (a - b).abs();
            total += a + b;
        }
    }
    (total > 0.0).then(|| 1.0 - diff / total)
}

/// The description of one slice; `where_words`: state the plane, slice
/// number and position, and the in-plane axis names (else the content alone).
pub fn describe(
    vol: &Array3<f32>,
    rec: &CaseRecord,
    threshold: f32,
    plane: Plane,
    index: usize,
    position: f64,
    where_words: bool,
) -> Result<String> {
    let ax = plane.axis();
    let n = vol.shape()[ax];
    ensure!(
        index < n,
        "slice index {index} is outside the volume ({n} along the {} axis)",
        plane.name()
    );
    let s = vol.index_axis(Axis(ax), index);
    let [(a0, d0), (a1, d1)] = in_plane(plane);
    let sp = rec.geometry.spacing;
    let mut out = if where_words {
        format!(
            "{} {} slice {} of {}, {} of the {}-to-{} axis ({}%).",
            capitalise(plane.name()),
            rec.modality,
            index + 1,
            n,
            region(position, plane),
            axis_words(plane).0,
            axis_words(plane).1,
            (position * 100.0).round() as i64
        )
    } else {
        format!("{} slice.", rec.modality)
    };
    let (d0, d1) = if where_words { (d0, d1) } else { ("across", "down") };
    let mut fg: Vec<f32> = Vec::new();
    let (mut lo0, mut hi0, mut lo1, mut hi1) = (usize::MAX, 0, usize::MAX, 0);
    for ((i, j), &v) in s.indexed_iter() {
        if v > threshold {
            fg.push(v);
            lo0 = lo0.min(i);
            hi0 = hi0.max(i);
            lo1 = lo1.min(j);
            hi1 = hi1.max(j);
        }
    }
    if fg.is_empty() {
        out.push_str(" The slice holds no foreground.");
        return Ok(out);
    }
    let share = 100.0 * fg.len() as f64 / s.len() as f64;
    out.push_str(&format!(
        " Foreground covers {:.0}% of the slice, spanning {:.0} mm {} by {:.0} mm {}.",
        share,
        (hi0 - lo0 + 1) as f64 * sp[a0],
        d0,
        (hi1 - lo1 + 1) as f64 * sp[a1],
        d1
    ));
    match rec.modality {
        Modality::CT => {
            let [lo, hi] = rec.intensity_window;
            let mut bands = [0usize; 4];
            for &v in &fg {
                let hu = lo + v as f64 * (hi - lo);
                bands[HU_EDGES.iter().filter(|&&e| hu >= e).count()] += 1;
            }
            let pct = |k: usize| 100.0 * bands[k] as f64 / fg.len() as f64;
            out.push_str(&format!(
                " Foreground by HU band: air/lung {:.0}%, fat {:.0}%, soft tissue {:.0}%, bone {:.0}%.",
                pct(0),
                pct(1),
                pct(2),
                pct(3)
            ));
        }
        Modality::MR => {
            fg.sort_by(f32::total_cmp);
            out.push_str(&format!(
                " Foreground intensity percentiles (0-1 scale): p10 {:.2}, median {:.2}, p90 {:.2}.",
                percentile(&fg, 0.1),
                percentile(&fg, 0.5),
                percentile(&fg, 0.9)
            ));
        }
    }
    if plane != Plane::Sagittal {
        if let Some(sym) = symmetry(&s, threshold, lo0, hi0) {
            let word = match sym {
                x if x >= 0.9 => "nearly symmetric",
                x if x >= 0.75 => "mildly asymmetric",
                _ => "markedly asymmetric",
            };
            out.push_str(&format!(" Left-right symmetry {sym:.2} ({word})."));
        }
    }
    Ok(out)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through JSON, so fields that later versions add with defaults are filled.
    fn record(modality: Modality, window: [f64; 2], spacing: [f64; 3]) -> CaseRecord {
        let affine = [[0.0f64; 4]; 4];
        let g = serde_json::json!({
            "shape": [4, 6, 3], "spacing": spacing, "affine": affine, "orientation": "RAS",
        });
        serde_json::from_value(serde_json::json!({
            "id": "c", "modality": modality, "class": null,
            "image": {"path": "x", "sha256": ""}, "label": null,
            "config_hash": "", "med3d_version": "",
            "source_geometry": g, "geometry": g,
            "intensity_window": window, "foreground_bbox": [[0, 1], [0, 1], [0, 1]], "slices": 0,
        }))
        .unwrap()
    }

    #[test]
    fn ct_bands_extent_and_symmetry_are_computed_from_hu() {
        // CT window [-1000, 1000]: v = (HU + 1000) / 2000.
        let v = |hu: f64| ((hu + 1000.0) / 2000.0) as f32;
        let mut vol = Array3::<f32>::zeros((4, 6, 3));
        // axial slice z = 1: x 0..4 by y 1..3 is foreground
        for y in 1..3 {
            vol[[0, y, 1]] = v(-600.0); // air/lung
            vol[[1, y, 1]] = v(-100.0); // fat
            vol[[2, y, 1]] = v(40.0); // soft tissue
            vol[[3, y, 1]] = v(700.0); // bone
        }
        let rec = record(Modality::CT, [-1000.0, 1000.0], [1.5, 2.0, 3.0]);
        let t = describe(&vol, &rec, 0.0, Plane::Axial, 1, 0.5, true).unwrap();
        assert!(
            t.starts_with("Axial CT slice 2 of 3, near the middle of the inferior-to-superior axis (50%)."),
            "{t}"
        );
        assert!(t.contains("covers 33% of the slice"), "{t}");
        assert!(t.contains("spanning 6 mm left-right by 4 mm anterior-posterior"), "{t}");
        assert!(t.contains("air/lung 25%, fat 25%, soft tissue 25%, bone 25%"), "{t}");
        // mirror pairs (0,3) and (1,2): |0.2-0.85| + |0.45-0.52| over their sums
        let (a, b, c, d) = (v(-600.0) as f64, v(-100.0) as f64, v(40.0) as f64, v(700.0) as f64);
        let want = 1.0 - ((a - d).abs() + (b - c).abs()) / (a + b + c + d);
        assert!(t.contains(&format!("symmetry {want:.2}")), "{t}");
        // the content alone: nothing says which plane or where, the rest is the same
        let c = describe(&vol, &rec, 0.0, Plane::Axial, 1, 0.5, false).unwrap();
        assert!(c.starts_with("CT slice. Foreground covers 33%"), "{c}");
        assert!(c.contains("spanning 6 mm across by 4 mm down"), "{c}");
        let words = [
            "axial", "coronal", "sagittal", "middle", "superior", "anterior", "50%", "slice 2",
        ];
        assert!(words.iter().all(|w| !c.to_lowercase().contains(w)), "{c}");
        assert_eq!(
            c.split_once(". ").unwrap().1.replace("across", "left-right"),
            t.split_once("). ").unwrap().1.replace("anterior-posterior", "down")
        );
    }

    #[test]
    fn mr_percentiles_sagittal_without_symmetry_and_empty_slices() {
        let mut vol = Array3::<f32>::zeros((4, 6, 3));
        for (k, y) in (0..6).enumerate() {
            for z in 0..3 {
                vol[[2, y, z]] = 0.1 * (k + 1) as f32;
            }
        }
        let rec = record(Modality::MR, [10.0, 900.0], [1.0, 1.0, 1.0]);
        let t = describe(&vol, &rec, 0.0, Plane::Sagittal, 2, 0.67, true).unwrap();
        assert!(t.contains("in the patient's right part"), "{t}");
        assert!(t.contains("p10 0.10, median 0.40, p90 0.60"), "{t}");
        assert!(!t.contains("symmetry"), "{t}");
        let e = describe(&vol, &rec, 0.0, Plane::Sagittal, 0, 0.0, true).unwrap();
        assert!(e.ends_with("holds no foreground."), "{e}");
        assert!(describe(&vol, &rec, 0.0, Plane::Sagittal, 9, 1.0, true).is_err());
    }
}
