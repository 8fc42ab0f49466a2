//! The bounded, deterministic version of the `whole_case` fuzz target: real
//! seeds (a crop of the MNI152 template, NIfTI-1/-2 ramps plain and
//! gzipped, pynrrd-written NRRD ramps raw and gzipped, pydicom-written series in three transfer syntaxes, pydicom's own
//! test files) and thousands of mutants of them through
//! `med3dinsight::fuzz::whole_case`, the same body the fuzz target runs:
//! read, reorient, resample, intensity, crop, slices, commit. Every seed
//! must come out as a committed case; no mutant may panic or ask for more
//! memory in one allocation than a small multiple of its size (or, for
//! gzip, of the 64 MiB cap the fuzzed config sets).
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use med3dinsight::fuzz::{self, Input};

#[path = "common/mutate.rs"]
mod mutate;
use mutate::{mutate, Rng};

/// The system allocator, noting the largest single request (this binary has
/// one test, so process-wide is the test's own).
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

fn seeds() -> Vec<(PathBuf, Input, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/case_fuzz");
    let mut out: Vec<(PathBuf, Input, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let p = e.path();
            let kind = match p.extension().and_then(|x| x.to_str()) {
                Some("dcmseries") => Input::DicomSeries,
                Some("nrrd") => Input::Nrrd,
                _ => Input::Nifti,
            };
            let bytes = std::fs::read(&p).unwrap();
            (p, kind, bytes)
        })
        .collect();
    // pydicom's own files, each a one-file series
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    for py in std::fs::read_dir(lib).into_iter().flatten().flatten() {
        for name in [
            "CT_small.dcm",
            "MR_small.dcm",
            "MR_small_RLE.dcm",
            "JPGLosslessP14SV1_1s_1f_8b.dcm",
        ] {
            let p = py.path().join("site-packages/pydicom/data/test_files").join(name);
            if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, Input::DicomSeries, bytes));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The most one allocation may ask for on an input of `len` bytes: 64x the
/// input (RLE expands that far; f32 voxels are 4x uint8) plus 16 MiB of
/// fixed buffers, or for gzip the cap (64 MiB) as f32.
fn allowed(bytes: &[u8]) -> usize {
    let base = 64 * bytes.len() + (16 << 20);
    if bytes.starts_with(&[0x1f, 0x8b]) {
        base.max(4 * (64 << 20) + (16 << 20))
    } else {
        base
    }
}

#[test]
fn mutated_cases_fail_cleanly_through_the_whole_per_case_path() {
    let seeds = seeds();
    assert!(
        seeds.len() >= 8 && seeds.iter().filter(|s| s.1 == Input::Nrrd).count() == 2,
        "seeds: {:?}",
        seeds.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    let scratch = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x51_7cc1_b727_220a);
    let (mut ok, mut failed) = (0, 0);
    for (path, kind, orig) in &seeds {
        let r = fuzz::whole_case(scratch.path(), *kind, orig);
        assert!(
            matches!(r, Ok(true)),
            "seed {} did not come out as a committed case: {r:?}",
            path.display()
        );
        if *kind == Input::DicomSeries {
            assert!(fuzz::split(orig).count() >= 1);
        }
        for _ in 0..600 {
            let b = mutate(&mut rng, orig);
            if b.is_empty() {
                continue;
            }
            LARGEST.store(0, Ordering::Relaxed);
            match fuzz::whole_case(scratch.path(), *kind, &b) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
            let asked = LARGEST.load(Ordering::Relaxed);
            assert!(
                asked <= allowed(&b),
                "a mutant of {} ({} bytes) asked for {asked} bytes in one allocation",
                path.display(),
                b.len()
            );
        }
    }
    eprintln!(
        "{} seeds; mutants: {ok} committed, {failed} failed cleanly",
        seeds.len()
    );
    assert!(
        ok > 100 && failed > 100,
        "{ok} committed, {failed} failed: the mutants reach little"
    );
}
