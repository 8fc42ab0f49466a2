//! Image preprocessing for the CLIP image towers, reproducing open_clip's
//! eval transform bit for bit: torchvision `Resize(size)` on a PIL image
//! (shortest side to `size`, Pillow's bicubic resampling with its
//! antialiasing support and 8-bit fixed-point rounding), `CenterCrop(size)`,
//! conversion to RGB (a grey slice repeated to three channels), `ToTensor`
//! and `Normalize(mean, std)`.
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// An 8-bit image, channel-planar: `data[c][y * width + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: Vec<Vec<u8>>,
}

/// Decodes an 8-bit PNG (grey, grey+alpha, RGB, RGBA, palette); alpha is
/// dropped as Pillow's `convert("RGB")` / `convert("L")` would.
pub fn read_png(path: &Path) -> Result<Image8> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(f));
    dec.set_transformations(png::Transformations::EXPAND);
    let mut r = dec
        .read_info()
        .with_context(|| format!("{}: not a PNG", path.display()))?;
    let mut buf = vec![0u8; r.output_buffer_size()];
    let info = r
        .next_frame(&mut buf)
        .with_context(|| format!("{}: cannot decode PNG", path.display()))?;
    if info.bit_depth != png::BitDepth::Eight {
        bail!("{}: {:?}-bit PNG; 8-bit images only", path.display(), info.bit_depth);
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let (n, keep) = match info.color_type {
        png::ColorType::Grayscale => (1, 1),
        png::ColorType::GrayscaleAlpha => (2, 1),
        png::ColorType::Rgb => (3, 3),
        png::ColorType::Rgba => (4, 3),
        png::ColorType::Indexed => bail!("{}: palette PNG was not expanded", path.display()),
    };
    let px = &buf[..w * h * n];
    let channels = (0..keep)
        .map(|c| px.iter().skip(c).step_by(n).copied().collect())
        .collect();
    Ok(Image8 {
        width: w,
        height: h,
        channels,
    })
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` (Resample.c) for
/// the bicubic filter: per output pixel, the first input index and
/// fixed-point weights.
fn coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (s - 0.5) as i32
                    } else {
                        (s + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One channel resized like Pillow's `Image.resize(size, BICUBIC)`: a
/// horizontal then a vertical pass, each rounded to 8 bits.
fn resize_channel(src: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let half = 1i64 << (PRECISION_BITS - 1);
    let tmp = if ow != w {
        let cx = coeffs(w, ow);
        let mut t = vec![0u8; ow * h];
        for y in 0..h {
            let row = &src[y * w..(y + 1) * w];
            for (x, (x0, k)) in cx.iter().enumerate() {
                let acc = k
                    .iter()
                    .enumerate()
                    .fold(half, |a, (i, &kv)| a + row[x0 + i] as i64 * kv as i64);
                t[y * ow + x] = clip8(acc);
            }
        }
        t
    } else {
        src.to_vec()
    };
    if oh == h {
        return tmp;
    }
    let cy = coeffs(h, oh);
    let mut out = vec![0u8; ow * oh];
    for (y, (y0, k)) in cy.iter().enumerate() {
        for x in 0..ow {
            let acc = k
                .iter()
                .enumerate()
                .fold(half, |a, (i, &kv)| a + tmp[(y0 + i) * ow + x] as i64 * kv as i64);
            out[y * ow + x] = clip8(acc);
        }
    }
    out
}

pub fn resize(img: &Image8, ow: usize, oh: usize) -> Image8 {
    if ow == img.width && oh == img.height {
        return img.clone();
    }
    Image8 {
        width: ow,
        height: oh,
        channels: img
            .channels
            .iter()
            .map(|c| resize_channel(c, img.width, img.height, ow, oh))
            .collect(),
    }
}

/// Python's `round` (half to even), as torchvision's `center_crop` uses.
fn round_half_even(v: f64) -> i64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - v.signum()) as i64
    } else {
        r as i64
    }
}

/// torchvision `Resize(size)` (shortest side) then `CenterCrop(size)`.
pub fn resize_shortest_and_crop(img: &Image8, size: usize) -> Result<Image8> {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        bail!("empty image");
    }
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((size * long) as f64 / short as f64) as usize;
    let (nw, nh) = if w <= h { (size, new_long) } else { (new_long, size) };
    let r = resize(img, nw, nh);
    let top = round_half_even((nh - size) as f64 / 2.0) as usize;
    let left = round_half_even((nw - size) as f64 / 2.0) as usize;
    let channels = r
        .channels
        .iter()
        .map(|c| {
            (top..top + size)
                .flat_map(|y| c[y * nw + left..y * nw + left + size].iter().copied())
                .collect()
        })
        .collect();
    Ok(Image8 {
        width: size,
        height: size,
        channels,
    })
}

/// The tower's input [3, size, size] in f32: RGB (grey repeated), /255,
/// then (x - mean) / std, in the order and precision torchvision uses.
pub fn to_input(img: &Image8, size: usize, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let sq = resize_shortest_and_crop(img, size)?;
    let planes: Vec<u8> = match sq.channels.len() {
        1 => sq.channels[0].repeat(3),
        3 => sq.channels.concat(),
        n => bail!("{n}-channel image; grey or RGB only"),
    };
    let s = size as i64;
    let x = Tensor::from_slice(&planes).view([3, s, s]).to_kind(Kind::Float) / 255.0;
    let m = Tensor::from_slice(&mean).view([3, 1, 1]);
    let d = Tensor::from_slice(&std).view([3, 1, 1]);
    Ok((x - m) / d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_is_half_to_even() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(2.4), 2);
        assert_eq!(round_half_even(2.6), 3);
    }

    #[test]
    fn constant_image_stays_constant_and_weights_sum_to_one() {
        for (i, o) in [(96, 224), (512, 224), (7, 3), (224, 225)] {
            for (_, k) in coeffs(i, o) {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
        let img = Image8 {
            width: 37,
            height: 50,
            channels: vec![vec![77; 37 * 50]],
        };
        let r = resize_shortest_and_crop(&img, 224).unwrap();
        assert_eq!((r.width, r.height), (224, 224));
        assert!(r.channels[0].iter().all(|&v| v == 77));
    }
}
