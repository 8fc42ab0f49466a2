//! `med3d finetune` and `med3d evaluate` end to end on a real volume: the
//! MNI152 T1 with its tissue label map (grey and white matter), preprocessed
//! at 4 mm into a small cache, a feature_size-12 SwinUNETR on 64x32x32
//! patches, one CPU thread.
//! - Twelve steps from scratch raise the training case's Dice (sliding
//!   window over the whole volume) well above the untrained network's.
//! - The same seed gives byte-identical metrics and weights twice.
//! - An export whose model card names another backbone is refused with an
//!   error naming the setting, both values and both files; matching exports
//!   (full with another head size, encoder-only) load what they hold.
//! - Classification trains the encoder and a linear head to tell two real
//!   volumes apart (the MNI152 T1 and its grey-matter map) in 12 steps, and
//!   reports accuracy and AUC consistent with its per-case probabilities.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use med3dinsight::downstream::results::{Evaluation, StepLine};
use med3dinsight::model::state_dict::save_safetensors;
use med3dinsight::model::swin_unetr::{SwinUnetr, SwinUnetrConfig};
use serde_json::Value;
use tch::nn::VarStore;
use tch::Tensor;

fn manifest(dir: &Path) -> PathBuf {
    let p = dir.join("m.yaml");
    std::fs::write(
        &p,
        format!(
            "name: t\nmodality: MR\ncases:\n  - id: mni\n    image: {}\n    label: {}\n    class: 0\n  - id: gm\n    image: {}\n    class: 1\n",
            common::demo("mni152_t1.nii.gz").display(),
            common::demo("mni152_tissue.nii.gz").display(),
            common::demo("mni152_gm.nii.gz").display()
        ),
    )
    .unwrap();
    p
}

fn config(dir: &Path, name: &str, downstream: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "name: t\nmanifest: m.yaml\nworkdir: {}\npreprocess: {{spacing: [4.0, 4.0, 4.0], roi: [64, 48, 48], \
             roi_mode: crop_pad, slices_per_plane: 1}}\ndownstream:\n  backbone: {{feature_size: 12}}\n  \
             patch_size: [64, 32, 32]\n  seed: 1\n  device: cpu\n  threads: 1\n{downstream}",
            dir.join("work").display()
        ),
    )
    .unwrap();
    p
}

fn seg(steps: u64) -> String {
    format!(
        "  task: segmentation\n  num_classes: 3\n  steps: {steps}\n  batch_size: 1\n  \
         optimizer: {{lr: 2.0e-3, schedule: constant, weight_decay: 0.0}}\n"
    )
}

fn med3d(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(common::bin());
    for a in args {
        c.arg(a);
    }
    let o = c.env_remove("MED3D_LOG").output().unwrap();
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn ok(o: Output) -> String {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "failed:\n{out}\n{err}");
    out.into_owned()
}

/// Preprocesses the manifest (only the labelled case for segmentation).
fn cache(dir: &Path, cfg: &Path, labelled_only: bool) -> PathBuf {
    let m = manifest(dir);
    if labelled_only {
        let text = std::fs::read_to_string(&m).unwrap();
        std::fs::write(&m, &text[..text.find("  - id: gm").unwrap()]).unwrap();
    }
    let c = dir.join("cache");
    let r = common::preprocess(cfg, &m, &c, &[]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    c
}

fn finetune(init: &str, cache: &Path, cfg: &Path, out: &Path) -> Output {
    med3d(&[
        &"finetune",
        &"--init",
        &init,
        &"--cache",
        &cache,
        &"--config",
        &cfg,
        &"--out",
        &out,
    ])
}

fn evaluate(run: &Path, cache: &Path) -> Value {
    let line = ok(med3d(&[&"evaluate", &"--run", &run, &"--cache", &cache]));
    eprintln!("{line}");
    let path = run.join("evaluate.json");
    let v = common::read_json(&path);
    // the typed record reads it back whole, and writes the same keys
    let typed = Evaluation::read(&path).unwrap();
    assert_eq!(serde_json::to_value(&typed).unwrap(), v);
    assert_eq!(typed.run, run);
    v
}

/// A run's metrics lines, each read back as the typed record too.
fn step_lines(run: &Path) -> Vec<Value> {
    let lines = common::jsonl(&run.join("metrics.jsonl"));
    for l in &lines {
        let typed: StepLine = serde_json::from_value(l.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), *l);
    }
    lines
}

#[test]
fn finetuning_raises_the_training_dice() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cfg0 = config(d.path(), "e0.yaml", &seg(0));
    let cfg12 = config(d.path(), "e12.yaml", &seg(12));
    let cache = cache(d.path(), &cfg0, true);
    let (r0, r12) = (d.path().join("r0"), d.path().join("r12"));
    ok(finetune("scratch", &cache, &cfg0, &r0));
    ok(finetune("scratch", &cache, &cfg12, &r12));
    let (e0, e12) = (evaluate(&r0, &cache), evaluate(&r12, &cache));
    let dice = |e: &Value| e["mean"]["dice"].as_f64().unwrap();
    let (before, after) = (dice(&e0), dice(&e12));
    eprintln!("training-case Dice: {before:.4} untrained -> {after:.4} after 12 steps");
    assert_eq!(e12["cases"][0]["id"], "mni");
    assert_eq!(e12["classes"], serde_json::json!([1, 2]));
    assert!(after > before + 0.3 && after > 0.6, "Dice {before} -> {after}");
    for c in 0..2 {
        let d = e12["per_class"]["dice_mean"][c].as_f64().unwrap();
        assert!(d > 0.5, "class {}: Dice {d}", c + 1);
        // HD95 at 4 mm voxels: a few voxels at most once trained.
        let h = e12["per_class"]["hd95_mean"][c].as_f64().unwrap();
        assert!(h.is_finite() && h < 30.0, "class {}: HD95 {h}", c + 1);
    }
    let lines = step_lines(&r12);
    assert_eq!(lines.len(), 12);
    assert!(lines.iter().all(|l| l["dice_loss"].is_f64() && l["ce_loss"].is_f64()));
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    assert!(loss(11) < loss(0), "loss {} -> {}", loss(0), loss(11));
    // TensorBoard's reader: every step scalar, and evaluate's scores at the last step
    let tb = med3dinsight::artifacts::run::tensorboard_dir(&r12);
    common::assert_tensorboard_has(&tb, &lines);
    let scalars = common::tensorboard(&tb);
    let point = |tag: &str| scalars[tag].iter().map(|&(s, v)| (s, v as f32)).collect::<Vec<_>>();
    assert_eq!(point("val/mean_dice"), vec![(12, after as f32)]);
    let d2 = e12["per_class"]["dice_mean"][1].as_f64().unwrap();
    assert_eq!(point("val/dice_class2"), vec![(12, d2 as f32)]);
}

#[test]
fn the_same_seed_gives_identical_runs() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "e.yaml", &seg(3));
    let cache = cache(d.path(), &cfg, true);
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    ok(finetune("scratch", &cache, &cfg, &a));
    ok(finetune("scratch", &cache, &cfg, &b));
    let read = |p: &Path, f: &str| std::fs::read(p.join(f)).unwrap();
    assert_eq!(common::jsonl(&a.join("metrics.jsonl")).len(), 3);
    assert_eq!(read(&a, "metrics.jsonl"), read(&b, "metrics.jsonl"));
    assert_eq!(read(&a, "model.safetensors"), read(&b, "model.safetensors"));
}

/// A SwinUNETR export as `med3d export` writes it: weights plus card.
fn export(dir: &Path, name: &str, feature_size: i64, variant: &str) -> PathBuf {
    let cfg = SwinUnetrConfig {
        feature_size,
        ..SwinUnetrConfig::default()
    };
    tch::manual_seed(99);
    let vs = VarStore::new(tch::Device::Cpu);
    let _m = SwinUnetr::new(&vs.root(), &cfg).unwrap();
    let path = dir.join(format!("{name}.safetensors"));
    if variant == "full" {
        save_safetensors(&vs, &path).unwrap();
    } else {
        let named: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("swinViT.").map(|s| (s.to_string(), v)))
            .collect();
        Tensor::write_safetensors(&named, &path).unwrap();
    }
    let card = serde_json::json!({"variant": variant, "backbone": cfg, "preprocess": {}});
    std::fs::write(dir.join(format!("{name}.card.json")), card.to_string()).unwrap();
    path
}

#[test]
fn exports_load_strictly_and_a_backbone_mismatch_is_named() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "e.yaml", &seg(0));
    let cache = cache(d.path(), &cfg, true);

    let wrong = export(d.path(), "wide", 24, "full");
    let o = finetune(wrong.to_str().unwrap(), &cache, &cfg, &d.path().join("x"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    for want in ["feature_size is 24 in the export, 12 in", "e.yaml", "wide.card.json"] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    assert!(!d.path().join("x/model.safetensors").exists());

    let load = |t: &Path| -> std::collections::HashMap<String, Tensor> {
        Tensor::read_safetensors(t).unwrap().into_iter().collect()
    };
    for variant in ["full", "encoder"] {
        let e = export(d.path(), variant, 12, variant);
        let run = d.path().join(format!("run-{variant}"));
        let out = ok(finetune(e.to_str().unwrap(), &cache, &cfg, &run));
        let got = load(&run.join("model.safetensors"));
        let src = load(&e);
        let key = |k: &str| {
            if variant == "full" {
                k.to_string()
            } else {
                k.trim_start_matches("swinViT.").to_string()
            }
        };
        let w = "swinViT.layers4.0.blocks.1.mlp.linear2.weight";
        assert!(got[w].equal(&src[&key(w)]), "{variant}: {w} not loaded");
        // The export's 1-class head does not fit 3 classes: kept random.
        assert_eq!(got["out.conv.conv.weight"].size(), vec![3, 12, 1, 1, 1]);
        if variant == "full" {
            assert!(out.contains("out.* is not loaded"), "{out}");
            let k = "decoder2.transp_conv.conv.weight";
            assert!(got[k].equal(&src[k]), "decoder not loaded");
        } else {
            assert!(out.contains("encoder-only export"), "{out}");
        }
    }
}

#[test]
fn classification_trains_the_encoder_and_a_linear_head() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        "c.yaml",
        "  task: classification\n  num_classes: 2\n  steps: 12\n  batch_size: 2\n  \
         optimizer: {lr: 1.0e-3, schedule: constant, weight_decay: 0.0}\n  augment: {flip_prob: 0.0}\n",
    );
    let cache = cache(d.path(), &cfg, false);
    let run = d.path().join("run");
    ok(finetune("scratch", &cache, &cfg, &run));
    let lines = step_lines(&run);
    assert_eq!(lines.len(), 12);
    assert!(lines.iter().all(|l| l.get("dice_loss").is_none()));
    let loss = |i: usize| lines[i]["loss"].as_f64().unwrap();
    // The zero-initialised head starts at ln 2.
    assert!((loss(0) - std::f64::consts::LN_2).abs() < 1e-6, "{}", loss(0));
    assert!(loss(11) < 0.4, "loss {} -> {}", loss(0), loss(11));
    // The weights: the encoder under MONAI's swinViT.* names, and the head.
    let w: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(run.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        w.keys().all(|k| k.starts_with("swinViT.") || k.starts_with("head.")),
        "{:?}",
        w.keys()
    );
    assert_eq!(w["head.weight"].size(), vec![2, 192]);
    assert!(w.contains_key("swinViT.layers4.0.blocks.1.attn.qkv.weight"));
    // The report: one row per case, consistent with its own numbers.
    let e = evaluate(&run, &cache);
    assert_eq!(e["task"], "classification");
    let cases = e["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    let mut right = 0;
    for c in cases {
        let p: Vec<f64> = c["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{c}");
        let arg = if p[1] > p[0] { 1 } else { 0 };
        assert_eq!(c["predicted"], arg, "{c}");
        right += (c["predicted"] == c["class"]) as usize;
    }
    assert_eq!(e["accuracy"].as_f64(), Some(right as f64 / 2.0), "{e}");
    // The T1 and the grey-matter map are told apart after 12 steps.
    assert_eq!(e["accuracy"].as_f64(), Some(1.0), "{e}");
    assert_eq!(e["auc"].as_f64(), Some(1.0), "{e}");
}

/// nnU-Net's ResEnc U-Net (tests/data/nnunet/tiny_ResEncUNetPlans.json) as
/// the downstream network: an nnU-Net export (torch.save's
/// `network_weights`, aliases included, made for 1 class) loads into the
/// 3-class network with every tensor but `seg_layers`; a wrong
/// architecture is refused; 12 steps from scratch raise the Dice.
#[test]
fn an_nnunet_backbone_finetunes_from_its_export() {
    use med3dinsight::model::backbone::BackboneConfig;
    use med3dinsight::model::nnunet::ConvUnet;
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let plans = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/tiny_ResEncUNetPlans.json");
    let nnunet = |steps: u64| {
        format!(
            "{}  backbone:\n    nnunet: {{plans: {}}}\n",
            seg(steps).replace("lr: 2.0e-3", "lr: 1.0e-2"),
            plans.display()
        )
    };
    let write = |name: &str, steps: u64| {
        let text = std::fs::read_to_string(config(d.path(), name, &nnunet(steps))).unwrap();
        // the SwinUNETR backbone line of `config` gives way to nnU-Net's
        let text = text.replace("  backbone: {feature_size: 12}\n", "");
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (cfg0, cfg12) = (write("n0.yaml", 0), write("n12.yaml", 12));
    let cache = cache(d.path(), &cfg0, true);

    // An export as `med3d export --format nnunet` writes it.
    let mut bb: BackboneConfig = serde_yaml::from_str(&format!("nnunet: {{plans: {}}}", plans.display())).unwrap();
    bb.resolve().unwrap();
    let BackboneConfig::Nnunet(n) = &bb else { unreachable!() };
    tch::manual_seed(5);
    let vs = VarStore::new(tch::Device::Cpu);
    let net = ConvUnet::new(&vs.root(), &n.spec(1, 1).unwrap()).unwrap();
    let vars = vs.variables();
    let mut named: Vec<(String, Tensor)> = vars.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    for (a, k) in net.aliases() {
        named.push((a.clone(), vars[k].shallow_clone()));
    }
    let export = d.path().join("resenc.pth");
    med3dinsight::model::torch_save::save_nested(&export, "network_weights", &named).unwrap();
    let card = serde_json::json!({"variant": "nnunet", "backbone": bb});
    std::fs::write(d.path().join("resenc.card.json"), card.to_string()).unwrap();

    let r = d.path().join("from-export");
    let log = ok(finetune(export.to_str().unwrap(), &cache, &cfg0, &r));
    eprintln!("{log}");
    let tuned: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(r.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    for (k, t) in &vars {
        if k.starts_with("decoder.seg_layers.") {
            assert_ne!(
                tuned[k].size(),
                t.size(),
                "{k}: the 1-class head was loaded into 3 classes"
            );
        } else {
            assert!(tuned[k].equal(t), "{k}: not loaded from the export");
        }
    }

    // A card of other plans is refused, naming both.
    let mut other = card.clone();
    other["backbone"]["nnunet"]["resolved"]["architecture"]["arch_kwargs"]["features_per_stage"] =
        serde_json::json!([4, 8, 32]);
    std::fs::write(d.path().join("resenc.card.json"), other.to_string()).unwrap();
    let o = finetune(export.to_str().unwrap(), &cache, &cfg0, &d.path().join("x"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("architecture") && err.contains("tiny_ResEncUNetPlans.json"),
        "{err}"
    );

    let (r0, r12) = (d.path().join("n0"), d.path().join("n12"));
    ok(finetune("scratch", &cache, &cfg0, &r0));
    ok(finetune("scratch", &cache, &cfg12, &r12));
    let dice = |e: &Value| e["mean"]["dice"].as_f64().unwrap();
    let (before, after) = (dice(&evaluate(&r0, &cache)), dice(&evaluate(&r12, &cache)));
    eprintln!("ResEnc (tiny plans) training-case Dice: {before:.4} untrained -> {after:.4} after 12 steps");
    assert!(after > before + 0.2, "Dice {before} -> {after}");
}
