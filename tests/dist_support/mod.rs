//! What the data-parallel tests share: the tiny configs, launching ranks
//! as real processes (on this host over loopback, or each in its own
//! network namespace), and comparing a 2-rank run with 1 process.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use med3dinsight::artifacts::run as checkpoint;
use med3dinsight::train::metrics;
use tch::Tensor;

use crate::pretrain_fixture::{bin, experiment, Fixture};

pub const STEPS: u64 = 3;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tiny SwinUNETR of the other pretrain tests.
pub const SWIN: &str = "{feature_size: 12, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], fused_attention: true}";

/// nnU-Net's ResEnc U-Net from the tiny plans derived from ResEnc M's.
pub fn nnunet() -> String {
    let plans = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nnunet/tiny_ResEncUNetPlans.json");
    format!("{{nnunet: {{plans: {}}}}}", plans.display())
}

/// The tiny model of the other pretrain tests on the fixture's 64x32x32
/// volumes (32^3 would leave one voxel at the bottleneck), dropout off.
pub fn config(dir: &Path, name: &str, batch: usize, steps: u64, extra: &str) -> PathBuf {
    config_with(dir, name, batch, steps, SWIN, extra)
}

pub fn config_with(dir: &Path, name: &str, batch: usize, steps: u64, backbone: &str, extra: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    experiment(
        &d,
        &format!(
            "  device: cpu
  threads: 1
  backbone: {backbone}
  psat: {{layers: 1, heads: 2, queries: 4, bins: 8, dropout: 0.0}}
  align: {{max_iter: 30}}
  sampling: slice
  workers: 1
  prefetch: 1
  batch_size: {batch}
  max_steps: {steps}
  checkpoint_every: 1
  keep_checkpoints: {STEPS}
  optimizer: {{lr: 0.05, eps: 1.0, weight_decay: 0.0, schedule: constant}}
{extra}"
        ),
    )
}

pub fn spawn(
    cfg: &Path,
    cache: &Path,
    out: &Path,
    rank_world_port: Option<(usize, usize, u16)>,
    timeout_s: u64,
) -> Child {
    spawn_on(None, false, cfg, cache, out, rank_world_port, timeout_s)
}

/// One of the test's hosts: a network namespace, its interface (what
/// GLOO_SOCKET_IFNAME names, as on a cluster node) and the address every
/// rank is told the master is at (MASTER_ADDR).
pub struct Host {
    pub netns: String,
    pub ifname: String,
    pub master_addr: String,
}

/// [`spawn`] on `host` (`ip netns exec`, which execs the binary: the
/// child's pid is med3d's), or on this host over loopback; with --resume
/// when `resume`.
pub fn spawn_on(
    host: Option<&Host>,
    resume: bool,
    cfg: &Path,
    cache: &Path,
    out: &Path,
    rank_world_port: Option<(usize, usize, u16)>,
    timeout_s: u64,
) -> Child {
    let mut c = match host {
        None => Command::new(bin()),
        Some(h) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &h.netns]).arg(bin());
            c.env("GLOO_SOCKET_IFNAME", &h.ifname);
            c
        }
    };
    c.arg("pretrain");
    if resume {
        c.arg("--resume");
    }
    c.arg("--cache")
        .arg(cache)
        .arg("--config")
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_NTASKS")
        .env("MED3D_DIST_TIMEOUT_S", timeout_s.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((rank, world, port)) = rank_world_port {
        c.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", host.map_or("127.0.0.1", |h| h.master_addr.as_str()))
            .env("MASTER_PORT", port.to_string());
    }
    c.spawn().unwrap()
}

pub fn finish(c: Child) -> (bool, String) {
    let o = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

pub fn weights(out: &Path, step: u64) -> Vec<(String, Tensor)> {
    let p = checkpoint::checkpoints_dir(out)
        .join(format!("step-{step:08}"))
        .join("model.safetensors");
    let mut v = Tensor::read_safetensors(&p).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest absolute difference over all float tensors, and where.
pub fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0, String::new());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        if !ta.is_floating_point() {
            assert!(ta.equal(tb), "{na} differs");
            continue;
        }
        let d = (ta - tb).abs().max().double_value(&[]);
        if d > worst.0 {
            worst = (d, na.clone());
        }
    }
    worst
}

/// Trains 1 process with batch 2b and 2 ranks with batch b; returns the
/// two runs' folders.
pub fn one_vs_two(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    one_vs_two_with(dir, SWIN, extra)
}

pub fn one_vs_two_with(dir: &Path, backbone: &str, extra: &str) -> (PathBuf, PathBuf) {
    one_vs_two_on(None, dir, backbone, extra)
}

/// [`one_vs_two_with`] with rank r on `hosts[r]` when given.
pub fn one_vs_two_on(hosts: Option<&[Host; 2]>, dir: &Path, backbone: &str, extra: &str) -> (PathBuf, PathBuf) {
    let cache = Fixture::default().write(dir);
    let (one, two) = (dir.join("one"), dir.join("two"));
    let c1 = spawn(
        &config_with(dir, "c1", 4, STEPS, backbone, extra),
        &cache,
        &one,
        None,
        60,
    );
    let (ok, log) = finish(c1);
    assert!(ok, "1 process failed:\n{log}");
    let cfg2 = config_with(dir, "c2", 2, STEPS, backbone, extra);
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| spawn_on(hosts.map(|h| &h[r]), false, &cfg2, &cache, &two, Some((r, 2, port)), 60))
        .collect();
    for (r, c) in ranks.into_iter().enumerate() {
        let (ok, log) = finish(c);
        assert!(ok, "rank {r} failed:\n{log}");
        if r == 1 {
            assert!(log.contains("pretrain rank 1/2: Done at step 3"), "{log}");
        }
    }
    (one, two)
}

pub fn select(w: &[(String, Tensor)], prefix: &str) -> Vec<(String, Tensor)> {
    w.iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

/// The 2-rank run's weights after each step equal the 1-process run's to
/// within 1e-3 of how far the weights moved, for the whole model and for
/// each part separately (`prefixes`: the head and the metric weights, which
/// only the alignment term trains); the logged losses agree to 1e-5, and
/// so do the logged terms, all of them or those named in `terms`.
pub fn assert_same_run(one: &Path, two: &Path, prefixes: &[&str], terms: Option<&[&str]>) {
    let init_free = weights(one, 1);
    for prefix in std::iter::once("").chain(prefixes.iter().copied()) {
        let moved = max_diff(&select(&weights(one, STEPS), prefix), &select(&init_free, prefix)).0;
        assert!(moved > 1e-4, "{prefix}*: the weights hardly moved ({moved})");
        for step in 1..=STEPS {
            let (diff, at) = max_diff(
                &select(&weights(one, step), prefix),
                &select(&weights(two, step), prefix),
            );
            eprintln!("{prefix}* step {step}: max |1 process - 2 ranks| = {diff:.3e} ({at}); moved from step 1 to {STEPS}: {moved:.3e}");
            assert!(
                diff < 1e-3 * moved,
                "{prefix}* step {step}: 2 ranks differ from 1 process by {diff} at {at} (moved {moved})"
            );
        }
    }
    let (m1, m2) = (
        metrics::read(&one.join("metrics.jsonl")).unwrap(),
        metrics::read(&two.join("metrics.jsonl")).unwrap(),
    );
    assert_eq!((m1.len(), m2.len()), (STEPS as usize, STEPS as usize));
    for (a, b) in m1.iter().zip(&m2) {
        let (la, lb) = (a.loss.unwrap(), b.loss.unwrap());
        eprintln!(
            "step {}: loss {la} vs {lb}; terms {:?} vs {:?}",
            a.step, a.terms, b.terms
        );
        assert!(
            (la - lb).abs() < 1e-5 * la.abs().max(1.0),
            "step {}: loss {la} vs {lb}",
            a.step
        );
        for (k, v) in a
            .terms
            .iter()
            .filter(|(k, _)| terms.is_none_or(|t| t.contains(&k.as_str())))
        {
            let (x, y) = (v.unwrap(), b.terms[k].unwrap());
            assert!(
                (x - y).abs() < 1e-5 * x.abs().max(1.0),
                "step {}: {k} {x} vs {y}",
                a.step
            );
        }
        assert_eq!(a.epoch, b.epoch, "the same samples were consumed");
        assert!(a.allreduce_s.is_none() && b.allreduce_s.is_some());
    }
    // only rank 0 wrote the run folder
    assert_eq!(checkpoint::list(two).len(), STEPS as usize);
}
