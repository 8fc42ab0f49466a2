//! The trainer's parts (start, step, checkpoint, finish) driven one by
//! one through the library. In a test binary of its own: the torch RNG
//! (dropout) is process-wide, and other tests running beside it in one
//! process would draw from it between steps.
mod pretrain_fixture;

use med3dinsight::artifacts::run as checkpoint;
use med3dinsight::config::Experiment;
use med3dinsight::train::{self, metrics, Status};
use pretrain_fixture::{experiment, options as opts, Fixture, TINY};

/// The trainer's parts alone: start, two steps, a checkpoint, finish;
/// then a resumed start and the last two steps. The losses are those of
/// the whole run, the checkpoint opens through the one reader.
#[test]
fn trainer_parts_run_alone_and_add_up_to_the_run() {
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let cache = Fixture::default().write(d.path());
    let cfg = experiment(
        d.path(),
        &format!("{TINY}  max_steps: 4\n  run: {{checkpoint_every: 100}}\n  optimizer: {{lr: 0.001}}\n"),
    );
    let exp = Experiment::load(&cfg).unwrap();
    let whole = d.path().join("whole");
    train::run(&exp.pretrain, &opts(&cache, &whole)).unwrap();
    let want: Vec<f64> = metrics::read(&whole.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|m| m.loss.unwrap())
        .collect();
    assert_eq!(want.len(), 4);

    let parts = d.path().join("parts");
    let mut t = train::Trainer::start(&exp.pretrain, &opts(&cache, &parts)).unwrap();
    assert_eq!(t.position(), (0, 4));
    assert!(t.is_main() && !t.is_done());
    for i in 0..2 {
        let out = t.step(false).unwrap();
        assert!(!out.stop);
        assert_eq!(out.metrics.step, i + 1);
        // metrics.jsonl keeps 16 significant digits
        let got = out.metrics.loss.unwrap();
        assert!(
            (got - want[i as usize]).abs() <= 1e-12 * got.abs(),
            "step {}: {got} vs {}",
            i + 1,
            want[i as usize]
        );
        assert!(
            !t.checkpoint_due(false),
            "checkpoint_every 100 is not due at step {}",
            i + 1
        );
    }
    assert!(t.checkpoint_due(true), "a stop is always due");
    let saved = t.checkpoint().unwrap().unwrap();
    let s = t.finish(Status::Interrupted, None).unwrap();
    assert_eq!((s.status, s.step, s.steps_run), (Status::Interrupted, 2, 2));
    assert_eq!(s.checkpoint.as_deref(), Some(saved.as_path()));
    assert!(parts.join("summary.json").is_file());
    let (ckpt, rec) = checkpoint::Checkpoint::open::<train::PretrainConfig>(&parts, Some(2)).unwrap();
    assert_eq!((ckpt.state.step, rec.config_hash), (2, exp.pretrain.hash()));

    let mut o = opts(&cache, &parts);
    o.resume = true;
    let mut t = train::Trainer::start(&exp.pretrain, &o).unwrap();
    assert_eq!(t.position(), (2, 4));
    for _ in 0..2 {
        t.step(false).unwrap();
    }
    assert!(t.is_done() && t.checkpoint_due(false));
    t.checkpoint().unwrap();
    let s = t.finish(Status::Done, None).unwrap();
    assert_eq!((s.step, s.steps_run), (4, 2));
    let lines = metrics::read(&parts.join("metrics.jsonl")).unwrap();
    // the resumed run's log is the whole run's, step for step
    assert_eq!(lines.iter().map(|m| m.loss.unwrap()).collect::<Vec<_>>(), want);
}
