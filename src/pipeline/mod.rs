//! `med3d run` and the stage entry points the CLI calls: each stage has the
//! same shape (run it, or find it up to date; print its summary; say
//! whether everything in it succeeded), and `run` chains them for one
//! experiment, skipping what is already done. The skip rules live with
//! their stages (preprocess and embed skip unchanged cases and chunks,
//! pretrain resumes, `export::run_if_stale`, `finetune::is_up_to_date`);
//! the paths of a run come from the experiment (`Experiment::*_dir`).
//! Each stage runs inside the libtorch error boundary (`runtime::guard`),
//! so anything its per-step boundaries do not cover (a model that cannot
//! be built, weights that cannot be loaded) is still an error naming the
//! stage, never a panic's exit code 101.
pub mod report;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::Experiment;
use crate::downstream::{self, finetune, DownstreamConfig};
use crate::export;
use crate::manifest::Manifest;
use crate::preprocess::{self, Shard};
use crate::runtime::guard;
use crate::{caption, embed, train};
use report::{eprint_failures, Done};

/// How a command ended, and so its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// 0.
    Ok,
    /// 2: some cases or slices failed, or a stage stopped early.
    Failed,
    /// 128 + signal (130 SIGINT, 143 SIGTERM), as shells and batch
    /// schedulers expect of a job stopped by a signal: pretraining wrote a
    /// checkpoint and can be resumed.
    Signal(i32),
}

impl From<bool> for End {
    fn from(ok: bool) -> End {
        if ok {
            End::Ok
        } else {
            End::Failed
        }
    }
}

/// Runs a stage inside the libtorch error boundary; a panic caught there
/// is named with its stage (errors the stage returns name themselves).
fn guarded<T>(stage: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    guard::boundary(f).map_err(|e| {
        // Caught here, not by a step's boundary (those name their step).
        if e.chain().count() == 1 && e.is::<guard::Caught>() {
            e.context(format!(
                "{stage} failed inside libtorch (or on a bug); what was done before is kept"
            ))
        } else {
            e
        }
    })
}

/// Worker threads: the given number, else every core.
pub fn workers(w: Option<usize>) -> usize {
    w.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

pub fn preprocess(manifest: &Manifest, exp: &Experiment, out: &Path, shard: Shard, w: usize) -> Result<bool> {
    let s = guarded("preprocess", || {
        preprocess::run(manifest, &exp.preprocess, out, shard, w)
    })?;
    println!("{}", Done { summary: &s, out });
    eprint_failures(s.failures.iter().map(|f| (f.case.as_str(), f.error.as_str())), "FAILED");
    Ok(s.failed == 0)
}

pub fn caption(exp: &Experiment, cache: &Path, out: &Path, shard: Shard) -> Result<bool> {
    let s = guarded("caption", || caption::run(&exp.caption, cache, out, shard))?;
    println!("{}", Done { summary: &s, out });
    eprint_failures(
        s.failures.iter().map(|f| (f.slice_id.as_str(), f.error.as_str())),
        "FAILED",
    );
    if s.failed > s.failures.len() {
        eprintln!(
            "  ... and {} more failures (see the records with status failed)",
            s.failed - s.failures.len()
        );
    }
    if let Some(why) = &s.stopped {
        eprintln!(
            "caption: stopped early, {} slices not attempted: {why}",
            s.not_attempted
        );
    }
    Ok(s.failed == 0 && s.stopped.is_none())
}

pub fn embed(exp: &Experiment, cache: &Path, captions: Option<PathBuf>, out: Option<PathBuf>) -> Result<bool> {
    let dir = out.clone().unwrap_or_else(|| cache.to_path_buf());
    let s = guarded("embed", || {
        embed::run(&exp.embed, cache, &embed::RunOptions { captions, out })
    })?;
    println!("{}", Done { summary: &s, out: &dir });
    for t in std::iter::once(&s.text).chain(s.image.as_ref()) {
        eprint_failures(
            t.failures
                .iter()
                .take(20)
                .map(|f| (f.slice_id.as_str(), f.error.as_str())),
            "FAILED",
        );
    }
    Ok(s.failed() == 0)
}

pub fn pretrain(exp: &Experiment, cache: &Path, out: &Path, resume: bool) -> Result<End> {
    use train::Status;
    let opts = train::Options {
        cache: cache.to_path_buf(),
        out: out.to_path_buf(),
        resume,
        handle_signals: true,
        overrides: exp.overrides.clone(),
    };
    let s = guarded("pretrain", || train::run(&exp.pretrain, &opts))?;
    if s.rank == 0 {
        eprint_failures(
            s.skipped_cases.iter().map(|(c, w)| (c.as_str(), w.as_str())),
            "SKIPPED case",
        );
    }
    println!("{}", Done { summary: &s, out });
    Ok(match (s.status, s.signal) {
        (Status::Interrupted, Some(sig)) => End::Signal(sig),
        (Status::Interrupted, None) => End::Failed,
        _ => End::Ok,
    })
}

/// `run_mode`: skip an export newer than its checkpoint (`med3d run`).
pub fn export(req: &export::Request, run_mode: bool) -> Result<bool> {
    let e = guarded("export", || {
        if run_mode {
            export::run_if_stale(req)
        } else {
            export::run(req)
        }
    })?;
    println!("{e}");
    Ok(true)
}

pub fn downstream_of(exp: &Experiment, config: &Path) -> Result<DownstreamConfig> {
    exp.downstream
        .clone()
        .with_context(|| format!("{}: no `downstream:` section", config.display()))
}

pub fn finetune(d: &DownstreamConfig, init: finetune::Init, cache: &Path, out: &Path, config: &Path) -> Result<bool> {
    let opts = finetune::Options {
        cache: cache.to_path_buf(),
        out: out.to_path_buf(),
        init,
        config_name: config.display().to_string(),
    };
    let s = guarded("finetune", || finetune::run(d, &opts))?;
    eprint_failures(
        s.skipped_cases.iter().map(|(c, w)| (c.as_str(), w.as_str())),
        "SKIPPED case",
    );
    println!("{}", Done { summary: &s, out });
    Ok(s.skipped_cases.is_empty())
}

pub fn evaluate(
    run: &Path,
    cache: &Path,
    sw: Option<downstream::sliding::SlidingWindow>,
    out: Option<PathBuf>,
) -> Result<bool> {
    use downstream::evaluate;
    let opts = evaluate::Options {
        run: run.to_path_buf(),
        cache: cache.to_path_buf(),
        sliding_window: sw,
        out: out.unwrap_or_else(|| crate::artifacts::run::evaluate_json(run)),
    };
    let r = guarded("evaluate", || evaluate::run(&opts))?;
    println!("{}", r.line);
    Ok(r.failed_cases == 0)
}

/// `med3d evaluate-alignment`: the report's summary line on stdout.
pub fn evaluate_alignment(req: &crate::train::alignment_eval::Request) -> Result<bool> {
    let r = guarded("evaluate-alignment", || crate::train::alignment_eval::run(req))?;
    println!("{}", r.line);
    Ok(true)
}

/// `med3d run`: every stage of one experiment in order, skipping what is done.
pub fn run(config: &Path, overrides: &[String], w: Option<usize>) -> Result<End> {
    let exp = Experiment::load_with(config, overrides)?;
    let at = |stage: &str| format!("experiment {}: {stage}", exp.name);
    let manifest = Manifest::load(&exp.manifest)?;
    let cache = exp.cache_dir();
    let ok = preprocess(&manifest, &exp, &cache, Shard::ALL, workers(w)).with_context(|| at("preprocess"))?;
    let captioned = caption(
        &exp,
        &cache,
        &crate::artifacts::cache::captions_path(&cache),
        Shard::ALL,
    )
    .with_context(|| at("caption"))?;
    let embedded = embed(&exp, &cache, None, None).with_context(|| at("embed"))?;
    let pretrained = pretrain(&exp, &cache, &exp.run_dir(), true).with_context(|| at("pretrain"))?;
    // Weights for downstream networks, from the finished run only.
    let mut exported = true;
    if pretrained == End::Ok {
        let request = |format, encoder_only, out| export::Request {
            run: exp.run_dir(),
            step: None,
            format,
            encoder_only,
            out,
        };
        let requests = match exp.pretrain.backbone {
            crate::model::backbone::BackboneConfig::SwinUnetr(_) => vec![
                request(export::Format::MonaiSwinunetr, false, exp.export_path(false)),
                request(export::Format::MonaiSwinunetr, true, exp.export_path(true)),
            ],
            crate::model::backbone::BackboneConfig::Nnunet(_) => {
                vec![request(export::Format::Nnunet, false, exp.nnunet_export_path())]
            }
        };
        for req in &requests {
            exported &= export(req, true).with_context(|| at("export"))?;
        }
    }
    let mut downstream_ok = true;
    if let Some(d) = exp.downstream.as_ref().filter(|_| pretrained == End::Ok) {
        let export = exp.finetune_export();
        let init = if export.is_file() {
            finetune::Init::Export(export)
        } else {
            d.init.clone().unwrap_or(finetune::Init::Scratch)
        };
        let ft = exp.finetune_dir();
        let (eval_cache, mut ok) = match &d.test_manifest {
            Some(m) => {
                let test_cache = exp.test_cache_dir();
                let ok = preprocess(&Manifest::load(m)?, &exp, &test_cache, Shard::ALL, workers(w))
                    .with_context(|| at("preprocess the test manifest"))?;
                (test_cache, ok)
            }
            None => (cache.clone(), true),
        };
        if finetune::is_up_to_date(&ft, d, &init, &cache) {
            println!("finetune: up to date -> {}", ft.display());
        } else {
            ok &= finetune(d, init, &cache, &ft, config).with_context(|| at("finetune"))?;
        }
        ok &= evaluate(&ft, &eval_cache, None, None).with_context(|| at("evaluate"))?;
        downstream_ok = ok;
    }
    Ok(match pretrained {
        End::Signal(sig) => End::Signal(sig),
        End::Ok if ok && captioned && embedded && exported && downstream_ok => End::Ok,
        _ => End::Failed,
    })
}
