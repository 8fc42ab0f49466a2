//! One embedding table: its rows cut into chunks keyed by the encoder and
//! the chunk's inputs, finished chunks written as resume points, then
//! merged into the table in index order.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::{EmbedConfig, RowFailure, TableSummary, EMBED_FORMAT};
use crate::artifacts::cache::SliceRow;
use crate::artifacts::embeddings::{self as store, Table, TargetKind};
use crate::encoders::{ImageEncoder, ImagePlan, TextEncoder, TextPlan};
use crate::fsutil::sha256_bytes;

/// One table's inputs, aligned with the index: None = no input (invalid row).
pub(super) enum Inputs {
    Text(Vec<Option<String>>),
    /// PNG paths and their sha256 (None when unreadable: error text).
    Image(Vec<Result<(PathBuf, String), String>>),
}

impl Inputs {
    fn len(&self) -> usize {
        match self {
            Inputs::Text(v) => v.len(),
            Inputs::Image(v) => v.len(),
        }
    }

    /// A stable digest of row i's input ("-" for none).
    fn digest(&self, i: usize) -> String {
        match self {
            Inputs::Text(v) => v[i]
                .as_deref()
                .map(|t| sha256_bytes(t.as_bytes()))
                .unwrap_or("-".into()),
            Inputs::Image(v) => v[i].as_ref().map(|(_, h)| h.clone()).unwrap_or("-".into()),
        }
    }

    fn has(&self, i: usize) -> bool {
        match self {
            Inputs::Text(v) => v[i].is_some(),
            Inputs::Image(v) => v[i].is_ok(),
        }
    }
}

/// The loaded model behind a table.
enum Model {
    Text(Box<TextEncoder>),
    Image(Box<ImageEncoder>),
}

impl Model {
    fn dim(&self) -> usize {
        match self {
            Model::Text(m) => m.dim as usize,
            Model::Image(m) => m.dim as usize,
        }
    }
}

/// Identity and loader of a table's encoder.
pub(super) enum Plan {
    Text(TextPlan),
    Image(ImagePlan),
}

impl Plan {
    fn identity(&self) -> &crate::encoders::Identity {
        match self {
            Plan::Text(p) => &p.identity,
            Plan::Image(p) => &p.identity,
        }
    }

    fn load(&self, device: Device) -> Result<Model> {
        Ok(match self {
            Plan::Text(p) => Model::Text(Box::new(TextEncoder::load(p, device)?)),
            Plan::Image(p) => Model::Image(Box::new(ImageEncoder::load(p, device)?)),
        })
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn embed_table(
    kind: TargetKind,
    plan: &Plan,
    inputs: &Inputs,
    rows: &[SliceRow],
    index_sha: &str,
    cfg: &EmbedConfig,
    device: Device,
    out_dir: &Path,
) -> Result<TableSummary> {
    let started = std::time::Instant::now();
    let name = kind.name();
    let id = plan.identity();
    let n = inputs.len();
    let digests: Vec<String> = (0..n).map(|i| inputs.digest(i)).collect();
    let inputs_sha = sha256_bytes(
        rows.iter()
            .zip(&digests)
            .map(|(r, d)| format!("{}\t{d}", r.slice_id))
            .collect::<Vec<_>>()
            .join("\n")
            .as_bytes(),
    );
    let path = crate::artifacts::cache::table_in(out_dir, name);
    let mut summary = TableSummary {
        table: name.to_string(),
        encoder: id.encoder.clone(),
        path: path.clone(),
        rows: n,
        ..Default::default()
    };
    if let Ok(meta) = store::read_meta(&path) {
        let current = meta.get("format").map(String::as_str) == Some(EMBED_FORMAT)
            && meta.get("encoder_key") == Some(&id.key)
            && meta.get("index_sha256").map(String::as_str) == Some(index_sha)
            && meta.get("inputs_sha256") == Some(&inputs_sha)
            && meta.get("failed_rows").map(String::as_str) == Some("0");
        if current {
            summary.up_to_date = true;
            summary.valid = meta_number(&meta, &path, "valid_rows")?;
            summary.dim = meta_number(&meta, &path, "dim")?;
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(summary);
        }
    }

    let parts_dir = out_dir.join("parts");
    let chunk_keys: Vec<(std::ops::Range<usize>, String)> = (0..n)
        .step_by(cfg.chunk_rows)
        .map(|lo| {
            let hi = (lo + cfg.chunk_rows).min(n);
            let mut s = format!("{EMBED_FORMAT}|{}|", id.key);
            for i in lo..hi {
                s.push_str(&rows[i].slice_id);
                s.push('\t');
                s.push_str(&digests[i]);
                s.push('\n');
            }
            (lo..hi, sha256_bytes(s.as_bytes()))
        })
        .collect();
    let part_path = |key: &str| parts_dir.join(format!("{name}-{}.safetensors", &key[..32]));

    let todo_rows: usize = chunk_keys
        .iter()
        .filter(|(_, k)| !part_path(k).is_file())
        .map(|(r, _)| r.clone().filter(|&i| inputs.has(i)).count())
        .sum();
    let bar = crate::progress::bar(todo_rows as u64, name);
    let mut model: Option<Model> = None;
    let mut chunks: Vec<Table> = Vec::with_capacity(chunk_keys.len());
    for (range, key) in &chunk_keys {
        let pp = part_path(key);
        if let Ok(t) = store::read(&pp) {
            if t.rows() == range.len() && t.meta.get("chunk_key") == Some(key) {
                summary.chunks_reused += 1;
                chunks.push(t);
                continue;
            }
        }
        if model.is_none() && range.clone().any(|i| inputs.has(i)) {
            tracing::info!(table = name, encoder = %id.encoder, weights = %id.weights, "loading encoder");
            model = Some(
                plan.load(device)
                    .with_context(|| format!("{name} encoder {}", id.weights))?,
            );
        }
        // Chunks already written stay; a libtorch failure (out of memory
        // above all) names the chunk and the setting that sizes it.
        let (table, failures) = crate::runtime::guard::boundary(|| {
            compute_chunk(model.as_ref(), inputs, range.clone(), rows, cfg.batch_size, &bar)
        })
        .map_err(|e| {
            crate::runtime::guard::explain(
                e,
                &format!("embed {name}, rows {}..{} of {n}", range.start, range.end),
                device,
                &format!("Each forward pass holds embed.batch_size {} inputs", cfg.batch_size),
                "Lower embed.batch_size; the chunks already written are kept and a rerun resumes after them",
            )
        })?;
        summary.rows_computed += table.valid_rows();
        summary.chunks_computed += 1;
        let mut table = table;
        table.meta.insert("chunk_key".into(), key.clone());
        // A chunk with failed rows is not a resume point: its failures are
        // retried on the next run.
        if failures.is_empty() {
            store::write(&pp, &table)?;
        }
        summary.failures.extend(failures);
        chunks.push(table);
    }
    bar.finish_and_clear();

    let dim = match chunks.iter().map(|c| c.dim).find(|&d| d > 0) {
        Some(d) => d,
        None => match &model {
            Some(m) => m.dim(),
            // No valid row anywhere and nothing loaded: load to learn D.
            None => plan.load(device)?.dim(),
        },
    };
    let mut emb = Vec::with_capacity(n * dim);
    let mut valid = Vec::with_capacity(n);
    for c in &chunks {
        if c.dim == dim {
            emb.extend_from_slice(&c.embeddings);
        } else {
            emb.extend(std::iter::repeat_n(0.0, c.rows() * dim));
        }
        valid.extend_from_slice(&c.valid);
    }
    let mut meta = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        meta.insert(k.to_string(), v);
    };
    put("format", EMBED_FORMAT.into());
    put("table", name.into());
    put("encoder", id.encoder.clone());
    put("encoder_key", id.key.clone());
    put("weights", id.weights.clone());
    put("weights_sha256", id.weights_sha256.clone());
    put("input", id.input.clone());
    put("input_sha256", id.input_sha256.clone());
    put("l2_normalized", id.l2_normalized.to_string());
    put("rows", n.to_string());
    put("dim", dim.to_string());
    put("valid_rows", valid.iter().filter(|&&v| v != 0).count().to_string());
    put("failed_rows", summary.failures.len().to_string());
    put("index_sha256", index_sha.into());
    put("inputs_sha256", inputs_sha.clone());
    if kind == TargetKind::Text {
        put("captions_sha256", inputs_sha);
    }
    put("med3d_version", crate::VERSION.into());
    let table = Table {
        dim,
        embeddings: emb,
        valid,
        meta,
    };
    summary.valid = table.valid_rows();
    summary.dim = dim;
    store::write(&path, &table)?;

    // Parts of this table that no current chunk names are stale.
    let current: Vec<PathBuf> = chunk_keys.iter().map(|(_, k)| part_path(k)).collect();
    if let Ok(rd) = std::fs::read_dir(&parts_dir) {
        for e in rd.flatten() {
            let p = e.path();
            let mine = e.file_name().to_string_lossy().starts_with(&format!("{name}-"));
            if mine && !current.contains(&p) {
                std::fs::remove_file(&p).with_context(|| format!("cannot remove stale part {}", p.display()))?;
            }
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Embeds the rows of one chunk that have inputs, in batches.
fn compute_chunk(
    model: Option<&Model>,
    inputs: &Inputs,
    range: std::ops::Range<usize>,
    rows: &[SliceRow],
    batch: usize,
    bar: &indicatif::ProgressBar,
) -> Result<(Table, Vec<RowFailure>)> {
    let len = range.len();
    let mut valid = vec![0u8; len];
    let mut failures = Vec::new();
    let Some(model) = model else {
        return Ok((
            Table {
                dim: 0,
                embeddings: Vec::new(),
                valid,
                meta: BTreeMap::new(),
            },
            failures,
        ));
    };
    let dim = model.dim();
    let mut emb = vec![0f32; len * dim];
    let mut store_rows = |local: &[usize], out: &Tensor| -> Result<()> {
        let out = out.to_kind(Kind::Float).contiguous();
        let flat: Vec<f32> = Vec::<f32>::try_from(out.view([-1])).context("cannot read embeddings back")?;
        for (j, &l) in local.iter().enumerate() {
            emb[l * dim..(l + 1) * dim].copy_from_slice(&flat[j * dim..(j + 1) * dim]);
            valid[l] = 1;
        }
        Ok(())
    };
    match (model, inputs) {
        (Model::Text(enc), Inputs::Text(texts)) => {
            // Longest first, as sentence-transformers batches: less padding.
            let mut local: Vec<usize> = (0..len).filter(|&l| texts[range.start + l].is_some()).collect();
            local.sort_by_key(|&l| std::cmp::Reverse(texts[range.start + l].as_ref().map_or(0, |t| t.len())));
            for group in local.chunks(batch) {
                let batch_texts: Vec<&str> = group
                    .iter()
                    .map(|&l| texts[range.start + l].as_deref().unwrap_or(""))
                    .collect();
                let out = enc.embed(&batch_texts)?;
                store_rows(group, &out)?;
                bar.inc(group.len() as u64);
            }
        }
        (Model::Image(enc), Inputs::Image(pngs)) => {
            let mut ready: Vec<(usize, Tensor)> = Vec::with_capacity(batch);
            let flush = |ready: &mut Vec<(usize, Tensor)>,
                         store_rows: &mut dyn FnMut(&[usize], &Tensor) -> Result<()>|
             -> Result<()> {
                if ready.is_empty() {
                    return Ok(());
                }
                let idx: Vec<usize> = ready.iter().map(|(l, _)| *l).collect();
                let xs: Vec<Tensor> = ready.drain(..).map(|(_, t)| t).collect();
                let out = enc.embed_inputs(&Tensor::stack(&xs, 0));
                store_rows(&idx, &out)?;
                bar.inc(idx.len() as u64);
                Ok(())
            };
            for l in 0..len {
                let i = range.start + l;
                match &pngs[i] {
                    Err(e) => failures.push(RowFailure {
                        slice_id: rows[i].slice_id.clone(),
                        error: e.clone(),
                    }),
                    Ok((p, _)) => match enc.input_png(p) {
                        Ok(x) => ready.push((l, x)),
                        Err(e) => {
                            failures.push(RowFailure {
                                slice_id: rows[i].slice_id.clone(),
                                error: format!("{e:#}"),
                            });
                            bar.inc(1);
                        }
                    },
                }
                if ready.len() == batch {
                    flush(&mut ready, &mut store_rows)?;
                }
            }
            flush(&mut ready, &mut store_rows)?;
        }
        _ => bail!("internal: encoder and inputs of different kinds"),
    }
    Ok((
        Table {
            dim,
            embeddings: emb,
            valid,
            meta: BTreeMap::new(),
        },
        failures,
    ))
}

/// A number in a table's safetensors metadata; a missing or unreadable one
/// is an error naming the file and the key (never a silent 0).
fn meta_number(meta: &BTreeMap<String, String>, path: &Path, key: &str) -> Result<usize> {
    let v = meta
        .get(key)
        .with_context(|| format!("{}: metadata key `{key}` is missing", path.display()))?;
    v.parse()
        .with_context(|| format!("{}: metadata key `{key}` is {v:?}, not a count", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_metadata_numbers_are_read_or_named() {
        let p = Path::new("/x/text.safetensors");
        let mut m = BTreeMap::new();
        m.insert("dim".to_string(), "384".to_string());
        m.insert("valid_rows".to_string(), "ten".to_string());
        assert_eq!(meta_number(&m, p, "dim").unwrap(), 384);
        let e = format!("{:#}", meta_number(&m, p, "valid_rows").unwrap_err());
        assert!(e.contains("text.safetensors") && e.contains("`valid_rows`"), "{e}");
        let e = format!("{:#}", meta_number(&m, p, "rows").unwrap_err());
        assert!(e.contains("`rows` is missing"), "{e}");
    }
}
