//! The preprocess stage's robustness promises, checked on the real binary
//! with real files: a bad case is reported with its path and reason while
//! the good ones complete (exit status 2); a SIGKILL at any instant leaves a
//! cache that a rerun completes to exactly what an uninterrupted run writes;
//! reruns skip and touch nothing; `--shard` processes share one cache.
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// The per-run report: it says what *this* run did (done vs skipped), so it
/// legitimately differs between runs that end in the same cache.
const REPORT: &str = "preprocess-report.json";

/// Checks a committed case against its source and returns its slice count:
/// provenance, a 48^3 float16 volume, and exactly the PNGs its index lists.
fn assert_good_case(cache: &Path, id: &str, source: &Path) -> usize {
    let dir = cache.join("cases").join(id);
    let rec = read_json(&dir.join("case.json"));
    assert_eq!(rec["id"], id);
    assert_eq!(
        rec["image"]["sha256"],
        sha256_hex(&std::fs::read(source).unwrap()),
        "{id}: source hash"
    );
    assert_eq!(
        rec["geometry"]["shape"],
        serde_json::json!([48, 48, 48]),
        "{id}: geometry"
    );

    let npy = std::fs::read(dir.join("image.npy")).unwrap();
    assert!(npy.starts_with(b"\x93NUMPY\x01\x00"), "{id}: image.npy is not .npy 1.0");
    let hlen = 10 + u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let head = String::from_utf8_lossy(&npy[10..hlen]);
    assert!(
        head.contains("'descr': '<f2'") && head.contains("(48, 48, 48)"),
        "{id}: npy header {head}"
    );
    assert_eq!(npy.len() - hlen, 48 * 48 * 48 * 2, "{id}: image.npy data size");

    let rows = jsonl(&dir.join("slices.jsonl"));
    assert!(!rows.is_empty(), "{id}: no slices");
    assert_eq!(rec["slices"], rows.len(), "{id}: case.json slice count vs slices.jsonl");
    let mut listed: Vec<String> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["case"], id);
            let png = r["png"].as_str().unwrap().to_string();
            let bytes = std::fs::read(cache.join(&png)).unwrap_or_else(|e| panic!("{id}: {png}: {e}"));
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{png} is not a PNG");
            png
        })
        .collect();
    listed.sort();
    let mut on_disk: Vec<String> = std::fs::read_dir(dir.join("slices"))
        .unwrap()
        .map(|e| format!("cases/{id}/slices/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    on_disk.sort();
    assert_eq!(listed, on_disk, "{id}: slice PNGs on disk vs slices.jsonl");
    rows.len()
}

/// Runs a manifest of one good case (a copy of the demo's
/// nibabel_anatomical.nii) and one bad case, and checks every promise:
/// exit status 2, "1 done ... 1 failed", the failure named with the bad
/// file's path and each of `reasons`, the good case complete, the report.
fn check_bad_case(dir: &Path, bad: CaseSpec, bad_path: &Path, reasons: &[&str]) {
    check_bad_case_with(dir, bad, bad_path, reasons, "")
}

/// `check_bad_case` with `extra` (YAML lines) added to the preprocess section.
fn check_bad_case_with(dir: &Path, bad: CaseSpec, bad_path: &Path, reasons: &[&str], extra: &str) {
    let good = dir.join("good.nii");
    std::fs::copy(demo("nibabel_anatomical.nii"), &good).unwrap();
    let manifest = write_manifest(dir, "manifest.yaml", &[case("good", &good, None), bad]);
    let config = write_experiment(dir, "experiment.yaml", 4);
    if !extra.is_empty() {
        let mut y = std::fs::read_to_string(&config).unwrap();
        y.push_str(extra);
        std::fs::write(&config, y).unwrap();
    }
    let cache = dir.join("cache");
    let r = preprocess(&config, &manifest, &cache, &[]);
    let ctx = format!("stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);

    assert_eq!(r.code, Some(2), "exit status; {ctx}");
    assert_eq!(r.counts(), counts(1, 0, 1, 2), "{ctx}");
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("FAILED bad:"))
        .unwrap_or_else(|| panic!("no FAILED line for the bad case; {ctx}"));
    let path = bad_path.display().to_string();
    assert!(line.contains(&path), "failure does not name {path}: {line}");
    for reason in reasons {
        assert!(line.contains(reason), "failure does not say {reason:?}: {line}");
    }

    let report = read_json(&cache.join(REPORT));
    assert_eq!(
        (report["done"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    let failures = report["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{report}");
    assert_eq!(failures[0]["case"], "bad");
    let err = failures[0]["error"].as_str().unwrap();
    assert!(
        err.contains(&path) && reasons.iter().all(|w| err.contains(w)),
        "report error: {err}"
    );

    let n = assert_good_case(&cache, "good", &good);
    let index = jsonl(&cache.join("index.jsonl"));
    assert_eq!(index.len(), n, "index.jsonl rows");
    assert!(index.iter().all(|r| r["case"] == "good"), "index lists a failed case");
    assert_eq!(committed_cases(&cache), vec!["good".to_string()]);
    assert!(!cache.join("cases/bad").exists(), "the failed case left a folder");
    assert_eq!(temporaries(&cache), Vec::<PathBuf>::new());
}

fn anatomical() -> Nii {
    let n = Nii::read(&demo("nibabel_anatomical.nii"));
    // The byte surgery below relies on this file's layout.
    assert!(n.big_endian);
    assert_eq!((n.dims(), n.i16(DATATYPE), n.i16(SFORM_CODE)), ([33, 41, 25], 4, 2));
    n
}

#[test]
fn truncated_nii_gz_is_reported_with_its_path() {
    let whole = gzip(&anatomical().bytes);
    let inner = anatomical().bytes;
    // (what is cut, file bytes): mid-stream, just after the gzip header,
    // only the CRC/size trailer, and a complete gzip of a cut .nii.
    let variants: [(&str, Vec<u8>); 4] = [
        ("half", whole[..whole.len() / 2].to_vec()),
        ("head", whole[..20].to_vec()),
        ("trailer", whole[..whole.len() - 4].to_vec()),
        ("payload", gzip(&inner[..inner.len() - 1000])),
    ];
    for (what, bytes) in variants {
        let d = tempfile::tempdir().unwrap();
        let bad = d.path().join(format!("cut_{what}.nii.gz"));
        std::fs::write(&bad, bytes).unwrap();
        check_bad_case(d.path(), case("bad", &bad, None), &bad, &["truncated"]);
    }
}

#[test]
fn header_dims_larger_than_the_data_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let mut n = anatomical();
    n.set_i16(DIM + 6, 26); // dim[3]: 25 -> 26, one slab more than the file holds
    let bad = n.write(&d.path().join("dims.nii"));
    let need = 33 * 41 * 26 * 2;
    let have = 33 * 41 * 25 * 2;
    check_bad_case(
        d.path(),
        case("bad", &bad, None),
        &bad,
        &[
            "header dims [33, 41, 26]",
            &format!("need {need} bytes"),
            &format!("holds {have}"),
        ],
    );
}

/// A header that declares terabytes over a few kB of data (plain and
/// gzipped): the case fails with its file named, nothing is allocated for
/// the declared size (this used to abort the whole run), the other case
/// finishes.
#[test]
fn header_dims_far_beyond_the_data_fail_the_case_without_allocating() {
    for gz in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let mut n = anatomical();
        for axis in 1..=3 {
            n.set_i16(DIM + 2 * axis, 30000); // 30000^3 int16: 54 TB
        }
        let plain = n.write(&d.path().join("huge.nii"));
        let bad = if gz {
            let p = d.path().join("huge.nii.gz");
            std::fs::write(&p, gzip(&std::fs::read(&plain).unwrap())).unwrap();
            p
        } else {
            plain
        };
        check_bad_case(
            d.path(),
            case("bad", &bad, None),
            &bad,
            &["header dims [30000, 30000, 30000]"],
        );
    }
}

/// The largest resident set of any child this test process has waited for,
/// in bytes (getrusage RUSAGE_CHILDREN).
fn children_peak_rss() -> u64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) }, 0);
    ru.ru_maxrss as u64 * 1024
}

/// Peak RSS no child may reach: med3d with libtorch loaded is ~0.5 GB; the
/// inputs below would have made it reserve 8 GB or more.
const CHILD_RSS_LIMIT: u64 = 2 << 30;

/// Compressed voxels that inflate past the cap on decompressed data (here
/// lowered to 4 MiB through the config key): the case fails naming the key,
/// inflating stops at the cap, the other case finishes. 8 MiB of zeros
/// gzip to well under 1 MiB, with a consistent gzip trailer, so only the
/// cap stops it.
#[test]
fn gzip_that_inflates_past_the_cap_fails_the_case_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    let mut n = anatomical();
    let off = n.vox_offset();
    n.bytes.truncate(off);
    for (axis, v) in [(1, 256), (2, 256), (3, 64)] {
        n.set_i16(DIM + 2 * axis, v);
    }
    n.bytes.resize(off + 256 * 256 * 64 * 2, 0);
    let bad = n.write(&d.path().join("bomb.nii.gz"));
    assert!(std::fs::metadata(&bad).unwrap().len() < 1 << 20);
    check_bad_case_with(
        d.path(),
        case("bad", &bad, None),
        &bad,
        &["decompresses to more than 4 MiB", "preprocess.max_decompressed_mib"],
        "  max_decompressed_mib: 4\n",
    );
    assert!(
        children_peak_rss() < CHILD_RSS_LIMIT,
        "a child peaked at {} bytes",
        children_peak_rss()
    );
}

/// A pydicom test file, when the venv has pydicom.
fn pydicom_file(name: &str) -> Option<PathBuf> {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    std::fs::read_dir(lib).ok()?.flatten().find_map(|py| {
        let p = py.path().join("site-packages/pydicom/data/test_files").join(name);
        p.exists().then_some(p)
    })
}

/// Sets Rows (0028,0010) and Columns (0028,0011) of a little-endian file,
/// explicit or implicit VR.
fn set_matrix(bytes: &mut [u8], rows: u16, cols: u16) {
    for (elem, v) in [(0x10u8, rows), (0x11u8, cols)] {
        let explicit = [0x28, 0x00, elem, 0x00, b'U', b'S', 0x02, 0x00];
        let implicit = [0x28, 0x00, elem, 0x00, 0x02, 0x00, 0x00, 0x00];
        let at = bytes
            .windows(8)
            .position(|w| w == explicit || w == implicit)
            .expect("no Rows/Columns element");
        bytes[at + 8..at + 10].copy_from_slice(&v.to_le_bytes());
    }
}

/// DICOM headers that declare far more pixels than the file holds: native
/// (too few bytes), RLE (a fragment that cannot expand that far), JPEG 2000
/// over the cap, and a JPEG 2000 stream of another size than Rows/Columns
/// (its decoder would size its buffers from the stream). Each fails its case
/// with the file named; the good case finishes; no child grows past 2 GB.
#[test]
fn dicom_headers_that_declare_far_more_than_the_file_holds_fail_the_case_only() {
    let cases: [(&str, u16, &[&str]); 4] = [
        (
            "MR_small.dcm",
            65535,
            &[
                "truncated or corrupt file",
                "need 8589672450 bytes, but the PixelData holds",
            ],
        ),
        (
            "MR_small_RLE.dcm",
            4000,
            &[
                "cannot decode the pixel data",
                "the PixelData fragments decode to at most",
            ],
        ),
        (
            "MR_small_jp2klossless.dcm",
            65535,
            &["decompresses to more than", "max_decompressed_mib"],
        ),
        (
            "MR_small_jp2klossless.dcm",
            4000,
            &["the compressed stream declares a 64x64 image"],
        ),
    ];
    for (name, side, reasons) in cases {
        let Some(src) = pydicom_file(name) else {
            eprintln!("skipped: no pydicom test files in .venv (run `make setup`)");
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let mut bytes = std::fs::read(&src).unwrap();
        set_matrix(&mut bytes, side, side);
        let bad = d.path().join(format!("big_{name}"));
        std::fs::write(&bad, &bytes).unwrap();
        check_bad_case(d.path(), case("bad", &bad, None), &bad, reasons);
    }
    assert!(
        children_peak_rss() < CHILD_RSS_LIMIT,
        "a child peaked at {} bytes",
        children_peak_rss()
    );
}

#[test]
fn nan_and_inf_voxels_are_reported_with_their_count() {
    let d = tempfile::tempdir().unwrap();
    let src = anatomical();
    // Same image as float32 (still big-endian), with 3 NaN and 3 infinite voxels.
    let mut n = Nii {
        bytes: src.bytes[..352].to_vec(),
        big_endian: true,
    };
    n.set_i16(DATATYPE, 16);
    n.set_i16(BITPIX, 32);
    let mut vals: Vec<f32> = src.bytes[352..]
        .chunks_exact(2)
        .map(|c| i16::from_be_bytes([c[0], c[1]]) as f32)
        .collect();
    assert_eq!(vals.len(), 33 * 41 * 25);
    for i in [0, 4000, 20000] {
        vals[i] = f32::NAN;
    }
    vals[100] = f32::INFINITY;
    vals[9000] = f32::INFINITY;
    vals[33000] = f32::NEG_INFINITY;
    n.bytes.extend(vals.iter().flat_map(|v| v.to_be_bytes()));
    let bad = n.write(&d.path().join("nan.nii.gz"));
    check_bad_case(
        d.path(),
        case("bad", &bad, None),
        &bad,
        &["6 voxels are NaN or infinite"],
    );
}

#[test]
fn zero_pixdim_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let mut n = anatomical();
    n.set_f32(PIXDIM + 8, 0.0); // pixdim[2]
    let bad = n.write(&d.path().join("zero_pixdim.nii"));
    check_bad_case(
        d.path(),
        case("bad", &bad, None),
        &bad,
        &["pixdim[2] = 0", "spacing must be positive"],
    );
}

#[test]
fn negative_pixdim_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let mut n = anatomical();
    n.set_f32(PIXDIM + 12, -2.0); // pixdim[3]
    let bad = n.write(&d.path().join("negative_pixdim.nii.gz"));
    check_bad_case(
        d.path(),
        case("bad", &bad, None),
        &bad,
        &["pixdim[3] = -2", "spacing must be positive"],
    );
}

#[test]
fn singular_affine_is_reported() {
    let base = anatomical();
    let [x, _, z] = base.srow();
    // A zero row, and two equal rows: both rank 2.
    for (what, srow) in [("zero_row", [x, [0.0; 4], z]), ("equal_rows", [x, x, z])] {
        let d = tempfile::tempdir().unwrap();
        let mut n = base.clone();
        n.set_srow(srow);
        let bad = n.write(&d.path().join(format!("{what}.nii")));
        check_bad_case(d.path(), case("bad", &bad, None), &bad, &["affine is singular"]);
    }
}

#[test]
fn implausible_voxel_size_is_reported_not_fatal() {
    // 20 m voxels: resampling to 2.5 mm would need ~10^16 voxels; before the
    // grid was bounded this aborted the process (allocation failure) and
    // took the good case down with it.
    let d = tempfile::tempdir().unwrap();
    let mut n = anatomical();
    let srow = n.srow().map(|r| [r[0] * 1e4, r[1] * 1e4, r[2] * 1e4, r[3]]);
    n.set_srow(srow);
    let bad = n.write(&d.path().join("metres.nii"));
    check_bad_case(
        d.path(),
        case("bad", &bad, None),
        &bad,
        &["[20000.0, 20000.0, 20000.0] mm", "implausible"],
    );
}

/// Voxels 30x too large for their file: the resampled grid (a few hundred
/// MB, sized by the affine, not by the file) falls under the cap on what a
/// case may expand to, here lowered to 64 MiB: the case fails naming the
/// key, before the grid is allocated.
#[test]
fn a_resampled_grid_past_the_cap_fails_the_case_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    let mut n = anatomical();
    let srow = n.srow().map(|r| [r[0] * 30.0, r[1] * 30.0, r[2] * 30.0, r[3]]);
    n.set_srow(srow);
    let bad = n.write(&d.path().join("big_voxels.nii"));
    check_bad_case_with(
        d.path(),
        case("bad", &bad, None),
        &bad,
        &[
            "more than the 64 MiB one case may expand to",
            "preprocess.max_decompressed_mib",
        ],
        "  max_decompressed_mib: 64\n",
    );
}

#[test]
fn missing_files_are_reported() {
    // A missing image, and an existing image whose label is missing.
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("no_such_image.nii.gz");
    check_bad_case(d.path(), case("bad", &bad, None), &bad, &["not found"]);

    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("image.nii");
    std::fs::copy(demo("nibabel_anatomical.nii"), &image).unwrap();
    let label = d.path().join("no_such_label.nii.gz");
    check_bad_case(d.path(), case("bad", &image, Some(&label)), &label, &["not found"]);
}

#[test]
fn label_of_another_shape_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("image.nii");
    std::fs::copy(demo("nibabel_anatomical.nii"), &image).unwrap();
    let label =
        crop_u8(&demo("mni152_tissue.nii.gz"), [80, 90, 70], [20, 22, 24]).write(&d.path().join("label.nii.gz"));
    check_bad_case(
        d.path(),
        case("bad", &image, Some(&label)),
        &label,
        &["label shape [20, 22, 24] differs from image shape [33, 41, 25]"],
    );
}

/// Five cases, some slow (full-size MNI with its label), some quick.
fn kill_inputs(dir: &Path) -> Vec<CaseSpec> {
    let anat_a = dir.join("anat_a.nii");
    let anat_b = dir.join("anat_b.nii");
    std::fs::copy(demo("nibabel_anatomical.nii"), &anat_a).unwrap();
    std::fs::copy(demo("nibabel_anatomical.nii"), &anat_b).unwrap();
    let crop = crop_u8(&demo("mni152_t1.nii.gz"), [30, 30, 30], [130, 150, 120]).write(&dir.join("crop.nii.gz"));
    let crop_l =
        crop_u8(&demo("mni152_tissue.nii.gz"), [30, 30, 30], [130, 150, 120]).write(&dir.join("crop_label.nii.gz"));
    vec![
        case("anat_a", &anat_a, None),
        case("anat_b", &anat_b, None),
        case("mni", &demo("mni152_t1.nii.gz"), Some(&demo("mni152_tissue.nii.gz"))),
        case("mni_gm", &demo("mni152_gm.nii.gz"), None),
        case("mni_crop", &crop, Some(&crop_l)),
    ]
}

/// Committed cases whose case.json carries `config_hash`.
fn committed_with(cache: &Path, config_hash: &str) -> usize {
    committed_cases(cache)
        .iter()
        .filter(|id| read_json(&cache.join("cases").join(id).join("case.json"))["config_hash"] == config_hash)
        .count()
}

/// When a run under test gets its SIGKILL.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// This fraction of the uninterrupted run's duration after the start.
    Fraction(f64),
    /// The moment a case's temporary folder shows up in `cases/`: the kill
    /// lands while that case's files are being written or swapped in.
    FirstTemporary,
    /// The moment one more case of this config is committed than there
    /// were at the start: the kill lands between cases, so the rerun must
    /// keep what was committed and redo only the rest. Aimed, because with
    /// two workers the cases of a fast build commit close together and a
    /// fixed delay may miss the gap (it did on a CI machine).
    NextCommit,
}

/// Cases committed with `config_hash`, read while a run may be replacing
/// them: a folder that vanishes or a case.json not readable at that instant
/// is not counted.
fn committed_now(cache: &Path, config_hash: &str) -> usize {
    let Ok(rd) = std::fs::read_dir(cache.join("cases")) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| !e.file_name().to_string_lossy().contains(".tmp-"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("case.json")).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|j| j["config_hash"] == config_hash)
        .count()
}

/// Waits until `at`, then SIGKILLs the child (if it is still running).
fn kill_at(child: &mut std::process::Child, at: KillAt, full: Duration, cache: &Path, config_hash: &str) {
    match at {
        KillAt::Fraction(f) => std::thread::sleep(full.mul_f64(f)),
        KillAt::FirstTemporary => {
            let deadline = Instant::now() + full * 4;
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                let seen = std::fs::read_dir(cache.join("cases"))
                    .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().contains(".tmp-")))
                    .unwrap_or(false);
                if seen {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        KillAt::NextCommit => {
            let start = committed_now(cache, config_hash);
            let deadline = Instant::now() + full * 4;
            while Instant::now() < deadline
                && child.try_wait().unwrap().is_none()
                && committed_now(cache, config_hash) <= start
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    child.kill().unwrap(); // SIGKILL; Ok also when it has already exited
}

#[test]
fn kill_9_at_any_instant_then_rerun_equals_an_uninterrupted_run() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempfile::tempdir().unwrap();
    let cases = kill_inputs(d.path());
    let ncases = cases.len();
    let manifest = write_manifest(d.path(), "manifest.yaml", &cases);
    let config = write_experiment(d.path(), "experiment.yaml", 4);
    let old_config = write_experiment(d.path(), "old.yaml", 3);
    let workers = ["--workers", "2"];

    // A first run warms the page cache and the loader, so that `full`, the
    // scale of the kill delays, is the time of a warm run like the ones
    // killed (a cold first run on CI took long enough that every later
    // kill delay missed).
    let warm = preprocess(&config, &manifest, &d.path().join("warm"), &workers);
    assert_eq!(warm.code, Some(0), "{}", warm.stderr);
    let a = d.path().join("A");
    let t0 = Instant::now();
    let r = preprocess(&config, &manifest, &a, &workers);
    let full = t0.elapsed();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.counts(), counts(ncases, 0, 0, ncases));
    let hash = read_json(&a.join("cache.json"))["config_hash"]
        .as_str()
        .unwrap()
        .to_string();

    // Kill delays spread over the uninterrupted run's duration (the run is
    // mostly computation, so these rarely hit a write), then kills aimed at
    // the writes, then kills aimed between two commits. Odd rounds start from a complete cache of another config,
    // so kills also land while committed cases are being replaced.
    let mut plan: Vec<KillAt> = [0.03, 0.12, 0.25, 0.38, 0.5, 0.62, 0.75, 0.9]
        .map(KillAt::Fraction)
        .to_vec();
    plan.extend([KillAt::FirstTemporary; 4]);
    plan.extend([KillAt::NextCommit; 2]);
    let (mut attempts, mut killed, mut partial, mut torn) = (0, 0, 0, 0);
    for (round, at) in plan.iter().enumerate() {
        let b = d.path().join(format!("B{round}"));
        if round % 2 == 1 {
            let r = preprocess(&old_config, &manifest, &b, &workers);
            assert_eq!((r.code, r.counts().done), (Some(0), ncases), "{}", r.stderr);
        }
        for _ in 0..3 {
            let mut child = preprocess_cmd(&config, &manifest, &b, &workers).spawn().unwrap();
            kill_at(&mut child, *at, full, &b, &hash);
            let status = child.wait().unwrap();
            attempts += 1;
            if status.signal() == Some(9) {
                killed += 1;
                let n = committed_with(&b, &hash);
                if 0 < n && n < ncases {
                    partial += 1;
                }
                if !temporaries(&b).is_empty() {
                    torn += 1;
                }
            } else {
                assert_eq!(
                    status.code(),
                    Some(0),
                    "round {round}: a run that was not killed failed"
                );
            }
        }
        // What the killed runs committed is kept; everything else is redone.
        let before = committed_with(&b, &hash);
        let r = preprocess(&config, &manifest, &b, &workers);
        assert_eq!(r.code, Some(0), "round {round}: {}", r.stderr);
        let want = counts(ncases - before, before, 0, ncases);
        assert_eq!(r.counts(), want, "round {round} ({at:?})");
        assert_eq!(
            temporaries(&b),
            Vec::<PathBuf>::new(),
            "round {round}: temporaries left"
        );
        // The hidden .index.lock is compared too: it is an empty file in both.
        assert_same_tree(&a, &b, &[REPORT]);
        let report = read_json(&b.join(REPORT));
        assert_eq!(report["done"], want.done);
        assert_eq!(report["skipped"], want.skipped);
        assert_eq!(report["failed"], 0);
    }
    eprintln!(
        "uninterrupted run {full:?}; {killed} of {attempts} runs killed mid-way, {partial} left a partial cache, \
         {torn} left temporaries"
    );
    // Later attempts of a round have less left to do and may finish before
    // the kill; what matters is that kills did land mid-run and mid-write.
    assert!(
        killed * 4 >= attempts,
        "only {killed} of {attempts} runs were still running when killed"
    );
    assert!(
        partial >= 1,
        "no kill landed between cases; the resume path was not exercised"
    );
    assert!(torn >= 1, "no kill landed while a case was being written");
}

fn rerun_inputs(dir: &Path) -> Vec<CaseSpec> {
    let anat = dir.join("anat.nii");
    std::fs::copy(demo("nibabel_anatomical.nii"), &anat).unwrap();
    let crop = crop_u8(&demo("mni152_t1.nii.gz"), [40, 40, 30], [110, 120, 100]).write(&dir.join("crop.nii.gz"));
    let crop_l =
        crop_u8(&demo("mni152_tissue.nii.gz"), [40, 40, 30], [110, 120, 100]).write(&dir.join("crop_label.nii.gz"));
    vec![case("anat", &anat, None), case("mni_crop", &crop, Some(&crop_l))]
}

#[test]
fn rerun_skips_every_case_and_rewrites_no_file() {
    let d = tempfile::tempdir().unwrap();
    let manifest = write_manifest(d.path(), "manifest.yaml", &rerun_inputs(d.path()));
    let config = write_experiment(d.path(), "experiment.yaml", 4);
    let cache = d.path().join("cache");
    let r = preprocess(&config, &manifest, &cache, &[]);
    assert_eq!((r.code, r.counts().done), (Some(0), 2), "{}", r.stderr);
    let before = tree_with_mtimes(&cache);
    std::thread::sleep(Duration::from_millis(50));

    let r = preprocess(&config, &manifest, &cache, &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.counts(), counts(0, 2, 0, 2));
    let after = tree_with_mtimes(&cache);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "file list changed"
    );
    for (name, (bytes, mtime)) in &before {
        if name == REPORT {
            continue;
        }
        assert!(
            after[name].0 == *bytes,
            "{name}: bytes changed on a rerun that skipped everything"
        );
        assert_eq!(
            after[name].1, *mtime,
            "{name}: rewritten on a rerun that skipped everything"
        );
    }
    let report = read_json(&cache.join(REPORT));
    assert_eq!(
        (report["done"].as_u64(), report["skipped"].as_u64()),
        (Some(0), Some(2))
    );
}

#[test]
fn changed_config_reprocesses_every_case() {
    let d = tempfile::tempdir().unwrap();
    let inputs = rerun_inputs(d.path());
    let manifest = write_manifest(d.path(), "manifest.yaml", &inputs);
    let four = write_experiment(d.path(), "four.yaml", 4);
    let six = write_experiment(d.path(), "six.yaml", 6);
    let cache = d.path().join("cache");
    let hash = |c: &Path| {
        read_json(&c.join("cache.json"))["config_hash"]
            .as_str()
            .unwrap()
            .to_string()
    };

    let r = preprocess(&four, &manifest, &cache, &[]);
    assert_eq!((r.code, r.counts().done), (Some(0), 2), "{}", r.stderr);
    let first = tree(&cache);
    let hash4 = hash(&cache);

    let r = preprocess(&six, &manifest, &cache, &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.counts(), counts(2, 0, 0, 2));
    let hash6 = hash(&cache);
    assert_ne!(hash4, hash6);
    let mut rows = 0;
    for c in &inputs {
        let rec = read_json(&cache.join("cases").join(&c.id).join("case.json"));
        assert_eq!(rec["config_hash"], hash6.as_str(), "{}", c.id);
        // 6 distinct positions on each of 3 planes, and no PNG left from the 4-slice run.
        assert_eq!(assert_good_case(&cache, &c.id, &c.image), 18, "{}", c.id);
        rows += 18;
        // Only the slicing changed, so the volumes are the same bytes.
        let npy = format!("cases/{}/image.npy", c.id);
        assert!(std::fs::read(cache.join(&npy)).unwrap() == first[&npy], "{npy} changed");
    }
    assert_eq!(jsonl(&cache.join("index.jsonl")).len(), rows);

    let r = preprocess(&six, &manifest, &cache, &[]);
    assert_eq!(r.counts(), counts(0, 2, 0, 2));

    // Back to the first config: redone, and byte for byte what it was.
    let r = preprocess(&four, &manifest, &cache, &[]);
    assert_eq!(r.counts(), counts(2, 0, 0, 2));
    let again = tree(&cache);
    let strip = |t: &std::collections::BTreeMap<String, Vec<u8>>| {
        t.iter()
            .filter(|(k, _)| *k != REPORT)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert!(
        strip(&first) == strip(&again),
        "redoing the first config gave a different cache"
    );
    assert_eq!(temporaries(&cache), Vec::<PathBuf>::new());
}

#[test]
fn concurrent_shards_fill_one_cache_identical_to_an_unsharded_run() {
    let d = tempfile::tempdir().unwrap();
    let anat = d.path().join("anat.nii");
    std::fs::copy(demo("nibabel_anatomical.nii"), &anat).unwrap();
    let crop = crop_u8(&demo("mni152_t1.nii.gz"), [40, 40, 30], [110, 120, 100]).write(&d.path().join("crop.nii.gz"));
    let crop_l =
        crop_u8(&demo("mni152_tissue.nii.gz"), [40, 40, 30], [110, 120, 100]).write(&d.path().join("crop_l.nii.gz"));
    let mut cases = Vec::new();
    for i in 0..4 {
        cases.push(case(&format!("anat{i}"), &anat, None));
        cases.push(case(&format!("crop{i}"), &crop, Some(&crop_l)));
    }
    let all: Vec<String> = {
        let mut v: Vec<String> = cases.iter().map(|c| c.id.clone()).collect();
        v.sort();
        v
    };
    let manifest = write_manifest(d.path(), "manifest.yaml", &cases);
    let config = write_experiment(d.path(), "experiment.yaml", 4);
    let one = ["--workers", "1"];

    let whole = d.path().join("unsharded");
    let r = preprocess(&config, &manifest, &whole, &one);
    assert_eq!((r.code, r.counts().done), (Some(0), cases.len()), "{}", r.stderr);

    // Each shard alone, to learn its case set.
    let mut sets = Vec::new();
    for s in ["1/2", "2/2"] {
        let c = d.path().join(format!("alone-{}", &s[..1]));
        let r = preprocess(&config, &manifest, &c, &["--shard", s, "--workers", "1"]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        let ids = committed_cases(&c);
        assert_eq!(r.counts(), counts(ids.len(), 0, 0, ids.len()), "shard {s}");
        let index_cases: std::collections::BTreeSet<String> = jsonl(&c.join("index.jsonl"))
            .iter()
            .map(|r| r["case"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            index_cases.into_iter().collect::<Vec<_>>(),
            ids,
            "shard {s}: index vs cases"
        );
        sets.push(ids);
    }
    assert!(
        sets.iter().all(|s| !s.is_empty()),
        "a shard is empty: {sets:?}; pick other ids"
    );
    assert!(
        sets[0].iter().all(|id| !sets[1].contains(id)),
        "shards overlap: {sets:?}"
    );
    let mut union: Vec<String> = sets.concat();
    union.sort();
    assert_eq!(union, all, "shards do not cover the manifest");

    // Both shards at once into one cache, a few times over.
    for round in 0..3 {
        let shared = d.path().join(format!("shared-{round}"));
        let kids: Vec<_> = ["1/2", "2/2"]
            .iter()
            .map(|s| {
                preprocess_cmd(&config, &manifest, &shared, &["--shard", s, "--workers", "1"])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (i, k) in kids.into_iter().enumerate() {
            let o = k.wait_with_output().unwrap();
            let ran = Ran {
                code: o.status.code(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            };
            assert!(!ran.stderr.contains("panicked"), "{}", ran.stderr);
            assert_eq!(ran.code, Some(0), "shard {}: {}", i + 1, ran.stderr);
            let n = sets[i].len();
            assert_eq!(ran.counts(), counts(n, 0, 0, n), "shard {}", i + 1);
            let rep = read_json(&shared.join(format!("preprocess-report-shard-{}-of-2.json", i + 1)));
            assert_eq!(
                (rep["shard"].as_str(), rep["done"].as_u64()),
                (Some(&*format!("{}/2", i + 1)), Some(n as u64))
            );
        }
        assert!(!shared.join(REPORT).exists(), "a shard wrote the unsharded report");
        assert_same_tree(
            &whole,
            &shared,
            &[
                REPORT,
                "preprocess-report-shard-1-of-2.json",
                "preprocess-report-shard-2-of-2.json",
            ],
        );
        assert_eq!(temporaries(&shared), Vec::<PathBuf>::new());
    }
}
