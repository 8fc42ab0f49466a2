//! TensorBoard event files (`RUN/tensorboard/events.out.tfevents.*`), so a
//! running `tensorboard --logdir` shows a run's scalars as they are
//! written. Written by hand, with no protobuf dependency: the format is
//! TFRecord framing around `tensorboard/compat/proto/event.proto`'s Event.
//!
//! - A record is `u64 length | u32 masked crc32c(length) | data | u32
//!   masked crc32c(data)`, little-endian; CRC-32C is Castagnoli's, masked
//!   as TensorFlow does (rotate right by 15, plus 0xa282ead8).
//! - Each file starts with the Event `file_version: "brain.Event:2"`:
//!   with it, TensorBoard's reader drops orphaned points only on a
//!   `SessionLog.START`, not whenever a step goes backwards.
//! - A writer opened to continue a run at step `s` writes a
//!   `SessionLog.START` at step `s`: TensorBoard then drops every point of
//!   the earlier files at steps >= s (those of a killed run after its last
//!   checkpoint), so a resumed run shows each step once, as metrics.jsonl
//!   does.
//! - A scalar is a `Summary.Value { tag, simple_value }` (a float32), one
//!   Event per step holding all of that step's values.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The file-version string of the current event format.
const FILE_VERSION: &str = "brain.Event:2";

/// Appends events to one new file in a `tensorboard/` folder.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new event file in `dir` (created if needed), named as
    /// TensorFlow's writer names them, beginning with the file version.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host = hostname();
        let pid = std::process::id();
        // Unique within the folder even for two writers of one process in
        // one second; names sort by time, as TensorBoard reads them.
        let (path, file) = (0u32..)
            .map(|n| dir.join(format!("events.out.tfevents.{secs:010}.{host}.{pid}.{n}")))
            .find_map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .ok()
                    .map(|f| (p, f))
            })
            .with_context(|| format!("cannot create an event file in {}", dir.display()))?;
        let mut w = EventWriter { path, file };
        let mut e = event_head(wall_time(), 0);
        field_bytes(&mut e, 3, FILE_VERSION.as_bytes());
        w.record(&e)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks a (re)start at `step`: TensorBoard drops the points of
    /// earlier files at steps >= `step`.
    pub fn start_at(&mut self, step: u64) -> Result<()> {
        let mut e = event_head(wall_time(), step);
        // SessionLog { status: START (1) } as Event field 7
        field_bytes(&mut e, 7, &[0x08, 0x01]);
        self.record(&e)
    }

    /// One event at `step` holding every `(tag, value)` as a float32
    /// scalar; non-finite values are written as they are.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            field_bytes(&mut value, 1, tag.as_bytes());
            value.push(0x15); // simple_value = 2, fixed32
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(&mut summary, 1, &value);
        }
        let mut e = event_head(wall_time(), step);
        field_bytes(&mut e, 5, &summary);
        self.record(&e)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        // bounded: one event this process built (a writer)
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The numeric fields of a metrics line (a flat JSON object) as scalars,
/// named as in the line, but for `skip` (the step itself, counters);
/// booleans and nulls are left out.
pub fn numeric_fields<T: serde::Serialize>(line: &T, skip: &[&str]) -> Vec<(String, f64)> {
    let Ok(serde_json::Value::Object(m)) = serde_json::to_value(line) else {
        return Vec::new();
    };
    m.into_iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k, v.as_f64()?)))
        .collect()
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
    let h: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

/// An Event's `wall_time` (field 1, double) and `step` (field 2, int64;
/// left out at 0, as proto3 writers do).
fn event_head(wall_time: f64, step: u64) -> Vec<u8> {
    // bounded: a fixed 1-byte tag (a writer)
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        e.push(0x10);
        varint(&mut e, step);
    }
    e
}

/// A length-delimited field (wire type 2).
fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TensorFlow's and TensorBoard's own test vectors.
    #[test]
    fn crc_and_framing_match_tensorflow() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc32c(b"\x1a\x11CRC test, one two"), 0x5794_d08a);
        // the first record of a file with wall_time 1.0
        let mut e = event_head(1.0, 0);
        field_bytes(&mut e, 3, FILE_VERSION.as_bytes());
        let len = (e.len() as u64).to_le_bytes();
        let mut rec = len.to_vec();
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(&e);
        rec.extend_from_slice(&masked_crc32c(&e).to_le_bytes());
        let hex: String = rec.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "1800000000000000a37f4b2209000000000000f03f1a0d627261696e2e4576656e743a3286bf577a"
        );
    }

    #[test]
    fn numeric_fields_skip_flags_nulls_and_named_keys() {
        let v = serde_json::json!({"step": 3, "loss": 0.5, "skipped": false, "grad_norm": null, "lr": 1e-4});
        let mut f = numeric_fields(&v, &["step"]);
        f.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(f, vec![("loss".to_string(), 0.5), ("lr".to_string(), 1e-4)]);
    }
}
