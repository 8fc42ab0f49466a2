//! A pretraining run's TensorBoard event files, read by TensorBoard's own
//! reader (EventAccumulator): every scalar of metrics.jsonl at its step,
//! once, also after a crash that lost steps past the last checkpoint and a
//! resume that replayed them. In a test binary of its own: it drives the
//! trainer in-process, and the torch RNG is process-wide.
mod common;
mod pretrain_fixture;

use med3dinsight::artifacts::run as run_dir;
use med3dinsight::config::Experiment;
use med3dinsight::train::{self, Status};
use pretrain_fixture::{experiment, Fixture, TINY};

#[test]
fn every_metric_reaches_tensorboard_once_through_a_crash_and_resume() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let cfg = experiment(
        d.path(),
        &format!("{TINY}  max_steps: 5\n  run: {{checkpoint_every: 2}}\n  optimizer: {{lr: 0.001}}\n"),
    );
    let exp = Experiment::load(&cfg).unwrap();
    let out = d.path().join("run");
    let mut opts = pretrain_fixture::options(&cache, &out);
    // steps 1-3 logged, a checkpoint at 2 only, then the process "dies"
    let mut t = train::Trainer::start(&exp.pretrain, &opts).unwrap();
    for _ in 0..3 {
        let o = t.step(false).unwrap();
        if o.metrics.step == 2 {
            t.checkpoint().unwrap();
        }
    }
    drop(t);
    let tb = run_dir::tensorboard_dir(&out);
    let before = common::tensorboard(&tb);
    assert_eq!(
        before["loss"].iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "the points are there while the run goes"
    );
    // resumed: from step 2, steps 3-5 (3 a second time)
    opts.resume = true;
    let s = train::run(&exp.pretrain, &opts).unwrap();
    assert_eq!((s.status, s.step, s.steps_run), (Status::Done, 5, 3));
    let files = std::fs::read_dir(&tb).unwrap().count();
    assert_eq!(files, 2, "one event file per invocation");
    let lines = common::jsonl(&run_dir::metrics_jsonl(&out));
    assert_eq!(
        lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    // every numeric field: losses and their terms, mass and matched share,
    // lr, grad norm, volumes/s, waits, epoch, elapsed
    for key in [
        "loss",
        "loss_text",
        "loss_recon",
        "mass_text",
        "matched_text",
        "lr",
        "grad_norm",
        "volumes_per_s",
    ] {
        assert!(lines[0][key].is_f64(), "metrics.jsonl has no {key}");
    }
    common::assert_tensorboard_has(&tb, &lines);
}
