//! 2D slices cut from the processed volume: where they are taken (spread
//! over the foreground extent along each plane's axis) and how they are
//! drawn (8-bit greyscale PNG, radiological view, no metadata chunks).
//!
//! View convention, with the volume in RAS: axial slices show anterior up
//! and the patient's right on the image's left; coronal show superior up,
//! right on the left; sagittal show superior up, anterior on the left.
use anyhow::{Context, Result};
use ndarray::{Array2, Array3, Axis};

use crate::artifacts::cache::Plane;

/// Positions along an axis of length `n` for `count` slices spread evenly
/// over [lo, hi) (the foreground extent): the centres of `count` equal bins,
/// duplicates removed when the extent is shorter than `count`.
pub fn positions(lo: usize, hi: usize, count: usize) -> Vec<usize> {
    let len = hi.saturating_sub(lo);
    if len == 0 || count == 0 {
        return Vec::new();
    }
    let mut v: Vec<usize> = (0..count).map(|k| lo + ((2 * k + 1) * len) / (2 * count)).collect();
    v.dedup();
    v
}

/// Normalised position of index `i` along an axis of `n` voxels, in [0, 1].
pub fn normalised(i: usize, n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        i as f64 / (n - 1) as f64
    }
}

/// The 2D image of slice `index` on `plane`, oriented for display, with
/// values in [0, 1].
pub fn view(vol: &Array3<f32>, plane: Plane, index: usize) -> Array2<f32> {
    let s = vol.index_axis(Axis(plane.axis()), index);
    // s is 2D over the two remaining RAS axes, in increasing axis order.
    let (rows, cols) = (s.shape()[0], s.shape()[1]);
    // axial s = [x, y]: image rows run y descending (anterior up), columns x
    // descending (RAS x grows to the patient's right, shown on the left);
    // coronal s = [x, z] and sagittal s = [y, z] follow the same rule.
    Array2::from_shape_fn((cols, rows), |(r, c)| s[[rows - 1 - c, cols - 1 - r]])
}

/// 8-bit greyscale PNG bytes (IHDR, IDAT, IEND only).
pub fn png_bytes(img: &Array2<f32>) -> Result<Vec<u8>> {
    let (h, w) = (img.shape()[0], img.shape()[1]);
    let pixels: Vec<u8> = img.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Default);
        let mut wr = enc.write_header().context("cannot start PNG")?;
        wr.write_image_data(&pixels).context("cannot encode PNG")?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_cover_the_extent_evenly() {
        assert_eq!(positions(10, 20, 5), vec![11, 13, 15, 17, 19]);
        assert_eq!(positions(0, 2, 4), vec![0, 1]);
        assert!(positions(3, 3, 4).is_empty());
    }

    #[test]
    fn axial_view_is_radiological() {
        // value encodes (x, y); axial slice at z = 0
        let v = Array3::from_shape_fn((3, 2, 1), |(x, y, _)| (10 * x + y) as f32);
        let img = view(&v, Plane::Axial, 0);
        assert_eq!(img.shape(), &[2, 3]);
        // top-left: most anterior (y = 1) and most rightward (x = 2)
        assert_eq!(img[[0, 0]], 21.0);
        assert_eq!(img[[1, 2]], 0.0);
    }
}
