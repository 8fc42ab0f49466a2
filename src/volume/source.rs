//! What the readers learn about their source files while reading them, kept
//! for the caller that asked (`record`), on its thread:
//! - the sha256 of every file read whole, from its first byte to its last
//!   in order, through `HashedFile`, so the cache's provenance hash costs no
//!   second pass over the input (or, for a DICOM folder, the series hash
//!   that `dicom::load` computes from the bytes its scan read anyway);
//! - the wall time of the steps of reading (read, inflate, decode,
//!   transpose, scan), which `med3d preprocess` logs beside its own stages.
//!
//! Nothing is recorded, and nothing is hashed, outside `record`.
use std::cell::RefCell;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// What one `record` call saw.
#[derive(Debug, Default)]
pub struct Recording {
    sha256: Vec<(PathBuf, String)>,
    steps: Vec<(&'static str, Duration)>,
}

impl Recording {
    /// The sha256 of `path`, when it was read whole.
    pub fn sha256_of(&self, path: &Path) -> Option<&str> {
        self.sha256
            .iter()
            .rev()
            .find(|(p, _)| p == path)
            .map(|(_, h)| h.as_str())
    }

    /// Each step's summed wall time, in the order the steps first ran.
    pub fn steps(&self) -> &[(&'static str, Duration)] {
        &self.steps
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Recording>> = const { RefCell::new(None) };
}

/// Runs `f`, recording what the readers it calls report on this thread.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Recording) {
    let outer = CURRENT.with(|c| c.replace(Some(Recording::default())));
    let out = f();
    let rec = CURRENT.with(|c| c.replace(outer)).unwrap_or_default();
    (out, rec)
}

fn recording() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

/// Adds `d` to `step`'s time (when recording).
pub fn add_time(step: &'static str, d: Duration) {
    CURRENT.with(|c| {
        if let Some(r) = c.borrow_mut().as_mut() {
            match r.steps.iter_mut().find(|(s, _)| *s == step) {
                Some((_, t)) => *t += d,
                None => r.steps.push((step, d)),
            }
        }
    })
}

/// Runs `f`, its wall time counted to `step` (when recording).
pub fn time<T>(step: &'static str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    add_time(step, t.elapsed());
    out
}

/// Notes the sha256 of `path`, computed by a reader from the bytes it read.
pub fn note_sha256(path: &Path, hex: String) {
    CURRENT.with(|c| {
        if let Some(r) = c.borrow_mut().as_mut() {
            r.sha256.push((path.to_path_buf(), hex));
        }
    })
}

/// Notes the sha256 of `bytes`, the whole of `path` as a reader read it;
/// hashed only while recording.
pub fn note_whole(path: &Path, bytes: &[u8]) {
    if recording() {
        note_sha256(path, crate::fsutil::sha256_bytes(bytes));
    }
}

/// A file that hashes what is read from it, in order, while recording:
/// when a read reaches its end, every byte went through and its sha256 is
/// noted for `path`. It cannot seek, so a hash noted is the whole file's.
pub struct HashedFile {
    file: std::fs::File,
    path: PathBuf,
    hasher: Option<Sha256>,
}

impl HashedFile {
    pub fn open(path: &Path) -> io::Result<HashedFile> {
        Self::open_if(path, true)
    }

    /// Opens `path`, hashed only when `hash` (and recording): a file read
    /// in part, or one whose hash is not the source's (a detached data
    /// file), is opened with `hash` false.
    pub fn open_if(path: &Path, hash: bool) -> io::Result<HashedFile> {
        Ok(HashedFile {
            file: std::fs::File::open(path)?,
            path: path.to_path_buf(),
            hasher: (hash && recording()).then(Sha256::new),
        })
    }

    /// Reads the rest of the file, and drops it, while hashing: a reader
    /// that needed the file only up to some point calls this after, so
    /// that the whole file's hash is noted. Nothing is read otherwise.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.hasher.is_some() {
            io::copy(self, &mut io::sink())?;
        }
        Ok(())
    }
}

impl Read for HashedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            if n > 0 {
                h.update(&buf[..n]);
            } else if !buf.is_empty() {
                let h = self.hasher.take().expect("the hasher is there");
                note_sha256(&self.path, hex::encode(h.finalize()));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_read_to_its_end_is_hashed_once_and_a_partial_read_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        // bounded: a test's bytes
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let ((), rec) = record(|| {
            let mut f = HashedFile::open(&p).unwrap();
            let mut first = [0u8; 1000];
            f.read_exact(&mut first).unwrap();
        });
        assert_eq!(rec.sha256_of(&p), None, "a partial read is not the file's hash");
        let ((), rec) = record(|| {
            let mut out = Vec::new();
            time("read", || HashedFile::open(&p).unwrap().read_to_end(&mut out).unwrap());
        });
        assert_eq!(rec.sha256_of(&p), Some(crate::fsutil::sha256_bytes(&bytes).as_str()));
        assert_eq!(rec.steps().len(), 1);
        // outside `record`, nothing is hashed or kept
        let mut out = Vec::new();
        HashedFile::open(&p).unwrap().read_to_end(&mut out).unwrap();
        assert!(HashedFile::open(&p).unwrap().hasher.is_none());
    }
}
