//! File-system habits every stage shares: write to a temporary name,
//! fsync it, rename it into place and fsync the folder (so a kill leaves
//! the old file or the new one, never a torn one, and so does a crash of
//! the machine once the call has returned), hash sources, and sweep
//! temporaries left by dead processes.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Marker in temporary names: `<name>.tmp-<pid>-<n>`.
const TMP_MARK: &str = ".tmp-";

/// A temporary path beside `path`, unique to this process and call.
pub fn tmp_path(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{name}{TMP_MARK}{}-{n}", std::process::id()))
}

/// Writes `bytes` to `path` atomically and durably: a temporary file,
/// fsynced, renamed into place, then the folder fsynced. On any failure
/// (a full disk above all) the temporary is removed and `path` keeps its
/// previous content.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let written = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {} ({} bytes)", tmp.display(), bytes.len()))?;
        f.sync_all()
            .with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path)
}

/// fsyncs the folder holding `path`, so a rename into it survives a crash.
pub fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

/// fsyncs a folder (its entries: files renamed in or out).
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush folder {} to disk", dir.display()))
}

/// Moves a finished temporary file into place durably: its data fsynced,
/// the rename, then the folder fsynced.
pub fn commit_file(tmp: &Path, path: &Path) -> Result<()> {
    sync_file(tmp)?;
    std::fs::rename(tmp, path).with_context(|| format!("cannot move {} into place", path.display()))?;
    sync_parent(path)
}

/// fsyncs every file of a folder written by this process (and its
/// sub-folders), then the folder itself: before the folder is renamed
/// into place as one commit.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e.with_context(|| format!("cannot list {}", dir.display()))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            sync_file(&p)?;
        }
    }
    sync_dir(dir)
}

/// fsyncs a file's data.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {} to disk", path.display()))
}

/// Like `atomic_write`, but leaves the file (and its mtime) alone when it
/// already holds `bytes`, so a rerun that changes nothing rewrites nothing.
/// Returns whether it wrote.
pub fn atomic_write_if_changed(path: &Path, bytes: &[u8]) -> Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    atomic_write(path, bytes)?;
    Ok(true)
}

/// Hex sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: file not found or unreadable", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The pid that made a temporary name, if `name` is one.
fn tmp_owner(name: &str) -> Option<u32> {
    let rest = &name[name.rfind(TMP_MARK)? + TMP_MARK.len()..];
    rest.split('-').next()?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes temporaries in `dir` (not recursive) whose process is gone.
pub fn sweep_stale_tmp(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(0) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = tmp_owner(&name) {
            if !pid_alive(pid) {
                let p = e.path();
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.with_context(|| format!("cannot remove stale temporary {}", p.display()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_dead_processes_are_swept() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.json.tmp-999999999-0"), b"x").unwrap();
        let mine = tmp_path(&d.path().join("b.json"));
        std::fs::write(&mine, b"y").unwrap();
        atomic_write(&d.path().join("c.json"), b"z").unwrap();
        assert_eq!(sweep_stale_tmp(d.path()).unwrap(), 1);
        assert!(mine.exists());
        assert_eq!(std::fs::read(d.path().join("c.json")).unwrap(), b"z");
    }

    #[test]
    fn unchanged_bytes_are_not_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        assert!(atomic_write_if_changed(&p, b"x").unwrap());
        let t = std::fs::metadata(&p).unwrap().modified().unwrap();
        assert!(!atomic_write_if_changed(&p, b"x").unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), t);
        assert!(atomic_write_if_changed(&p, b"y").unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"y");
    }
}
