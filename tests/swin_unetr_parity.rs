//! SwinUNETR against MONAI's `monai.networks.nets.SwinUNETR` (MONAI 1.6, in
//! the project venv): the same random weights give the same encoder hidden
//! states, decoder features and logits within 1e-4 of the output scale in
//! float32 (and 1e-10 in float64); MONAI's state dict loads into our
//! VarStore by name with every key and shape matching; and our VarStore,
//! saved as safetensors, loads into MONAI with `strict=True` and gives our
//! outputs. Two configurations: MONAI's defaults ("merging", 64^3), and a
//! non-default one (use_v2, "mergingv2", patch_norm, an anisotropic window,
//! odd depths, batch 2, two input channels, also in float64) whose stages
//! exercise padding to whole windows, shifts along some axes only and
//! windows clipped to the feature map. Both also run with fused attention
//! (`scaled_dot_product_attention`).
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use med3dinsight::model::state_dict::{load_safetensors, save_safetensors};
use med3dinsight::model::swin_unetr::{Downsample, SwinUnetr, SwinUnetrConfig, SwinUnetrOutput};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

mod common;
use common::python;

struct Case {
    name: &'static str,
    seed: i64,
    config: SwinUnetrConfig,
    input_shape: Vec<i64>,
    float64: bool,
}

fn cases() -> Vec<Case> {
    let default = SwinUnetrConfig {
        in_channels: 1,
        out_channels: 2,
        feature_size: 12,
        ..SwinUnetrConfig::default()
    };
    let v2 = SwinUnetrConfig {
        in_channels: 2,
        out_channels: 3,
        feature_size: 12,
        depths: vec![2, 1, 2, 3],
        window_size: [5, 4, 3],
        patch_norm: true,
        downsample: Downsample::MergingV2,
        use_v2: true,
        ..SwinUnetrConfig::default()
    };
    vec![
        Case {
            name: "merging_64",
            seed: 1,
            config: default,
            input_shape: vec![1, 1, 64, 64, 64],
            float64: false,
        },
        Case {
            name: "v2_32",
            seed: 2,
            config: v2,
            input_shape: vec![2, 2, 32, 32, 64],
            float64: true,
        },
    ]
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn named_outputs(out: &SwinUnetrOutput) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = out
        .hidden_states
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("hidden.{i}"), h.shallow_clone()))
        .collect();
    v.push(("decoder".into(), out.decoder_features.shallow_clone()));
    v.push(("logits".into(), out.logits.shallow_clone()));
    v
}

/// Worst of max|ours - ref| / max|ref| over all outputs, each one checked
/// against `tol` with its name in the message.
fn compare(what: &str, ours: &[(String, Tensor)], refs: &HashMap<String, Tensor>, prefix: &str, tol: f64) -> f64 {
    let mut worst: f64 = 0.0;
    for (name, got) in ours {
        let want = &refs[&format!("{prefix}{name}")];
        assert_eq!(got.size(), want.size(), "{what} {name}: shape");
        let want = want.to_kind(Kind::Double);
        let scale = want.abs().max().double_value(&[]);
        let err = (got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]) / scale;
        eprintln!("  {what} {name}: relative error {err:.2e} (scale {scale:.3})");
        assert!(err < tol, "{what} {name}: relative error {err:.3e} >= {tol:.0e}");
        worst = worst.max(err);
    }
    worst
}

fn build(config: &SwinUnetrConfig) -> (VarStore, SwinUnetr) {
    let vs = VarStore::new(Device::Cpu);
    let model = SwinUnetr::new(&vs.root(), config).expect("valid config");
    (vs, model)
}

fn run(model: &SwinUnetr, x: &Tensor) -> Vec<(String, Tensor)> {
    tch::no_grad(|| named_outputs(&model.forward_t(x, false).expect("input shape accepted")))
}

#[test]
fn swin_unetr_matches_monai_both_ways() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = cases();

    // Our own randomly initialised models, saved for MONAI to load strictly.
    let mut ours_out = Vec::new();
    let mut json = Vec::new();
    for case in &cases {
        tch::manual_seed(100 + case.seed);
        let (vs, model) = build(&case.config);
        let file = format!("{}.ours.safetensors", case.name);
        save_safetensors(&vs, &d.join(&file)).unwrap();
        let x = Tensor::randn(case.input_shape.as_slice(), (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(
            &[("input", &x)],
            d.join(format!("{}.ours_input.safetensors", case.name)),
        )
        .unwrap();
        ours_out.push(run(&model, &x));
        json.push(serde_json::json!({
            "name": case.name,
            "seed": case.seed,
            "input_shape": case.input_shape,
            // the kwargs a user reads off the export card: production code, not a copy
            "kwargs": med3dinsight::export::card::swin_unetr_kwargs(&case.config),
            "float64": case.float64,
            "ours": file,
        }));
    }
    std::fs::write(d.join("cases.json"), serde_json::to_vec(&json).unwrap()).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/monai_swin_unetr.py");
    let t = Instant::now();
    let out = Command::new(python())
        .arg(&script)
        .arg(d)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "MONAI reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("MONAI reference: {:.1} s", t.elapsed().as_secs_f64());

    for (case, ours) in cases.iter().zip(&ours_out) {
        eprintln!("{}:", case.name);
        let t = Instant::now();
        // MONAI -> us: every key of the state dict is a variable of ours
        // with the same shape, and nothing is left over on either side.
        let monai_file = d.join(format!("{}.monai.safetensors", case.name));
        let monai_keys = read(&monai_file).len();
        let (mut vs, model) = build(&case.config);
        assert_eq!(vs.variables().len(), monai_keys, "number of state-dict entries");
        load_safetensors(&vs, &monai_file).unwrap();
        let refs = read(&d.join(format!("{}.ref.safetensors", case.name)));
        let x = &refs["input"];
        let worst32 = compare("float32", &run(&model, x), &refs, "", 1e-4);

        // scaled_dot_product_attention instead of MONAI's matmul-softmax
        let (fvs, fused) = build(&SwinUnetrConfig {
            fused_attention: true,
            ..case.config.clone()
        });
        load_safetensors(&fvs, &monai_file).unwrap();
        let worst_fused = compare("fused float32", &run(&fused, x), &refs, "", 1e-4);
        eprintln!("  worst: float32 {worst32:.2e}, fused float32 {worst_fused:.2e}");
        if case.float64 {
            vs.double();
            let worst64 = compare("float64", &run(&model, &x.to_kind(Kind::Double)), &refs, "f64.", 1e-10);
            eprintln!("  worst: float64 {worst64:.2e}");
        }

        // us -> MONAI: our VarStore loaded with strict=True reproduces our
        // outputs.
        let reverse = read(&d.join(format!("{}.reverse.safetensors", case.name)));
        let worst_rev = compare("reverse", ours, &reverse, "", 1e-4);
        eprintln!(
            "  worst reverse {worst_rev:.2e}; {monai_keys} keys; ours {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
}
