//! `med3d evaluate-alignment` on a tiny pretraining run: every number of its
//! report equals scikit-learn's and numpy's on the embeddings it dumps
//! (tests/reference/alignment_metrics.py), the read-outs use the
//! checkpoint's weights, and a table that does not fit the run is a named
//! error.
mod pretrain_fixture;

use std::path::Path;
use std::process::Command;

use med3dinsight::config::Experiment;
use med3dinsight::train;
use pretrain_fixture::{bin, experiment, Fixture, TINY};
use serde_json::Value;

fn python() -> String {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        venv.display().to_string()
    } else {
        "python3".into()
    }
}

fn evaluate(run: &Path, cache: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("evaluate-alignment")
        .arg("--run")
        .arg(run)
        .arg("--cache")
        .arg(cache)
        .args(extra)
        .output()
        .unwrap()
}

fn close(a: &Value, b: &Value, at: &str) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in y {
                close(&x[k], v, &format!("{at}.{k}"));
            }
        }
        _ => {
            let (x, y) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{at}: med3d {x}, reference {y}"
            );
        }
    }
}

#[test]
fn report_matches_scikit_learn_and_follows_the_checkpoint() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture {
        cases: 5,
        ..Default::default()
    }
    .write(d.path());
    let cfg = experiment(
        d.path(),
        &format!("{TINY}  max_steps: 4\n  checkpoint_every: 2\n  optimizer: {{lr: 0.001, warmup_steps: 1}}\n"),
    );
    let exp = Experiment::load(&cfg).unwrap();
    let run = d.path().join("run");
    train::run(&exp.pretrain, &pretrain_fixture::options(&cache, &run)).unwrap();

    let dump = d.path().join("dump");
    let out = evaluate(&run, &cache, &["--dump", dump.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.contains("evaluate-alignment:") && line.contains("text: R@1"),
        "{line}"
    );
    let report: Value = serde_json::from_slice(&std::fs::read(run.join("alignment.json")).unwrap()).unwrap();
    assert_eq!(report["step"], 4);
    assert_eq!(report["cases"], 5);
    // 5 cases x 3 planes x 4 slices, every seventh row uncaptioned
    assert_eq!(report["slices"], 60 - 9);
    let t = &report["targets"][0];
    assert_eq!(t["name"], "text");

    let r = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/alignment_metrics.py"))
        .arg(&dump)
        .arg("text")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let want: Value = serde_json::from_slice(&r.stdout).unwrap();
    for k in [
        "retrieval_all",
        "retrieval_same_plane_bin",
        "modality_gap",
        "matched_cosine",
        "unmatched_cosine",
        "readout_3d",
        "readout_targets",
    ] {
        close(&t[k], &want[k], k);
    }
    // no ties among these continuous scores: scikit-learn's top-k agrees
    close(&t["retrieval_all"]["r_at_1"], &want["top_k_accuracy"]["1"], "top-1");
    close(&t["retrieval_all"]["r_at_5"], &want["top_k_accuracy"]["5"], "top-5");
    // same plane and bin: the fixture's slices sit at the same positions in every case
    let g = &t["retrieval_same_plane_bin"];
    assert!(g["queries"].as_u64().unwrap() > 30, "{g}");
    assert!(g["mean_candidates"].as_f64().unwrap() <= 5.0, "{g}");

    // another checkpoint gives other read-outs (the weights are used)
    let early = d.path().join("early.json");
    let out = evaluate(&run, &cache, &["--step", "2", "--out", early.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: Value = serde_json::from_slice(&std::fs::read(&early).unwrap()).unwrap();
    assert_eq!(e["step"], 2);
    assert_ne!(e["targets"][0]["modality_gap"], t["modality_gap"]);
    // the targets' own read-outs do not depend on the checkpoint
    assert_eq!(e["targets"][0]["readout_targets"], t["readout_targets"]);

    // a table of another width than the run was trained on: named
    let other = d.path().join("other");
    Fixture {
        cases: 5,
        dim: 24,
        ..Default::default()
    }
    .write(&other);
    let out = evaluate(
        &run,
        &cache,
        &["--embeddings", other.join("cache/embeddings").to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("text is 24 wide") && err.contains("other/cache/embeddings"),
        "{err}"
    );
    // a missing step is named with the steps the run holds
    let out = evaluate(&run, &cache, &["--step", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no checkpoint at step 3"),
        "{err}"
    );
    // a damaged checkpoint is refused as export and resume refuse it
    let model = run.join("checkpoints/step-00000002/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x55;
    std::fs::write(&model, &bytes).unwrap();
    let out = evaluate(&run, &cache, &["--step", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("the checkpoint is damaged")
            && err.contains(&model.display().to_string()),
        "{err}"
    );
    // and a foreign one (written under another config than run.json's)
    let state = run.join("checkpoints/step-00000004/state.json");
    let mut st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    st["config_hash"] = "feedfacefeedface".into();
    std::fs::write(&state, serde_json::to_vec_pretty(&st).unwrap()).unwrap();
    let out = evaluate(&run, &cache, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("written with another pretrain config"),
        "{err}"
    );
}
