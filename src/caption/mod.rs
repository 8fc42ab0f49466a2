//! The caption stage: cache/index.jsonl + slice PNGs -> captions.jsonl, one
//! record per slice, appended as each answer arrives (see `store` for how
//! appends survive kill -9 and concurrent shards).
//!
//! A slice is done when its latest record is `ok` or `dropped` with the
//! prompt hash the current config would send and the sha256 of the PNG as
//! it is now; everything else (no record, `failed`, changed prompt, model
//! or image) is captioned on the next run. At the end of a run the records
//! are judged for `repeated` text over all slices and the file is compacted
//! to the latest record per slice.
//!
//! Backends: `descriptor` (offline facts from the volume, the default) and
//! `openai` (any OpenAI-compatible server, with bounded concurrency,
//! retries and Retry-After).
pub mod config;
pub mod descriptor;
pub mod openai;
mod summary;

pub use summary::{SliceFailure, Summary};
pub mod prompt;
pub mod quality;
pub mod sheet;
mod sink;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use rayon::prelude::*;

pub use config::{Action, BackendKind, CaptionConfig, FlagPolicy, OpenAiConfig};
use quality::Flag;
use sink::{Sink, Tally};
use store::{CaptionRecord, Latest, Status, Store};

use crate::artifacts::cache::{read_case_record, read_index, CaseRecord, Shard, SliceRow};
use crate::fsutil::{atomic_write, sha256_bytes, sweep_stale_tmp};

/// The slice's PNG bytes and their sha256.
fn read_png(cache: &Path, row: &SliceRow) -> Result<(Vec<u8>, String)> {
    let p = cache.join(&row.png);
    let bytes = std::fs::read(&p).with_context(|| format!("cannot read slice image {}", p.display()))?;
    let sha = sha256_bytes(&bytes);
    Ok((bytes, sha))
}

/// Identity of the backend's answer for a slice (see `prompt::hash`).
struct Asker<'a> {
    cfg: &'a CaptionConfig,
    backend: BackendKind,
    threshold: f32,
}

impl Asker<'_> {
    fn model(&self) -> String {
        match (self.backend, &self.cfg.openai) {
            (BackendKind::Openai, Some(o)) => o.model.clone(),
            _ => descriptor::MODEL.to_string(),
        }
    }

    fn backend_name(&self) -> &'static str {
        match self.backend {
            BackendKind::Openai => "openai",
            BackendKind::Descriptor => "descriptor",
        }
    }

    /// The rendered prompt (openai only) and the hash recorded for it.
    fn prompt(&self, row: &SliceRow, case: &CaseRecord) -> Result<(String, String)> {
        match (self.backend, &self.cfg.openai) {
            (BackendKind::Openai, Some(o)) => {
                let modality = case.modality.to_string();
                let vars = prompt::Vars {
                    plane: row.plane,
                    modality: &modality,
                    position: row.position,
                    max_words: self.cfg.max_words,
                };
                let text =
                    prompt::render(&self.cfg.prompt, &vars).map_err(|e| anyhow::anyhow!("caption.prompt: {e}"))?;
                let h = openai::Request::new(o, &text).identity();
                Ok((text, h))
            }
            _ => Ok((String::new(), {
                let mut id = serde_json::json!({
                    "backend": "descriptor", "model": descriptor::MODEL, "foreground_threshold": self.threshold,
                });
                // absent when true: the records of default captions keep their hash
                if !self.cfg.descriptor.plane_and_position {
                    id["plane_and_position"] = false.into();
                }
                prompt::hash(&id)
            })),
        }
    }

    fn record(&self, row: &SliceRow, prompt_hash: String, image_sha256: String) -> CaptionRecord {
        CaptionRecord {
            slice_id: row.slice_id.clone(),
            case: row.case.clone(),
            plane: row.plane,
            index: row.index,
            status: Status::Failed,
            text: String::new(),
            backend: self.backend_name().into(),
            model: self.model(),
            prompt_hash,
            image_sha256,
            latency_ms: 0,
            attempts: 0,
            flags: Vec::new(),
            error: None,
            usage: None,
            sampling: None,
        }
    }
}

fn failed(asker: &Asker, row: &SliceRow, e: &anyhow::Error) -> CaptionRecord {
    let mut r = asker.record(row, String::new(), String::new());
    r.error = Some(format!("{e:#}"));
    r
}

fn run_descriptor(
    cache: &Path,
    rows: &[SliceRow],
    cases: &HashMap<String, Option<CaseRecord>>,
    latest: &Latest,
    asker: &Asker,
    sink: &Sink,
) {
    let mut groups: Vec<(&str, Vec<&SliceRow>)> = Vec::new();
    for r in rows {
        match groups.last_mut() {
            Some((c, v)) if *c == r.case => v.push(r),
            _ => groups.push((&r.case, vec![r])),
        }
    }
    groups.par_iter().for_each(|(case, rows)| {
        let mut volume: Option<Result<ndarray::Array3<f32>>> = None;
        for row in rows {
            if sink.stop.load(Ordering::Relaxed) {
                return;
            }
            let rec = describe_one(
                cache,
                row,
                cases.get(*case).and_then(Option::as_ref),
                latest,
                asker,
                &mut volume,
            );
            match rec {
                Some(r) => sink.record(r),
                None => sink.skip(),
            }
        }
    });
}

/// None when the slice is already done.
fn describe_one(
    cache: &Path,
    row: &SliceRow,
    case: Option<&CaseRecord>,
    latest: &Latest,
    asker: &Asker,
    volume: &mut Option<Result<ndarray::Array3<f32>>>,
) -> Option<CaptionRecord> {
    let t0 = Instant::now();
    let Some(case) = case else {
        let e = anyhow::anyhow!(
            "case {}: no committed case.json in the cache (rerun preprocess)",
            row.case
        );
        return Some(failed(asker, row, &e));
    };
    let (png_sha, (_, hash)) = match read_png(cache, row).and_then(|(_, sha)| Ok((sha, asker.prompt(row, case)?))) {
        Ok(x) => x,
        Err(e) => return Some(failed(asker, row, &e)),
    };
    if latest.is_done(&row.slice_id, &hash, &png_sha) {
        return None;
    }
    let mut rec = asker.record(row, hash, png_sha);
    rec.attempts = 1;
    let vol = volume.get_or_insert_with(|| descriptor::load_volume(cache, &row.case));
    let text = match vol {
        Ok(v) => descriptor::describe(
            v,
            case,
            asker.threshold,
            row.plane,
            row.index,
            row.position,
            asker.cfg.descriptor.plane_and_position,
        ),
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    match text {
        Ok(t) => {
            rec.status = Status::Ok;
            rec.text = t;
        }
        Err(e) => rec.error = Some(format!("{e:#}")),
    }
    rec.latency_ms = t0.elapsed().as_millis() as u64;
    Some(rec)
}

#[allow(clippy::too_many_arguments)]
fn run_openai(
    cache: &Path,
    rows: Vec<SliceRow>,
    cases: Arc<HashMap<String, Option<CaseRecord>>>,
    latest: Arc<Latest>,
    cfg: &CaptionConfig,
    threshold: f32,
    sink: Arc<Sink>,
    again: bool,
) -> Result<Vec<openai::ServerStats>> {
    let Some(o) = cfg.openai.clone() else {
        anyhow::bail!("caption.openai section missing");
    };
    let key = openai::read_api_key(&o)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = Arc::new(openai::Client::new(&o, key)?);
    let stats_of = client.clone();
    let cfg = Arc::new(cfg.clone());
    let cache = Arc::new(cache.to_path_buf());
    rt.block_on(async move {
        // Is the server there, and does it serve the model? (Once a run.)
        if !again {
            let bar = sink.bar.clone();
            let say = move |line: &str| bar.suspend(|| eprintln!("{line}"));
            if let Err(why) = client.preflight(&say).await {
                sink.halt(why);
                return;
            }
        }
        // Tasks alive at once: enough to keep max_in_flight requests busy
        // while others sleep in backoff, and no more (memory stays bounded).
        let slots = Arc::new(tokio::sync::Semaphore::new(2 * client.capacity()));
        let mut set = tokio::task::JoinSet::new();
        let (probe, probe_sink) = (client.clone(), sink.clone());
        for row in rows {
            if sink.stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            while let Some(done) = set.try_join_next() {
                if let Err(e) = done {
                    sink.halt(format!("a caption task failed: {e}"));
                }
            }
            let (client, cfg, cache, cases, latest, sink) = (
                client.clone(),
                cfg.clone(),
                cache.clone(),
                cases.clone(),
                latest.clone(),
                sink.clone(),
            );
            set.spawn(async move {
                let _permit = permit;
                let asker = Asker {
                    cfg: &cfg,
                    backend: BackendKind::Openai,
                    threshold,
                };
                let case = cases.get(&row.case).and_then(Option::as_ref);
                let prepared = match case {
                    None => Err(anyhow::anyhow!(
                        "case {}: no committed case.json in the cache (rerun preprocess)",
                        row.case
                    )),
                    Some(c) => read_png(&cache, &row).and_then(|(png, sha)| Ok((png, sha, asker.prompt(&row, c)?))),
                };
                let (png, sha, (text, hash)) = match prepared {
                    Ok(x) => x,
                    Err(e) if again => return sink.record_again(failed(&asker, &row, &e)),
                    Err(e) => return sink.record(failed(&asker, &row, &e)),
                };
                if !again && latest.is_done(&row.slice_id, &hash, &sha) {
                    return sink.skip();
                }
                let fallback = OpenAiConfig::default();
                let o = cfg.openai.as_ref().unwrap_or(&fallback);
                let body = |sampling| openai::Request::new(o, &text).body(&png, sampling);
                let Some(out) = client.caption(&body, &cfg.policy, &sink.stop).await else {
                    return;
                };
                drop(png);
                if let Some(f) = &out.fatal {
                    sink.halt(f.clone());
                }
                let mut rec = asker.record(&row, hash, sha);
                rec.status = out.status;
                rec.text = out.text;
                rec.flags = out.flags;
                rec.attempts = out.attempts;
                rec.latency_ms = out.latency_ms;
                rec.error = out.error;
                rec.usage = out.usage;
                rec.sampling = out.sampling;
                if again {
                    sink.record_again(rec);
                } else {
                    sink.record(rec);
                }
            });
            // The first slice that needs a request is asked alone, so that
            // an error every slice would get stops the run after one.
            if !probe.probe_done() {
                while let Some(done) = set.join_next().await {
                    if let Err(e) = done {
                        probe_sink.halt(format!("a caption task failed: {e}"));
                    }
                }
            }
        }
        while let Some(done) = set.join_next().await {
            if let Err(e) = done {
                sink.halt(format!("a caption task failed: {e}"));
            }
        }
    });
    Ok(stats_of.stats())
}

/// Applies the end-of-run `repeated` judgement to one record: the flag is
/// set on repeated captions (and `drop` turns `ok` ones into `dropped`;
/// `keep`, and `retry` after its extra round, keep them); an `ok` record
/// whose text is no longer shared widely enough loses the flag.
fn judge_repeated(r: &mut CaptionRecord, repeated: bool, action: Action) {
    if r.status == Status::Failed {
        return;
    }
    let has = r.flags.contains(&Flag::Repeated);
    if repeated {
        if !has {
            r.flags.push(Flag::Repeated);
        }
        if action == Action::Drop && r.status == Status::Ok {
            r.status = Status::Dropped;
        }
    } else if has && r.status == Status::Ok {
        r.flags.retain(|f| *f != Flag::Repeated);
    }
}

/// Captions this shard's slices of `cache` into `out`.
pub fn run(cfg: &CaptionConfig, cache: &Path, out: &Path, shard: Shard) -> Result<Summary> {
    cfg.validate()?;
    let started = Instant::now();
    let rows: Vec<SliceRow> = read_index(cache)?.into_iter().filter(|r| shard.owns(&r.case)).collect();
    let store = Arc::new(Store::new(out)?);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        sweep_stale_tmp(dir)?;
    }
    let latest = Arc::new(store.latest()?);
    let mut cases: HashMap<String, Option<CaseRecord>> = HashMap::new();
    for r in &rows {
        if !cases.contains_key(&r.case) {
            cases.insert(r.case.clone(), read_case_record(cache, &r.case));
        }
    }
    let cases = Arc::new(cases);
    // what counts as foreground: the cache's own setting
    let threshold = crate::artifacts::cache::CacheInfo::read(cache)?
        .preprocess
        .foreground_threshold;
    let backend = cfg.backend();
    let asker = Asker {
        cfg,
        backend,
        threshold,
    };

    let bar = crate::progress::bar(rows.len() as u64, "caption");
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let (tx, writer) = sink::spawn_writer(store.clone());
    let sink = Arc::new(Sink {
        tx: Mutex::new(Some(tx)),
        tally: Mutex::new(Tally::default()),
        bar,
        stop: AtomicBool::new(false),
        stopped: Mutex::new(None),
    });
    let mut servers: Vec<openai::ServerStats> = Vec::new();
    let result = match backend {
        BackendKind::Descriptor => {
            run_descriptor(cache, &rows, &cases, &latest, &asker, &sink);
            Ok(())
        }
        BackendKind::Openai => {
            let r = run_openai(
                cache,
                rows.clone(),
                cases.clone(),
                latest.clone(),
                cfg,
                threshold,
                sink.clone(),
                false,
            );
            let r = r.map(|stats| servers = stats);
            // One more round for repeated captions, when the policy asks.
            if r.is_ok() && cfg.policy.repeated == Action::Retry && !sink.stop.load(Ordering::Relaxed) {
                sink.flush();
                let now = store.latest()?;
                let rep: HashSet<String> = now
                    .repeated(cfg.repeated_threshold)?
                    .into_iter()
                    .filter(|id| now.slot(id).is_some_and(|s| s.status == Status::Ok))
                    .collect();
                let redo: Vec<SliceRow> = rows.iter().filter(|r| rep.contains(&r.slice_id)).cloned().collect();
                if !redo.is_empty() {
                    tracing::info!("asking again for {} slices with repeated captions", redo.len());
                    sink.bar.inc_length(redo.len() as u64);
                    let again = run_openai(
                        cache,
                        redo,
                        cases.clone(),
                        latest.clone(),
                        cfg,
                        threshold,
                        sink.clone(),
                        true,
                    )?;
                    for (s, a) in servers.iter_mut().zip(&again) {
                        s.add(a);
                    }
                }
            }
            r
        }
    };
    sink.bar.finish_and_clear();
    if let Ok(mut tx) = sink.tx.lock() {
        tx.take();
    }
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the caption writer panicked"))?;
    written.with_context(|| format!("cannot write captions to {}", out.display()))?;
    result?;

    let finals = store.compact(cfg.repeated_threshold, |r, rep| {
        judge_repeated(r, rep, cfg.policy.repeated)
    })?;
    let t = sink
        .tally
        .lock()
        .map_err(|_| anyhow::anyhow!("caption counters poisoned"))?;
    let seconds = started.elapsed().as_secs_f64();
    for st in servers.iter_mut() {
        st.set_rate(seconds);
    }
    let mut s = Summary {
        servers,
        shard: format!("{}/{}", shard.index, shard.count),
        backend: asker.backend_name().into(),
        model: asker.model(),
        total: rows.len(),
        captioned: t.captioned,
        dropped: t.dropped,
        failed: t.failed,
        skipped: t.skipped,
        retried: t.retried,
        requests: t.requests,
        asked_again: t.asked_again,
        stopped: sink.stopped.lock().ok().and_then(|s| s.clone()),
        prompt_tokens: t.usage.prompt_tokens,
        completion_tokens: t.usage.completion_tokens,
        seconds,
        captions: out.to_path_buf(),
        failures: t.failures.clone(),
        ..Default::default()
    };
    // Failed records keep the flags of their last reply and count here too.
    for slot in rows.iter().filter_map(|r| finals.slot(&r.slice_id)) {
        if !slot.flagged() {
            continue;
        }
        s.flagged += 1;
        for f in Flag::ALL.into_iter().filter(|f| slot.has(*f)) {
            *s.flag_counts.entry(f.name().to_string()).or_default() += 1;
        }
    }
    if s.seconds > 0.0 {
        s.completion_tokens_per_s = s.completion_tokens as f64 / s.seconds;
    }
    let attempted = s.captioned + s.dropped + s.failed + s.skipped;
    s.not_attempted = s.total.saturating_sub(attempted);
    let report = crate::artifacts::cache::report_path(out.parent().unwrap_or(Path::new(".")), "caption", shard);
    atomic_write(&report, &serde_json::to_vec_pretty(&s)?)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, status: Status, text: &str) -> CaptionRecord {
        CaptionRecord {
            slice_id: id.into(),
            case: "a".into(),
            plane: crate::artifacts::cache::Plane::Axial,
            index: id.len(),
            status,
            text: text.into(),
            backend: "openai".into(),
            model: "m".into(),
            prompt_hash: "p".into(),
            image_sha256: "i".into(),
            latency_ms: 1,
            attempts: 1,
            flags: vec![],
            error: None,
            usage: None,
            sampling: None,
        }
    }

    #[test]
    fn repeated_is_flagged_dropped_and_cleared() {
        let mut r = rec("1", Status::Ok, "same");
        judge_repeated(&mut r, true, Action::Keep);
        assert_eq!((r.status, r.flags.clone()), (Status::Ok, vec![Flag::Repeated]));
        judge_repeated(&mut r, true, Action::Drop);
        assert_eq!((r.status, r.flags.clone()), (Status::Dropped, vec![Flag::Repeated]));
        // dropped stays dropped; an ok record no longer repeated loses the flag
        judge_repeated(&mut r, false, Action::Drop);
        assert_eq!(r.status, Status::Dropped);
        let mut r = rec("2", Status::Ok, "x");
        r.flags = vec![Flag::Truncated, Flag::Repeated];
        judge_repeated(&mut r, false, Action::Keep);
        assert_eq!(r.flags, vec![Flag::Truncated]);
        let mut f = rec("3", Status::Failed, "same");
        judge_repeated(&mut f, true, Action::Drop);
        assert!(f.flags.is_empty() && f.status == Status::Failed);
    }
}
