//! A small synthetic cache for the pretrain tests, laid out exactly as
//! `med3d preprocess` + `med3d embed` lay theirs out: float16 volumes,
//! `index.jsonl`, and `embeddings/text.safetensors` (and optionally
//! `image.safetensors`) with rows in index order and a `valid` mask.
//! Target rows depend on the case, the plane and the position, so there is
//! something to align; a few rows are invalid, as uncaptioned slices are.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use med3dinsight::artifacts::cache::Plane;
use med3dinsight::artifacts::npy::{to_bytes, NpyDtype};
use med3dinsight::preprocess::SliceRow;

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
            let cdir = cache.join("cases").join(&id);
            std::fs::create_dir_all(&cdir).unwrap();
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
            std::fs::write(cdir.join("image.npy"), to_bytes(NpyDtype::F16, &self.shape, &vals)).unwrap();
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
        let index: String = rows.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        std::fs::write(cache.join("index.jsonl"), index).unwrap();
        let emb = cache.join("embeddings");
        std::fs::create_dir_all(&emb).unwrap();
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
            let n = rows.len() as i64;
            [
                ("embeddings", tch::Tensor::from_slice(&e).view([n, dim as i64])),
                ("valid", tch::Tensor::from_slice(&valid)),
            ]
        };
        tch::Tensor::write_safetensors(&table(self.dim, 0), emb.join("text.safetensors")).unwrap();
        if let Some(d) = self.image_dim {
            tch::Tensor::write_safetensors(&table(d, 5_000_000), emb.join("image.safetensors")).unwrap();
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
    let t = tch::Tensor::read_safetensors(path).unwrap();
    let get = |n: &str| t.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let (emb, valid) = (get("embeddings"), get("valid"));
    let e: Vec<f32> = Vec::try_from(emb.flatten(0, -1)).unwrap();
    let v: Vec<u8> = Vec::try_from(&valid).unwrap();
    let mut data: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
    let elen = data.len();
    data.extend_from_slice(&v);
    let m: serde_json::Map<String, serde_json::Value> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let header = serde_json::json!({
        "__metadata__": m,
        "embeddings": {"dtype": "F32", "shape": emb.size(), "data_offsets": [0, elen]},
        "valid": {"dtype": "U8", "shape": valid.size(), "data_offsets": [elen, data.len()]},
    });
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}
