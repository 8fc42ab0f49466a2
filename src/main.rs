//! The `med3d` command line: parses arguments, then calls one stage entry
//! point (`med3dinsight::pipeline`), and turns how it ended into the exit
//! status. Nothing else lives here.
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

mod cli;

use cli::{Cli, Cmd};
use med3dinsight::artifacts::cache::captions_path;
use med3dinsight::caption;
use med3dinsight::config::Experiment;
use med3dinsight::manifest::Manifest;
use med3dinsight::pipeline::{self, workers, End};
use med3dinsight::preprocess::Shard;

fn real_main() -> Result<End> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Convert {
            input,
            output,
            series,
            volume_index,
            max_decompressed_mib,
            label_overlap,
        } => {
            let limits = med3dinsight::volume::ReadOptions {
                label_overlap,
                ..med3dinsight::volume::ReadOptions::mib(max_decompressed_mib)
            };
            let v = med3dinsight::convert::convert(&input, series.as_deref(), volume_index, &limits, &output)?;
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
        Cmd::Info {
            path,
            series,
            json,
            max_decompressed_mib,
        } => {
            let limits = med3dinsight::volume::ReadOptions::mib(max_decompressed_mib);
            let info = med3dinsight::info::describe(&path, series.as_deref(), &limits)?;
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
            set,
        } => {
            let exp = Experiment::load_with(&config, &set)?;
            let manifest = Manifest::load(manifest.as_ref().unwrap_or(&exp.manifest))?;
            let shard = shard.as_deref().map(Shard::parse).transpose()?.unwrap_or(Shard::ALL);
            let out = out.unwrap_or_else(|| exp.cache_dir());
            pipeline::preprocess(&manifest, &exp, &out, shard, workers(w)).map(End::from)
        }
        Cmd::Caption {
            cache,
            config,
            shard,
            out,
            set,
        } => {
            let exp = Experiment::load_with(&config, &set)?;
            let shard = shard.as_deref().map(Shard::parse).transpose()?.unwrap_or(Shard::ALL);
            let cache = cache.unwrap_or_else(|| exp.cache_dir());
            let out = out.unwrap_or_else(|| captions_path(&cache));
            pipeline::caption(&exp, &cache, &out, shard).map(End::from)
        }
        Cmd::Inspect {
            cache,
            captions,
            out,
            limit,
        } => {
            let captions = captions.unwrap_or_else(|| captions_path(&cache));
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
            out,
            set,
        } => {
            let exp = Experiment::load_with(&config, &set)?;
            let cache = cache.unwrap_or_else(|| exp.cache_dir());
            pipeline::embed(&exp, &cache, captions, out).map(End::from)
        }
        Cmd::Pretrain {
            cache,
            config,
            out,
            resume,
            set,
        } => {
            let exp = Experiment::load_with(&config, &set)?;
            let cache = cache.unwrap_or_else(|| exp.cache_dir());
            let out = out.unwrap_or_else(|| exp.run_dir());
            pipeline::pretrain(&exp, &cache, &out, resume)
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
            pipeline::export(&req, false).map(End::from)
        }
        Cmd::Finetune {
            init,
            cache,
            manifest,
            config,
            out,
            set,
        } => {
            let exp = Experiment::load_with(&config, &set)?;
            let d = pipeline::downstream_of(&exp, &config)?;
            let cache = cache.unwrap_or_else(|| exp.cache_dir());
            let mut ok = true;
            if let Some(m) = manifest {
                let m = Manifest::load(&m)?;
                ok = pipeline::preprocess(&m, &exp, &cache, Shard::ALL, workers(None))?;
            }
            let init = med3dinsight::downstream::finetune::Init::parse(&init);
            Ok(End::from(pipeline::finetune(&d, init, &cache, &out, &config)? && ok))
        }
        Cmd::Evaluate {
            run,
            cache,
            config,
            out,
            set,
        } => {
            let sw = match config {
                Some(c) => Some(pipeline::downstream_of(&Experiment::load_with(&c, &set)?, &c)?.sliding_window),
                None => None,
            };
            pipeline::evaluate(&run, &cache, sw, out).map(End::from)
        }
        Cmd::EvaluateAlignment(req) => pipeline::evaluate_alignment(&req).map(End::from),
        Cmd::Encode(args) => {
            let r = med3dinsight::embed::encode::encode(&args)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(End::Ok)
        }
        Cmd::Run {
            config,
            workers: w,
            set,
        } => pipeline::run(&config, &set, w),
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
