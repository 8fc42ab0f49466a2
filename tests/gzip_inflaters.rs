//! ISA-L and zlib-rs, the two inflaters behind `volume::gzip`, give the same
//! bytes for every valid gzip stream and refuse the same damaged ones: real
//! files written by Python's gzip (nilearn's MNI152, nibabel's test data),
//! streams with every optional header field, multi-member streams, and
//! thousands of truncated, bit-flipped and padded variants, read through
//! output buffers of several sizes.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use med3dinsight::volume::gzip::{self, Inflater};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn inflate(bytes: &[u8], which: Inflater, chunk: usize) -> Result<Vec<u8>, String> {
    let mut r = gzip::decoder_with(bytes, which);
    assert_eq!(r.inflater(), which, "{which:?} was asked for and is available");
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{:?}: {e}", e.kind())),
        }
        if out.len() > 64 << 20 {
            return Err("more than 64 MiB".into());
        }
    }
}

/// Both inflaters agree on `bytes`: the same output, or both refuse.
fn agree(bytes: &[u8], what: &str, chunk: usize) -> Option<Vec<u8>> {
    let a = inflate(bytes, Inflater::Isal, chunk);
    let b = inflate(bytes, Inflater::Zlib, chunk);
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert!(x == y, "{what}: ISA-L and zlib-rs inflate to different bytes"),
        (Err(_), Err(_)) => {}
        _ => panic!(
            "{what} (chunk {chunk}): ISA-L {:?} but zlib-rs {:?}",
            a.as_ref().map(|v| v.len()),
            b.as_ref().map(|v| v.len())
        ),
    }
    a.ok()
}

fn require_isal() {
    assert!(
        gzip::isal_available(),
        "ISA-L is not available ({}); `make setup` installs libisal-dev",
        gzip::isal_missing_reason().unwrap_or_default()
    );
}

fn gz(payload: &[u8], level: u32, builder: flate2::GzBuilder) -> Vec<u8> {
    let mut e = builder.write(Vec::new(), flate2::Compression::new(level));
    e.write_all(payload).unwrap();
    e.finish().unwrap()
}

/// A payload like a CT's int16 voxels: smooth, with noise.
fn payload(n: usize) -> Vec<u8> {
    let mut s = 0x9E37_79B9u32;
    (0..n / 2)
        .flat_map(|i| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let v = ((i as f32 / 97.0).sin() * 800.0) as i16 + (s % 23) as i16;
            v.to_le_bytes()
        })
        .collect()
}

/// A member with a header CRC (FHCRC) and every other optional field,
/// built by hand: flate2 does not write FHCRC.
fn gz_with_hcrc(data: &[u8]) -> Vec<u8> {
    let mut h = vec![0x1f, 0x8b, 8, 0x02 | 0x04 | 0x08 | 0x10, 1, 2, 3, 4, 0, 3];
    h.extend_from_slice(&[4, 0, b'A', b'B', 1, 0]); // FEXTRA: one 4-byte subfield... of 0 bytes
    h.extend_from_slice(b"name.nii\0comment\0");
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&(crc as u16).to_le_bytes());
    let mut e = flate2::write::DeflateEncoder::new(h, flate2::Compression::new(6));
    e.write_all(data).unwrap();
    let mut out = e.finish().unwrap();
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn python_written() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("data/demo"))
        .expect("data/demo (make setup fetches it)")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".nii.gz"))
        .collect();
    let lib = root().join(".venv/lib");
    let py = std::fs::read_dir(&lib)
        .expect(".venv (make setup)")
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("python3"))
        .expect("a python3.* folder in .venv/lib");
    let nib = py.join("site-packages/nibabel/tests/data");
    for name in [
        "example4d.nii.gz",
        "example_nifti2.nii.gz",
        "standard.nii.gz",
        "test.mgz",
    ] {
        files.push(nib.join(name));
    }
    files.sort();
    files
}

#[test]
fn real_gzip_files_inflate_identically() {
    require_isal();
    let files = python_written();
    assert!(files.len() >= 8, "{files:?}");
    for p in &files {
        let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let reference = {
            let mut v = Vec::new();
            flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_end(&mut v)
                .unwrap();
            v
        };
        for chunk in [1 << 20, 4096, 7] {
            if chunk == 7 && bytes.len() > 1 << 20 {
                continue;
            }
            let out = agree(&bytes, &p.display().to_string(), chunk).expect("a valid file inflates");
            assert_eq!(out, reference, "{}", p.display());
        }
    }
}

#[test]
fn every_header_field_levels_and_members_inflate_identically() {
    require_isal();
    let data = payload(300_000);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for level in [0, 1, 6, 9] {
        cases.push((format!("level {level}"), gz(&data, level, flate2::GzBuilder::new())));
    }
    cases.push((
        "name, comment, extra".into(),
        gz(
            &data,
            6,
            flate2::GzBuilder::new()
                .filename("ct.nii")
                .comment("a comment")
                .extra(vec![b'M', b'D', 3, 0, 1, 2, 3]),
        ),
    ));
    cases.push(("header crc".into(), gz_with_hcrc(&data)));
    cases.push(("empty member".into(), gz(b"", 6, flate2::GzBuilder::new())));
    let mut multi = gz(&data[..1000], 6, flate2::GzBuilder::new());
    multi.extend(gz(b"", 1, flate2::GzBuilder::new()));
    multi.extend(gz_with_hcrc(&data[1000..50_000]));
    multi.extend(gz(&data[50_000..], 0, flate2::GzBuilder::new()));
    cases.push(("four members".into(), multi));
    for (what, bytes) in &cases {
        for chunk in [1 << 20, 65536, 1000, 1] {
            let out = agree(bytes, what, chunk).unwrap_or_else(|| panic!("{what}: refused"));
            let want: &[u8] = if what == "empty member" { b"" } else { &data };
            assert!(out == want, "{what} (chunk {chunk}): wrong bytes");
        }
    }
}

#[test]
fn damaged_streams_are_refused_by_both() {
    require_isal();
    let data = payload(40_000);
    let mut two = gz(&data[..20_000], 6, flate2::GzBuilder::new().filename("a"));
    let boundary = two.len();
    two.extend(gz(&data[20_000..], 9, flate2::GzBuilder::new()));
    let mut checked = 0usize;
    for (name, good) in [
        ("one member", gz(&data, 6, flate2::GzBuilder::new())),
        ("two members", two),
    ] {
        // every truncation
        for cut in 0..good.len() {
            if name == "two members" && cut == boundary {
                // the first member alone: a valid stream
                assert_eq!(agree(&good[..cut], "first member", 4096).unwrap(), &data[..20_000]);
                continue;
            }
            let what = format!("{name} cut at {cut}/{}", good.len());
            assert!(agree(&good[..cut], &what, 4096).is_none(), "{what} inflated");
            checked += 1;
        }
        // trailing garbage, zeros, a stray gzip magic
        for tail in [
            &b"\0"[..],
            b"\0\0\0\0\0\0\0\0",
            b"garbage",
            b"\x1f",
            b"\x1f\x8b",
            b"\x1f\x8b\x08\0",
        ] {
            let mut b = good.clone();
            b.extend_from_slice(tail);
            assert!(
                agree(&b, &format!("{name} + {tail:?}"), 4096).is_none(),
                "{name} + {tail:?} inflated"
            );
            checked += 1;
        }
        // bit flips, one or three at a time, anywhere
        let mut s = 12345u64;
        let mut next = |n: usize| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as usize % n
        };
        for i in 0..3000 {
            let mut b = good.clone();
            for _ in 0..(1 + 2 * (i % 2)) {
                let at = next(b.len());
                b[at] ^= 1 << next(8);
            }
            agree(&b, &format!("{name} flip #{i}"), [4096, 333][i % 2]);
            checked += 1;
        }
    }
    assert!(checked > 6000);
}

/// The readers use the process's inflater: ISA-L here, unless
/// MED3D_INFLATE says otherwise.
#[test]
fn readers_inflate_with_isal_by_default() {
    require_isal();
    if std::env::var("MED3D_INFLATE").is_err() {
        assert_eq!(gzip::inflater(), Inflater::Isal);
    }
    let p: &Path = &root().join("data/demo/mni152_t1.nii.gz");
    let img = med3dinsight::volume::nifti::read(p, &med3dinsight::volume::ReadOptions::default()).unwrap();
    assert_eq!(img.shape.iter().product::<usize>(), img.data.len());
}

/// Fuzz findings (scripts/fuzz.sh, target gzip_inflaters): streams the two
/// inflaters once disagreed on.
#[test]
fn fuzz_findings_agree() {
    require_isal();
    let dir = root().join("tests/data/gzip");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        for chunk in [4096, 1] {
            agree(&bytes, &p.display().to_string(), chunk);
        }
        n += 1;
    }
    assert!(n >= 1, "no findings in {}", dir.display());
}
