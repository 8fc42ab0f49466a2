//! Data-parallel pretraining on real processes (the `med3d` binary, Gloo
//! over loopback, launched with torchrun's variables: RANK, WORLD_SIZE,
//! MASTER_ADDR, MASTER_PORT).
//!
//! Equivalence: 2 ranks with batch b each must end with the parameters of
//! 1 process with batch 2b and the same seed. What makes them equal: rank r
//! takes samples 2b k + r b .. 2b k + (r + 1) b of the one global stream,
//! so the two ranks together see the single process's batch k; dropout is
//! off (the only draw from the per-micro-batch torch seed); both start from
//! the same seed-derived weights (rank 1's are overwritten by rank 0's).
//! Then, per step, with L the 1-process loss over the 2b samples:
//! - reconstruction: the MSE over 2b volumes is the mean of the two ranks'
//!   MSEs over b, so the averaged gradient is dL_recon/dθ;
//! - alignment with `all_gather_embeddings`: each rank solves the transport
//!   problem over the gathered 2b x 2b batch (the same one the single
//!   process solves) and back-propagates 2 x L_align through its own rows
//!   (rank 0 alone into the Mahalanobis weights); the ranks' gradients
//!   sum to 2 x dL_align/dθ, averaged: dL_align/dθ.
//!
//! Without all_gather the alignment loss is per rank and not the 1-process
//! one, so the second test compares reconstruction-only runs (text weight
//! 0), whose loss decomposes. What remains is float summation order (the
//! backbone on b vs 2b volumes, the allreduce), hence a tolerance.
//!
//! Failure: a rank killed with SIGKILL mid-run, or stopped with SIGSTOP
//! (hung, its sockets open), makes the other exit with an error naming the
//! failed collective and c10d's reason, instead of waiting forever.
//!
//! Resume: SIGTERM to both ranks stops them at the same step with one
//! checkpoint, which one process resumes (global batch halved), the data
//! position counted in samples of all ranks.
mod dist_support;
mod pretrain_fixture;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use dist_support::*;
use med3dinsight::artifacts::run as checkpoint;
use med3dinsight::train::metrics;
use pretrain_fixture::{bin, Fixture};

#[test]
fn two_ranks_with_all_gather_match_one_process_with_the_global_batch() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let (one, two) = one_vs_two(d.path(), "  all_gather_embeddings: true\n");
    assert_same_run(&one, &two, &["psat.", "align."], None);
    let m = metrics::read(&two.join("metrics.jsonl")).unwrap();
    // the gathered plan spans 4 x 4 and carries the mass 0.95
    assert!((m[0].terms["mass_text"].unwrap() - 0.95).abs() < 1e-4);
}

#[test]
fn two_ranks_match_one_process_on_a_loss_that_decomposes() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let (one, two) = one_vs_two(d.path(), "  weights: {text: 0.0, recon: 1.0}\n");
    // the text term, weighted 0, is logged per rank: not comparable
    assert_same_run(&one, &two, &["swinViT.", "decoder1."], Some(&["loss_recon"]));
}

#[test]
fn two_ranks_match_one_process_on_the_nnunet_backbone() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let (one, two) = one_vs_two_with(d.path(), &nnunet(), "  all_gather_embeddings: true\n");
    assert_same_run(&one, &two, &["encoder.", "decoder.", "psat.", "align."], None);
}

/// Starts 2 ranks, sends `signal` to rank 1 once step 2 is checkpointed,
/// and waits for rank 0 to end by itself (a hang guard far above the
/// timeout, not a timing check). Returns rank 0's output.
fn peer_failure(signal: &str, timeout_s: u64) -> String {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let cfg = config(d.path(), "c", 2, 1000, "");
    let out = d.path().join("run");
    let port = free_port();
    let mut r0 = spawn(&cfg, &cache, &out, Some((0, 2, port)), timeout_s);
    let mut r1 = spawn(&cfg, &cache, &out, Some((1, 2, port)), timeout_s);
    let t = Instant::now();
    while checkpoint::list(&out).last().is_none_or(|c| c.0 < 2) {
        if let Ok(Some(s)) = r0.try_wait() {
            panic!("rank 0 ended early: {s}");
        }
        assert!(t.elapsed() < Duration::from_secs(300), "no step-2 checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = |sig: &str, c: &Child| {
        assert!(Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()
            .unwrap()
            .success())
    };
    kill(signal, &r1);
    let sent = Instant::now();
    loop {
        if r0.try_wait().unwrap().is_some() {
            break;
        }
        if sent.elapsed() > Duration::from_secs(10 * timeout_s) {
            let _ = r0.kill();
            let _ = r1.kill();
            panic!("rank 0 still running {} s after {signal} to rank 1", 10 * timeout_s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = sent.elapsed().as_secs_f64();
    let _ = r1.kill();
    let _ = r1.wait();
    let (ok, log) = finish(r0);
    eprintln!("rank 0 exited {after:.1} s after {signal} to rank 1 (timeout {timeout_s} s):\n{log}");
    assert!(!ok);
    assert!(log.contains("error: ") && log.contains("rank 0/2: "), "{log}");
    assert!(
        log.contains(&format!(
            "failed (rank 1 exited, or did not answer within {timeout_s} s): "
        )),
        "{log}"
    );
    assert!(!log.contains("terminate called") && !log.contains("panicked"), "{log}");
    log
}

#[test]
fn a_killed_rank_makes_the_other_fail_with_a_message() {
    let log = peer_failure("-KILL", 20);
    // Gloo sees the socket close at once
    assert!(log.contains("Connection closed by peer"), "{log}");
}

#[test]
fn a_hung_rank_makes_the_other_fail_after_the_timeout() {
    // SIGSTOP: the peer's sockets stay open, so only the timeout ends the wait
    let log = peer_failure("-STOP", 10);
    // Gloo says "Timed out waiting ...ms for recv" or "... timed out",
    // depending on which wait the peer's silence reaches first.
    assert!(log.to_lowercase().contains("timed out"), "{log}");
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_process() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let steps = 5;
    let cfg = config(d.path(), "c", 2, steps, "");
    let out = d.path().join("run");
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| spawn(&cfg, &cache, &out, Some((r, 2, port)), 60))
        .collect();
    // SIGTERM to both ranks (as Slurm and torchrun send it) once step 1 is
    // checkpointed: they stop together at the same step, rank 0 checkpoints
    let t = Instant::now();
    while checkpoint::list(&out).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in &ranks {
        assert!(Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
    for (r, c) in ranks.into_iter().enumerate() {
        let (ok, log) = finish(c);
        assert!(!ok, "rank {r} should report the interruption:\n{log}");
        assert!(log.contains("nterrupted"), "rank {r}:\n{log}");
    }
    let stopped = checkpoint::read_state(&checkpoint::latest(&out).unwrap()).unwrap();
    let s = stopped.step;
    assert!(s < steps, "the run ended before the signal ({s} steps)");
    assert_eq!((stopped.world_size, stopped.data_position), (2, 2 * s));

    // one process, same config: global batch 2 instead of 4
    let mut c = Command::new(bin());
    c.args(["pretrain", "--resume", "--cache"])
        .arg(&cache)
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE");
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let last = checkpoint::read_state(&checkpoint::latest(&out).unwrap()).unwrap();
    // data position in batch_size units of all ranks: 2 per 2-rank step, 1 after
    assert_eq!(
        (last.step, last.world_size, last.data_position),
        (steps, 1, 2 * s + (steps - s))
    );
    let m = metrics::read(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        m.iter().map(|l| l.step).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    for l in &m {
        let samples = if l.step <= s {
            4 * l.step
        } else {
            4 * s + 2 * (l.step - s)
        };
        assert!(
            (l.epoch - samples as f64 / 41.0).abs() < 1e-12,
            "step {}: epoch {}",
            l.step,
            l.epoch
        );
        assert!(l.loss.is_some_and(f64::is_finite));
        assert_eq!(l.allreduce_s.is_some(), l.step <= s);
    }
}
