//! The PSAT decoder against PyTorch's own torch.nn.TransformerDecoder: the
//! same weights (loaded by PyTorch's key names, no renaming) give the same
//! output.
use std::path::Path;
use std::process::Command;

use med3dinsight::model::psat::Decoder;
use tch::{nn, Device, Tensor};

#[test]
fn decoder_matches_torch_transformer_decoder() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    let (dim, heads, ffn, layers) = (48i64, 4i64, 96i64, 3i64);
    let out = Command::new(if py.exists() {
        py.display().to_string()
    } else {
        "python3".into()
    })
    .arg(root.join("tests/reference/torch_decoder.py"))
    .arg(dir.path())
    .args([dim, heads, ffn, layers].map(|v| v.to_string()))
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut vs = nn::VarStore::new(Device::Cpu);
    let dec = Decoder::new(vs.root() / "decoder", dim, layers, heads, ffn, 0.1);
    let ours: std::collections::BTreeSet<String> = vs.variables().keys().cloned().collect();
    let theirs: std::collections::BTreeSet<String> = Tensor::read_safetensors(dir.path().join("decoder.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(ours, theirs, "variable names differ from PyTorch's state dict");
    vs.load(dir.path().join("decoder.safetensors")).unwrap();
    let q = Tensor::read_npy(dir.path().join("queries.npy")).unwrap();
    let m = Tensor::read_npy(dir.path().join("memory.npy")).unwrap();
    let want = Tensor::read_npy(dir.path().join("out.npy")).unwrap();
    let got = tch::no_grad(|| dec.forward(&q, &m, false));
    let err = (&got - &want).abs().max().double_value(&[]);
    assert!(err < 1e-5, "max abs error {err}");
}
