//! `captions.jsonl`: one JSON line per caption record, appended as results
//! arrive and shared by concurrent shards.
//!
//! Every touch of the file happens under an exclusive lock on a sibling
//! `<name>.lock` file. An append opens the file (O_APPEND), writes whole
//! lines in one call and closes it, so a compaction that renames a new file
//! into place is never written past by an appender holding the old one. A
//! line without its newline can only come from a process killed inside its
//! write; the next append or read under the lock cuts it off. A compaction
//! keeps the latest record per slice and rewrites the file atomically.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::quality::Flag;
use crate::config::Plane;
use crate::fsutil::atomic_write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A caption to train on (possibly with flags the policy keeps).
    Ok,
    /// Answered, but the policy drops it; done, not retried.
    Dropped,
    /// No usable caption within the retry budget; retried on the next run.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionRecord {
    pub slice_id: String,
    pub case: String,
    pub plane: Plane,
    pub index: usize,
    pub status: Status,
    pub text: String,
    pub backend: String,
    pub model: String,
    pub prompt_hash: String,
    /// sha256 of the slice's PNG file, as sent.
    pub image_sha256: String,
    /// Duration of the last request (descriptor: of the computation).
    pub latency_ms: u64,
    pub attempts: u32,
    pub flags: Vec<Flag>,
    pub error: Option<String>,
}

impl CaptionRecord {
    /// Done: not to be asked again while prompt and image stay the same.
    pub fn is_done_for(&self, prompt_hash: &str, image_sha256: &str) -> bool {
        self.status != Status::Failed && self.prompt_hash == prompt_hash && self.image_sha256 == image_sha256
    }

    fn sort_key(&self) -> (&str, usize, usize) {
        (&self.case, self.plane.id(), self.index)
    }
}

pub struct Store {
    path: PathBuf,
    lock_path: PathBuf,
}

/// Records read back, and how many lines could not be parsed.
pub struct Loaded {
    pub records: Vec<CaptionRecord>,
    pub bad_lines: usize,
}

impl Store {
    pub fn new(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
        lock_name.push(".lock");
        Ok(Store {
            path: path.to_path_buf(),
            lock_path: path.with_file_name(lock_name),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> Result<File> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .with_context(|| format!("cannot open lock file {}", self.lock_path.display()))?;
        f.lock()
            .with_context(|| format!("cannot lock {}", self.lock_path.display()))?;
        Ok(f)
    }

    /// Appends records as whole lines in one write (under the lock).
    pub fn append(&self, recs: &[CaptionRecord]) -> Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(recs.len() * 512);
        for r in recs {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let _lock = self.lock()?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {} for appending", self.path.display()))?;
        cut_torn_tail(&f, &self.path)?;
        f.write_all(&buf)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        Ok(())
    }

    /// Every parseable record, in file order; a torn last line is cut off.
    pub fn load(&self) -> Result<Loaded> {
        let _lock = self.lock()?;
        self.load_locked()
    }

    fn load_locked(&self) -> Result<Loaded> {
        let f = match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Loaded {
                    records: Vec::new(),
                    bad_lines: 0,
                })
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", self.path.display())),
        };
        cut_torn_tail(&f, &self.path)?;
        drop(f);
        let text = std::fs::read(&self.path).with_context(|| format!("cannot read {}", self.path.display()))?;
        let mut records = Vec::new();
        let mut bad_lines = 0;
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<CaptionRecord>(line) {
                Ok(r) => records.push(r),
                Err(e) => {
                    bad_lines += 1;
                    tracing::warn!(
                        "{}:{}: skipping unreadable caption record: {e}",
                        self.path.display(),
                        i + 1
                    );
                }
            }
        }
        Ok(Loaded { records, bad_lines })
    }

    /// The latest record of each slice.
    pub fn latest(&self) -> Result<HashMap<String, CaptionRecord>> {
        Ok(latest_of(self.load()?.records))
    }

    /// Rewrites the file with one record per slice (the latest), after
    /// `edit` has had its say over them; returns what was written.
    pub fn compact(&self, edit: impl FnOnce(&mut Vec<CaptionRecord>)) -> Result<Vec<CaptionRecord>> {
        let _lock = self.lock()?;
        let loaded = self.load_locked()?;
        let mut recs: Vec<CaptionRecord> = latest_of(loaded.records).into_values().collect();
        edit(&mut recs);
        recs.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        let mut buf = Vec::with_capacity(recs.len() * 512);
        for r in &recs {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        atomic_write(&self.path, &buf)?;
        Ok(recs)
    }
}

fn latest_of(recs: Vec<CaptionRecord>) -> HashMap<String, CaptionRecord> {
    let mut m = HashMap::with_capacity(recs.len());
    for r in recs {
        m.insert(r.slice_id.clone(), r);
    }
    m
}

/// Truncates the file after its last newline when it does not end in one.
fn cut_torn_tail(f: &File, path: &Path) -> Result<()> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    f.read_exact_at(&mut last, len - 1)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    let mut end = len;
    let mut keep = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.read_exact_at(chunk, start)?;
        if let Some(p) = chunk.iter().rposition(|&b| b == b'\n') {
            keep = start + p as u64 + 1;
            break;
        }
        end = start;
    }
    tracing::warn!(
        "{}: cutting off a torn last line ({} bytes) left by a killed writer",
        path.display(),
        len - keep
    );
    f.set_len(keep)
        .with_context(|| format!("cannot cut the torn last line of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn rec(id: &str, status: Status, text: &str) -> CaptionRecord {
        let mut parts = id.split('/');
        let case = parts.next().unwrap_or_default().to_string();
        let plane = match parts.next() {
            Some("coronal") => Plane::Coronal,
            Some("sagittal") => Plane::Sagittal,
            _ => Plane::Axial,
        };
        CaptionRecord {
            slice_id: id.into(),
            case,
            plane,
            index: parts.next().and_then(|s| s.parse().ok()).unwrap_or(0),
            status,
            text: text.into(),
            backend: "openai".into(),
            model: "m".into(),
            prompt_hash: "p".into(),
            image_sha256: "i".into(),
            latency_ms: 1,
            attempts: 1,
            flags: vec![],
            error: None,
        }
    }

    #[test]
    fn torn_tail_is_cut_and_compaction_keeps_the_latest() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(&d.path().join("sub/captions.jsonl")).unwrap();
        s.append(&[rec("a/axial/10", Status::Failed, ""), rec("a/axial/2", Status::Ok, "x")])
            .unwrap();
        // a writer killed mid-line
        let mut f = OpenOptions::new().append(true).open(s.path()).unwrap();
        f.write_all(br#"{"slice_id":"a/axial/3","ca"#).unwrap();
        drop(f);
        s.append(&[rec("a/axial/10", Status::Ok, "y")]).unwrap();
        let text = std::fs::read_to_string(s.path()).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with('\n'));
        let l = s.load().unwrap();
        assert_eq!((l.records.len(), l.bad_lines), (3, 0));
        let out = s.compact(|_| {}).unwrap();
        let ids: Vec<_> = out.iter().map(|r| (r.slice_id.as_str(), r.status)).collect();
        assert_eq!(ids, vec![("a/axial/2", Status::Ok), ("a/axial/10", Status::Ok)]);
        assert_eq!(std::fs::read_to_string(s.path()).unwrap().lines().count(), 2);
        assert!(d.path().join("sub/captions.jsonl.lock").exists());
    }

    #[test]
    fn torn_tail_without_any_newline_empties_the_file() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(&d.path().join("c.jsonl")).unwrap();
        std::fs::write(s.path(), b"{\"slice_").unwrap();
        assert!(s.load().unwrap().records.is_empty());
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), 0);
    }

    #[test]
    fn done_means_same_prompt_same_image_not_failed() {
        let r = rec("a/axial/1", Status::Ok, "t");
        assert!(r.is_done_for("p", "i"));
        assert!(!r.is_done_for("q", "i"));
        assert!(!r.is_done_for("p", "j"));
        assert!(!rec("a/axial/1", Status::Failed, "").is_done_for("p", "i"));
        assert!(rec("a/axial/1", Status::Dropped, "").is_done_for("p", "i"));
    }
}
