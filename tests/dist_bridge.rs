//! The c10d bridge on two real processes over Gloo (loopback): this test
//! binary re-runs itself as rank 0 and rank 1 (the `child` entry, selected
//! by MED3D_DIST_CHILD), and each rank checks its collectives' results
//! against the same arithmetic done locally by ATen on both ranks' inputs.
//! A rank that leaves makes its peer's next collective fail with c10d's
//! message, within the timeout, instead of hanging.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use med3dinsight::dist::{grads, Dist, Launch};
use tch::{Device, Kind, Tensor};

const CHILD: &str = "MED3D_DIST_CHILD";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `scenario` on two ranks; returns each rank's (exit ok, stderr).
fn run_pair(scenario: &str, dir: &Path) -> Vec<(bool, String)> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let err = std::fs::File::create(dir.join(format!("{scenario}-{rank}.log"))).unwrap();
            Command::new(&exe)
                .args(["--exact", "child", "--nocapture", "--test-threads=1"])
                .env(CHILD, scenario)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("MED3D_DIST_SCRATCH", dir)
                .stdout(Stdio::null())
                .stderr(err)
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .enumerate()
        .map(|(rank, mut c)| {
            let ok = c.wait().unwrap().success();
            let log = std::fs::read_to_string(dir.join(format!("{scenario}-{rank}.log"))).unwrap();
            (ok, log)
        })
        .collect()
}

/// Rank r's input: a fixed function of (r, n).
fn input(rank: usize, n: i64) -> Tensor {
    tch::manual_seed(100 + rank as i64);
    Tensor::randn([n], (Kind::Float, Device::Cpu))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn collectives(d: &Dist) {
    let r = d.rank;
    // sum of both ranks' 1M floats, as ATen adds them
    let t = input(r, 1 << 20);
    let want = input(0, 1 << 20) + input(1, 1 << 20);
    d.all_reduce_sum(&t).unwrap();
    assert!(
        max_diff(&t, &want) < 1e-6,
        "allreduce differs by {}",
        max_diff(&t, &want)
    );
    // integers exactly
    let i = Tensor::from_slice(&[r as i64 + 1, 10 * (r as i64 + 1), -7]);
    d.all_reduce_sum(&i).unwrap();
    assert_eq!(Vec::<i64>::try_from(&i).unwrap(), vec![3, 30, -14]);
    // broadcast from rank 1: rank 0 ends with rank 1's values, bit for bit
    let b = input(r, 1000).view([10, 100]);
    d.broadcast(&b, 1).unwrap();
    assert!(b.equal(&input(1, 1000).view([10, 100])));
    // all_gather: [2, 3, 5] in rank order
    let g = input(r, 15).view([3, 5]);
    let all = d.all_gather(&g).unwrap();
    assert_eq!(all.size(), vec![2, 3, 5]);
    assert!(all.get(0).equal(&input(0, 15).view([3, 5])));
    assert!(all.get(1).equal(&input(1, 15).view([3, 5])));
    // barrier: rank 1 writes a file before it; rank 0 must see it after
    let scratch = std::path::PathBuf::from(std::env::var("MED3D_DIST_SCRATCH").unwrap());
    let flag = scratch.join("rank1-was-here");
    if r == 1 {
        std::thread::sleep(Duration::from_millis(500));
        std::fs::write(&flag, b"1").unwrap();
    }
    d.barrier().unwrap();
    assert!(flag.exists(), "rank {r} passed the barrier before rank 1 reached it");
}

fn gradients(d: &Dist) {
    let r = d.rank;
    // rank-specific initial values; after the broadcast both hold rank 0's
    let vs = tch::nn::VarStore::new(Device::Cpu);
    tch::manual_seed(r as i64);
    let a = vs.root().randn("a", &[300, 7], 0.0, 1.0);
    let b = vs.root().randn("b", &[11], 0.0, 1.0);
    let c = vs.root().randn("c", &[5], 0.0, 1.0);
    grads::broadcast_variables(d, &vs.variables().into_iter().collect::<Vec<_>>()).unwrap();
    tch::manual_seed(0);
    let a0 = Tensor::randn([300, 7], (Kind::Float, Device::Cpu));
    let b0 = Tensor::randn([11], (Kind::Float, Device::Cpu));
    assert!(a.equal(&a0) && b.equal(&b0));
    // loss_r = (r + 1) * sum(a^2) + sum(b) [+ sum(c) on rank 0 only]
    let mut loss = (&a * &a).sum(Kind::Float) * (r as f64 + 1.0) + b.sum(Kind::Float);
    if r == 0 {
        loss += c.sum(Kind::Float);
    }
    loss.backward();
    let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    params.sort_by(|x, y| x.0.cmp(&y.0));
    // 4 KB buckets: a (8400 B) alone, then b and c together
    grads::average_gradients(d, &params, 4096).unwrap();
    // mean over ranks of d loss_r / d a = (1 + 2) / 2 * 2a
    assert!(max_diff(&a.grad(), &(&a0 * 3.0)) < 1e-5);
    assert!(b.grad().equal(&Tensor::ones([11], (Kind::Float, Device::Cpu))));
    // c: 1 on rank 0, undefined (zeros) on rank 1 -> 0.5 on both
    assert!(c.grad().defined());
    assert!(c.grad().equal(&Tensor::full([5], 0.5, (Kind::Float, Device::Cpu))));
}

/// The harness entry of the child processes; a no-op in a normal run.
#[test]
fn child() {
    let Ok(scenario) = std::env::var(CHILD) else {
        return;
    };
    tch::set_num_threads(1);
    let launch = Launch::from_env().unwrap().unwrap();
    let d = Dist::connect(&launch, Duration::from_secs(20), Device::Cpu).unwrap();
    match scenario.as_str() {
        "collectives" => collectives(&d),
        "gradients" => gradients(&d),
        "peer_exits" => {
            d.barrier().unwrap();
            if d.rank == 1 {
                std::process::exit(0);
            }
            let t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
            let e = d.all_reduce_sum(&t).unwrap_err();
            eprintln!("ERROR: {e:#}");
            std::process::exit(3);
        }
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn allreduce_broadcast_allgather_barrier_on_two_processes() {
    let d = tempfile::tempdir().unwrap();
    for (rank, (ok, log)) in run_pair("collectives", d.path()).into_iter().enumerate() {
        assert!(ok, "rank {rank} failed:\n{log}");
    }
}

#[test]
fn parameters_broadcast_and_gradients_averaged_in_buckets() {
    let d = tempfile::tempdir().unwrap();
    for (rank, (ok, log)) in run_pair("gradients", d.path()).into_iter().enumerate() {
        assert!(ok, "rank {rank} failed:\n{log}");
    }
}

#[test]
fn a_peer_that_exits_fails_the_collective_with_a_message() {
    let d = tempfile::tempdir().unwrap();
    let r = run_pair("peer_exits", d.path());
    assert!(r[1].0, "rank 1 should exit cleanly:\n{}", r[1].1);
    let (ok, log) = &r[0];
    assert!(!ok);
    // our context, then c10d's own message (Gloo: the connection closed)
    assert!(log.contains("ERROR: rank 0/2: all_reduce failed"), "{log}");
    let c10d = log.split("s): ").nth(1).unwrap_or("");
    assert!(c10d.trim().len() > 10, "no c10d message in: {log}");
    assert!(!log.contains("terminate called"), "{log}");
}

#[test]
fn this_build_carries_the_bridge() {
    assert!(med3dinsight::dist::capabilities().0);
}
