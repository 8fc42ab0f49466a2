//! The pretrain stage on a synthetic cache, through the library: the loss
//! falls on a tiny model, the artifacts hold what they should, non-finite
//! steps are skipped and stop the run, the ablations run with their own
//! terms, and the loader's batches are a pure function of their number.
mod pretrain_fixture;

use std::sync::Arc;

use med3dinsight::artifacts::run as checkpoint;
use med3dinsight::config::Experiment;
use med3dinsight::train::data::{BatchMaker, Dataset, Loader};
use med3dinsight::train::{self, metrics, Status};
use pretrain_fixture::{experiment, options as opts, Fixture, TINY};
use tch::Tensor;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn tiny_run_lowers_the_loss_and_writes_its_artifacts() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let cfg = experiment(
        d.path(),
        &format!(
            "{TINY}  max_steps: 30\n  checkpoint_every: 12\n  optimizer: {{lr: 0.001, warmup_steps: 5, clip_grad_norm: 5.0}}\n"
        ),
    );
    let exp = Experiment::load(&cfg).unwrap();
    let out = d.path().join("run");
    let s = train::run(&exp.pretrain, &opts(&cache, &out)).unwrap();
    assert_eq!(s.status, Status::Done);
    assert_eq!((s.step, s.total_steps, s.steps_run), (30, 30, 30));
    assert_eq!(s.targets, vec![("text".to_string(), 16)]);
    // 4 cases x 3 planes x 4 slices, every seventh row invalid
    assert_eq!(s.usable_slices, 48 - 7);

    let m = metrics::read(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        m.iter().map(|l| l.step).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    let loss: Vec<f64> = m.iter().map(|l| l.loss.unwrap()).collect();
    let (first, last) = (mean(&loss[..10]), mean(&loss[20..]));
    assert!(
        last < 0.9 * first,
        "loss did not fall: first 10 {first}, last 10 {last}"
    );
    for l in &m {
        let t = |k: &str| l.terms[k].unwrap();
        // total = text + recon (weights 1)
        assert!((l.loss.unwrap() - t("loss_text") - t("loss_recon")).abs() < 1e-4);
        // the partial plan carries exactly the mass m
        assert!((t("mass_text") - 0.95).abs() < 1e-4, "mass {}", t("mass_text"));
        assert!((0.0..=1.0).contains(&t("matched_text")));
        assert!(l.grad_norm.unwrap() > 0.0 && !l.skipped);
        assert!(l.volumes_per_s > 0.0);
    }
    // warm-up then cosine
    assert!((m[0].lr - 0.0002).abs() < 1e-12 && (m[4].lr - 0.001).abs() < 1e-12);
    assert!(m[29].lr < 1e-9);
    assert!((m[29].epoch - 30.0 * 2.0 / 41.0).abs() < 1e-9);

    // checkpoints at 24 and 30 kept (keep 2), 12 pruned
    let ck: Vec<u64> = checkpoint::list(&out).into_iter().map(|c| c.0).collect();
    assert_eq!(ck, vec![24, 30]);
    let latest = checkpoint::latest(&out).unwrap();
    let st = checkpoint::read_state(&latest).unwrap();
    assert_eq!((st.step, st.data_position, st.optimizer_t), (30, 30, 30));
    let keys: Vec<String> = Tensor::read_safetensors(latest.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for k in [
        "swinViT.patch_embed.proj.weight",
        "swinViT.layers1.0.blocks.0.attn.relative_position_index",
        "decoder1.transp_conv.conv.weight",
        "out.conv.conv.weight",
        "psat.decoder.layers.0.multihead_attn.in_proj_weight",
        "psat.plane_slice_embed.weight",
        "psat.proj.text.weight",
        "align.text.metric",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} missing from the checkpoint");
    }
    let opt = Tensor::read_safetensors(latest.join("optimizer.safetensors")).unwrap();
    assert!(opt.iter().any(|(k, _)| k == "exp_avg_sq.align.text.metric"));

    // the plot: one panel per series (total, recon, text), finite pixels
    let img = png::Decoder::new(std::fs::File::open(out.join("loss.png")).unwrap());
    let r = img.read_info().unwrap();
    assert_eq!((r.info().width, r.info().height), (900, 3 * 190));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "done");
    assert_eq!(summary["first_loss"].as_f64().unwrap(), loss[0]);

    // a second invocation without --resume refuses; with it, nothing to do
    let e = format!("{:#}", train::run(&exp.pretrain, &opts(&cache, &out)).unwrap_err());
    assert!(e.contains("--resume"), "{e}");
    let again = train::run(
        &exp.pretrain,
        &train::Options {
            resume: true,
            ..opts(&cache, &out)
        },
    )
    .unwrap();
    assert_eq!((again.status, again.steps_run), (Status::UpToDate, 0));
    // and another config may not resume this run
    let mut other = exp.pretrain.clone();
    other.optimizer.lr = 0.002;
    let e = format!(
        "{:#}",
        train::run(
            &other,
            &train::Options {
                resume: true,
                ..opts(&cache, &out)
            }
        )
        .unwrap_err()
    );
    assert!(e.contains("another pretrain config"), "{e}");
}

#[test]
fn nonfinite_steps_are_skipped_then_stop_the_run() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    // lr 1e30: the first update blows the weights up; every later loss is NaN
    let cfg = experiment(
        d.path(),
        &format!("{TINY}  max_steps: 50\n  max_nonfinite: 3\n  optimizer: {{lr: 1.0e+30}}\n"),
    );
    let exp = Experiment::load(&cfg).unwrap();
    let out = d.path().join("run");
    let e = format!("{:#}", train::run(&exp.pretrain, &opts(&cache, &out)).unwrap_err());
    assert!(e.contains("3 steps in a row had a non-finite loss"), "{e}");
    let m = metrics::read(&out.join("metrics.jsonl")).unwrap();
    let n = m.len();
    assert!((4..50).contains(&n), "{n} lines");
    assert!(!m[0].skipped && m[0].loss.is_some());
    for l in &m[n - 3..] {
        assert!(l.skipped && l.loss.is_none() && l.grad_norm.is_none());
    }
    assert_eq!(m[n - 1].nonfinite_total, m.iter().filter(|l| l.skipped).count() as u64);
    assert!(e.contains(&format!("stopped at step {n}")), "{e}");
}

#[test]
fn ablations_report_their_own_terms() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture {
        image_dim: Some(8),
        ..Default::default()
    }
    .write(d.path());
    for (name, extra) in [
        ("ot", "  align: {loss: ot, max_iter: 30}\n"),
        ("infonce", "  align: {loss: infonce}\n  head: pool\n"),
    ] {
        let cfg = experiment(
            d.path(),
            &format!(
                "{}  max_steps: 2\n{extra}",
                TINY.replace("  align: {max_iter: 30}\n", "")
            ),
        );
        let exp = Experiment::load(&cfg).unwrap();
        let out = d.path().join(name);
        let s = train::run(&exp.pretrain, &opts(&cache, &out)).unwrap();
        assert_eq!(s.targets, vec![("text".to_string(), 16), ("image".to_string(), 8)]);
        let m = metrics::read(&out.join("metrics.jsonl")).unwrap();
        let t = &m[1].terms;
        let total = t["loss_text"].unwrap() + t["loss_image"].unwrap() + t["loss_recon"].unwrap();
        assert!((m[1].loss.unwrap() - total).abs() < 1e-4, "{name}");
        if name == "ot" {
            // the balanced plan moves all the mass
            assert!((t["mass_text"].unwrap() - 1.0).abs() < 1e-4);
            assert!((t["mass_image"].unwrap() - 1.0).abs() < 1e-4);
        } else {
            assert!(!t.contains_key("mass_text"));
            let keys: Vec<String> =
                Tensor::read_safetensors(checkpoint::latest(&out).unwrap().join("model.safetensors"))
                    .unwrap()
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
            assert!(keys.iter().any(|k| k == "pool.proj.image.weight"));
            assert!(!keys.iter().any(|k| k.starts_with("psat.") || k.starts_with("align.")));
        }
    }
}

#[test]
fn batches_are_a_function_of_their_number_and_flips_keep_positions_true() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let exp = Experiment::load(&experiment(d.path(), &format!("{TINY}  augment: {{flip_prob: 0.5}}\n"))).unwrap();
    let ds = Arc::new(Dataset::open(&cache, &exp.pretrain).unwrap());
    let maker = Arc::new(BatchMaker::new(ds.clone(), &exp.pretrain));
    let mut perm = None;
    let direct: Vec<_> = (5..15).map(|k| maker.batch(k, &mut perm).unwrap()).collect();
    let mut loader = Loader::start(maker.clone(), 5).unwrap();
    for want in &direct {
        let got = loader.next_batch().unwrap();
        assert_eq!(
            (got.index, &got.rows, &got.positions),
            (want.index, &want.rows, &want.positions)
        );
        assert!(got.volumes.equal(&want.volumes));
    }
    drop(loader);
    // an epoch (41 usable slices) visits every slice once
    let mut seen: Vec<usize> = (0..41u64).map(|s| maker.sampler.row(s, &mut perm)).collect();
    seen.sort_unstable();
    assert_eq!(seen, ds.usable);

    // A flipped slice axis maps position p to 1 - p and index i to
    // n - 1 - i, and the flipped volume holds the original slice there (up
    // to in-plane mirroring by the other flips).
    let originals: Vec<Tensor> = ds
        .cases
        .iter()
        .map(|c| {
            let (v, s) = med3dinsight::artifacts::npy::read_volume(&c.volume).unwrap();
            Tensor::from_slice(&v).view([s[0] as i64, s[1] as i64, s[2] as i64])
        })
        .collect();
    let mut flipped = 0;
    for b in &direct {
        for i in 0..b.rows.len() {
            let row = &ds.rows[b.rows[i]];
            let n = ds.cases[0].shape[row.plane.axis()] as i64;
            let (p, idx) = (b.positions[i], b.indices[i]);
            if (p - row.position).abs() > 1e-12 {
                flipped += 1;
                assert!((p - (1.0 - row.position)).abs() < 1e-12);
                assert_eq!(idx, n - 1 - row.index as i64);
            } else {
                assert_eq!(idx, row.index as i64);
            }
            assert_eq!(b.planes[i], row.plane.id() as i64);
            let axis = row.plane.axis() as i64;
            let got = b.volumes.get(i as i64).get(0).select(axis, idx);
            let want = originals[ds.row_case[b.rows[i]].unwrap()].select(axis, row.index as i64);
            let candidates = [got.shallow_clone(), got.flip([0]), got.flip([1]), got.flip([0, 1])];
            assert!(
                candidates.iter().any(|c| c.equal(&want)),
                "row {}: the batch's slice at index {idx} is not the original slice",
                row.slice_id
            );
        }
    }
    assert!(flipped > 0, "flip_prob 0.5 flipped no slice axis in 30 samples");
}

#[test]
fn intensity_jitter_is_an_affine_map_within_its_bounds() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let exp = Experiment::load(&experiment(
        d.path(),
        &format!("{TINY}  augment: {{intensity_scale: 0.2, intensity_shift: 0.05}}\n"),
    ))
    .unwrap();
    let ds = Arc::new(Dataset::open(&cache, &exp.pretrain).unwrap());
    let maker = BatchMaker::new(ds.clone(), &exp.pretrain);
    let b = maker.batch(0, &mut None).unwrap();
    let mut scales = Vec::new();
    for i in 0..b.rows.len() {
        let c = &ds.cases[ds.row_case[b.rows[i]].unwrap()];
        let (v, _) = med3dinsight::artifacts::npy::read_volume(&c.volume).unwrap();
        let x = Tensor::from_slice(&v);
        let y = b.volumes.get(i as i64).flatten(0, -1);
        assert_eq!(b.positions[i], ds.rows[b.rows[i]].position);
        // fit y = a x + b on the voxels the clamp left alone
        let keep = y.gt(1e-6).logical_and(&y.lt(1.0 - 1e-6));
        let (xs, ys) = (
            x.masked_select(&keep).to_kind(tch::Kind::Double),
            y.masked_select(&keep).to_kind(tch::Kind::Double),
        );
        let (mx, my) = (xs.mean(None), ys.mean(None));
        let a = ((&xs - &mx) * (&ys - &my)).sum(None) / (&xs - &mx).square().sum(None);
        let off = &my - &a * &mx;
        let resid = (&ys - (&xs * &a + &off)).abs().max().double_value(&[]);
        let (a, off) = (a.double_value(&[]), off.double_value(&[]));
        assert!(resid < 1e-5, "not affine: residual {resid}");
        assert!((0.8..=1.2).contains(&a) && off.abs() <= 0.05 + 1e-6, "a {a}, b {off}");
        assert!(b.volumes.get(i as i64).min().double_value(&[]) >= 0.0);
        assert!(b.volumes.get(i as i64).max().double_value(&[]) <= 1.0);
        scales.push(a);
    }
    assert!(scales.iter().any(|a| (a - 1.0).abs() > 1e-3), "{scales:?}");
}

#[test]
fn stale_or_missing_embeddings_are_named() {
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let exp = Experiment::load(&experiment(d.path(), TINY)).unwrap();
    let text = cache.join("embeddings/text.safetensors");
    // the embed stage's hash of the index order: accepted when it matches
    let rows = med3dinsight::preprocess::read_index(&cache).unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.slice_id.as_str()).collect();
    let sha = med3dinsight::fsutil::sha256_bytes(ids.join("\n").as_bytes());
    pretrain_fixture::add_metadata(&text, &[("index_sha256", &sha), ("encoder", "minilm")]);
    assert_eq!(med3dinsight::artifacts::cache::index_sha256(&rows), sha);
    let t = med3dinsight::artifacts::embeddings::read(&text).unwrap();
    assert_eq!(t.meta["encoder"], "minilm");
    assert_eq!((t.rows(), t.dim), (48, 16));
    assert_eq!(Dataset::open(&cache, &exp.pretrain).unwrap().usable.len(), 41);
    // and refused when the index changed since
    pretrain_fixture::add_metadata(&text, &[("index_sha256", "0123")]);
    let e = format!("{:#}", Dataset::open(&cache, &exp.pretrain).unwrap_err());
    assert!(e.contains("another slice index") && e.contains("med3d embed"), "{e}");
    std::fs::remove_file(&text).unwrap();
    let e = format!("{:#}", Dataset::open(&cache, &exp.pretrain).unwrap_err());
    assert!(
        e.contains("no text embeddings") && e.contains("text.safetensors"),
        "{e}"
    );
}

/// Writes the fixture to $PRETRAIN_FIXTURE_DIR for manual runs of the
/// binary (`cargo test --release --test pretrain_stage -- --ignored`).
#[test]
#[ignore]
fn write_fixture_for_manual_runs() {
    let dir = std::path::PathBuf::from(std::env::var("PRETRAIN_FIXTURE_DIR").unwrap());
    Fixture::default().write(&dir);
    pretrain_fixture::experiment(&dir, TINY);
}
