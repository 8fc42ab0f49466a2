//! Sliding-window inference with MONAI's `sliding_window_inference`
//! semantics: windows of `roi` every `roi * (1 - overlap)` voxels (the last
//! one flush with the border), the image zero-padded symmetrically where it
//! is smaller than the window and cropped back after, and window outputs
//! blended with a constant or Gaussian importance map (sigma = 0.125 x roi
//! by default, floored at max(min, 1e-3)).
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blend {
    Constant,
    Gaussian,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlidingWindow {
    /// Window size; absent: the training patch size.
    pub roi: Option<[i64; 3]>,
    /// Windows run through the network at once.
    pub sw_batch_size: usize,
    /// Fraction of a window shared with its neighbour, in [0, 1).
    pub overlap: f64,
    pub mode: Blend,
    pub sigma_scale: f64,
}

impl Default for SlidingWindow {
    fn default() -> Self {
        SlidingWindow {
            roi: None,
            sw_batch_size: 1,
            overlap: 0.5,
            mode: Blend::Gaussian,
            sigma_scale: 0.125,
        }
    }
}

impl SlidingWindow {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..1.0).contains(&self.overlap),
            "sliding_window.overlap must be in [0, 1), got {}",
            self.overlap
        );
        ensure!(
            self.sw_batch_size >= 1,
            "sliding_window.sw_batch_size must be at least 1"
        );
        ensure!(
            self.sigma_scale > 0.0,
            "sliding_window.sigma_scale must be positive, got {}",
            self.sigma_scale
        );
        if let Some(r) = self.roi {
            ensure!(
                r.iter().all(|&s| s > 0),
                "sliding_window.roi must be positive, got {r:?}"
            );
        }
        Ok(())
    }
}

/// Window start offsets along one axis (MONAI's `dense_patch_slices`).
pub fn starts(image: i64, roi: i64, overlap: f64) -> Vec<i64> {
    let interval = if roi == image {
        roi
    } else {
        ((roi as f64 * (1.0 - overlap)) as i64).max(1)
    };
    let num = (image as f64 / interval as f64).ceil() as i64;
    let count = (0..num)
        .find(|d| d * interval + roi >= image)
        .map(|d| d + 1)
        .unwrap_or(1);
    (0..count)
        .map(|i| {
            let s = i * interval;
            s - (s + roi - image).max(0)
        })
        .collect()
}

/// The blending weights of one window, [x, y, z] float32.
pub fn importance_map(roi: [i64; 3], mode: Blend, sigma_scale: f64) -> Tensor {
    match mode {
        Blend::Constant => Tensor::ones(roi, (Kind::Float, tch::Device::Cpu)),
        Blend::Gaussian => {
            let axes: Vec<Tensor> = roi
                .iter()
                .map(|&n| {
                    let sigma = n as f64 * sigma_scale;
                    let half = (n - 1) as f64 / 2.0;
                    let x: Vec<f32> = (0..n).map(|i| (i as f64 - half) as f32).collect();
                    let x = Tensor::from_slice(&x);
                    (&x * &x / (-2.0 * sigma * sigma)).exp()
                })
                .collect();
            let m = axes[0].view([-1, 1, 1]) * axes[1].view([1, -1, 1]) * axes[2].view([1, 1, -1]);
            let floor = m.min().double_value(&[]).max(1e-3);
            m.clamp_min(floor)
        }
    }
}

/// Runs `f` over windows of `input` [1, c, x, y, z] and blends the outputs
/// (each [n, c_out, roi...]) into one [1, c_out, x, y, z] float32 tensor.
pub fn infer(
    input: &Tensor,
    sw: &SlidingWindow,
    roi: [i64; 3],
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let shape = input.size();
    ensure!(
        shape.len() == 5 && shape[0] == 1,
        "sliding-window inference takes one [1, c, x, y, z] image, got {shape:?}"
    );
    let orig = [shape[2], shape[3], shape[4]];
    // Pad where the image is smaller than the window (half before, rest after).
    let pads: Vec<(i64, i64)> = (0..3)
        .map(|d| {
            let diff = (roi[d] - orig[d]).max(0);
            (diff / 2, diff - diff / 2)
        })
        .collect();
    let input = if pads.iter().any(|&(a, b)| a > 0 || b > 0) {
        input.constant_pad_nd([pads[2].0, pads[2].1, pads[1].0, pads[1].1, pads[0].0, pads[0].1])
    } else {
        input.shallow_clone()
    };
    let size = [orig[0].max(roi[0]), orig[1].max(roi[1]), orig[2].max(roi[2])];
    let s: Vec<Vec<i64>> = (0..3).map(|d| starts(size[d], roi[d], sw.overlap)).collect();
    let mut windows = Vec::new();
    for &a in &s[0] {
        for &b in &s[1] {
            for &c in &s[2] {
                windows.push([a, b, c]);
            }
        }
    }
    let device = input.device();
    let weight = importance_map(roi, sw.mode, sw.sigma_scale).to_device(device);
    let mut acc: Option<Tensor> = None;
    let count = Tensor::zeros(size, (Kind::Float, device));
    for chunk in windows.chunks(sw.sw_batch_size) {
        let crops: Vec<Tensor> = chunk
            .iter()
            .map(|w| {
                input
                    .narrow(2, w[0], roi[0])
                    .narrow(3, w[1], roi[1])
                    .narrow(4, w[2], roi[2])
            })
            .collect();
        let out = f(&Tensor::cat(&crops, 0))?.to_kind(Kind::Float);
        let os = out.size();
        ensure!(
            os.len() == 5 && os[0] == chunk.len() as i64 && os[2..] == roi[..],
            "the window function returned {os:?} for {} windows of {roi:?}",
            chunk.len()
        );
        let acc =
            acc.get_or_insert_with(|| Tensor::zeros([1, os[1], size[0], size[1], size[2]], (Kind::Float, device)));
        for (i, w) in chunk.iter().enumerate() {
            let mut dst = acc
                .narrow(2, w[0], roi[0])
                .narrow(3, w[1], roi[1])
                .narrow(4, w[2], roi[2]);
            let _ = dst.g_add_(&(out.narrow(0, i as i64, 1) * &weight));
            let mut cnt = count
                .narrow(0, w[0], roi[0])
                .narrow(1, w[1], roi[1])
                .narrow(2, w[2], roi[2]);
            let _ = cnt.g_add_(&weight);
        }
    }
    let Some(acc) = acc else {
        anyhow::bail!("no window fits an image of {orig:?}");
    };
    let blended = acc / count.unsqueeze(0).unsqueeze(0);
    Ok(blended
        .narrow(2, pads[0].0, orig[0])
        .narrow(3, pads[1].0, orig[1])
        .narrow(4, pads[2].0, orig[2]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_match_dense_patch_slices() {
        assert_eq!(starts(48, 32, 0.5), vec![0, 16]);
        assert_eq!(starts(50, 32, 0.25), vec![0, 18]);
        assert_eq!(starts(32, 32, 0.5), vec![0]);
        assert_eq!(starts(100, 32, 0.0), vec![0, 32, 64, 68]);
    }
}
