//! The pretraining data: which slices can be used (their case's volume is
//! readable and every target embedding row is valid), the order they are
//! visited in, and a loader whose threads read the memory-mapped volumes
//! ahead of the model into bounded queues.
//!
//! Micro-batch k holds samples k*B .. (k+1)*B of an endless stream. Sample
//! s belongs to epoch s / n (n = cases or slices, by `sampling`), whose
//! order is a permutation drawn from (seed, epoch); the slice of a case and
//! the augmentation of a sample are drawn from (seed, s). A batch is thus
//! a pure function of (seed, k): the loader can start at any k, and worker
//! w builds the batches k = start + w + i * workers, so batches arrive in
//! order with no reordering buffer and at most `workers * prefetch` held.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::config::{PretrainConfig, Sampling};
use crate::artifacts::cache::{self, read_index, SliceRow};
use crate::artifacts::{embeddings, npy::read_volume, npy::volume_shape};
use crate::runtime::rng::{Rng, STREAM_AUGMENT, STREAM_ORDER, STREAM_SLICE};

pub use super::targets::Target;

#[derive(Debug, Clone)]
pub struct CaseEntry {
    pub id: String,
    pub volume: PathBuf,
    pub shape: [usize; 3],
    /// Usable index rows of this case.
    pub rows: Vec<usize>,
}

/// The cache and embeddings as pretraining sees them.
#[derive(Debug)]
pub struct Dataset {
    pub rows: Vec<SliceRow>,
    pub cases: Vec<CaseEntry>,
    /// Case (into `cases`) of each index row, when usable.
    pub row_case: Vec<Option<usize>>,
    /// Usable rows, ascending.
    pub usable: Vec<usize>,
    pub targets: Vec<Target>,
    /// Cases left out, with the reason.
    pub skipped_cases: Vec<(String, String)>,
    /// Rows left out because a target row is not valid.
    pub invalid_rows: usize,
    /// Hash of the index order and the (clean) target tables.
    pub data_hash: String,
    /// Usable slices carrying another slice's targets (`target_noise`).
    pub noisy_slices: usize,
}

impl Dataset {
    /// Reads the index, the embedding tables (`text` required, `image`
    /// when present) and every case's volume header.
    pub fn open(cache: &Path, cfg: &PretrainConfig) -> Result<Dataset> {
        Dataset::open_with_tables(cache, &cache::embeddings_dir(cache), cfg)
    }

    /// As `open`, with the tables taken from `tables` (a folder laid out as
    /// `<cache>/embeddings/`, e.g. `med3d embed --out` of other captions).
    pub fn open_with_tables(cache: &Path, tables: &Path, cfg: &PretrainConfig) -> Result<Dataset> {
        let rows = read_index(cache)?;
        let mut targets = Vec::new();
        let mut valid = vec![true; rows.len()];
        let mut h = Sha256::new();
        for id in &rows {
            h.update(id.slice_id.as_bytes());
            h.update(b"\n");
        }
        for kind in embeddings::TargetKind::ALL {
            let name = kind.name();
            let p = cache::table_in(tables, name);
            if !p.exists() {
                if kind == embeddings::TargetKind::Text {
                    bail!("{}: no text embeddings (run `med3d embed` first)", p.display());
                }
                continue;
            }
            let t = embeddings::read(&p)?;
            if t.rows() != rows.len() {
                bail!(
                    "{}: {} rows, but {} has {}: the embeddings are stale, rerun `med3d embed`",
                    p.display(),
                    t.rows(),
                    cache::index_path(cache).display(),
                    rows.len()
                );
            }
            if let Some(sha) = t.meta.get("index_sha256") {
                if *sha != cache::index_sha256(&rows) {
                    bail!(
                        "{}: made for another slice index than {}: rerun `med3d embed`",
                        p.display(),
                        cache::index_path(cache).display()
                    );
                }
            }
            for (v, &ok) in valid.iter_mut().zip(&t.valid) {
                *v &= ok != 0;
            }
            h.update(name.as_bytes());
            h.update((t.dim as u64).to_le_bytes());
            h.update(&t.valid);
            let mut buf = Vec::with_capacity(1 << 16);
            for chunk in t.embeddings.chunks(1 << 14) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                h.update(&buf);
            }
            targets.push(Target {
                name: name.to_string(),
                dim: t.dim,
                data: t.embeddings,
            });
        }
        let invalid_rows = valid.iter().filter(|v| !**v).count();

        let mut by_case: Vec<(String, Vec<usize>)> = Vec::new();
        let mut case_pos: HashMap<&str, usize> = HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            let k = *case_pos.entry(r.case.as_str()).or_insert_with(|| {
                by_case.push((r.case.clone(), Vec::new()));
                by_case.len() - 1
            });
            if valid[i] {
                by_case[k].1.push(i);
            }
        }
        let mut cases = Vec::new();
        let mut skipped_cases = Vec::new();
        let mut row_case = vec![None; rows.len()];
        for (id, case_rows) in by_case {
            if case_rows.is_empty() {
                skipped_cases.push((id, "no slice with valid target embeddings".to_string()));
                continue;
            }
            let volume = cache::image_npy(cache, &id);
            match volume_shape(&volume) {
                Ok(shape) => {
                    for &r in &case_rows {
                        row_case[r] = Some(cases.len());
                    }
                    cases.push(CaseEntry {
                        id,
                        volume,
                        shape,
                        rows: case_rows,
                    });
                }
                Err(e) => skipped_cases.push((id, format!("{e:#}"))),
            }
        }
        let usable: Vec<usize> = (0..rows.len()).filter(|&r| row_case[r].is_some()).collect();
        if usable.is_empty() {
            bail!(
                "{}: no usable slice ({} rows, {} without valid embeddings, {} cases skipped{})",
                cache.display(),
                rows.len(),
                invalid_rows,
                skipped_cases.len(),
                skipped_cases
                    .first()
                    .map(|(c, why)| format!("; first: {c}: {why}"))
                    .unwrap_or_default()
            );
        }
        if cfg.input_size.is_none() {
            let m = cfg.backbone.size_multiple()?;
            let first = &cases[0];
            for c in &cases {
                if c.shape != first.shape {
                    bail!(
                        "case {} is {:?} but case {} is {:?}: volumes of a batch must share a grid; set preprocess.roi (crop_pad) or pretrain.input_size",
                        c.id, c.shape, first.id, first.shape
                    );
                }
            }
            if first.shape.iter().zip(m).any(|(&s, m)| s as i64 % m != 0) {
                bail!(
                    "cached volumes are {:?}; {} needs sides divisible by {m:?}: set preprocess.roi to multiples of them or pretrain.input_size",
                    first.shape,
                    cfg.backbone.name()
                );
            }
        }
        let swaps = super::noise::draw(cfg.seed, cfg.target_noise, &usable)?;
        super::noise::apply(&mut targets, &swaps);
        Ok(Dataset {
            rows,
            cases,
            row_case,
            usable,
            targets,
            skipped_cases,
            invalid_rows,
            data_hash: hex::encode(h.finalize()),
            noisy_slices: swaps.len(),
        })
    }

    pub fn target_dims(&self) -> Vec<(String, i64)> {
        self.targets.iter().map(|t| (t.name.clone(), t.dim as i64)).collect()
    }
}

/// The order samples are visited in.
#[derive(Debug, Clone)]
pub struct Sampler {
    seed: u64,
    mode: Sampling,
    /// Case mode: the rows of each case; slice mode: one row per unit.
    units: Vec<Vec<usize>>,
}

impl Sampler {
    pub fn new(ds: &Dataset, seed: u64, mode: Sampling) -> Sampler {
        let units = match mode {
            Sampling::Case => ds.cases.iter().map(|c| c.rows.clone()).collect(),
            Sampling::Slice => ds.usable.iter().map(|&r| vec![r]).collect(),
        };
        Sampler { seed, mode, units }
    }

    /// Units (cases or slices) in one epoch.
    pub fn epoch_len(&self) -> usize {
        self.units.len()
    }

    /// Index row of sample `s`. `perm` caches the current epoch's order.
    pub fn row(&self, s: u64, perm: &mut Option<(u64, Vec<u32>)>) -> usize {
        let n = self.units.len() as u64;
        let epoch = s / n;
        if perm.as_ref().map(|p| p.0) != Some(epoch) {
            *perm = Some((epoch, Rng::new(self.seed, STREAM_ORDER, epoch).permutation(n as usize)));
        }
        let unit = &self.units[perm.as_ref().map(|p| p.1[(s % n) as usize]).unwrap_or(0) as usize];
        match self.mode {
            Sampling::Slice => unit[0],
            Sampling::Case => unit[Rng::new(self.seed, STREAM_SLICE, s).below(unit.len() as u64) as usize],
        }
    }
}

/// One micro-batch, on the CPU.
#[derive(Debug)]
pub struct Batch {
    /// Micro-batch number k (the data position).
    pub index: u64,
    /// [B, 1, X, Y, Z] float32 in [0, 1].
    pub volumes: Tensor,
    /// Plane ids (axial 0, coronal 1, sagittal 2).
    pub planes: Vec<i64>,
    /// Slice positions in [0, 1] after augmentation.
    pub positions: Vec<f64>,
    /// Slice indices on the cached grid after augmentation.
    pub indices: Vec<i64>,
    /// Index rows the targets come from.
    pub rows: Vec<usize>,
    /// (target name, [B, dim] float32), in the dataset's target order.
    pub targets: Vec<(String, Tensor)>,
}

/// Builds micro-batches as pure functions of their number.
#[derive(Debug)]
pub struct BatchMaker {
    pub ds: Arc<Dataset>,
    pub sampler: Sampler,
    pub cfg: PretrainConfig,
}

impl BatchMaker {
    pub fn new(ds: Arc<Dataset>, cfg: &PretrainConfig) -> BatchMaker {
        BatchMaker {
            sampler: Sampler::new(&ds, cfg.seed, cfg.sampling),
            ds,
            cfg: cfg.clone(),
        }
    }

    /// Sample `s`: its volume [1, X, Y, Z] and (plane id, position, index, row).
    fn sample(&self, s: u64, perm: &mut Option<(u64, Vec<u32>)>) -> Result<(Tensor, i64, f64, i64, usize)> {
        let row_i = self.sampler.row(s, perm);
        let row = &self.ds.rows[row_i];
        let case = &self.ds.cases[self.ds.row_case[row_i].context("sampled a row without a case")?];
        let (data, shape) = read_volume(&case.volume).with_context(|| format!("case {}", case.id))?;
        let mut v = Tensor::from_slice(&data).view([1, shape[0] as i64, shape[1] as i64, shape[2] as i64]);
        let (mut position, mut index) = (row.position, row.index as i64);
        let axis = row.plane.axis();
        let a = &self.cfg.augment;
        // Fixed draw order, whatever is enabled, so toggling one
        // augmentation does not reshuffle the others.
        let mut rng = Rng::new(self.cfg.seed, STREAM_AUGMENT, s);
        let flips: Vec<bool> = (0..3).map(|_| rng.uniform() < a.flip_prob).collect();
        let (u_scale, u_shift) = (rng.uniform(), rng.uniform());
        let axes: Vec<i64> = (0..3).filter(|&d| flips[d]).map(|d| d as i64 + 1).collect();
        if !axes.is_empty() {
            v = v.flip(axes.as_slice());
            if flips[axis] {
                position = 1.0 - position;
                index = shape[axis] as i64 - 1 - index;
            }
        }
        if a.intensity_scale > 0.0 || a.intensity_shift > 0.0 {
            let scale = 1.0 + a.intensity_scale * (2.0 * u_scale - 1.0);
            let shift = a.intensity_shift * (2.0 * u_shift - 1.0);
            v = (v * scale + shift).clamp(0.0, 1.0);
        }
        Ok((
            fit_input(v, self.cfg.input_size),
            row.plane.id() as i64,
            position,
            index,
            row_i,
        ))
    }

    /// Micro-batch `k`.
    pub fn batch(&self, k: u64, perm: &mut Option<(u64, Vec<u32>)>) -> Result<Batch> {
        let b = self.cfg.batch_size as u64;
        let mut vols = Vec::with_capacity(b as usize);
        let mut batch = Batch {
            index: k,
            volumes: Tensor::new(),
            planes: Vec::new(),
            positions: Vec::new(),
            indices: Vec::new(),
            rows: Vec::new(),
            targets: Vec::new(),
        };
        for s in k * b..(k + 1) * b {
            let (v, plane, pos, idx, row) = self.sample(s, perm)?;
            vols.push(v);
            batch.planes.push(plane);
            batch.positions.push(pos);
            batch.indices.push(idx);
            batch.rows.push(row);
        }
        batch.volumes = Tensor::stack(&vols, 0).to_kind(Kind::Float);
        for t in &self.ds.targets {
            let mut buf = Vec::with_capacity(batch.rows.len() * t.dim);
            for &r in &batch.rows {
                buf.extend_from_slice(&t.data[r * t.dim..(r + 1) * t.dim]);
            }
            let y = Tensor::from_slice(&buf).view([batch.rows.len() as i64, t.dim as i64]);
            batch.targets.push((t.name.clone(), y));
        }
        Ok(batch)
    }
}

/// A volume [1, X, Y, Z] as the model takes it: resized (trilinear) to
/// `pretrain.input_size` when that is set and differs.
pub fn fit_input(v: Tensor, input_size: Option<[i64; 3]>) -> Tensor {
    match input_size {
        Some(size) if v.size()[1..] != size[..] => v
            .unsqueeze(0)
            .upsample_trilinear3d(size.as_slice(), false, None, None, None)
            .squeeze_dim(0),
        _ => v,
    }
}

/// Worker threads filling bounded queues, read back in batch order.
pub struct Loader {
    rxs: Vec<Receiver<Result<Batch>>>,
    /// Batches taken so far.
    taken: u64,
    /// Number of the first batch, and the step between this rank's batches.
    first: u64,
    stride: u64,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Loader {
    /// Starts `cfg.run.workers` threads producing batches from number `start` on.
    pub fn start(maker: Arc<BatchMaker>, start: u64) -> Result<Loader> {
        Loader::start_sharded(maker, start, 0, 1)
    }

    /// The batches of `rank` in a data-parallel run of `world` ranks from
    /// global batch number `start` on: `start + rank + world * i`. Every
    /// rank draws the same epoch permutations, so the ranks' batches are
    /// disjoint slices of one global stream; together they are batches
    /// `start ..` of a single process, in rank order.
    pub fn start_sharded(maker: Arc<BatchMaker>, start: u64, rank: u64, world: u64) -> Result<Loader> {
        let workers = maker.cfg.run.workers.max(1);
        let prefetch = maker.cfg.run.prefetch.max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let mut rxs = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        let (first, stride) = (start + rank, world.max(1));
        for w in 0..workers {
            let (tx, rx) = sync_channel(prefetch);
            let (maker, stop) = (maker.clone(), stop.clone());
            let (k0, step) = (first + stride * w as u64, stride * workers as u64);
            let h = std::thread::Builder::new()
                .name(format!("med3d-loader-{w}"))
                .spawn(move || worker(&maker, k0, step, &tx, &stop))
                .context("cannot start a loader thread")?;
            rxs.push(rx);
            handles.push(h);
        }
        Ok(Loader {
            rxs,
            taken: 0,
            first,
            stride,
            stop,
            handles,
        })
    }

    /// The next micro-batch, in order.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let w = (self.taken % self.rxs.len() as u64) as usize;
        let b = self.rxs[w].recv().context("a loader thread stopped unexpectedly")??;
        debug_assert_eq!(b.index, self.first + self.stride * self.taken);
        self.taken += 1;
        Ok(b)
    }
}

fn worker(maker: &BatchMaker, first: u64, stride: u64, tx: &SyncSender<Result<Batch>>, stop: &AtomicBool) {
    let mut perm = None;
    let mut k = first;
    while !stop.load(Ordering::Relaxed) {
        // A libtorch exception while assembling a batch (an input_size
        // whose resize cannot be allocated) reaches the trainer as an error.
        let b = crate::runtime::guard::boundary(|| maker.batch(k, &mut perm));
        if tx.send(b).is_err() {
            break;
        }
        k += stride;
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers wakes workers blocked on a full queue.
        self.rxs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
