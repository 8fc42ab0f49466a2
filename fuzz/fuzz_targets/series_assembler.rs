//! The DICOM series assembler on slice geometries built from fuzz bytes:
//! mostly a regular stack with per-slice damage (missing or raw attributes,
//! jitter, duplicates, gaps, tilt, mixed orientation, shuffled order), so
//! the search reaches every check. It must never panic, and a stack it
//! accepts must be a permutation of the input with a finite, invertible
//! affine that puts every slice where its header says (within tolerance).
#![no_main]
use libfuzzer_sys::fuzz_target;
use med3dinsight::volume::affine::{apply4, inv_affine};
use med3dinsight::volume::dicom::series::{assemble, normal_of, SliceGeom, Tolerance};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn f64(&mut self) -> f64 {
        let mut a = [0u8; 8];
        for v in a.iter_mut() {
            *v = self.u8();
        }
        f64::from_le_bytes(a)
    }
    /// A small signed number: (-128..=127) * scale.
    fn small(&mut self, scale: f64) -> f64 {
        f64::from(self.u8() as i8) * scale
    }
}

const C: f64 = 0.939_692_620_785_908_4; // cos 20 degrees
const S: f64 = 0.342_020_143_325_668_7;
const ORIENTATIONS: [[f64; 6]; 5] = [
    [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    [1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
    [0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
    [1.0, 0.0, 0.0, 0.0, -1.0, 0.0],
    [1.0, 0.0, 0.0, 0.0, C, S],
];

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let n = usize::from(b.u8() % 25);
    let o = ORIENTATIONS[usize::from(b.u8() % 5)];
    let nrm = normal_of(&o);
    let step = (f64::from(b.u8()) + 1.0) / 16.0;
    let (rows, cols) = (u32::from(b.u8() % 4) + 1, u32::from(b.u8() % 4) + 1);
    let base = [b.small(1.0), b.small(1.0), b.small(1.0)];
    let at = |t: f64| [base[0] + t * nrm[0], base[1] + t * nrm[1], base[2] + t * nrm[2]];
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let mut g = SliceGeom {
            rows,
            cols,
            position: Some(at(i as f64 * step)),
            orientation: Some(o),
            pixel_spacing: Some([0.5, 0.7]),
            slice_thickness: Some(step),
            spacing_between_slices: None,
        };
        match b.u8() % 20 {
            0 => g.position = None,
            1 => g.orientation = None,
            2 => g.pixel_spacing = None,
            3 => g.position = Some([b.f64(), b.f64(), b.f64()]),
            4 => g.orientation = Some([b.f64(), b.f64(), b.f64(), b.f64(), b.f64(), b.f64()]),
            5 => g.pixel_spacing = Some([b.f64(), b.f64()]),
            6 => {
                if let Some(p) = g.position.as_mut() {
                    for v in p.iter_mut() {
                        *v += b.small(0.01);
                    }
                }
            }
            7 => g.position = Some(at(i as f64 * step + b.small(step / 64.0))),
            8 => {
                g.rows = u32::from(b.u8());
                g.cols = u32::from(b.u8());
            }
            9 => g.position = Some(at(f64::from(b.u8()) * step)),
            10 => {
                if let Some(or) = g.orientation.as_mut() {
                    for v in or.iter_mut() {
                        *v += b.small(1e-5);
                    }
                }
            }
            11 => {
                g.slice_thickness = Some(b.f64());
                g.spacing_between_slices = Some(b.f64());
            }
            12 => g.orientation = Some(ORIENTATIONS[usize::from(b.u8() % 5)]),
            13 => g.pixel_spacing = Some([0.5 + b.small(1e-3), 0.7]),
            _ => {}
        }
        slices.push(g);
    }
    for _ in 0..b.u8() % 8 {
        if n > 0 {
            let (i, j) = (usize::from(b.u8()) % n, usize::from(b.u8()) % n);
            slices.swap(i, j);
        }
    }
    let labels: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    let tol = Tolerance::default();
    match assemble(&slices, &labels, &tol) {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(a) => {
            assert_eq!(a.shape, [slices[0].cols as usize, slices[0].rows as usize, n]);
            let mut seen = a.order.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "order is not a permutation");
            assert!(a.affine.iter().flatten().all(|v| v.is_finite()), "{:?}", a.affine);
            assert!(inv_affine(&a.affine).is_some(), "singular affine {:?}", a.affine);
            assert!(a.slice_spacing.is_finite() && a.slice_spacing > 0.0);
            let p = |i: usize| slices[i].position.unwrap_or([f64::NAN; 3]);
            let span = {
                let (f, l) = (p(a.order[0]), p(a.order[n - 1]));
                ((l[0] - f[0]).powi(2) + (l[1] - f[1]).powi(2) + (l[2] - f[2]).powi(2)).sqrt()
            };
            for (z, &i) in a.order.iter().enumerate() {
                let w = apply4(&a.affine, [0.0, 0.0, z as f64]);
                let q = p(i);
                let ras = [-q[0], -q[1], q[2]];
                let mag = q.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                let dev = ((w[0] - ras[0]).powi(2) + (w[1] - ras[1]).powi(2) + (w[2] - ras[2]).powi(2)).sqrt();
                assert!(
                    dev <= 0.06 + 0.02 * span + 1e-9 * mag,
                    "slice {z} is {dev} mm from its header position"
                );
            }
        }
    }
});
