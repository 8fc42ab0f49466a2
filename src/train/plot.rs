//! The loss-curve PNG: one panel per loss series (total, then each term),
//! each with its own y range, the raw per-step values in a light colour and
//! an exponential moving average over them in a strong one. Drawn pixel by
//! pixel with a built-in 5x7 bitmap font, so it needs no system fonts: the
//! `plotters` crate was weighed, but its text needs a TrueType font at run
//! time (fontconfig's system fonts, or one bundled into the binary), which
//! the CUDA runtime image and batch nodes do not have.
use std::path::Path;

use anyhow::{Context, Result};

use super::metrics::StepMetrics;

const W: usize = 900;
const PANEL_H: usize = 190;
const LEFT: usize = 84;
const RIGHT: usize = 16;
const TOP: usize = 26;
const BOTTOM: usize = 28;
const SCALE: usize = 2;

/// 5x7 glyphs, one byte per row, bit 4 = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        ' ' => [0; 7],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0, 0, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

type Rgb = [u8; 3];
const INK: Rgb = [40, 40, 40];
const GRID: Rgb = [225, 225, 225];
const FRAME: Rgb = [150, 150, 150];
/// (raw, smoothed) colour of each panel, cycling.
const COLOURS: [(Rgb, Rgb); 4] = [
    ([170, 190, 230], [20, 70, 180]),
    ([240, 190, 150], [200, 90, 10]),
    ([170, 220, 170], [30, 140, 40]),
    ([220, 170, 220], [140, 40, 140]),
];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, thick: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if thick {
                self.set(x, y + 1, c);
                self.set(x + 1, y, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let ox = x + (i * 6 * SCALE) as i64;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for dy in 0..SCALE {
                            for dx in 0..SCALE {
                                self.set(ox + (col * SCALE + dx) as i64, y + (row * SCALE + dy) as i64, c);
                            }
                        }
                    }
                }
            }
        }
    }

    fn text_width(s: &str) -> i64 {
        (s.chars().count() * 6 * SCALE) as i64
    }

    fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().context("png header")?;
        wr.write_image_data(&self.px).context("png data")?;
        wr.finish().context("png end")?;
        Ok(out)
    }
}

/// A short label for an axis value.
pub fn label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

/// (name, points (step, value)) of each panel, in drawing order.
pub fn series(metrics: &[StepMetrics]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut names = vec!["loss".to_string()];
    for m in metrics {
        for k in m.terms.keys() {
            if k.starts_with("loss_") && !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names
        .into_iter()
        .map(|n| {
            let pts = metrics
                .iter()
                .filter_map(|m| {
                    let v = if n == "loss" {
                        m.loss
                    } else {
                        m.terms.get(&n).copied().flatten()
                    };
                    v.filter(|v| v.is_finite()).map(|v| (m.step as f64, v))
                })
                .collect();
            (n, pts)
        })
        .collect()
}

/// Draws the loss curves of `metrics` as a PNG.
pub fn render(metrics: &[StepMetrics]) -> Result<Vec<u8>> {
    let panels = series(metrics);
    let mut c = Canvas::new(W, PANEL_H * panels.len().max(1));
    let max_step = metrics.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;
    for (i, (name, pts)) in panels.iter().enumerate() {
        let top = (i * PANEL_H + TOP) as i64;
        let bottom = ((i + 1) * PANEL_H - BOTTOM) as i64;
        let (left, right) = (LEFT as i64, (W - RIGHT) as i64);
        let (lo, hi) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| (l.min(p.1), h.max(p.1)));
        let (lo, hi) = if !lo.is_finite() {
            (0.0, 1.0)
        } else if hi - lo < 1e-12 * hi.abs().max(1e-12) {
            (lo - 0.5 * lo.abs().max(1e-6), hi + 0.5 * hi.abs().max(1e-6))
        } else {
            let pad = 0.05 * (hi - lo);
            (lo - pad, hi + pad)
        };
        let xpx = |s: f64| left + ((s - 1.0) / (max_step - 1.0).max(1.0) * (right - left) as f64).round() as i64;
        let ypx = |v: f64| bottom - ((v - lo) / (hi - lo) * (bottom - top) as f64).round() as i64;
        for k in 0..=4 {
            let v = lo + (hi - lo) * k as f64 / 4.0;
            let y = ypx(v);
            c.line((left, y), (right, y), GRID, false);
            let l = label(v);
            c.text(left - 6 - Canvas::text_width(&l), y - 7, &l, INK);
        }
        for k in 0..=4 {
            let s = 1.0 + (max_step - 1.0) * k as f64 / 4.0;
            let x = xpx(s);
            c.line((x, bottom), (x, bottom + 4), FRAME, false);
            let l = format!("{}", s.round() as u64);
            let lx = (x - Canvas::text_width(&l) / 2).clamp(0, W as i64 - Canvas::text_width(&l));
            c.text(lx, bottom + 8, &l, INK);
        }
        c.line((left, top), (left, bottom), FRAME, false);
        c.line((left, bottom), (right, bottom), FRAME, false);
        c.line((right, top), (right, bottom), FRAME, false);
        c.line((left, top), (right, top), FRAME, false);
        let (raw, smooth) = COLOURS[i % COLOURS.len()];
        for w in pts.windows(2) {
            c.line((xpx(w[0].0), ypx(w[0].1)), (xpx(w[1].0), ypx(w[1].1)), raw, false);
        }
        let alpha = 2.0 / ((pts.len() as f64 / 25.0).max(1.0) + 1.0);
        let mut ema: Option<f64> = None;
        let mut prev: Option<(i64, i64)> = None;
        for &(s, v) in pts {
            let e = ema.map_or(v, |e| e + alpha * (v - e));
            ema = Some(e);
            let p = (xpx(s), ypx(e));
            if let Some(q) = prev {
                c.line(q, p, smooth, true);
            }
            prev = Some(p);
        }
        let title = match (pts.first(), pts.last()) {
            (Some(f), Some(l)) => format!("{name}  first {}  last {}  (step)", label(f.1), label(l.1)),
            _ => format!("{name}  (no finite values)"),
        };
        c.text(left, top - 20, &title, INK);
    }
    c.png()
}

/// Writes the loss-curve PNG atomically.
pub fn write(metrics: &[StepMetrics], path: &Path) -> Result<()> {
    crate::fsutil::atomic_write(path, &render(metrics)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short_and_round_trip() {
        assert_eq!(label(0.0), "0");
        assert_eq!(label(1234.4), "1234");
        assert_eq!(label(2.5), "2.500");
        assert_eq!(label(0.01234), "0.0123");
        assert_eq!(label(1.5e-5), "1.50e-5");
        for v in [3.2e7, -0.5, 42.0] {
            let back: f64 = label(v).parse().unwrap();
            assert!((back - v).abs() <= 0.01 * v.abs(), "{v} -> {}", label(v));
        }
    }

    #[test]
    fn every_label_character_has_a_glyph() {
        let unknown = glyph('\u{1}');
        for ch in "0123456789.-+e_abcdefghijklmnopqrstuvwxyz():/".chars() {
            assert_ne!(glyph(ch), unknown, "{ch}");
        }
    }
}
