//! `--set KEY=VALUE` on the real binary: a sweep of two values gives two
//! run folders with their own config hashes and the overrides recorded in
//! run.json, and every stage that reads a config applies them (an unknown
//! key set on the command line is the same named error everywhere).
mod pretrain_fixture;

use std::process::Command;

use pretrain_fixture::{bin, experiment, Fixture, TINY};

fn run_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p.join("run.json")).unwrap()).unwrap()
}

#[test]
fn a_two_value_sweep_gives_two_runs_with_their_own_hashes() {
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let cfg = experiment(d.path(), &format!("{TINY}  max_steps: 1\n"));
    let pretrain = |sets: &[&str]| {
        let mut c = Command::new(bin());
        c.args(["pretrain", "--config"]).arg(&cfg).arg("--cache").arg(&cache);
        for s in sets {
            c.args(["--set", s]);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    for (name, lr) in [("sweep-a", "1e-3"), ("sweep-b", "2e-3")] {
        pretrain(&[
            &format!("name={name}"),
            &format!("pretrain.optimizer.lr={lr}"),
            "pretrain.run.checkpoint_every=1",
        ]);
    }
    let runs = d.path().join("work/runs");
    let (a, b) = (run_json(&runs.join("sweep-a")), run_json(&runs.join("sweep-b")));
    assert_ne!(a["config_hash"], b["config_hash"]);
    assert_eq!(a["config"]["optimizer"]["lr"], 1e-3);
    assert_eq!(b["config"]["optimizer"]["lr"], 2e-3);
    assert_eq!(
        a["overrides"],
        serde_json::json!([
            "name=sweep-a",
            "pretrain.optimizer.lr=1e-3",
            "pretrain.run.checkpoint_every=1"
        ])
    );
    // an operational override changes no hash
    pretrain(&["name=sweep-c", "pretrain.optimizer.lr=1e-3", "pretrain.run.workers=1"]);
    assert_eq!(run_json(&runs.join("sweep-c"))["config_hash"], a["config_hash"]);
}

#[test]
fn every_stage_that_reads_a_config_applies_set() {
    let d = tempfile::tempdir().unwrap();
    let cfg = experiment(d.path(), TINY);
    let c = cfg.to_str().unwrap();
    let w = d.path().join("x");
    let w = w.to_str().unwrap();
    for args in [
        vec!["preprocess", "--config", c],
        vec!["caption", "--config", c, "--cache", w],
        vec!["embed", "--config", c, "--cache", w],
        vec!["pretrain", "--config", c, "--cache", w],
        vec!["finetune", "--config", c, "--init", "scratch", "--out", w],
        vec!["evaluate", "--config", c, "--run", w, "--cache", w],
        vec!["run", "--config", c],
    ] {
        let out = Command::new(bin())
            .args(&args)
            .args(["--set", "pretrain.optimizer.not_a_key=1"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran");
        assert!(
            err.contains("not_a_key") && err.contains("--set pretrain.optimizer.not_a_key=1"),
            "{args:?}: {err}"
        );
    }
}
