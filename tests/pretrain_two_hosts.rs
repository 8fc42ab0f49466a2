//! Data-parallel pretraining across two hosts with their own addresses:
//! two network namespaces joined by a veth pair (10.213.k.1 and
//! 10.213.k.2), one rank in each, launched with the variables torchrun and
//! Slurm set (RANK, WORLD_SIZE, MASTER_ADDR = the first host's address,
//! MASTER_PORT) and GLOO_SOCKET_IFNAME naming the host's interface, as on a
//! cluster node. Loopback cannot stand in for this: the rendezvous, the
//! store and Gloo's pairs all cross the veth here.
//!
//! - the 2-host run equals 1 process with the global batch;
//! - killing one rank makes the other exit non-zero within a bound of
//!   pretrain.dist_timeout_s, with c10d's reason, never hanging;
//! - relaunching both with --resume continues from the last checkpoint to
//!   the uninterrupted run's weights.
//!
//! Needs root and iproute2 (`ip netns`); .ci/run has both. Elsewhere the
//! tests say they skipped.
mod dist_support;
mod pretrain_fixture;

use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dist_support::*;
use med3dinsight::artifacts::run as checkpoint;
use med3dinsight::train::metrics;
use pretrain_fixture::Fixture;

/// Two namespaces and the veth between them; removed on drop.
struct Hosts {
    names: [String; 2],
    hosts: [Host; 2],
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip (iproute2) not found");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Hosts {
    /// None (with a note) where this process may not make namespaces.
    fn new() -> Option<Hosts> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: making network namespaces needs root");
            return None;
        }
        // a subnet per test in this process, and per process
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let k = (std::process::id() % 200 + n * 7) % 250 + 1;
        let tag = format!("m3d{}x{n}", std::process::id() % 100000);
        let names = [format!("{tag}a"), format!("{tag}b")];
        let (a, b) = (&names[0], &names[1]);
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        let hosts = Hosts {
            names: names.clone(),
            hosts: [0, 1].map(|i| Host {
                netns: names[i].clone(),
                ifname: format!("v{}", names[i]),
                master_addr: format!("10.213.{k}.1"),
            }),
        };
        let (va, vb) = (&hosts.hosts[0].ifname, &hosts.hosts[1].ifname);
        ip(&[
            "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b,
        ]);
        for (i, (ns, dev)) in [(a, va), (b, vb)].into_iter().enumerate() {
            ip(&["-n", ns, "addr", "add", &format!("10.213.{k}.{}/24", i + 1), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn two_hosts_match_one_process_with_the_global_batch() {
    let Some(h) = Hosts::new() else { return };
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let (one, two) = one_vs_two_on(Some(&h.hosts), d.path(), SWIN, "  all_gather_embeddings: true\n");
    assert_same_run(&one, &two, &["psat.", "align."], None);
}

/// Both ranks on their hosts; rank 1 killed with SIGKILL once step 2 is
/// checkpointed; rank 0 must end by itself with an error. Then both are
/// relaunched with --resume and must reach the weights of an uninterrupted
/// 2-host run.
#[test]
fn a_lost_host_fails_the_other_and_both_resume() {
    let Some(h) = Hosts::new() else { return };
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let steps = 6;
    let timeout_s = 20;
    let cfg = config(d.path(), "c", 2, steps, "");
    let (out, whole) = (d.path().join("run"), d.path().join("whole"));
    let launch = |out: &std::path::Path, resume: bool| -> Vec<Child> {
        // a port of its own for each launch (a killed store's may linger)
        let port = 29000 + (std::process::id() % 1000) as u16 + if resume { 1000 } else { 0 };
        (0..2)
            .map(|r| {
                spawn_on(
                    Some(&h.hosts[r]),
                    resume,
                    &cfg,
                    &cache,
                    out,
                    Some((r, 2, port)),
                    timeout_s,
                )
            })
            .collect()
    };

    // the uninterrupted run
    for (r, c) in launch(&whole, false).into_iter().enumerate() {
        let (ok, log) = finish(c);
        assert!(ok, "uninterrupted rank {r} failed:\n{log}");
    }

    let mut ranks = launch(&out, false);
    let t = Instant::now();
    while checkpoint::list(&out).last().is_none_or(|c| c.0 < 2) {
        if let Ok(Some(s)) = ranks[0].try_wait() {
            panic!("rank 0 ended early: {s}");
        }
        assert!(t.elapsed() < Duration::from_secs(300), "no step-2 checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r1 = ranks.pop().unwrap();
    let r0 = ranks.pop().unwrap();
    // `ip netns exec` execs the binary: the pid is med3d's
    assert!(Command::new("kill")
        .args(["-KILL", &r1.id().to_string()])
        .status()
        .unwrap()
        .success());
    let sent = Instant::now();
    let mut r0 = r0;
    loop {
        if r0.try_wait().unwrap().is_some() {
            break;
        }
        if sent.elapsed() > Duration::from_secs(10 * timeout_s) {
            let _ = r0.kill();
            panic!("rank 0 still running {} s after its peer host was lost", 10 * timeout_s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = sent.elapsed().as_secs_f64();
    let _ = finish(r1);
    let (ok, log) = finish(r0);
    eprintln!("rank 0 exited {after:.1} s after rank 1 was killed (timeout {timeout_s} s):\n{log}");
    assert!(!ok, "rank 0 must fail when its peer is lost");
    assert!(log.contains("rank 0/2: "), "{log}");
    assert!(
        log.contains(&format!(
            "failed (rank 1 exited, or did not answer within {timeout_s} s): "
        )),
        "{log}"
    );
    assert!(!log.contains("terminate called") && !log.contains("panicked"), "{log}");
    let stopped = checkpoint::read_state(&checkpoint::latest(&out).unwrap()).unwrap().step;
    assert!((2..steps).contains(&stopped), "checkpoint at step {stopped}");

    // both hosts relaunched with --resume
    for (r, c) in launch(&out, true).into_iter().enumerate() {
        let (ok, log) = finish(c);
        assert!(ok, "resumed rank {r} failed:\n{log}");
    }
    let m = metrics::read(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        m.iter().map(|l| l.step).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    let (a, b) = (weights(&whole, steps), weights(&out, steps));
    let (diff, at) = max_diff(&a, &b);
    eprintln!("resumed vs uninterrupted at step {steps}: max |diff| {diff:.3e} ({at})");
    assert!(
        diff < 1e-6,
        "the resumed run differs from the uninterrupted one by {diff} at {at}"
    );
}
