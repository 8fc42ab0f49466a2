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
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::quality::{self, Flag};
use crate::artifacts::cache::Plane;
use crate::fsutil::tmp_path;

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
    /// Tokens the server reported over this slice's requests in this run
    /// (absent when it reports none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// What the kept reply was asked with, when a quality retry changed the
    /// request (raised temperature and a seed); absent for the plain request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
}

/// Token counts from a reply's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
    }
}

/// The sampling settings of a changed (retried) request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f64,
    pub seed: u64,
}

/// The fields of a record that say which caption a slice has.
#[derive(Deserialize)]
struct TextOf {
    slice_id: String,
    status: Status,
    #[serde(default)]
    text: String,
}

/// The usable caption of each slice, read-only: the last record per slice
/// wins, and only status `ok` with non-blank text counts. Returns the
/// captions and the number of unparsable lines (a torn last line after a
/// kill is one). What the embed stage trains its text targets on.
pub fn read_ok_captions(path: &Path) -> Result<(HashMap<String, String>, usize)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read captions {} (run `med3d caption` first)", path.display()))?;
    let mut out = HashMap::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<TextOf>(line) {
            Ok(c) if c.status == Status::Ok && !c.text.trim().is_empty() => {
                out.insert(c.slice_id, c.text);
            }
            Ok(c) => {
                out.remove(&c.slice_id);
            }
            Err(_) => bad += 1,
        }
    }
    Ok((out, bad))
}

pub struct Store {
    path: PathBuf,
    lock_path: PathBuf,
}

/// What the skip check, the `repeated` judgement and the summary need of a
/// record, read without its text.
#[derive(Deserialize)]
struct Head {
    slice_id: String,
    status: Status,
    prompt_hash: String,
    image_sha256: String,
    #[serde(default)]
    flags: Vec<Flag>,
}

/// Where the latest record of a slice is, and its gist.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    offset: u64,
    len: u32,
    pub status: Status,
    flags: u8,
    done: u64,
}

impl Slot {
    pub fn has(&self, f: Flag) -> bool {
        self.flags & flag_bit(f) != 0
    }

    pub fn flagged(&self) -> bool {
        self.flags != 0
    }
}

fn flag_bit(f: Flag) -> u8 {
    1 << (f as u8)
}

fn key_of(prompt_hash: &str, image_sha256: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (prompt_hash, image_sha256).hash(&mut h);
    h.finish()
}

/// The latest record of every slice, as a snapshot of one version of the
/// file: the slots point into the open file, which stays readable when a
/// compaction renames a new file into place. Memory grows with the number
/// of slices (tens of bytes each), not with the text.
pub struct Latest {
    file: Option<File>,
    map: HashMap<String, Slot>,
    pub bad_lines: usize,
}

impl Latest {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn slot(&self, slice_id: &str) -> Option<&Slot> {
        self.map.get(slice_id)
    }

    pub fn slots(&self) -> impl Iterator<Item = (&str, &Slot)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Done: `ok` or `dropped` with the same prompt hash and image.
    pub fn is_done(&self, slice_id: &str, prompt_hash: &str, image_sha256: &str) -> bool {
        self.map
            .get(slice_id)
            .is_some_and(|s| s.status != Status::Failed && s.done == key_of(prompt_hash, image_sha256))
    }

    /// The full record behind a slot.
    pub fn read_slot(&self, slot: &Slot) -> Result<CaptionRecord> {
        let f = self.file.as_ref().context("no captions file")?;
        let mut buf = vec![0u8; slot.len as usize];
        f.read_exact_at(&mut buf, slot.offset)?;
        Ok(serde_json::from_slice(&buf)?)
    }

    pub fn read(&self, slice_id: &str) -> Result<Option<CaptionRecord>> {
        self.map.get(slice_id).map(|s| self.read_slot(s)).transpose()
    }

    /// Slices whose normalised text is shared by at least `threshold`
    /// slices, over the records that count: `ok` ones, and those already
    /// dropped as repeated (so a dropped group stays a group).
    pub fn repeated(&self, threshold: usize) -> Result<HashSet<String>> {
        let counted = |s: &Slot| s.status == Status::Ok || (s.status == Status::Dropped && s.has(Flag::Repeated));
        let mut text_of: Vec<(&str, u64)> = Vec::new();
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for (id, s) in self.map.iter().filter(|(_, s)| counted(s)) {
            let r = self.read_slot(s)?;
            let n = quality::normalise(&r.text);
            if n.is_empty() {
                continue;
            }
            let mut h = std::hash::DefaultHasher::new();
            n.hash(&mut h);
            let h = h.finish();
            *counts.entry(h).or_default() += 1;
            text_of.push((id, h));
        }
        Ok(text_of
            .into_iter()
            .filter(|(_, h)| counts[h] >= threshold)
            .map(|(id, _)| id.to_string())
            .collect())
    }
}

/// Orders records as the index does: case, plane, index (from the id
/// `<case>/<plane>/<index>`).
fn sort_key(slice_id: &str) -> (&str, usize, usize, &str) {
    let mut it = slice_id.rsplitn(3, '/');
    let index = it.next().and_then(|s| s.parse().ok()).unwrap_or(usize::MAX);
    let plane = match it.next() {
        Some("axial") => 0,
        Some("coronal") => 1,
        Some("sagittal") => 2,
        _ => 3,
    };
    (it.next().unwrap_or(""), plane, index, slice_id)
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

    /// Every parseable record, in file order (tests and small files).
    pub fn load(&self) -> Result<Vec<CaptionRecord>> {
        let latest = self.latest()?;
        let mut slots: Vec<&Slot> = latest.map.values().collect();
        slots.sort_by_key(|s| s.offset);
        slots.into_iter().map(|s| latest.read_slot(s)).collect()
    }

    /// The latest record of each slice (a torn last line is cut off first).
    pub fn latest(&self) -> Result<Latest> {
        let _lock = self.lock()?;
        self.latest_locked()
    }

    fn latest_locked(&self) -> Result<Latest> {
        let f = match OpenOptions::new().read(true).write(true).open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Latest {
                    file: None,
                    map: HashMap::new(),
                    bad_lines: 0,
                })
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", self.path.display())),
        };
        cut_torn_tail(&f, &self.path)?;
        let mut map = HashMap::new();
        let mut bad_lines = 0;
        let mut r = BufReader::with_capacity(1 << 20, &f);
        let mut line = Vec::new();
        let (mut offset, mut n) = (0u64, 0usize);
        loop {
            line.clear();
            let got = r
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read {}", self.path.display()))?;
            if got == 0 {
                break;
            }
            n += 1;
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            if !body.is_empty() {
                match serde_json::from_slice::<Head>(body) {
                    Ok(h) => {
                        let slot = Slot {
                            offset,
                            len: body.len() as u32,
                            status: h.status,
                            flags: h.flags.iter().fold(0, |m, f| m | flag_bit(*f)),
                            done: key_of(&h.prompt_hash, &h.image_sha256),
                        };
                        map.insert(h.slice_id, slot);
                    }
                    Err(e) => {
                        bad_lines += 1;
                        tracing::warn!("{}:{n}: skipping unreadable caption record: {e}", self.path.display());
                    }
                }
            }
            offset += got as u64;
        }
        drop(r);
        Ok(Latest {
            file: Some(f),
            map,
            bad_lines,
        })
    }

    /// Rewrites the file with one record per slice (the latest), in index
    /// order, after `edit` has seen each record with the set of slices whose
    /// text is repeated (`repeated_threshold`); returns the new snapshot.
    /// Streams: one record in memory at a time.
    pub fn compact(&self, repeated_threshold: usize, mut edit: impl FnMut(&mut CaptionRecord, bool)) -> Result<Latest> {
        let _lock = self.lock()?;
        let cur = self.latest_locked()?;
        if cur.file.is_none() {
            return Ok(cur);
        }
        let rep = cur.repeated(repeated_threshold)?;
        let mut order: Vec<(&str, &Slot)> = cur.map.iter().map(|(k, v)| (k.as_str(), v)).collect();
        order.sort_by(|a, b| sort_key(a.0).cmp(&sort_key(b.0)));
        let tmp = tmp_path(&self.path);
        let out = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, &out);
        let mut map = HashMap::with_capacity(order.len());
        let mut offset = 0u64;
        let mut buf = Vec::with_capacity(4096);
        for (id, slot) in order {
            let mut r = cur.read_slot(slot)?;
            edit(&mut r, rep.contains(id));
            buf.clear();
            serde_json::to_writer(&mut buf, &r)?;
            map.insert(
                r.slice_id.clone(),
                Slot {
                    offset,
                    len: buf.len() as u32,
                    status: r.status,
                    flags: r.flags.iter().fold(0, |m, f| m | flag_bit(*f)),
                    done: key_of(&r.prompt_hash, &r.image_sha256),
                },
            );
            buf.push(b'\n');
            w.write_all(&buf)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            offset += buf.len() as u64;
        }
        w.flush().with_context(|| format!("cannot write {}", tmp.display()))?;
        drop(w);
        let file = File::open(&tmp).with_context(|| format!("cannot reopen {}", tmp.display()))?;
        crate::fsutil::commit_file(&tmp, &self.path)?;
        Ok(Latest {
            file: Some(file),
            map,
            bad_lines: 0,
        })
    }
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
            usage: None,
            sampling: None,
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
        let l = s.latest().unwrap();
        assert_eq!((l.len(), l.bad_lines), (2, 0));
        assert_eq!(l.read("a/axial/10").unwrap().unwrap().text, "y");
        let out = s.compact(2, |_, _| {}).unwrap();
        assert_eq!(out.read("a/axial/10").unwrap().unwrap().status, Status::Ok);
        let ids: Vec<_> = s.load().unwrap().into_iter().map(|r| (r.slice_id, r.status)).collect();
        assert_eq!(
            ids,
            vec![
                ("a/axial/2".to_string(), Status::Ok),
                ("a/axial/10".to_string(), Status::Ok)
            ]
        );
        assert_eq!(std::fs::read_to_string(s.path()).unwrap().lines().count(), 2);
        assert!(d.path().join("sub/captions.jsonl.lock").exists());
    }

    #[test]
    fn a_snapshot_survives_a_compaction_by_someone_else() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(&d.path().join("c.jsonl")).unwrap();
        s.append(&[
            rec("a/axial/1", Status::Failed, "old"),
            rec("a/axial/1", Status::Ok, "new"),
        ])
        .unwrap();
        let snap = s.latest().unwrap();
        s.compact(2, |r, _| r.text = "rewritten".into()).unwrap();
        assert_eq!(snap.read("a/axial/1").unwrap().unwrap().text, "new");
        assert_eq!(
            s.latest().unwrap().read("a/axial/1").unwrap().unwrap().text,
            "rewritten"
        );
    }

    #[test]
    fn torn_tail_without_any_newline_empties_the_file() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(&d.path().join("c.jsonl")).unwrap();
        std::fs::write(s.path(), b"{\"slice_").unwrap();
        assert!(s.latest().unwrap().is_empty());
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), 0);
    }

    #[test]
    fn done_means_same_prompt_same_image_not_failed() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(&d.path().join("c.jsonl")).unwrap();
        s.append(&[
            rec("a/axial/1", Status::Ok, "t"),
            rec("a/axial/2", Status::Failed, ""),
            rec("a/axial/3", Status::Dropped, "t"),
        ])
        .unwrap();
        let l = s.latest().unwrap();
        assert!(l.is_done("a/axial/1", "p", "i"));
        assert!(!l.is_done("a/axial/1", "q", "i"));
        assert!(!l.is_done("a/axial/1", "p", "j"));
        assert!(!l.is_done("a/axial/2", "p", "i"));
        assert!(l.is_done("a/axial/3", "p", "i"));
        assert!(!l.is_done("a/axial/4", "p", "i"));
    }

    #[test]
    fn repeated_counts_ok_and_dropped_repeats_and_order_follows_the_index() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(&d.path().join("c.jsonl")).unwrap();
        let mut dropped = rec("b/axial/1", Status::Dropped, "Same text");
        dropped.flags.push(Flag::Repeated);
        s.append(&[
            rec("b/sagittal/2", Status::Ok, "same text."),
            rec("b/axial/10", Status::Ok, "SAME TEXT"),
            rec("b/axial/9", Status::Failed, "same text"),
            dropped,
            rec("a/coronal/3", Status::Ok, "other"),
        ])
        .unwrap();
        let mut rep: Vec<_> = s.latest().unwrap().repeated(3).unwrap().into_iter().collect();
        rep.sort();
        assert_eq!(rep, vec!["b/axial/1", "b/axial/10", "b/sagittal/2"]);
        let mut seen = Vec::new();
        s.compact(3, |r, is_rep| seen.push((r.slice_id.clone(), is_rep)))
            .unwrap();
        let order: Vec<_> = s.load().unwrap().into_iter().map(|r| r.slice_id).collect();
        assert_eq!(
            order,
            vec!["a/coronal/3", "b/axial/1", "b/axial/9", "b/axial/10", "b/sagittal/2"]
        );
        assert_eq!(seen.iter().filter(|(_, r)| *r).count(), 3);
    }
}
