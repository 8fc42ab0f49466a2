//! A small synthetic cache for the pretrain tests, laid out exactly as
//! `med3d preprocess` + `med3d embed` lay theirs out: float16 volumes,
//! `index.jsonl`, `cache.json`, and `embeddings/text.safetensors` (and optionally
//! `image.safetensors`) with rows in index order and a `valid` mask.
//! Target rows depend on the case, the plane and the position, so there is
//! something to align; a few rows are invalid, as uncaptioned slices are.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use med3dinsight::artifacts::cache::{self, Plane};
use med3dinsight::artifacts::embeddings::{self, Table};
use med3dinsight::artifacts::npy::{to_bytes, NpyDtype};
use med3dinsight::preprocess::SliceRow;

/// How the library tests run pretraining: from `cache` into `out`, fresh,
/// without signal handling or overrides.
pub fn options(cache: &Path, out: &Path) -> med3dinsight::train::Options {
    med3dinsight::train::Options {
        cache: cache.to_path_buf(),
        out: out.to_path_buf(),
        resume: false,
        handle_signals: false,
        overrides: Vec::new(),
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_med3d")
}

/// Deterministic pseudo-random numbers in [-1, 1).
fn noise(i: u64) -> f32 {
    let mut z = i.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(0x1234_5678);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

pub struct Fixture {
    pub cases: usize,
    /// SwinUNETR needs sides divisible by 32 and a bottleneck of more
    /// than one voxel, hence 64 x 32 x 32.
    pub shape: [usize; 3],
    pub slices_per_plane: usize,
    pub dim: usize,
    pub image_dim: Option<usize>,
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture {
            cases: 4,
            shape: [64, 32, 32],
            slices_per_plane: 4,
            dim: 16,
            image_dim: None,
        }
    }
}

impl Fixture {
    /// Writes the cache into `dir`; returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let cache = dir.join("cache");
        let [nx, ny, nz] = self.shape;
        let mut rows = Vec::new();
        for c in 0..self.cases {
            let id = format!("case{c}");
            std::fs::create_dir_all(cache::case_dir(&cache, &id)).unwrap();
            // an off-centre ellipsoid whose size and brightness vary by case
            let (cx, cy, cz) = (0.4 + 0.05 * c as f32, 0.5, 0.55 - 0.03 * c as f32);
            let r = 0.25 + 0.03 * c as f32;
            let mut vals = Vec::with_capacity(nx * ny * nz * 2);
            for x in 0..nx {
                for y in 0..ny {
                    for z in 0..nz {
                        let p = |i: usize, n: usize| i as f32 / (n - 1) as f32;
                        let d = ((p(x, nx) - cx) / r).powi(2)
                            + ((p(y, ny) - cy) / (1.2 * r)).powi(2)
                            + ((p(z, nz) - cz) / r).powi(2);
                        let v = if d < 1.0 {
                            0.5 + 0.1 * c as f32 + 0.2 * p(z, nz)
                        } else {
                            0.1 * p(x, nx)
                        };
                        let i = ((c * nx + x) * ny + y) * nz + z;
                        let v = (v + 0.02 * noise(i as u64)).clamp(0.0, 1.0);
                        vals.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
                    }
                }
            }
            std::fs::write(
                cache::image_npy(&cache, &id),
                to_bytes(NpyDtype::F16, &self.shape, &vals),
            )
            .unwrap();
            for plane in Plane::ALL {
                let n = self.shape[plane.axis()];
                for k in 0..self.slices_per_plane {
                    let index = (k + 1) * (n - 1) / (self.slices_per_plane + 1);
                    rows.push(SliceRow {
                        slice_id: format!("{id}/{}/{index}", plane.name()),
                        case: id.clone(),
                        plane,
                        index,
                        position: index as f64 / (n - 1) as f64,
                        png: format!("cases/{id}/slices/{}_{index:03}.png", plane.name()),
                    });
                }
            }
        }
        cache::write_index(&cache, &rows).unwrap();
        let preprocess = cache::PreprocessConfig {
            roi: self.shape,
            slices_per_plane: self.slices_per_plane,
            ..Default::default()
        };
        cache::CacheInfo {
            format: cache::CACHE_FORMAT,
            med3d_version: med3dinsight::VERSION.to_string(),
            config_hash: preprocess.hash(),
            preprocess,
        }
        .write(&cache)
        .unwrap();
        std::fs::create_dir_all(cache::embeddings_dir(&cache)).unwrap();
        let table = |dim: usize, salt: u64| {
            let mut e = Vec::with_capacity(rows.len() * dim);
            let mut valid = Vec::with_capacity(rows.len());
            for (i, r) in rows.iter().enumerate() {
                let case: u64 = r.case.trim_start_matches("case").parse().unwrap();
                let plane = r.plane.id() as u64;
                let mut v: Vec<f32> = (0..dim as u64)
                    .map(|k| {
                        noise(salt + 1000 * plane + k)
                            + (r.position as f32 * 3.0 + k as f32).sin()
                            + 0.5 * noise(salt + 77_777 + 1000 * case + k)
                    })
                    .collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= norm);
                // every seventh row uncaptioned: zeros and invalid
                let ok = i % 7 != 3;
                e.extend(v.into_iter().map(|x| if ok { x } else { 0.0 }));
                valid.push(ok as u8);
            }
            Table {
                dim,
                embeddings: e,
                valid,
                meta: Default::default(),
            }
        };
        embeddings::write(&cache::table_path(&cache, "text"), &table(self.dim, 0)).unwrap();
        if let Some(d) = self.image_dim {
            embeddings::write(&cache::table_path(&cache, "image"), &table(d, 5_000_000)).unwrap();
        }
        cache
    }
}

/// A tiny CPU experiment config around a `pretrain:` body (indented by 2).
pub fn experiment(dir: &Path, pretrain: &str) -> PathBuf {
    let p = dir.join("exp.yaml");
    std::fs::write(
        &p,
        format!(
            "name: t\nmanifest: m.yaml\nworkdir: {}\npretrain:\n{pretrain}",
            dir.join("work").display()
        ),
    )
    .unwrap();
    p
}

/// The smallest SwinUNETR (64 x 32 x 32 input, feature_size 12, one block
/// per stage) and a one-layer PSAT: ~0.3 s of CPU per volume and step.
pub const TINY: &str = "  device: cpu
  threads: 1
  backbone: {feature_size: 12, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], fused_attention: true}
  psat: {layers: 1, heads: 2, queries: 4, bins: 8, dropout: 0.1}
  align: {max_iter: 30}
  batch_size: 2
  sampling: slice
  workers: 2
  prefetch: 2
";

/// Rewrites `path` (a table written by `Fixture::write`) with safetensors
/// metadata, as the embed stage writes its own.
pub fn add_metadata(path: &Path, meta: &[(&str, &str)]) {
    let mut t = embeddings::read(path).unwrap();
    t.meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    embeddings::write(path, &t).unwrap();
}
