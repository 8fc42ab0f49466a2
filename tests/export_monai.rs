//! `med3d export` on a real run: the real binary pretrains a tiny
//! SwinUNETR + PSAT on the synthetic cache for 3 steps, then exports the
//! whole SwinUNETR, its encoder and the training state. MONAI (the project
//! venv's, via tests/reference/monai_load_export.py) builds SwinUNETR and
//! SwinTransformer from the cards' kwargs alone, loads the files with
//! `strict=True` and runs them; their logits and hidden states must equal
//! those of med3d's model loaded from the checkpoint within 1e-4. Also:
//! the cards' provenance, the skip-when-newer rule of `med3d run`, and
//! clear errors (no panic) for a missing step, an empty run, a truncated
//! or garbage checkpoint and one whose keys do not fit its config.
mod pretrain_fixture;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use med3dinsight::config::Experiment;
use med3dinsight::config::PreprocessConfig;
use med3dinsight::export::{self, card::Card, Format, Request};
use med3dinsight::model::backbone::BackboneConfig;
use med3dinsight::model::state_dict::load_named;
use med3dinsight::model::swin_unetr::SwinUnetr;
use med3dinsight::train::model::Pretrainer;
use pretrain_fixture::{bin, experiment, Fixture, TINY};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

mod common;
use common::python;

/// Runs the binary; returns (success, stdout, stderr).
fn med3d(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin()).args(args).output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(!err.contains("panicked"), "med3d {args:?} panicked:\n{err}");
    (o.status.success(), out, err)
}

fn export_ok(args: &[&str]) {
    let (ok, out, err) = med3d(args);
    assert!(ok, "med3d {args:?} failed:\n{out}\n{err}");
}

fn export_err(args: &[&str]) -> String {
    let (ok, out, err) = med3d(args);
    assert!(!ok, "med3d {args:?} should fail:\n{out}");
    err
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn card(path: &Path) -> Card {
    serde_json::from_str(&std::fs::read_to_string(export::card_path(path)).unwrap()).unwrap()
}

struct Run {
    _dir: tempfile::TempDir,
    root: PathBuf,
    run: PathBuf,
    exp: Experiment,
}

/// A 3-step pretraining run of the real binary, checkpoints at 2 and 3.
fn pretrain() -> Run {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let cache = Fixture::default().write(&root);
    let pre = PreprocessConfig {
        spacing: [2.0, 2.0, 2.0],
        roi: [64, 32, 32],
        ..Default::default()
    };
    let info = serde_json::json!({"format": 1, "med3d_version": "test", "config_hash": pre.hash(), "preprocess": pre});
    std::fs::write(cache.join("cache.json"), info.to_string()).unwrap();
    let cfg = experiment(
        &root,
        &format!("{TINY}  max_steps: 3\n  checkpoint_every: 2\n  keep_checkpoints: 3\n  optimizer: {{lr: 0.01, schedule: constant}}\n"),
    );
    let exp = Experiment::load(&cfg).unwrap();
    let run = root.join("run");
    let s = |p: &Path| p.display().to_string();
    export_ok(&[
        "pretrain",
        "--cache",
        &s(&cache),
        "--config",
        &s(&cfg),
        "--out",
        &s(&run),
    ]);
    Run {
        _dir: dir,
        root,
        run,
        exp,
    }
}

/// med3d's SwinUNETR with the backbone tensors of a checkpoint.
fn ours_from_checkpoint(exp: &Experiment, ckpt: &Path) -> (VarStore, SwinUnetr) {
    let vs = VarStore::new(Device::Cpu);
    let BackboneConfig::SwinUnetr(cfg) = &exp.pretrain.backbone else {
        panic!("the fixture trains SwinUNETR")
    };
    let model = SwinUnetr::new(&vs.root(), cfg).unwrap();
    let body: Vec<(String, Tensor)> = Tensor::read_safetensors(ckpt.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| Pretrainer::is_backbone_key(k))
        .collect();
    load_named(&vs, body, "checkpoint").unwrap();
    (vs, model)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.size(), b.size());
    let scale = b.abs().max().double_value(&[]);
    (
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]),
        scale,
    )
}

#[test]
fn exports_load_strictly_into_monai_and_match_med3d() {
    tch::set_num_threads(1);
    let r = pretrain();
    let s = |p: &Path| p.display().to_string();
    let (run, out) = (s(&r.run), r.root.join("export"));
    let full = out.join("swinunetr.safetensors");
    let enc = out.join("encoder.safetensors");
    let whole = out.join("whole.safetensors");
    export_ok(&[
        "export",
        "--run",
        &run,
        "--format",
        "monai-swinunetr",
        "--out",
        &s(&full),
    ]);
    export_ok(&["export", "--run", &run, "--encoder-only", "--out", &s(&enc)]);
    export_ok(&[
        "export",
        "--run",
        &run,
        "--step",
        "2",
        "--format",
        "safetensors",
        "--out",
        &s(&whole),
    ]);

    // keys: the backbone alone, float32; the encoder without its prefix
    let ckpt3 = r.run.join("checkpoints/step-00000003");
    let ckpt2 = r.run.join("checkpoints/step-00000002");
    let trained = read(&ckpt3.join("model.safetensors"));
    let f = read(&full);
    let e = read(&enc);
    assert!(f.keys().all(|k| !k.starts_with("psat.") && !k.starts_with("align.")));
    assert_eq!(
        f.len()
            + trained
                .keys()
                .filter(|k| k.starts_with("psat.") || k.starts_with("align."))
                .count(),
        trained.len()
    );
    assert!(f.values().all(|t| t.kind() == Kind::Float || t.kind() == Kind::Int64));
    assert_eq!(e.len(), f.keys().filter(|k| k.starts_with("swinViT.")).count());
    assert!(e.contains_key("patch_embed.proj.weight") && e.contains_key("layers4.0.blocks.0.attn.qkv.weight"));
    // the training state of step 2, tensor for tensor
    let w = read(&whole);
    let t2 = read(&ckpt2.join("model.safetensors"));
    assert_eq!(w.len(), t2.len());
    for (k, t) in &t2 {
        assert!(w[k].equal(t), "{k} differs from the step-2 checkpoint");
    }
    assert!(!w["psat.proj.text.weight"].equal(&trained["psat.proj.text.weight"]));

    // cards
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt3.join("state.json")).unwrap()).unwrap();
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(r.run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let c = card(&full);
    assert_eq!(c.variant, export::card::Variant::Full);
    assert_eq!((c.training.step, c.training.total_steps, c.tensors), (3, 3, f.len()));
    assert_eq!(c.training.final_metrics.as_ref().unwrap()["loss"], last["loss"]);
    assert_eq!(c.data.data_hash, state["data_hash"].as_str().unwrap());
    assert_eq!(c.data.cases, Some(4));
    assert_eq!(c.input.preprocess.as_ref().unwrap().spacing, [2.0, 2.0, 2.0]);
    assert_eq!(c.source.checkpoint, ckpt3);
    assert_eq!(
        c.source.model_sha256,
        med3dinsight::fsutil::sha256_file(&ckpt3.join("model.safetensors")).unwrap()
    );
    assert_eq!(c.file_sha256, med3dinsight::fsutil::sha256_file(&full).unwrap());
    let c2 = card(&whole);
    assert_eq!((c2.training.step, c2.monai.is_none()), (2, true));
    let m2 = c2.training.final_metrics.unwrap();
    assert_eq!(m2["step"], 2);

    // MONAI loads both strictly from the cards' kwargs and agrees with med3d
    tch::manual_seed(11);
    let x = Tensor::rand([1, 1, 64, 32, 32], (Kind::Float, Device::Cpu));
    let input = r.root.join("input.safetensors");
    Tensor::write_safetensors(&[("input", &x)], &input).unwrap();
    let job = serde_json::json!({"exports": {"full": full, "encoder": enc}, "input": input});
    std::fs::write(r.root.join("job.json"), job.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/monai_load_export.py");
    let o = Command::new(python()).arg(&script).arg(&r.root).output().unwrap();
    assert!(
        o.status.success(),
        "MONAI reference failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let refs = read(&r.root.join("monai_outputs.safetensors"));
    let (_vs, ours) = ours_from_checkpoint(&r.exp, &ckpt3);
    let got = tch::no_grad(|| ours.forward_t(&x, false).unwrap());
    let mut worst: f64 = 0.0;
    let mut check = |name: &str, t: &Tensor| {
        let (d, scale) = max_abs_diff(t, &refs[name]);
        eprintln!("  {name}: max |med3d - MONAI| {d:.2e} (scale {scale:.3})");
        assert!(d < 1e-4, "{name}: med3d and MONAI differ by {d:.3e}");
        worst = worst.max(d);
    };
    check("full.logits", &got.logits);
    for (i, h) in got.hidden_states.iter().enumerate() {
        check(&format!("full.hidden.{i}"), h);
        check(&format!("encoder.hidden.{i}"), h);
    }
    eprintln!("worst difference {worst:.2e}");
}

#[test]
fn run_skips_an_export_newer_than_its_checkpoint() {
    tch::set_num_threads(1);
    let r = pretrain();
    let req = Request {
        run: r.run.clone(),
        step: None,
        format: Format::MonaiSwinunetr,
        encoder_only: true,
        out: r.run.join("export/encoder.safetensors"),
    };
    assert!(!export::run_if_stale(&req).unwrap().up_to_date);
    let again = export::run_if_stale(&req).unwrap();
    assert!(again.up_to_date && again.step == 3);
    // the full variant at the same path is not the same export
    let full = Request {
        encoder_only: false,
        ..req.clone()
    };
    assert!(!export::run_if_stale(&full).unwrap().up_to_date);
    assert!(export::run_if_stale(&full).unwrap().up_to_date);
    // a checkpoint rewritten after the export is exported again
    let model = r.run.join("checkpoints/step-00000003/model.safetensors");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    std::fs::File::options()
        .append(true)
        .open(&model)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert!(!export::run_if_stale(&full).unwrap().up_to_date);
}

#[test]
fn bad_runs_and_checkpoints_give_clear_errors() {
    tch::set_num_threads(1);
    let r = pretrain();
    let s = |p: &Path| p.display().to_string();
    let run = s(&r.run);
    let out = s(&r.root.join("x.safetensors"));

    let e = export_err(&["export", "--run", &run, "--step", "7", "--out", &out]);
    assert!(
        e.contains(&run) && e.contains("no checkpoint at step 7") && e.contains("steps 2, 3"),
        "{e}"
    );
    let empty = r.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = export_err(&["export", "--run", &s(&empty), "--out", &out]);
    assert!(e.contains(&s(&empty)) && e.contains("no complete checkpoint"), "{e}");
    let e = export_err(&["export", "--run", &s(&r.root.join("nope")), "--out", &out]);
    assert!(e.contains("no such run folder"), "{e}");

    let ckpt = r.run.join("checkpoints/step-00000003");
    let model = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    let state_path = ckpt.join("state.json");
    let state_text = std::fs::read_to_string(&state_path).unwrap();
    // damaged: the hash recorded when it was written no longer matches
    for damaged in [
        &bytes[..bytes.len() / 2],
        b"not a safetensors file at all, just text".as_slice(),
    ] {
        std::fs::write(&model, damaged).unwrap();
        let e = export_err(&["export", "--run", &run, "--out", &out]);
        assert!(e.contains(&s(&model)) && e.contains("the checkpoint is damaged"), "{e}");
    }
    // rewritten with its hash recorded (a checkpoint that is whole but does
    // not fit its run): strict loading names the tensor
    let rehash = |tensors: &[(String, Tensor)]| {
        Tensor::write_safetensors(tensors, &model).unwrap();
        let mut st: serde_json::Value = serde_json::from_str(&state_text).unwrap();
        st["files"]["model.safetensors"] = med3dinsight::fsutil::sha256_file(&model).unwrap().into();
        std::fs::write(&state_path, serde_json::to_vec_pretty(&st).unwrap()).unwrap();
    };
    // a valid file without the PSAT head and with one backbone tensor reshaped
    std::fs::write(&model, &bytes).unwrap();
    let mut t: Vec<(String, Tensor)> = Tensor::read_safetensors(&model)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("psat."))
        .collect();
    for (k, v) in t.iter_mut() {
        if k == "out.conv.conv.bias" {
            *v = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        }
    }
    rehash(&t);
    let e = export_err(&["export", "--run", &run, "--out", &out]);
    assert!(
        e.contains("does not fit") && e.contains("out.conv.conv.bias: shape [2]"),
        "{e}"
    );
    // the backbone intact but the PSAT head gone: the whole model must fit
    let original = read(&r.run.join("checkpoints/step-00000002/model.safetensors"));
    for (k, v) in t.iter_mut() {
        if k == "out.conv.conv.bias" {
            *v = original[k.as_str()].shallow_clone();
        }
    }
    rehash(&t);
    let e = export_err(&["export", "--run", &run, "--out", &out]);
    assert!(
        e.contains("does not fit the model") && e.contains("missing") && e.contains("psat."),
        "{e}"
    );
    // foreign: written under another config than run.json records
    std::fs::write(&model, &bytes).unwrap();
    let mut st: serde_json::Value = serde_json::from_str(&state_text).unwrap();
    st["config_hash"] = "0123456789abcdef".into();
    std::fs::write(&state_path, serde_json::to_vec_pretty(&st).unwrap()).unwrap();
    let e = export_err(&["export", "--run", &run, "--out", &out]);
    assert!(
        e.contains(&s(&ckpt)) && e.contains("written with another pretrain config"),
        "{e}"
    );
    // run.json edited by hand: its hash no longer matches its config
    std::fs::write(&state_path, &state_text).unwrap();
    let rj = r.run.join("run.json");
    let rj_text = std::fs::read_to_string(&rj).unwrap();
    let mut rec: serde_json::Value = serde_json::from_str(&rj_text).unwrap();
    rec["config"]["seed"] = 12345.into();
    std::fs::write(&rj, serde_json::to_vec_pretty(&rec).unwrap()).unwrap();
    let e = export_err(&["export", "--run", &run, "--out", &out]);
    assert!(
        e.contains(&s(&rj)) && e.contains("is not the hash of its config"),
        "{e}"
    );
    std::fs::write(&rj, &rj_text).unwrap();
    std::fs::write(&model, &bytes).unwrap();
    let e = export_err(&[
        "export",
        "--run",
        &run,
        "--format",
        "safetensors",
        "--encoder-only",
        "--out",
        &out,
    ]);
    assert!(e.contains("--encoder-only"), "{e}");
    assert!(!r.root.join("x.safetensors").exists() && !r.root.join("x.card.json").exists());
    // and with the file restored the export works
    export_ok(&["export", "--run", &run, "--out", &out]);
}
