//! Helpers for integration tests that run the real `med3d` binary on real
//! files: demo data paths, NIfTI-1 byte surgery (to make bad inputs from good
//! ones), experiment/manifest writers, and whole-tree comparison of caches.
//!
//! The NIfTI helpers work on raw bytes at the format's fixed offsets and do
//! not use the crate's reader, so a bug in the reader cannot hide itself.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

/// NIfTI-1 header offsets (bytes).
pub const DIM: usize = 40;
pub const DATATYPE: usize = 70;
pub const BITPIX: usize = 72;
pub const PIXDIM: usize = 76;
pub const VOX_OFFSET: usize = 108;
pub const QFORM_CODE: usize = 252;
pub const SFORM_CODE: usize = 254;
pub const SROW: usize = 280;

/// The project venv's Python (with the reference libraries), else python3.
pub fn python() -> String {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        venv.display().to_string()
    } else {
        "python3".into()
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_med3d")
}

/// A file of `data/demo/` (made by `make setup`).
pub fn demo(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make setup` to fetch the demo data",
        p.display()
    );
    p
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

/// A single-file NIfTI-1 image in memory; fields are read and written in the
/// file's own byte order.
#[derive(Clone)]
pub struct Nii {
    pub bytes: Vec<u8>,
    pub big_endian: bool,
}

impl Nii {
    pub fn read(path: &Path) -> Nii {
        let raw = std::fs::read(path).unwrap();
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
            gunzip(&raw)
        } else {
            raw
        };
        let big_endian = match (&bytes[..4], i32::from_le_bytes(bytes[..4].try_into().unwrap())) {
            (_, 348) => false,
            (b, _) if i32::from_be_bytes(b.try_into().unwrap()) == 348 => true,
            _ => panic!("{} is not NIfTI-1", path.display()),
        };
        assert_eq!(
            &bytes[344..347],
            b"n+1",
            "{} is not a single-file NIfTI-1",
            path.display()
        );
        Nii { bytes, big_endian }
    }

    pub fn i16(&self, off: usize) -> i16 {
        let a = self.bytes[off..off + 2].try_into().unwrap();
        if self.big_endian {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    }

    pub fn set_i16(&mut self, off: usize, v: i16) {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.bytes[off..off + 2].copy_from_slice(&b);
    }

    pub fn f32(&self, off: usize) -> f32 {
        let a = self.bytes[off..off + 4].try_into().unwrap();
        if self.big_endian {
            f32::from_be_bytes(a)
        } else {
            f32::from_le_bytes(a)
        }
    }

    pub fn set_f32(&mut self, off: usize, v: f32) {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.bytes[off..off + 4].copy_from_slice(&b);
    }

    pub fn dims(&self) -> [usize; 3] {
        assert_eq!(self.i16(DIM), 3, "helpers expect 3D images");
        [1, 2, 3].map(|i| self.i16(DIM + 2 * i) as usize)
    }

    pub fn vox_offset(&self) -> usize {
        (self.f32(VOX_OFFSET) as usize).max(352)
    }

    /// srow_x/y/z, the sform affine's three rows.
    pub fn srow(&self) -> [[f32; 4]; 3] {
        let mut m = [[0f32; 4]; 3];
        for (r, row) in m.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.f32(SROW + 16 * r + 4 * c);
            }
        }
        m
    }

    pub fn set_srow(&mut self, m: [[f32; 4]; 3]) {
        for (r, row) in m.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                self.set_f32(SROW + 16 * r + 4 * c, *v);
            }
        }
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        let name = path.to_string_lossy();
        let out = if name.ends_with(".gz") {
            gzip(&self.bytes)
        } else {
            self.bytes.clone()
        };
        std::fs::write(path, out).unwrap();
        path.to_path_buf()
    }
}

/// A box `[origin, origin + size)` cut out of a uint8 NIfTI-1 image (the MNI
/// demo files), with the sform translated so the crop stays where it was in
/// world space.
pub fn crop_u8(src: &Path, origin: [usize; 3], size: [usize; 3]) -> Nii {
    let n = Nii::read(src);
    assert_eq!(n.i16(DATATYPE), 2, "{}: crop_u8 needs uint8 data", src.display());
    assert_ne!(n.i16(SFORM_CODE), 0, "{}: crop_u8 needs an sform", src.display());
    let [nx, ny, _] = n.dims();
    let off = n.vox_offset();
    let mut out = Nii {
        bytes: n.bytes[..352].to_vec(),
        big_endian: n.big_endian,
    };
    out.bytes[348..352].fill(0); // no extensions
    out.set_f32(VOX_OFFSET, 352.0);
    for (a, &s) in size.iter().enumerate() {
        out.set_i16(DIM + 2 * (a + 1), s as i16);
    }
    // File order: first axis fastest.
    for k in origin[2]..origin[2] + size[2] {
        for j in origin[1]..origin[1] + size[1] {
            let start = off + origin[0] + nx * (j + ny * k);
            out.bytes.extend_from_slice(&n.bytes[start..start + size[0]]);
        }
    }
    let mut m = n.srow();
    for row in m.iter_mut() {
        row[3] += (0..3).map(|c| row[c] * origin[c] as f32).sum::<f32>();
    }
    out.set_srow(m);
    out
}

/// A small CPU-friendly experiment: 2.5 mm, 48^3, `slices` per plane.
pub fn write_experiment(dir: &Path, name: &str, slices: usize) -> PathBuf {
    let p = dir.join(name);
    let yaml = format!(
        "name: robustness\nmanifest: unused.yaml\nworkdir: {}\npreprocess:\n  spacing: [2.5, 2.5, 2.5]\n  roi: [48, 48, 48]\n  \
         roi_mode: crop_pad\n  mr_percentiles: [0.5, 99.5]\n  foreground_threshold: 0.0\n  slices_per_plane: {slices}\n  \
         planes: [axial, coronal, sagittal]\n",
        dir.join("work").display()
    );
    std::fs::write(&p, yaml).unwrap();
    p
}

/// One manifest case: id, image, optional label (all MR).
pub struct CaseSpec {
    pub id: String,
    pub image: PathBuf,
    pub label: Option<PathBuf>,
}

pub fn case(id: &str, image: &Path, label: Option<&Path>) -> CaseSpec {
    CaseSpec {
        id: id.into(),
        image: image.into(),
        label: label.map(Into::into),
    }
}

pub fn write_manifest(dir: &Path, name: &str, cases: &[CaseSpec]) -> PathBuf {
    let mut y = String::from("name: robustness\nmodality: MR\ncases:\n");
    for c in cases {
        y.push_str(&format!("  - id: {}\n    image: {}\n", c.id, c.image.display()));
        if let Some(l) = &c.label {
            y.push_str(&format!("    label: {}\n", l.display()));
        }
    }
    let p = dir.join(name);
    std::fs::write(&p, y).unwrap();
    p
}

/// The `med3d preprocess` command line, not yet started.
pub fn preprocess_cmd(config: &Path, manifest: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("preprocess")
        .arg("--config")
        .arg(config)
        .arg("--manifest")
        .arg(manifest)
        .arg("--out")
        .arg(out);
    c.args(extra)
        .env_remove("MED3D_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Counts from the summary line `preprocess: D done, S skipped, F failed (of T cases ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub total: usize,
}

/// `Counts` in the summary line's order: done, skipped, failed, total.
pub fn counts(done: usize, skipped: usize, failed: usize, total: usize) -> Counts {
    Counts {
        done,
        skipped,
        failed,
        total,
    }
}

impl Ran {
    pub fn counts(&self) -> Counts {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with("preprocess: "))
            .unwrap_or_else(|| panic!("no summary line in stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr));
        let nums: Vec<usize> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(4)
            .map(|s| s.parse().unwrap())
            .collect();
        Counts {
            done: nums[0],
            skipped: nums[1],
            failed: nums[2],
            total: nums[3],
        }
    }
}

/// Runs preprocess to completion; fails the test if anything panicked.
pub fn preprocess(config: &Path, manifest: &Path, out: &Path, extra: &[&str]) -> Ran {
    let o = preprocess_cmd(config, manifest, out, extra).output().unwrap();
    let r = Ran {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(!r.stderr.contains("panicked"), "med3d panicked:\n{}", r.stderr);
    r
}

/// Every regular file under `dir`, by '/'-joined relative path.
pub fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap();
                out.push(
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/"),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Every name (file or folder) under `dir` that is a leftover temporary.
pub fn temporaries(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                out.push(e.path());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// Relative path -> bytes, for every file under `dir`.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files(dir)
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(dir.join(&f)).unwrap()))
        .collect()
}

/// Relative path -> (bytes, mtime), for every file under `dir`.
pub fn tree_with_mtimes(dir: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    files(dir)
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            (f, (std::fs::read(&p).unwrap(), m))
        })
        .collect()
}

/// Asserts two cache folders hold the same files with the same bytes,
/// except for the relative paths in `skip`.
pub fn assert_same_tree(a: &Path, b: &Path, skip: &[&str]) {
    let keep = |t: BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        t.into_iter().filter(|(k, _)| !skip.contains(&k.as_str())).collect()
    };
    let (ta, tb) = (keep(tree(a)), keep(tree(b)));
    let only_a: Vec<&String> = ta.keys().filter(|k| !tb.contains_key(*k)).collect();
    let only_b: Vec<&String> = tb.keys().filter(|k| !ta.contains_key(*k)).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "file lists differ: only in {}: {only_a:?}; only in {}: {only_b:?}",
        a.display(),
        b.display()
    );
    let differ: Vec<&String> = ta.iter().filter(|(k, v)| tb[*k] != **v).map(|(k, _)| k).collect();
    assert!(
        differ.is_empty(),
        "files differ between {} and {}: {differ:?}",
        a.display(),
        b.display()
    );
    assert!(!ta.is_empty(), "{} is empty", a.display());
}

/// The case ids committed in a cache (those with a `case.json`).
pub fn committed_cases(cache: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(cache.join("cases")) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = rd
        .flatten()
        .filter(|e| e.path().join("case.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains(".tmp-"))
        .collect();
    ids.sort();
    ids
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: bad JSON: {e}", path.display()))
}

pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Every scalar of a TensorBoard log folder as TensorBoard's own reader
/// (EventAccumulator, from the venv's `tensorboard`) sees it: tag ->
/// [(step, value)].
pub fn tensorboard(logdir: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/tb_scalars.py");
    let out = Command::new(python()).arg(script).arg(logdir).output().unwrap();
    assert!(
        out.status.success(),
        "tensorboard's reader failed on {}: {}",
        logdir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Checks that TensorBoard's reader finds, at each line's step, every
/// numeric field of `lines` (metrics.jsonl) but `step`, once, with the
/// value as a float32; and no other point under those tags.
pub fn assert_tensorboard_has(logdir: &Path, lines: &[serde_json::Value]) {
    let tb = tensorboard(logdir);
    let mut want: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for l in lines {
        let step = l["step"].as_u64().unwrap();
        for (k, v) in l.as_object().unwrap() {
            if let (true, Some(v)) = (k != "step", v.as_f64()) {
                want.entry(k.clone()).or_default().push((step, v));
            }
        }
    }
    assert!(!want.is_empty());
    for (tag, points) in &want {
        let got = tb
            .get(tag)
            .unwrap_or_else(|| panic!("tag {tag} not in {} (has {:?})", logdir.display(), tb.keys()));
        // compared as float32, what TensorBoard stores (serde_json's
        // default float parsing may move an f64's last bit)
        let f32s = |p: &[(u64, f64)]| p.iter().map(|&(s, v)| (s, v as f32)).collect::<Vec<_>>();
        assert_eq!(f32s(got), f32s(points), "tag {tag}");
    }
}
