//! `med3d evaluate-alignment`: how well a pretraining run's 3D read-outs
//! line up with the 2D target embeddings of a cache's slices (held-out
//! volumes, or the training cache itself).
//!
//! The run's model is rebuilt from its `run.json` and loaded strictly from
//! a checkpoint. Each usable case's volume goes through the backbone once
//! (eval mode, no augmentation, resized to `input_size` as in training);
//! the head then reads out one embedding per usable slice at its (plane,
//! bin). Per target table (`text`, `image`), on L2-normalised rows:
//! - retrieval of each slice's target among all slices' targets, and among
//!   the targets of other volumes' slices at the same plane and bin: the
//!   descriptor's captions state the plane and position, which the head is
//!   given as input, so only the second measures what the volume told it;
//! - the modality gap: the distance between the two sets' centroids;
//! - plane accuracy (leave-one-case-out nearest centroid) and position
//!   error (leave-one-case-out 5-NN within each plane) read out of the 3D
//!   embeddings, and, for comparison, out of the targets themselves.
//!
//! `--embeddings DIR` takes the targets from another table folder on the
//! same index (e.g. `med3d embed --out DIR` of captions with the plane and
//! position words left out); `--dump DIR` writes the normalised rows as
//! .npy with rows.json, for a reference to recompute every number.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::data::{fit_input, Dataset};
use super::model::Pretrainer;
use crate::align::metrics::{self, Retrieval};
use crate::artifacts::npy::{read_volume, to_bytes, NpyDtype};
use crate::artifacts::run::Checkpoint;
use crate::fsutil::atomic_write;

/// Neighbours of the position read-out.
pub const POSITION_K: usize = 5;

/// The arguments of `med3d evaluate-alignment`.
#[derive(Debug, Clone, clap::Args)]
pub struct Request {
    #[arg(long)]
    pub run: PathBuf,
    /// Cache with embeddings (held-out volumes, or the training cache).
    #[arg(long)]
    pub cache: PathBuf,
    /// Target tables folder; default: <cache>/embeddings.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Checkpoint step; default: the latest.
    #[arg(long)]
    pub step: Option<u64>,
    /// JSON report; default: <run>/alignment.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the normalised embeddings (x_<target>.npy, y_<target>.npy) and rows.json here.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Slices read out per head call.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Readout {
    /// Leave-one-case-out nearest-centroid plane accuracy.
    pub plane_accuracy: f64,
    /// Share of the most frequent plane (what always guessing it scores).
    pub plane_majority: f64,
    /// Leave-one-case-out 5-NN position error within each plane (position 0..1).
    pub position_mae: f64,
    /// The error of predicting the other cases' mean position.
    pub position_baseline_mae: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub name: String,
    pub dim: usize,
    pub retrieval_all: Retrieval,
    /// Candidates: the slice's own target and those of other cases' slices
    /// at the same plane and bin.
    pub retrieval_same_plane_bin: Retrieval,
    pub modality_gap: f64,
    pub matched_cosine: f64,
    pub unmatched_cosine: f64,
    /// Read out of the 3D embeddings.
    pub readout_3d: Readout,
    /// Read out of the target embeddings (how much the targets carry).
    pub readout_targets: Readout,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub format: String,
    pub run: PathBuf,
    pub checkpoint: PathBuf,
    pub step: u64,
    pub cache: PathBuf,
    pub embeddings: PathBuf,
    pub head: String,
    pub loss: String,
    pub cases: usize,
    pub slices: usize,
    pub skipped_cases: Vec<(String, String)>,
    pub targets: Vec<TargetReport>,
    #[serde(skip)]
    pub line: String,
}

/// One row per evaluated slice, in index order.
#[derive(Debug, Clone, Serialize)]
struct RowInfo {
    slice_id: String,
    case: usize,
    case_id: String,
    plane: i64,
    bin: i64,
    position: f64,
}

fn readout(x: &[f64], d: usize, rows: &[RowInfo]) -> Readout {
    let case: Vec<usize> = rows.iter().map(|r| r.case).collect();
    let plane: Vec<i64> = rows.iter().map(|r| r.plane).collect();
    let pos: Vec<f64> = rows.iter().map(|r| r.position).collect();
    let (plane_accuracy, plane_majority) = metrics::loco_centroid_accuracy(x, d, &case, &plane);
    let (position_mae, position_baseline_mae) = metrics::loco_knn_error(x, d, &case, &plane, &pos, POSITION_K);
    Readout {
        plane_accuracy,
        plane_majority,
        position_mae,
        position_baseline_mae,
    }
}

fn npy_f32(path: &Path, n: usize, d: usize, data: &[f64]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
    atomic_write(path, &to_bytes(NpyDtype::F32, &[n, d], &bytes))
}

pub fn run(req: &Request) -> Result<Report> {
    let (ckpt, rec) = Checkpoint::open::<super::PretrainConfig>(&req.run, req.step)?;
    let cfg = &rec.config;
    let step = ckpt.state.step;
    let dev = crate::runtime::start(
        cfg.run.threads,
        cfg.run.device,
        "pretrain.run.device",
        cfg.run.keep_freed_memory,
    )?;
    let tables = req
        .embeddings
        .clone()
        .unwrap_or_else(|| crate::artifacts::cache::embeddings_dir(&req.cache));
    let ds = Arc::new(Dataset::open_with_tables(&req.cache, &tables, cfg)?);
    let dims = ds.target_dims();
    for (name, width) in &dims {
        ensure!(
            rec.targets.iter().any(|(n, w)| n == name && w == width),
            "{}: table {name} is {width} wide, but the run was trained on {:?}: embed the cache with the run's encoders",
            tables.display(),
            rec.targets
        );
    }

    ensure!(
        ds.cases.len() >= 2,
        "{}: {} usable case(s); alignment is measured across at least 2 volumes",
        req.cache.display(),
        ds.cases.len()
    );

    let vs = VarStore::new(dev);
    let model = Pretrainer::new(&vs.root(), cfg, &rec.targets)
        .with_context(|| format!("{}: cannot build the model of its run.json", req.run.display()))?;
    ckpt.load_model(&vs)?;

    let mut rows: Vec<RowInfo> = Vec::new();
    let mut outs: Vec<Vec<f32>> = vec![Vec::new(); dims.len()];
    let batch = req.batch.max(1);
    for (ci, case) in ds.cases.iter().enumerate() {
        let (data, shape) = read_volume(&case.volume).with_context(|| format!("case {}", case.id))?;
        let v = Tensor::from_slice(&data).view([1, shape[0] as i64, shape[1] as i64, shape[2] as i64]);
        let v = fit_input(v, cfg.input_size)
            .unsqueeze(0)
            .to_kind(Kind::Float)
            .to_device(dev);
        let positions: Vec<f64> = case.rows.iter().map(|&r| ds.rows[r].position).collect();
        let indices: Vec<i64> = case.rows.iter().map(|&r| ds.rows[r].index as i64).collect();
        let planes: Vec<i64> = case.rows.iter().map(|&r| ds.rows[r].plane.id() as i64).collect();
        let bins = model.bins(&positions, &indices);
        let memory = tch::no_grad(|| model.memory(&v))?;
        for start in (0..case.rows.len()).step_by(batch) {
            let end = (start + batch).min(case.rows.len());
            let p = Tensor::from_slice(&planes[start..end]).to_device(dev);
            let b = Tensor::from_slice(&bins[start..end]).to_device(dev);
            let emb = tch::no_grad(|| model.read_out_memory(&memory, &p, &b));
            for (t, (name, _)) in dims.iter().enumerate() {
                let e = emb
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, e)| e)
                    .with_context(|| format!("the model has no read-out for target {name}"))?;
                let e = e.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
                outs[t].extend(Vec::<f32>::try_from(e.view([-1]))?);
            }
        }
        for (k, &r) in case.rows.iter().enumerate() {
            rows.push(RowInfo {
                slice_id: ds.rows[r].slice_id.clone(),
                case: ci,
                case_id: case.id.clone(),
                plane: planes[k],
                bin: bins[k],
                position: positions[k],
            });
        }
    }
    let n = rows.len();
    let row_of: Vec<usize> = ds.cases.iter().flat_map(|c| c.rows.iter().copied()).collect();

    if let Some(dir) = &req.dump {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        atomic_write(&dir.join("rows.json"), &serde_json::to_vec_pretty(&rows)?)?;
    }
    let mut targets = Vec::new();
    for (t, (name, width)) in dims.iter().enumerate() {
        let d = *width as usize;
        let table = ds
            .targets
            .iter()
            .find(|x| &x.name == name)
            .context("target table vanished")?;
        let mut y32 = Vec::with_capacity(n * d);
        for &r in &row_of {
            y32.extend_from_slice(&table.data[r * d..(r + 1) * d]);
        }
        let x = metrics::normalized(&outs[t], d);
        let y = metrics::normalized(&y32, d);
        if let Some(dir) = &req.dump {
            npy_f32(&dir.join(format!("x_{name}.npy")), n, d, &x)?;
            npy_f32(&dir.join(format!("y_{name}.npy")), n, d, &y)?;
        }
        let sim = metrics::similarity(&x, &y, d);
        let (matched_cosine, unmatched_cosine) = metrics::pair_cosines(&sim, n);
        targets.push(TargetReport {
            name: name.clone(),
            dim: d,
            retrieval_all: metrics::retrieval(&sim, n, |_, _| true),
            retrieval_same_plane_bin: metrics::retrieval(&sim, n, |i, j| {
                rows[i].case != rows[j].case && rows[i].plane == rows[j].plane && rows[i].bin == rows[j].bin
            }),
            modality_gap: metrics::modality_gap(&x, &y, d),
            matched_cosine,
            unmatched_cosine,
            readout_3d: readout(&x, d, &rows),
            readout_targets: readout(&y, d, &rows),
        });
    }
    let line = targets
        .iter()
        .map(|t| {
            let (a, g) = (&t.retrieval_all, &t.retrieval_same_plane_bin);
            format!(
                "{}: R@1 {:.3} (chance {:.3}), same plane+bin R@1 {:.3} (chance {:.3}, {} queries), gap {:.3}",
                t.name, a.r_at_1, a.chance_r_at_1, g.r_at_1, g.chance_r_at_1, g.queries, t.modality_gap
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let report = Report {
        format: "med3d-alignment-v1".into(),
        run: req.run.clone(),
        checkpoint: ckpt.dir,
        step,
        cache: req.cache.clone(),
        embeddings: tables,
        head: format!("{:?}", cfg.head).to_lowercase(),
        loss: format!("{:?}", cfg.align.loss).to_lowercase(),
        cases: ds.cases.len(),
        slices: n,
        skipped_cases: ds.skipped_cases.clone(),
        targets,
        line: format!(
            "evaluate-alignment: {n} slices of {} cases at step {step}; {line}",
            ds.cases.len()
        ),
    };
    let out = req.out.clone().unwrap_or_else(|| req.run.join("alignment.json"));
    atomic_write(&out, &serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}
