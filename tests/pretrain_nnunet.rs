//! Pretraining on nnU-Net's residual-encoder U-Net, through the real
//! binary, on tiny plans derived from nnU-Net's ResEnc M planner output
//! (tests/data/nnunet/tiny_ResEncUNetPlans.json): 4 steps train every part
//! of the network; a run cut after step 2 (its later checkpoints removed,
//! as a crash leaves it) resumes to the uninterrupted run's weights; the
//! export for nnU-Net (`--format nnunet`) is what `torch.load` reads and
//! nnU-Net's own `load_pretrained_weights` accepts, and nnunetv2's network
//! with those weights gives med3d's output.
mod common;
mod pretrain_fixture;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::python;
use med3dinsight::artifacts::run as checkpoint;
use med3dinsight::model::backbone::BackboneConfig;
use med3dinsight::model::nnunet::ConvUnet;
use med3dinsight::model::state_dict::load_named;
use med3dinsight::train::model::Pretrainer;
type RunRecord = checkpoint::RunRecord<med3dinsight::train::PretrainConfig>;
use pretrain_fixture::{bin, experiment, Fixture};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const STEPS: u64 = 4;

fn plans() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/tiny_ResEncUNetPlans.json")
}

/// The tiny ResEnc plans and a one-layer PSAT, dropout off.
fn config(dir: &Path) -> PathBuf {
    experiment(
        dir,
        &format!(
            "  device: cpu
  threads: 1
  backbone:
    nnunet: {{plans: {}, configuration: 3d_fullres}}
  psat: {{layers: 1, heads: 2, queries: 4, bins: 8, dropout: 0.0}}
  align: {{max_iter: 30}}
  sampling: slice
  workers: 1
  prefetch: 1
  batch_size: 2
  max_steps: {STEPS}
  checkpoint_every: 1
  keep_checkpoints: {STEPS}
  optimizer: {{lr: 0.01, schedule: constant}}
",
            plans().display()
        ),
    )
}

fn med3d(args: &[&str]) -> (bool, String) {
    let o = Command::new(bin()).args(args).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn weights(run: &Path, step: u64) -> HashMap<String, Tensor> {
    let p = checkpoint::checkpoints_dir(run)
        .join(format!("step-{step:08}"))
        .join("model.safetensors");
    Tensor::read_safetensors(&p).unwrap().into_iter().collect()
}

/// Largest |a - b| over the tensors whose names start with `prefix`.
fn diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, prefix: &str) -> f64 {
    a.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, t)| (t - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

#[test]
fn pretrains_resumes_and_exports_for_nnunet() {
    let d = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.display().to_string();
    let cache = Fixture::default().write(d.path());
    let cfg = config(d.path());
    let run = d.path().join("run");
    let pretrain = |out: &Path, extra: &[&str]| {
        let (c, f, o) = (s(&cache), s(&cfg), s(out));
        let mut args = vec!["pretrain", "--cache", &c, "--config", &f, "--out", &o];
        args.extend_from_slice(extra);
        med3d(&args)
    };
    let (ok, log) = pretrain(&run, &[]);
    assert!(ok, "pretrain failed:\n{log}");
    assert_eq!(checkpoint::list(&run).len(), STEPS as usize);

    // Every part trains: stem, deepest stage, decoder, head, metric.
    let (w1, w4) = (weights(&run, 1), weights(&run, STEPS));
    for prefix in [
        "encoder.stem.",
        "encoder.stages.2.",
        "decoder.transpconvs.",
        "decoder.stages.1.",
        "decoder.seg_layers.1.",
        "psat.",
        "align.",
    ] {
        let moved = diff(&w4, &w1, prefix);
        assert!(moved > 1e-5, "{prefix}*: did not move from step 1 to {STEPS} ({moved})");
    }
    // The run records the plans' architecture: it rebuilds without the file.
    let rec = RunRecord::read(&run).unwrap();
    let BackboneConfig::Nnunet(n) = &rec.config.backbone else {
        panic!("run.json does not record the nnU-Net backbone")
    };
    let resolved = n.resolved.as_ref().expect("run.json holds the resolved plans");
    assert_eq!(resolved.plans_name, "tinyResEncUNetPlans");

    // Resume: the same run cut after step 2.
    let cut = d.path().join("cut");
    assert!(Command::new("cp")
        .args(["-r", &s(&run), &s(&cut)])
        .status()
        .unwrap()
        .success());
    for step in 3..=STEPS {
        std::fs::remove_dir_all(checkpoint::checkpoints_dir(&cut).join(format!("step-{step:08}"))).unwrap();
    }
    let (ok, log) = pretrain(&cut, &["--resume"]);
    assert!(ok, "resume failed:\n{log}");
    let resumed = weights(&cut, STEPS);
    let gap = diff(&resumed, &w4, "");
    eprintln!("resumed after step 2 vs uninterrupted at step {STEPS}: max |diff| = {gap:e}");
    assert!(gap < 1e-6, "the resumed run ends {gap} away from the uninterrupted one");

    // Export for nnU-Net; the SwinUNETR format is refused by name.
    let out = d.path().join("export").join("resenc_pretrained.pth");
    let (ok, log) = med3d(&["export", "--run", &s(&run), "--format", "nnunet", "--out", &s(&out)]);
    assert!(ok, "export failed:\n{log}");
    let (ok, log) = med3d(&[
        "export",
        "--run",
        &s(&run),
        "--format",
        "monai-swinunetr",
        "--out",
        &s(&d.path().join("x.safetensors")),
    ]);
    assert!(!ok && log.contains("--format nnunet"), "{log}");
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("card.json")).unwrap()).unwrap();
    assert_eq!(card["variant"], "nnunet");
    let command = card["nnunet"]["command"].as_str().unwrap();
    assert!(
        command.starts_with(
            "nnUNetv2_train Dataset990_BrainTissue 3d_fullres FOLD -p tinyResEncUNetPlans -pretrained_weights"
        ),
        "{command}"
    );

    // med3d's network with the checkpoint's backbone, on an input in the
    // network's own axis order.
    let spec = n.spec(1, 1).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = ConvUnet::new(&vs.root(), &spec).unwrap();
    let body: Vec<(String, Tensor)> = w4
        .iter()
        .filter(|(k, _)| Pretrainer::is_backbone_key(k))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    load_named(&vs, body, "checkpoint").unwrap();
    tch::manual_seed(7);
    let x = Tensor::rand([2, 1, 16, 32, 32], (Kind::Float, Device::Cpu));
    let ours = tch::no_grad(|| net.forward_t(&x, false).unwrap());
    let input = d.path().join("input.safetensors");
    Tensor::write_safetensors(&[("input", &x)], &input).unwrap();
    let theirs_path = d.path().join("theirs.safetensors");
    let o = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/nnunet_net.py"))
        .args([
            "nnunet-load",
            &s(&plans()),
            "3d_fullres",
            &s(&out),
            &s(&input),
            &s(&theirs_path),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nnU-Net could not load the export:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let theirs: HashMap<String, Tensor> = Tensor::read_safetensors(&theirs_path).unwrap().into_iter().collect();

    // nnssl's layout: the adaptation plan checked against the plans and
    // what pretraining used, and loaded as nnU-Net's pretrained trainer does
    let nnssl = d.path().join("export").join("resenc_nnssl.pth");
    let (ok, log) = med3d(&["export", "--run", &s(&run), "--format", "nnssl", "--out", &s(&nnssl)]);
    assert!(ok, "nnssl export failed:\n{log}");
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    let cache_dir = std::path::PathBuf::from(rec["cache"].as_str().unwrap());
    let info = med3dinsight::artifacts::cache::CacheInfo::read(&cache_dir).unwrap();
    let join = |v: Vec<String>| v.join(",");
    let spacing = join(info.preprocess.spacing.iter().map(|v| v.to_string()).collect());
    let patch = match rec["config"]["input_size"].as_array() {
        Some(a) => join(a.iter().map(|v| v.to_string()).collect()),
        None => join(info.preprocess.roi.iter().map(|v| v.to_string()).collect()),
    };
    let o = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/nnunet_net.py"))
        .args(["nnssl-check", &s(&plans()), "3d_fullres", &s(&nnssl), &spacing, &patch])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the nnssl export fails nnU-Net's reading of it:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(nnssl.with_extension("card.json")).unwrap()).unwrap();
    assert_eq!(card["variant"], "nnssl");
    for (name, a, b) in [
        ("logits", &ours.logits, &theirs["logits"]),
        ("bottleneck", ours.bottleneck(), &theirs["bottleneck"]),
    ] {
        let e = (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1.0);
        eprintln!("nnU-Net with the export vs med3d: {name} max rel. diff {e:e}");
        assert!(
            e < 1e-5,
            "{name}: nnU-Net's network with the export differs from med3d's by {e}"
        );
    }
}
