//! nnU-Net's networks against nnunetv2 / dynamic_network_architectures
//! (in the project venv), built from real plans files that nnU-Net's own
//! planners wrote (tests/data/nnunet, see scripts/make_nnunet_plans.py):
//! ResEnc M (ResidualEncoderUNet, 5 stages, 32..320 features), the default
//! planner's PlainConvUNet, and the derived tiny ResEnc plans (an
//! anisotropic stage, 2 classes). For each:
//! - the state-dict keys nnunetv2's network lists are exactly med3d's
//!   variables plus [`ConvUnet::aliases`], and each alias holds the same
//!   tensor as the name it aliases;
//! - nnunetv2's weights (perturbed off its init) load into med3d by name
//!   and give nnunetv2's logits within float32 tolerance;
//! - med3d's own weights, written with every alias, load into nnunetv2
//!   with `strict=True` and give med3d's logits.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use med3dinsight::model::nnunet::{plans, ConvUnet, UnetSpec};
use med3dinsight::model::state_dict::load_named;
use tch::nn::VarStore;
use tch::{Device, Tensor};

mod common;
use common::python;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nnunet")
        .join(name)
}

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/nnunet_net.py")
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn run_py(args: &[&str]) {
    let out = Command::new(python())
        .arg(reference())
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "nnunet_net.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// max |a - b| / max(1, max |b|).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let scale = b.abs().max().double_value(&[]).max(1.0);
    (a - b).abs().max().double_value(&[]) / scale
}

fn case(plans_file: &str, classes: i64, shape: &str, seed: i64) {
    let dir = tempfile_dir(plans_file);
    let plans = data(plans_file);
    let ps = plans.display().to_string();
    let d = dir.display().to_string();
    let cls = classes.to_string();
    run_py(&["build", &ps, "3d_fullres", &cls, &seed.to_string(), shape, &d]);

    let conf = plans::read(&plans, "3d_fullres").unwrap();
    let spec = UnetSpec::from_architecture(&conf.architecture, 1, classes).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = ConvUnet::new(&vs.root(), &spec).unwrap();

    // Keys: ours + aliases == PyTorch's state dict.
    let theirs_keys: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref.keys.json")).unwrap()).unwrap();
    let theirs_set: HashSet<&str> = theirs_keys.iter().map(String::as_str).collect();
    let vars = vs.variables();
    let mut ours_set: HashSet<&str> = vars.keys().map(String::as_str).collect();
    for (a, _) in net.aliases() {
        assert!(ours_set.insert(a.as_str()), "alias {a} is also a variable");
    }
    let missing: Vec<_> = theirs_set.difference(&ours_set).collect();
    let extra: Vec<_> = ours_set.difference(&theirs_set).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{plans_file}: keys differ: nnunetv2 only {missing:?}; med3d only {extra:?}"
    );

    // nnunetv2's weights -> med3d.
    let state = read(&dir.join("ref.state.safetensors"));
    for (alias, name) in net.aliases() {
        assert!(
            state[alias].equal(&state[name]),
            "{alias} and {name} differ in nnunetv2's state dict"
        );
    }
    let canonical: Vec<(String, Tensor)> = vars.keys().map(|k| (k.clone(), state[k].shallow_clone())).collect();
    load_named(&vs, canonical, "nnunetv2 state dict").unwrap();
    let io = read(&dir.join("ref.io.safetensors"));
    let ours = tch::no_grad(|| net.forward_t(&io["input"], false).unwrap());
    let e1 = rel_err(&ours.logits, &io["logits"]);
    assert!(
        e1 < 1e-4,
        "{plans_file}: med3d with nnunetv2's weights is off by {e1:e}"
    );

    // med3d's weights (a fresh init) -> nnunetv2, strict.
    tch::manual_seed(seed + 100);
    let vs2 = VarStore::new(Device::Cpu);
    let net2 = ConvUnet::new(&vs2.root(), &spec).unwrap();
    // Move the zero-initialised norms off 0 so every branch counts.
    tch::no_grad(|| {
        for (k, mut t) in vs2.variables() {
            if k.ends_with("norm.weight") {
                t.copy_(&(Tensor::randn_like(&t) * 0.2 + 1.0));
            }
        }
    });
    let v2 = vs2.variables();
    let mut named: Vec<(String, Tensor)> = v2.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    for (a, n) in net2.aliases() {
        named.push((a.clone(), v2[n].shallow_clone()));
    }
    let ours_path = dir.join("ours.state.safetensors");
    Tensor::write_safetensors(&named, &ours_path).unwrap();
    let ours2 = tch::no_grad(|| net2.forward_t(&io["input"], false).unwrap());
    let rev = dir.join("reverse.safetensors");
    run_py(&[
        "check",
        &ps,
        "3d_fullres",
        &cls,
        &ours_path.display().to_string(),
        &dir.join("ref.io.safetensors").display().to_string(),
        &rev.display().to_string(),
    ]);
    let e2 = rel_err(&read(&rev)["logits"], &ours2.logits);
    assert!(
        e2 < 1e-4,
        "{plans_file}: nnunetv2 with med3d's weights is off by {e2:e}"
    );
    eprintln!(
        "{plans_file}: {} variables + {} aliases, {} parameters; logits agree: {e1:.1e} (their weights), {e2:.1e} (ours)",
        vars.len(),
        net.aliases().len(),
        vars.values().map(|t| t.numel()).sum::<usize>()
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn tempfile_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("med3d-nnunet-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn resenc_m_plans() {
    case("nnUNetResEncUNetMPlans.json", 4, "1x1x32x32x32", 1);
}

#[test]
fn plain_conv_unet_plans() {
    case("nnUNetPlans.json", 4, "1x1x32x48x32", 2);
}

#[test]
fn tiny_anisotropic_resenc_plans() {
    case("tiny_ResEncUNetPlans.json", 2, "2x1x8x16x24", 3);
}
