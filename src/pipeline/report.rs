//! What each stage prints when it ends: one line per stage, the `Display`
//! of its summary (`Done { summary, out }`), and the failures it lists on
//! stderr. Printing lives here, apart from the stages' logic.
use std::fmt;
use std::path::Path;

use crate::{caption, downstream, embed, export, preprocess, train};

/// A stage's summary with where it wrote.
pub struct Done<'a, S> {
    pub summary: &'a S,
    pub out: &'a Path,
}

fn loss(l: Option<f64>) -> String {
    l.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())
}

impl fmt::Display for Done<'_, preprocess::Summary> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.summary;
        write!(
            f,
            "preprocess: {} done, {} skipped, {} failed (of {} cases in shard {}) -> {}",
            s.done,
            s.skipped,
            s.failed,
            s.total,
            s.shard,
            self.out.display()
        )
    }
}

impl fmt::Display for Done<'_, caption::Summary> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.summary;
        let mut flags: Vec<String> = s.flag_counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
        flags.sort();
        write!(
            f,
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
            self.out.display()
        )?;
        write!(f, "; {} requests", s.requests)?;
        if s.prompt_tokens + s.completion_tokens > 0 {
            write!(
                f,
                ", {} prompt + {} completion tokens ({:.1} completion tokens/s)",
                s.prompt_tokens, s.completion_tokens, s.completion_tokens_per_s
            )?;
        }
        if s.servers.len() > 1 {
            for v in &s.servers {
                write!(
                    f,
                    "\n  {}: {} requests ({} failed), {} completion tokens ({:.1}/s){}",
                    v.base_url,
                    v.requests,
                    v.failed_requests,
                    v.completion_tokens,
                    v.completion_tokens_per_s,
                    v.left_out
                        .as_deref()
                        .map(|w| format!(", left out: {w}"))
                        .unwrap_or_default()
                )?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Done<'_, embed::Summary> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.summary;
        let mut first = true;
        for t in std::iter::once(&s.text).chain(s.image.as_ref()) {
            let what = if t.up_to_date {
                "up to date".to_string()
            } else {
                format!(
                    "{} rows computed, {} chunks reused, {:.1}s",
                    t.rows_computed, t.chunks_reused, t.seconds
                )
            };
            if !first {
                writeln!(f)?;
            }
            first = false;
            write!(
                f,
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
            )?;
        }
        if s.uncaptioned > 0 {
            write!(
                f,
                "\nembed: {} slices have no ok caption (invalid text rows)",
                s.uncaptioned
            )?;
        }
        if s.image.is_none() {
            write!(
                f,
                "\nembed: no image encoder configured; pretraining will use the text term alone"
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Done<'_, train::Summary> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use train::Status;
        let s = self.summary;
        if s.rank != 0 {
            // Rank 0 reports the run; the others only how they ended.
            return write!(
                f,
                "pretrain rank {}/{}: {:?} at step {}",
                s.rank, s.world_size, s.status, s.step
            );
        }
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
        write!(
            f,
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
            self.out.display()
        )
    }
}

impl fmt::Display for export::Exported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "export ({:?}, step {}): {} tensors, {} parameters{} -> {} (card {})",
            self.variant,
            self.step,
            self.tensors,
            self.parameters,
            if self.up_to_date { ", up to date" } else { "" },
            self.file.display(),
            self.card.display()
        )
    }
}

impl fmt::Display for Done<'_, downstream::finetune::Summary> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.summary;
        for n in &s.init_notes {
            writeln!(f, "finetune: {n}")?;
        }
        write!(
            f,
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
            self.out.display()
        )
    }
}

/// The per-item failures a stage lists on stderr after its line.
pub fn eprint_failures<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>, label: &str) {
    for (what, why) in items {
        eprintln!("  {label} {what}: {why}");
    }
}
