//! Labelled cases from a preprocess cache (`cases/<id>/image.npy` float16,
//! `label.npy` uint8, `case.json` with the class and spacing), the seeded
//! train / held-out split, and the training samples: random patches centred
//! on foreground or background voxels (as MONAI's RandCropByPosNegLabeld),
//! or the whole volume resized for classification, with random elastic
//! deformation (image and label through the same field), flips and
//! intensity scale / shift.
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};

use super::config::{DownstreamConfig, Task};
use crate::artifacts::{cache, npy};
use crate::runtime::rng::{Rng, STREAM_FT_AUGMENT, STREAM_FT_ORDER, STREAM_FT_SPLIT};

/// One cached case, read into memory.
#[derive(Debug)]
pub struct LabelledCase {
    pub id: String,
    pub shape: [usize; 3],
    /// mm per voxel along each array axis.
    pub spacing: [f64; 3],
    pub image: Vec<f32>,
    /// Segmentation label map (same shape), when the case has one.
    pub label: Option<Vec<u8>>,
    pub class: Option<i64>,
}

impl LabelledCase {
    pub fn image_tensor(&self) -> Tensor {
        let s = self.shape.map(|v| v as i64);
        Tensor::from_slice(&self.image).view([1, 1, s[0], s[1], s[2]])
    }
}

/// Ids of the committed cases of `cache`, sorted.
pub fn case_ids(cache: &Path) -> Result<Vec<String>> {
    let dir = cache::cases_dir(cache);
    let mut ids = Vec::new();
    for e in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {} (is it a preprocess cache?)", dir.display()))?
    {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        if e.path().join(cache::CASE_JSON).is_file() {
            ids.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    ids.sort();
    Ok(ids)
}

/// Whether case `id` carries what `task` trains on (a label map, or a
/// class); other cases of a mixed cache are left out, not failed.
pub fn is_labelled(cache: &Path, id: &str, task: Task) -> bool {
    match cache::read_case_record(cache, id) {
        Some(rec) => match task {
            Task::Segmentation => rec.label.is_some(),
            Task::Classification => rec.class.is_some(),
        },
        // Unreadable: let read_case report why.
        None => true,
    }
}

/// Ids of the cases of `cache` labelled for `task`, sorted, and how many
/// others there were.
pub fn labelled_ids(cache: &Path, task: Task) -> Result<(Vec<String>, usize)> {
    let all = case_ids(cache)?;
    let n = all.len();
    let ids: Vec<String> = all.into_iter().filter(|id| is_labelled(cache, id, task)).collect();
    let others = n - ids.len();
    Ok((ids, others))
}

/// Reads case `id`, requiring what `task` needs (a label map, or a class
/// in 0..num_classes).
pub fn read_case(cache: &Path, id: &str, task: Task, num_classes: i64) -> Result<LabelledCase> {
    let dir = cache::case_dir(cache, id);
    let rec =
        cache::read_case_record(cache, id).with_context(|| format!("{}: no readable case.json", dir.display()))?;
    let (image, shape) = npy::read_volume(&cache::image_npy(cache, id))?;
    let label = match task {
        Task::Classification => None,
        Task::Segmentation => {
            let path = cache::label_npy(cache, id);
            ensure!(
                path.is_file(),
                "case {id}: no label.npy in {} (segmentation needs a `label:` in the manifest)",
                dir.display()
            );
            let data = npy::read_label(&path, shape)?;
            if let Some(&bad) = data.iter().find(|&&v| v as i64 >= num_classes) {
                bail!(
                    "{}: label value {bad} is not below downstream.num_classes = {num_classes}",
                    path.display()
                );
            }
            Some(data)
        }
    };
    if task == Task::Classification {
        match rec.class {
            Some(c) if (0..num_classes).contains(&c) => {}
            Some(c) => bail!("case {id}: class {c} is not in 0..{num_classes} (downstream.num_classes)"),
            None => bail!("case {id}: no `class:` in the manifest (classification needs one per case)"),
        }
    }
    Ok(LabelledCase {
        id: id.to_string(),
        shape,
        spacing: rec.geometry.spacing,
        image,
        label,
        class: rec.class,
    })
}

/// Splits sorted ids into (train, held out) by a seeded shuffle.
pub fn split(ids: &[String], val_fraction: f64, seed: u64) -> (Vec<String>, Vec<String>) {
    let n_val = (ids.len() as f64 * val_fraction).ceil() as usize;
    let n_val = n_val.min(ids.len().saturating_sub(1));
    let perm = Rng::new(seed, STREAM_FT_SPLIT, 0).permutation(ids.len());
    let mut val: Vec<String> = perm[..n_val].iter().map(|&i| ids[i as usize].clone()).collect();
    let mut train: Vec<String> = perm[n_val..].iter().map(|&i| ids[i as usize].clone()).collect();
    train.sort();
    val.sort();
    (train, val)
}

/// One training batch: images [b, 1, ...] and targets (labels [b, 1, ...]
/// int64 for segmentation, classes [b] int64 for classification).
pub struct Batch {
    pub images: Tensor,
    pub targets: Tensor,
}

/// Draws batch `step` (a pure function of seed, step and the cases): the
/// cases in a seeded order, each once per epoch.
pub fn batch(cases: &[LabelledCase], cfg: &DownstreamConfig, step: u64) -> Result<Batch> {
    ensure!(!cases.is_empty(), "no training cases");
    let mut rng = Rng::new(cfg.seed, STREAM_FT_AUGMENT, step);
    let mut images = Vec::with_capacity(cfg.batch_size);
    let mut targets = Vec::with_capacity(cfg.batch_size);
    let n = cases.len() as u64;
    for i in 0..cfg.batch_size as u64 {
        // Every case once per epoch, in a seeded order.
        let k = step * cfg.batch_size as u64 + i;
        let perm = Rng::new(cfg.seed, STREAM_FT_ORDER, k / n).permutation(cases.len());
        let case = &cases[perm[(k % n) as usize] as usize];
        let (img, tgt) = match cfg.task {
            Task::Segmentation => {
                let (img, lab) = patch(case, cfg.patch_size, cfg.pos_fraction, &mut rng)?;
                (img, lab)
            }
            Task::Classification => {
                let img = resize(&case.image_tensor(), cfg.patch_size);
                let class = case.class.context("classification case without a class")?;
                (img, Tensor::from_slice(&[class]))
            }
        };
        let (img, tgt) = augment(img, tgt, cfg, &mut rng);
        images.push(img);
        targets.push(tgt);
    }
    Ok(Batch {
        images: Tensor::cat(&images, 0),
        targets: Tensor::cat(&targets, 0),
    })
}

/// Trilinear resize of [1, 1, ...] to `size` (align_corners=False).
pub fn resize(x: &Tensor, size: [i64; 3]) -> Tensor {
    if x.size()[2..] == size[..] {
        return x.shallow_clone();
    }
    x.upsample_trilinear3d(size, false, None, None, None)
}

/// A random patch of `size` (image [1, 1, ...] float, label [1, 1, ...]
/// int64), centred on a foreground voxel with probability `pos`, else on a
/// background voxel; volumes smaller than the patch are zero-padded
/// symmetrically first (MONAI SpatialPad).
fn patch(case: &LabelledCase, size: [i64; 3], pos: f64, rng: &mut Rng) -> Result<(Tensor, Tensor)> {
    let label = case.label.as_ref().context("segmentation case without a label map")?;
    let s = case.shape.map(|v| v as i64);
    let lab = Tensor::from_slice(label).view([1, 1, s[0], s[1], s[2]]);
    let pads: Vec<(i64, i64)> = (0..3)
        .map(|d| {
            let diff = (size[d] - s[d]).max(0);
            (diff / 2, diff - diff / 2)
        })
        .collect();
    let pad = [pads[2].0, pads[2].1, pads[1].0, pads[1].1, pads[0].0, pads[0].1];
    let img = case.image_tensor().constant_pad_nd(pad);
    let lab = lab.constant_pad_nd(pad);
    let full = [s[0].max(size[0]), s[1].max(size[1]), s[2].max(size[2])];
    let want_fg = rng.uniform() < pos;
    // Pick the k-th voxel of the wanted kind (in the unpadded volume).
    let n_fg = label.iter().filter(|&&v| v > 0).count();
    let n_kind = if want_fg { n_fg } else { label.len() - n_fg };
    let centre = if n_kind == 0 {
        [s[0] / 2, s[1] / 2, s[2] / 2]
    } else {
        let k = rng.below(n_kind as u64) as usize;
        let i = label
            .iter()
            .enumerate()
            .filter(|(_, &v)| (v > 0) == want_fg)
            .nth(k)
            .map(|(i, _)| i)
            .unwrap_or(0);
        let (y_z, z) = (i / case.shape[2], i % case.shape[2]);
        [(y_z / case.shape[1]) as i64, (y_z % case.shape[1]) as i64, z as i64]
    };
    let start: Vec<i64> = (0..3)
        .map(|d| (centre[d] + pads[d].0 - size[d] / 2).clamp(0, full[d] - size[d]))
        .collect();
    let crop = |t: &Tensor| {
        t.narrow(2, start[0], size[0])
            .narrow(3, start[1], size[1])
            .narrow(4, start[2], size[2])
            .contiguous()
    };
    Ok((crop(&img), crop(&lab).to_kind(Kind::Int64)))
}

fn augment(img: Tensor, tgt: Tensor, cfg: &DownstreamConfig, rng: &mut Rng) -> (Tensor, Tensor) {
    let a = &cfg.augment;
    let (mut img, mut tgt) = (img, tgt);
    if a.elastic_prob > 0.0 && rng.uniform() < a.elastic_prob {
        let field = displacement(&img.size()[2..], a.elastic_points, a.elastic_magnitude, rng);
        img = warp(&img, &field, Sampling::Linear);
        if cfg.task == Task::Segmentation {
            tgt = warp(&tgt.to_kind(Kind::Float), &field, Sampling::Nearest).to_kind(Kind::Int64);
        }
    }
    for axis in 2..5i64 {
        if rng.uniform() < a.flip_prob {
            img = img.flip([axis]);
            if cfg.task == Task::Segmentation {
                tgt = tgt.flip([axis]);
            }
        }
    }
    let scale = 1.0 + a.intensity_scale * (2.0 * rng.uniform() - 1.0);
    let shift = a.intensity_shift * (2.0 * rng.uniform() - 1.0);
    if a.intensity_scale > 0.0 || a.intensity_shift > 0.0 {
        img = img * scale + shift;
    }
    (img, tgt)
}

#[derive(Clone, Copy)]
enum Sampling {
    Linear,
    Nearest,
}

/// A sampling grid [1, x, y, z, 3] (grid_sample's normalised coordinates,
/// align_corners) displaced by a smooth random field of up to `magnitude`
/// voxels: uniform draws on `points`^3 control points, trilinearly upsampled.
fn displacement(size: &[i64], points: i64, magnitude: f64, rng: &mut Rng) -> Tensor {
    let n = (3 * points * points * points) as usize;
    let draws: Vec<f32> = (0..n)
        .map(|_| ((2.0 * rng.uniform() - 1.0) * magnitude) as f32)
        .collect();
    let coarse = Tensor::from_slice(&draws).view([1, 3, points, points, points]);
    let field = coarse.upsample_trilinear3d(size, true, None, None, None);
    // Grid component c moves along array axis 2 - c (x, y, z = last .. first).
    let scale: Vec<f32> = (0..3).map(|c| 2.0 / (size[2 - c] - 1).max(1) as f32).collect();
    let field = field.permute([0, 2, 3, 4, 1]) * Tensor::from_slice(&scale);
    let theta = Tensor::from_slice(&[1.0f32, 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0.]).view([1, 3, 4]);
    let identity = Tensor::affine_grid_generator(&theta, [1, 1, size[0], size[1], size[2]], true);
    identity + field
}

/// Samples [1, 1, ...] at `grid`, zero outside.
fn warp(t: &Tensor, grid: &Tensor, mode: Sampling) -> Tensor {
    let mode = match mode {
        Sampling::Linear => 0,
        Sampling::Nearest => 1,
    };
    t.grid_sampler(grid, mode, 0, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_disjoint_and_keeps_a_training_case() {
        let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let (t, v) = split(&ids, 0.25, 3);
        assert_eq!((t.len(), v.len()), (7, 3));
        assert!(v.iter().all(|x| !t.contains(x)));
        assert_eq!(split(&ids, 0.25, 3), (t.clone(), v.clone()));
        assert_ne!(split(&ids, 0.25, 4).1, v);
        assert_eq!(split(&ids[..1], 0.5, 3), (vec!["c0".to_string()], vec![]));
    }

    #[test]
    fn elastic_moves_image_and_label_together() {
        let s = 24i64;
        let lab: Vec<f32> = (0..s * s * s)
            .map(|i| {
                let (x, y, z) = (i / (s * s), (i / s) % s, i % s);
                ((x - 12).pow(2) + (y - 10).pow(2) + (z - 13).pow(2) < 49) as i32 as f32
            })
            .collect();
        let lab = Tensor::from_slice(&lab).view([1, 1, s, s, s]);
        let still = displacement(&[s, s, s], 4, 0.0, &mut Rng::new(0, 0, 0));
        assert!(warp(&lab, &still, Sampling::Nearest).equal(&lab));
        assert!(
            (warp(&lab, &still, Sampling::Linear) - &lab)
                .abs()
                .max()
                .double_value(&[])
                < 1e-5
        );
        let field = displacement(&[s, s, s], 4, 3.0, &mut Rng::new(0, 0, 1));
        let moved = warp(&lab, &field, Sampling::Nearest);
        let smooth = warp(&lab, &field, Sampling::Linear).gt(0.5).to_kind(Kind::Float);
        let dice = |a: &Tensor, b: &Tensor| {
            2.0 * (a * b).sum(Kind::Float).double_value(&[])
                / (a.sum(Kind::Float) + b.sum(Kind::Float)).double_value(&[])
        };
        let (together, apart) = (dice(&moved, &smooth), dice(&moved, &lab));
        assert!(
            together > 0.95 && apart < 0.9,
            "same field {together}, unwarped {apart}"
        );
        let values = Vec::<f32>::try_from(&moved.flatten(0, -1)).unwrap();
        assert!(values.iter().all(|&v| v == 0.0 || v == 1.0));
    }
}
