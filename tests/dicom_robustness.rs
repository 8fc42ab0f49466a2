//! Bounded, deterministic versions of the fuzz targets in fuzz/, so that
//! `cargo test` (stable, no libFuzzer) keeps checking that no input panics:
//! random slice geometries through the series assembler, and mutated real
//! DICOM files (pydicom's test files, from the project's venv) through
//! parsing, the header whitelist, assembly and pixel decoding.
use std::path::{Path, PathBuf};

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use med3dinsight::fuzz;
use med3dinsight::volume::affine::{apply4, inv_affine};

#[path = "common/mutate.rs"]
mod mutate;
use med3dinsight::volume::dicom::{header, series};
use mutate::{mutate, Rng};

/// The system allocator, noting the largest single request each thread makes,
/// so that a test can say what reading one input asked for at most.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(n: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(n)));
}

/// The largest request on this thread since the last call.
fn take_largest() -> usize {
    LARGEST.with(|l| l.replace(0))
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n);
        System.realloc(p, l, n)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// What reading an input of `len` bytes may ask for in one allocation: a
/// small multiple of the input (PackBits expands 64x at most) plus the
/// decoded frame `exercise` allows (1 MiB of samples, as f32), and some room
/// for fixed buffers.
fn allowed(len: usize) -> usize {
    64 * len + (8 << 20)
}

#[test]
fn assembler_never_panics_and_what_it_accepts_is_consistent() {
    let orientations = [
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        [1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
        [0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
        [1.0, 0.0, 0.0, 0.0, -1.0, 0.0],
        [1.0, 0.0, 0.0, 0.0, 20f64.to_radians().cos(), 20f64.to_radians().sin()],
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for _ in 0..30_000 {
        let n = rng.below(12) as usize;
        let o = orientations[rng.below(5) as usize];
        let nrm = series::normal_of(&o);
        let step = 0.1 + 5.0 * rng.unit();
        let at = |t: f64| [3.0 + t * nrm[0], -2.0 + t * nrm[1], 7.0 + t * nrm[2]];
        let mut slices: Vec<series::SliceGeom> = (0..n)
            .map(|i| series::SliceGeom {
                rows: 3,
                cols: 2,
                position: Some(at(i as f64 * step)),
                orientation: Some(o),
                pixel_spacing: Some([0.5, 0.7]),
                slice_thickness: Some(step),
                spacing_between_slices: None,
            })
            .collect();
        // damage a few slices at random
        for _ in 0..rng.below(3) {
            if n == 0 {
                break;
            }
            let g = &mut slices[rng.below(n as u64) as usize];
            match rng.below(9) {
                0 => g.position = None,
                1 => g.orientation = None,
                2 => g.position = Some([rng.any_f64(), rng.any_f64(), rng.any_f64()]),
                3 => g.orientation = Some([0.0; 6].map(|_| rng.any_f64())),
                4 => g.pixel_spacing = Some([rng.any_f64(), rng.any_f64()]),
                5 => g.position = Some(at(rng.below(20) as f64 * step)),
                6 => g.rows = rng.below(5) as u32,
                7 => {
                    let p = g.position.unwrap_or([0.0; 3]);
                    g.position = Some([p[0] + 0.3 * rng.unit(), p[1], p[2]]);
                }
                _ => g.slice_thickness = Some(rng.any_f64()),
            }
        }
        for i in (1..n).rev() {
            slices.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let labels: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let Ok(a) = series::assemble(&slices, &labels, &series::Tolerance::default()) else {
            continue;
        };
        accepted += 1;
        let mut seen = a.order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        assert!(inv_affine(&a.affine).is_some());
        for (z, &i) in a.order.iter().enumerate() {
            let q = slices[i].position.unwrap();
            let w = apply4(&a.affine, [0.0, 0.0, z as f64]);
            let dev = ((w[0] + q[0]).powi(2) + (w[1] + q[1]).powi(2) + (w[2] - q[2]).powi(2)).sqrt();
            // within what the tolerances allow: the in-plane offset, and
            // per-step deviations of max(1% of the step, 0.11 mm)
            let tol = series::Tolerance::default();
            let per_step = (tol.spacing_rel * step).max(tol.spacing_abs) + 0.01 * step;
            assert!(
                dev < tol.shear_abs + 0.01 + per_step * n as f64,
                "slice {z}: {dev} mm off"
            );
        }
    }
    // the generator must reach the accepting path often, or this tests nothing
    assert!(accepted > 3_000, "only {accepted} stacks accepted");
}

fn pydicom_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&root) else { return out };
    for py in rd.flatten() {
        let site = py.path().join("site-packages");
        for (dir, names) in [
            (
                "pydicom/data/test_files",
                &[
                    "CT_small.dcm",
                    "MR_small_RLE.dcm",
                    "MR_small_jp2klossless.dcm",
                    "MR_small_bigendian.dcm",
                    "JPGLosslessP14SV1_1s_1f_8b.dcm",
                ][..],
            ),
            ("data_store/data", &["eCT_Supplemental.dcm", "emri_small_RLE.dcm"][..]),
        ] {
            for n in names {
                let p = site.join(dir).join(n);
                if p.exists() {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// What the `dicom_file` fuzz target does with one input (the same body).
fn exercise(bytes: &[u8]) {
    fuzz::dicom_file(bytes, cfg!(not(debug_assertions)));
}

#[test]
fn mutated_dicom_files_never_panic() {
    let files = pydicom_files();
    if files.is_empty() {
        eprintln!("skipped: no pydicom test files in .venv (run `make setup`)");
        return;
    }
    let mut rng = Rng(0xd1b5_4a32_d192_ed03);
    let mut images = 0;
    for f in &files {
        let orig = std::fs::read(f).unwrap();
        exercise(&orig);
        for _ in 0..150 {
            let b = mutate(&mut rng, &orig);
            take_largest();
            if let header::ScanOutcome::Image(_) = header::scan_bytes(Path::new("m"), &b) {
                images += 1;
            }
            exercise(&b);
            let asked = take_largest();
            assert!(
                asked <= allowed(b.len()),
                "a mutant of {} ({} bytes) asked for {asked} bytes in one allocation",
                f.display(),
                b.len()
            );
        }
    }
    assert!(
        images > 100,
        "mutations rarely parse ({images}): the test reaches little"
    );
}

/// Inputs the `dicom_file` fuzz target crashed on, kept so they stay fixed.
#[test]
fn fuzz_crashes_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom_fuzz");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let bytes = std::fs::read(e.path()).unwrap();
        // The OOM inputs declare lengths that upstream dicom-rs reserved
        // (gigabytes) before reading: now the read fails when the bytes run
        // out, and no allocation grows past what the file holds.
        take_largest();
        let outcome = header::scan_bytes(Path::new("oom.dcm"), &bytes);
        exercise(&bytes);
        let asked = take_largest();
        assert!(
            asked <= allowed(bytes.len()),
            "{} ({} bytes) asked for {asked} bytes in one allocation",
            e.path().display(),
            bytes.len()
        );
        // Most are refused as broken; one (a meta group whose length counts
        // a data-set element) is a readable header once nothing is
        // over-reserved, and goes on through `exercise` like any image.
        if let header::ScanOutcome::Broken(why) = &outcome {
            assert!(!why.is_empty(), "{}", e.path().display());
        }
        n += 1;
    }
    assert!(n > 0);
}

/// The scan's `pixel_offset`: found for native little-endian files (single
/// and multi-frame, explicit and implicit VR, padded), not for big-endian or encapsulated ones; and every frame read
/// from the file's bytes there equals, bit for bit, the frame decoded from
/// dicom-rs's parse of the file.
#[test]
fn native_frames_read_at_the_scanned_offset_equal_dicom_rs_decode() {
    use med3dinsight::volume::dicom::header::{open_full, scan_file, ScanOutcome};
    use med3dinsight::volume::dicom::native::decode_frame_at;
    use med3dinsight::volume::dicom::pixels::decode_frame_into;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let site = std::fs::read_dir(&root)
        .expect(".venv (make setup)")
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.join("pydicom").exists())
        .expect("pydicom in .venv");
    let t = site.join("pydicom/data/test_files");
    let d = site.join("data_store/data");
    let cases: &[(PathBuf, bool)] = &[
        (t.join("CT_small.dcm"), true),
        (t.join("MR_small.dcm"), true),
        (t.join("MR_small_implicit.dcm"), true),
        (t.join("MR_small_padded.dcm"), true),
        (t.join("rtdose.dcm"), true),
        (d.join("emri_small.dcm"), true),
        (t.join("MR_small_bigendian.dcm"), false),
        (t.join("rtdose_expb.dcm"), false),
        (t.join("MR_small_RLE.dcm"), false),
        (d.join("emri_small_RLE.dcm"), false),
    ];
    let limits = med3dinsight::volume::ReadOptions::default();
    let mut frames = 0;
    for (p, native) in cases {
        let ScanOutcome::Image(h) = scan_file(p) else {
            panic!("{}: not scanned as an image", p.display())
        };
        assert_eq!(
            h.pixel_offset.is_some(),
            *native,
            "{}: pixel_offset {:?}",
            p.display(),
            h.pixel_offset
        );
        let Some(off) = h.pixel_offset else { continue };
        let file = std::fs::File::open(p).unwrap();
        let obj = open_full(p).unwrap();
        let n = h.pixel.rows as usize * h.pixel.cols as usize;
        for k in 0..h.frames.len() {
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            decode_frame_at(&file, off, &h, k, &limits, &mut a).unwrap();
            decode_frame_into(&obj, &h, k, &limits, &mut b).unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{} frame {k}: the file's bytes decode differently",
                p.display()
            );
            frames += 1;
        }
    }
    assert!(frames >= 20, "only {frames} frames compared");
}
