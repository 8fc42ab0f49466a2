//! The downstream stage's arithmetic against the references everyone
//! uses, each computed by tests/reference/monai_downstream.py (MONAI 1.6,
//! sklearn, in the project venv) on the same inputs:
//! - per-class Dice and HD95 (mm, anisotropic spacing) against
//!   `DiceMetric` and `HausdorffDistanceMetric(percentile=95)` on the real
//!   MNI152 tissue label map with shifted / eroded / emptied "predictions",
//!   including classes absent from the prediction, the truth or both;
//! - ROC AUC against sklearn's `roc_auc_score` per class and MONAI's
//!   `ROCAUCMetric` macro average, with tied scores;
//! - the segmentation loss against `DiceCELoss(to_onehot_y=True,
//!   softmax=True)` within 1e-5;
//! - sliding-window inference against `sliding_window_inference` (constant
//!   and Gaussian blending, padding, several overlaps and batch sizes) on a
//!   deterministic window function within 1e-5.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use med3dinsight::downstream::{loss, metrics, sliding};
use serde_json::Value;
use tch::{Kind, Tensor};

mod common;
use common::python;

/// Runs the reference in `mode`; returns its tensors and JSON.
fn reference(mode: &str, dir: &Path) -> (HashMap<String, Tensor>, Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/monai_downstream.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(mode)
        .arg(dir)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "reference {mode} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tensors = Tensor::read_safetensors(dir.join(format!("{mode}.safetensors")))
        .unwrap()
        .into_iter()
        .collect();
    let json = serde_json::from_slice(&std::fs::read(dir.join(format!("{mode}.json"))).unwrap()).unwrap();
    (tensors, json)
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

/// MONAI's value: a number, or null for NaN.
fn want(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got.is_nan() && want.is_nan()) || (got - want).abs() <= tol * want.abs().max(1.0)
}

#[test]
fn dice_and_hd95_match_monai_on_the_mni152_tissue_map() {
    tch::set_num_threads(1);
    let (_d, dir) = tmp();
    let (t, refs) = reference("metrics", &dir);
    let gt = &t["gt"];
    let shape: Vec<usize> = gt.size().iter().map(|&s| s as usize).collect();
    let shape = [shape[0], shape[1], shape[2]];
    let flat = |t: &Tensor| Vec::<u8>::try_from(&t.flatten(0, -1)).unwrap();
    let gt = flat(gt);
    let sp: Vec<f64> = refs["spacing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let spacing = [sp[0], sp[1], sp[2]];
    let n = refs["num_classes"].as_u64().unwrap() as u8;
    let mut nan_seen = 0;
    for name in ["a", "b"] {
        let pred = flat(&t[name]);
        for c in 1..n {
            let i = (c - 1) as usize;
            let d = metrics::dice(&pred, &gt, c);
            let h = metrics::hausdorff(&pred, &gt, shape, spacing, c, 95.0).unwrap();
            let (wd, wh) = (want(&refs[name]["dice"][i]), want(&refs[name]["hd95"][i]));
            eprintln!("{name} class {c}: dice {d:.6} (MONAI {wd:.6}), hd95 {h:.6} (MONAI {wh:.6})");
            assert!(close(d, wd, 1e-6), "{name} class {c}: dice {d} vs MONAI {wd}");
            assert!(close(h, wh, 1e-5), "{name} class {c}: hd95 {h} vs MONAI {wh}");
            nan_seen += wh.is_nan() as usize;
        }
    }
    // The cases must include empty classes, and real distances.
    assert!(nan_seen >= 4, "{nan_seen}");
    assert!(want(&refs["a"]["hd95"][1]) > 5.0);
}

#[test]
fn roc_auc_matches_sklearn_and_monai_with_ties() {
    let (_d, dir) = tmp();
    let (t, refs) = reference("auc", &dir);
    for n_cls in [2usize, 3] {
        let p = &t[&format!("p{n_cls}")];
        let n = p.size()[0];
        let probs: Vec<Vec<f64>> = (0..n).map(|i| Vec::<f64>::try_from(&p.get(i)).unwrap()).collect();
        let y: Vec<usize> = Vec::<i64>::try_from(&t[&format!("y{n_cls}")])
            .unwrap()
            .iter()
            .map(|&v| v as usize)
            .collect();
        let (per, mean) = metrics::macro_auc(&probs, &y, n_cls);
        let r = &refs[n_cls.to_string()];
        for (c, got) in per.iter().enumerate() {
            let w = r["sklearn_per_class"][c].as_f64().unwrap();
            assert!(
                (got - w).abs() < 1e-12,
                "{n_cls} classes, class {c}: {got} vs sklearn {w}"
            );
        }
        let w = r["monai"].as_f64().unwrap();
        eprintln!("{n_cls} classes: macro AUC {mean:.6} (MONAI {w:.6})");
        assert!((mean - w).abs() < 1e-12, "{n_cls} classes: {mean} vs MONAI {w}");
    }
}

#[test]
fn dice_ce_matches_monai_within_1e5() {
    tch::set_num_threads(1);
    let (_d, dir) = tmp();
    let (t, refs) = reference("loss", &dir);
    let l = loss::dice_ce(&t["logits"], &t["labels"]).unwrap();
    for (name, got) in [("dice_ce", &l.total), ("dice", &l.dice), ("ce", &l.ce)] {
        let got = got.double_value(&[]);
        let w = refs[name].as_f64().unwrap();
        eprintln!("{name}: {got:.8} (MONAI {w:.8})");
        assert!((got - w).abs() < 1e-5, "{name}: {got} vs MONAI {w}");
    }
}

fn window_fn(x: &Tensor) -> Tensor {
    let mean = x.mean_dim(&[1i64, 2, 3, 4][..], true, Kind::Float);
    Tensor::cat(&[x.cumsum(2, Kind::Float) / 10.0, x.flip([3]) * mean + 1.0], 1)
}

#[test]
fn sliding_window_matches_monai_within_1e5() {
    tch::set_num_threads(1);
    let (_d, dir) = tmp();
    let (t, refs) = reference("sliding", &dir);
    let x = &t["x"];
    for (i, c) in refs.as_array().unwrap().iter().enumerate() {
        let roi: Vec<i64> = c["roi"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let sw = sliding::SlidingWindow {
            roi: None,
            sw_batch_size: c["sw_batch_size"].as_u64().unwrap() as usize,
            overlap: c["overlap"].as_f64().unwrap(),
            mode: serde_json::from_value(c["mode"].clone()).unwrap(),
            sigma_scale: 0.125,
        };
        let mut calls = 0;
        let got = sliding::infer(x, &sw, [roi[0], roi[1], roi[2]], |w| {
            calls += 1;
            Ok(window_fn(w))
        })
        .unwrap();
        let w = &t[&format!("y{i}")];
        assert_eq!(got.size(), w.size(), "case {i}");
        let err = (got - w).abs().max().double_value(&[]);
        eprintln!("case {i} {c}: max |ours - MONAI| {err:.2e} over {calls} calls");
        assert!(err < 1e-5, "case {i} {c}: {err}");
    }
}
