//! The `med3d` command line: parses arguments, then calls one stage.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use med3dinsight::caption;
use med3dinsight::config::Experiment;
use med3dinsight::manifest::Manifest;
use med3dinsight::preprocess::{self, Shard};

#[derive(Parser)]
#[command(
    name = "med3d",
    version,
    about = "Pretrain 3D medical image encoders with language (Med3DInsight)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe an image (NIfTI file, DICOM file or folder): shape, spacing,
    /// affine, orientation, intensities; lists a folder's series when it holds several.
    Info {
        path: PathBuf,
        /// DICOM: the SeriesInstanceUID to describe when a folder holds several.
        #[arg(long)]
        series: Option<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write an image (DICOM folder or file, or NIfTI) as the float32 NIfTI
    /// med3d sees: the voxels and RAS+ affine every stage works from.
    Convert {
        input: PathBuf,
        /// Output .nii or .nii.gz.
        output: PathBuf,
        /// DICOM: the SeriesInstanceUID to read when a folder holds several.
        #[arg(long)]
        series: Option<String>,
        /// 4D NIfTI: the volume to take.
        #[arg(long)]
        volume_index: Option<usize>,
    },
    /// Turn the volumes of a manifest into a slice cache.
    Preprocess {
        /// Dataset manifest (YAML, MSD or nnU-Net v2 dataset.json); default: the config's.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Experiment config (its `preprocess` section is used).
        #[arg(long)]
        config: PathBuf,
        /// Cache folder; default: <workdir>/cache from the config.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Process only shard i of n (1-based), e.g. 3/8.
        #[arg(long)]
        shard: Option<String>,
        /// Cases processed at once (memory grows with this); default: all cores.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Caption every slice of a cache (descriptor or an OpenAI-compatible server).
    Caption {
        /// Cache folder; default: <workdir>/cache from the config.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Experiment config (its `caption` section is used).
        #[arg(long)]
        config: PathBuf,
        /// Caption only the slices of shard i of n (1-based, by case, as preprocess).
        #[arg(long)]
        shard: Option<String>,
        /// Captions file; default: <cache>/captions.jsonl.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write an HTML contact sheet of slices beside their captions.
    Inspect {
        #[arg(long)]
        cache: PathBuf,
        /// Captions file; default: <cache>/captions.jsonl.
        #[arg(long)]
        captions: Option<PathBuf>,
        /// HTML file to write.
        #[arg(long)]
        out: PathBuf,
        /// At most this many slices per section.
        #[arg(long, default_value_t = 120)]
        limit: usize,
    },
    /// Embed captions (and slices, with an image encoder) with frozen 2D encoders.
    Embed {
        /// Cache folder; default: <workdir>/cache from the config.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Experiment config (its `embed` section is used).
        #[arg(long)]
        config: PathBuf,
        /// Captions file; default: <cache>/captions.jsonl.
        #[arg(long)]
        captions: Option<PathBuf>,
    },
    /// Pretrain SwinUNETR + PSAT on a cache's volumes and embeddings.
    Pretrain {
        /// Cache folder (volumes, index, embeddings); default: <workdir>/cache.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Experiment config (its `pretrain` section is used).
        #[arg(long)]
        config: PathBuf,
        /// Run folder (checkpoints, metrics, loss plot); default: <workdir>/runs/<name>.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue from the run folder's newest checkpoint (a fresh start when it has none).
        #[arg(long)]
        resume: bool,
    },
    /// Write a checkpoint's weights for downstream networks (MONAI SwinUNETR
    /// or its encoder), with a model card beside them.
    Export {
        /// Run folder written by `med3d pretrain`.
        #[arg(long)]
        run: PathBuf,
        /// Checkpoint step; default: the latest.
        #[arg(long)]
        step: Option<u64>,
        #[arg(long, value_enum, default_value = "monai-swinunetr")]
        format: med3dinsight::export::Format,
        /// monai-swinunetr: only the encoder (MONAI's SwinTransformer, `swinViT.` removed).
        #[arg(long)]
        encoder_only: bool,
        /// The .safetensors file to write; the card goes beside it as <stem>.card.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fine-tune a segmentation or classification network (the config's
    /// `downstream` section) from an export or from scratch.
    Finetune {
        /// An export (.safetensors with its .card.json beside it) or `scratch`.
        #[arg(long)]
        init: String,
        /// Labelled cache; default: <workdir>/cache from the config.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Labelled manifest to preprocess into the cache first.
        #[arg(long)]
        manifest: Option<PathBuf>,
        #[arg(long)]
        config: PathBuf,
        /// Run folder (model.safetensors, metrics.jsonl, finetune.json).
        #[arg(long)]
        out: PathBuf,
    },
    /// Score a fine-tuned run on a cache (Dice and HD95, or accuracy and AUC).
    Evaluate {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        cache: PathBuf,
        /// Take the sliding-window settings from this config's downstream section.
        #[arg(long)]
        config: Option<PathBuf>,
        /// JSON report; default: <run>/evaluate.json.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// What a bug report needs: med3d, libtorch, CUDA (compiled, loaded,
    /// usable), the driver and GPUs, NCCL/Gloo, threads, and any mismatch.
    Doctor {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Embeddings of given texts or images as .npy (parity tests, benchmarks).
    #[command(hide = true)]
    Encode(med3dinsight::embed::encode::EncodeArgs),
    /// Run every stage of an experiment in order, skipping what is done.
    Run {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        workers: Option<usize>,
    },
}

fn workers(w: Option<usize>) -> usize {
    w.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn preprocess_stage(
    manifest: &Manifest,
    exp: &Experiment,
    out: &std::path::Path,
    shard: Shard,
    w: usize,
) -> Result<bool> {
    let s = preprocess::run(manifest, &exp.preprocess, out, shard, w)?;
    println!(
        "preprocess: {} done, {} skipped, {} failed (of {} cases in shard {}) -> {}",
        s.done,
        s.skipped,
        s.failed,
        s.total,
        s.shard,
        out.display()
    );
    for f in &s.failures {
        eprintln!("  FAILED {}: {}", f.case, f.error);
    }
    Ok(s.failed == 0)
}

fn caption_stage(exp: &Experiment, cache: &std::path::Path, out: &std::path::Path, shard: Shard) -> Result<bool> {
    let s = caption::run(&exp.caption, cache, out, shard)?;
    let mut flags: Vec<String> = s.flag_counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    flags.sort();
    println!(
        "caption ({} {}): {} captioned, {} retried, {} failed, {} flagged{}, {} dropped, {} skipped (of {} slices in shard {}) -> {}",
        s.backend,
        s.model,
        s.captioned,
        s.retried,
        s.failed,
        s.flagged,
        if flags.is_empty() { String::new() } else { format!(" ({})", flags.join(", ")) },
        s.dropped,
        s.skipped,
        s.total,
        s.shard,
        out.display()
    );
    for f in &s.failures {
        eprintln!("  FAILED {}: {}", f.slice_id, f.error);
    }
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

fn embed_stage(exp: &Experiment, cache: &std::path::Path, captions: Option<PathBuf>) -> Result<bool> {
    let opts = med3dinsight::embed::RunOptions { captions };
    let s = med3dinsight::embed::run(&exp.embed, cache, &opts)?;
    for t in std::iter::once(&s.text).chain(s.image.as_ref()) {
        let what = if t.up_to_date {
            "up to date".to_string()
        } else {
            format!(
                "{} rows computed, {} chunks reused, {:.1}s",
                t.rows_computed, t.chunks_reused, t.seconds
            )
        };
        println!(
            "embed {} ({}, {}-d, {}): {} of {} rows valid, {}, {} failed -> {}",
            t.table,
            t.encoder,
            t.dim,
            s.device,
            t.valid,
            t.rows,
            what,
            t.failures.len(),
            t.path.display()
        );
        for f in t.failures.iter().take(20) {
            eprintln!("  FAILED {}: {}", f.slice_id, f.error);
        }
    }
    if s.uncaptioned > 0 {
        println!("embed: {} slices have no ok caption (invalid text rows)", s.uncaptioned);
    }
    if s.image.is_none() {
        println!("embed: no image encoder configured; pretraining will use the text term alone");
    }
    Ok(s.failed() == 0)
}

/// How a command ended, and so its exit status.
enum End {
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

fn pretrain_stage(exp: &Experiment, cache: &std::path::Path, out: &std::path::Path, resume: bool) -> Result<End> {
    use med3dinsight::train::{self, Status};
    let opts = train::Options {
        cache: cache.to_path_buf(),
        out: out.to_path_buf(),
        resume,
        handle_signals: true,
    };
    let s = train::run(&exp.pretrain, &opts)?;
    if s.rank != 0 {
        // Rank 0 reports the run; the others only how they ended.
        println!(
            "pretrain rank {}/{}: {:?} at step {}",
            s.rank, s.world_size, s.status, s.step
        );
        return Ok(match (s.status, s.signal) {
            (Status::Interrupted, Some(sig)) => End::Signal(sig),
            (Status::Interrupted, None) => End::Failed,
            _ => End::Ok,
        });
    }
    for (case, why) in &s.skipped_cases {
        eprintln!("  SKIPPED case {case}: {why}");
    }
    let loss = |l: Option<f64>| l.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let targets: Vec<String> = s.targets.iter().map(|(n, d)| format!("{n} {d}-d")).collect();
    let what = match s.status {
        Status::Done => format!("{} steps run, {:.2} volumes/s", s.steps_run, s.volumes_per_s),
        Status::UpToDate => "up to date".to_string(),
        Status::Interrupted => format!(
            "interrupted by signal {} after {} steps, checkpoint written; the run can be resumed with `med3d pretrain --resume` (same --config, --cache and --out)",
            s.signal.unwrap_or(0),
            s.steps_run
        ),
    };
    let noisy = if s.noisy_slices > 0 {
        format!(", {} with swapped targets", s.noisy_slices)
    } else {
        String::new()
    };
    println!(
        "pretrain ({}{}{}, {} parameters, targets {}; {} slices{} of {} cases): step {}/{}, loss {} -> {}, {} non-finite steps skipped, {} -> {}",
        s.device,
        if s.autocast_bf16 { " bf16" } else { "" },
        if s.world_size > 1 { format!(" x {} ranks", s.world_size) } else { String::new() },
        s.parameters,
        targets.join(", "),
        s.usable_slices,
        noisy,
        s.cases,
        s.step,
        s.total_steps,
        loss(s.first_loss),
        loss(s.last_loss),
        s.nonfinite_total,
        what,
        out.display()
    );
    Ok(match (s.status, s.signal) {
        (Status::Interrupted, Some(sig)) => End::Signal(sig),
        (Status::Interrupted, None) => End::Failed,
        _ => End::Ok,
    })
}

fn export_stage(req: &med3dinsight::export::Request, run_mode: bool) -> Result<bool> {
    let e = if run_mode {
        med3dinsight::export::run_if_stale(req)?
    } else {
        med3dinsight::export::run(req)?
    };
    println!(
        "export ({:?}, step {}): {} tensors, {} parameters{} -> {} (card {})",
        e.variant,
        e.step,
        e.tensors,
        e.parameters,
        if e.up_to_date { ", up to date" } else { "" },
        e.file.display(),
        e.card.display()
    );
    Ok(true)
}

fn downstream_of(exp: &Experiment, config: &std::path::Path) -> Result<med3dinsight::downstream::DownstreamConfig> {
    exp.downstream
        .clone()
        .with_context(|| format!("{}: no `downstream:` section", config.display()))
}

fn finetune_stage(
    d: &med3dinsight::downstream::DownstreamConfig,
    init: med3dinsight::downstream::finetune::Init,
    cache: &std::path::Path,
    out: &std::path::Path,
    config: &std::path::Path,
) -> Result<bool> {
    use med3dinsight::downstream::finetune;
    let opts = finetune::Options {
        cache: cache.to_path_buf(),
        out: out.to_path_buf(),
        init,
        config_name: config.display().to_string(),
    };
    let s = finetune::run(d, &opts)?;
    for n in &s.init_notes {
        println!("finetune: {n}");
    }
    for (case, why) in &s.skipped_cases {
        eprintln!("  SKIPPED case {case}: {why}");
    }
    let loss = |l: Option<f64>| l.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    println!(
        "finetune ({:?} from {}, {}, {} parameters; {} training cases, {} held out, {} unlabelled left out): {} steps, loss {} -> {}, {:.1}s -> {}",
        s.config.task,
        s.init,
        s.device,
        s.parameters,
        s.train_cases.len(),
        s.val_cases.len(),
        s.unlabelled_cases,
        s.steps,
        loss(s.first_loss),
        loss(s.last_loss),
        s.seconds,
        out.display()
    );
    Ok(s.skipped_cases.is_empty())
}

fn evaluate_stage(
    run: &std::path::Path,
    cache: &std::path::Path,
    sw: Option<med3dinsight::downstream::sliding::SlidingWindow>,
    out: Option<PathBuf>,
) -> Result<bool> {
    use med3dinsight::downstream::evaluate;
    let opts = evaluate::Options {
        run: run.to_path_buf(),
        cache: cache.to_path_buf(),
        sliding_window: sw,
        out: out.unwrap_or_else(|| run.join("evaluate.json")),
    };
    let r = evaluate::run(&opts)?;
    println!("{}", r.line);
    Ok(r.json["failed_cases"].as_array().is_none_or(|f| f.is_empty()))
}

fn real_main() -> Result<End> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Convert {
            input,
            output,
            series,
            volume_index,
        } => {
            let v = med3dinsight::convert::convert(&input, series.as_deref(), volume_index, &output)?;
            println!(
                "{} -> {} {:?} {}",
                input.display(),
                output.display(),
                v.shape(),
                v.orientation().unwrap_or_default()
            );
            Ok(End::Ok)
        }
        Cmd::Doctor { json } => {
            let r = med3dinsight::doctor::report();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{r}");
            }
            Ok(End::Ok)
        }
        Cmd::Info { path, series, json } => {
            let info = med3dinsight::info::describe(&path, series.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!("{info}");
            }
            Ok(End::Ok)
        }
        Cmd::Preprocess {
            manifest,
            config,
            out,
            shard,
            workers: w,
        } => {
            let exp = Experiment::load(&config)?;
            let manifest = Manifest::load(manifest.as_ref().unwrap_or(&exp.manifest))?;
            let shard = shard.as_deref().map(Shard::parse).transpose()?.unwrap_or(Shard::ALL);
            let out = out.unwrap_or_else(|| exp.cache_dir());
            preprocess_stage(&manifest, &exp, &out, shard, workers(w)).map(End::from)
        }
        Cmd::Caption {
            cache,
            config,
            shard,
            out,
        } => {
            let exp = Experiment::load(&config)?;
            let shard = shard.as_deref().map(Shard::parse).transpose()?.unwrap_or(Shard::ALL);
            let cache = cache.unwrap_or_else(|| exp.cache_dir());
            let out = out.unwrap_or_else(|| cache.join("captions.jsonl"));
            caption_stage(&exp, &cache, &out, shard).map(End::from)
        }
        Cmd::Inspect {
            cache,
            captions,
            out,
            limit,
        } => {
            let captions = captions.unwrap_or_else(|| cache.join("captions.jsonl"));
            let s = caption::sheet::write(&cache, &captions, &out, limit)?;
            println!(
                "inspect: {} slices, {} with a record; {} needing a look and {} sampled shown -> {}",
                s.slices,
                s.with_caption,
                s.needs_look_shown,
                s.sample_shown,
                out.display()
            );
            Ok(End::Ok)
        }
        Cmd::Embed {
            cache,
            config,
            captions,
        } => {
            let exp = Experiment::load(&config)?;
            let cache = cache.unwrap_or_else(|| exp.cache_dir());
            embed_stage(&exp, &cache, captions).map(End::from)
        }
        Cmd::Pretrain {
            cache,
            config,
            out,
            resume,
        } => {
            let exp = Experiment::load(&config)?;
            let cache = cache.unwrap_or_else(|| exp.cache_dir());
            let out = out.unwrap_or_else(|| exp.run_dir());
            pretrain_stage(&exp, &cache, &out, resume)
        }
        Cmd::Export {
            run,
            step,
            format,
            encoder_only,
            out,
        } => {
            if encoder_only && format != med3dinsight::export::Format::MonaiSwinunetr {
                anyhow::bail!("--encoder-only goes with --format monai-swinunetr");
            }
            let req = med3dinsight::export::Request {
                run,
                step,
                format,
                encoder_only,
                out,
            };
            export_stage(&req, false).map(End::from)
        }
        Cmd::Finetune {
            init,
            cache,
            manifest,
            config,
            out,
        } => {
            let exp = Experiment::load(&config)?;
            let d = downstream_of(&exp, &config)?;
            let cache = cache.unwrap_or_else(|| exp.cache_dir());
            let mut ok = true;
            if let Some(m) = manifest {
                let m = Manifest::load(&m)?;
                ok = preprocess_stage(&m, &exp, &cache, Shard::ALL, workers(None))?;
            }
            let init = med3dinsight::downstream::finetune::Init::parse(&init);
            Ok(End::from(finetune_stage(&d, init, &cache, &out, &config)? && ok))
        }
        Cmd::Evaluate {
            run,
            cache,
            config,
            out,
        } => {
            let sw = match config {
                Some(c) => Some(downstream_of(&Experiment::load(&c)?, &c)?.sliding_window),
                None => None,
            };
            evaluate_stage(&run, &cache, sw, out).map(End::from)
        }
        Cmd::Encode(args) => {
            let r = med3dinsight::embed::encode::encode(&args)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(End::Ok)
        }
        Cmd::Run { config, workers: w } => {
            let exp = Experiment::load(&config)?;
            let manifest = Manifest::load(&exp.manifest)?;
            let ok = preprocess_stage(&manifest, &exp, &exp.cache_dir(), Shard::ALL, workers(w))
                .with_context(|| format!("experiment {}: preprocess", exp.name))?;
            let cache = exp.cache_dir();
            let captioned = caption_stage(&exp, &cache, &cache.join("captions.jsonl"), Shard::ALL)
                .with_context(|| format!("experiment {}: caption", exp.name))?;
            let embedded =
                embed_stage(&exp, &cache, None).with_context(|| format!("experiment {}: embed", exp.name))?;
            let pretrained = pretrain_stage(&exp, &cache, &exp.run_dir(), true)
                .with_context(|| format!("experiment {}: pretrain", exp.name))?;
            // Weights for downstream networks, from the finished run only.
            let mut exported = true;
            if matches!(pretrained, End::Ok) {
                let run = exp.run_dir();
                for (file, encoder_only) in [("swinunetr.safetensors", false), ("encoder.safetensors", true)] {
                    let req = med3dinsight::export::Request {
                        run: run.clone(),
                        step: None,
                        format: med3dinsight::export::Format::MonaiSwinunetr,
                        encoder_only,
                        out: run.join("export").join(file),
                    };
                    exported &= export_stage(&req, true).with_context(|| format!("experiment {}: export", exp.name))?;
                }
            }
            let mut downstream_ok = true;
            if let Some(d) = exp.downstream.as_ref().filter(|_| matches!(pretrained, End::Ok)) {
                use med3dinsight::downstream::{finetune::Init, RUN_EXPORT};
                let export = exp.run_dir().join(RUN_EXPORT);
                let init = if export.is_file() {
                    Init::Export(export)
                } else {
                    Init::parse(d.init.as_deref().unwrap_or("scratch"))
                };
                let ft = exp.workdir.join("finetune").join(&exp.name);
                let (eval_cache, mut prep_ok) = match &d.test_manifest {
                    Some(m) => {
                        let test_cache = exp.workdir.join("cache_test");
                        let ok = preprocess_stage(&Manifest::load(m)?, &exp, &test_cache, Shard::ALL, workers(w))
                            .with_context(|| format!("experiment {}: preprocess the test manifest", exp.name))?;
                        (test_cache, ok)
                    }
                    None => (cache.clone(), true),
                };
                let done = med3dinsight::downstream::finetune::read_summary(&ft).is_ok_and(|s| {
                    s.config == *d
                        && s.init == init.describe()
                        && s.cache == cache
                        && ft.join("model.safetensors").is_file()
                });
                if done {
                    println!("finetune: up to date -> {}", ft.display());
                } else {
                    prep_ok &= finetune_stage(d, init, &cache, &ft, &config)
                        .with_context(|| format!("experiment {}: finetune", exp.name))?;
                }
                prep_ok &= evaluate_stage(&ft, &eval_cache, None, None)
                    .with_context(|| format!("experiment {}: evaluate", exp.name))?;
                downstream_ok = prep_ok;
            }
            Ok(match pretrained {
                End::Signal(sig) => End::Signal(sig),
                End::Ok if ok && captioned && embedded && exported && downstream_ok => End::Ok,
                _ => End::Failed,
            })
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MED3D_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // No colour escapes in batch-job logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main() {
        Ok(End::Ok) => ExitCode::SUCCESS,
        Ok(End::Failed) => ExitCode::from(2),
        Ok(End::Signal(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(2)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
