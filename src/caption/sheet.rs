//! `med3d inspect`: a contact sheet of slices beside their captions, one
//! self-contained HTML file (the PNGs are inlined), so a person can judge
//! caption quality at a glance in any browser. Slices that need a look
//! (failed, dropped or flagged) come first; then an even sample of the
//! whole index.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use base64::Engine as _;

use super::quality::Flag;
use super::store::{CaptionRecord, Slot, Status, Store};
use crate::artifacts::cache::{read_index, SliceRow};
use crate::fsutil::atomic_write;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SheetSummary {
    pub slices: usize,
    pub with_caption: usize,
    pub needs_look_shown: usize,
    pub sample_shown: usize,
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `count` indices spread evenly over 0..n (all of them when n <= count).
fn spread(n: usize, count: usize) -> Vec<usize> {
    if n <= count {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..count).map(|k| (2 * k + 1) * n / (2 * count)).collect();
    v.dedup();
    v
}

fn needs_look(s: &Slot) -> bool {
    s.status != Status::Ok || s.flagged()
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Dropped => "dropped",
        Status::Failed => "failed",
    }
}

const STYLE: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; background: #f4f4f4; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.meta-top { color: #555; margin-bottom: 8px; }
.counts span { display: inline-block; margin-right: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 10px; }
.card { display: flex; gap: 10px; background: #fff; border: 2px solid #ddd; border-radius: 6px; padding: 8px; margin: 0; }
.card img { width: 192px; height: 192px; object-fit: contain; image-rendering: pixelated; background: #000; flex: none; }
.card figcaption { flex: 1; min-width: 0; }
.card .id { font-family: ui-monospace, monospace; font-size: 12px; color: #444; word-break: break-all; }
.card .info { font-size: 12px; color: #666; }
.card p { margin: 6px 0 0; }
.card .err { color: #a00; font-size: 12px; }
.card.flagged { border-color: #e0a000; background: #fffbea; }
.card.dropped { border-color: #888; background: #eee; }
.card.failed { border-color: #c00; background: #fff0f0; }
.card.none { border-style: dashed; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; padding: 1px 6px; border-radius: 9px; margin: 2px 4px 0 0; color: #fff; background: #e0a000; }
.badge.st-failed { background: #c00; } .badge.st-dropped { background: #777; } .badge.st-ok { background: #2a7a2a; }
"#;

fn card(cache: &Path, row: &SliceRow, rec: Option<&CaptionRecord>) -> String {
    let mut badges = String::new();
    let mut body = String::new();
    let class = match rec {
        None => {
            body.push_str("<p><em>no caption yet</em></p>");
            "card none"
        }
        Some(r) => {
            let st = status_name(r.status);
            let _ = write!(badges, r#"<span class="badge st-{st}">{st}</span>"#);
            for f in &r.flags {
                let _ = write!(badges, r#"<span class="badge flag">{}</span>"#, f.name());
            }
            let _ = write!(
                body,
                r#"<div class="info">{} · {} · {} ms · {} attempt{}</div>"#,
                escape(&r.backend),
                escape(&r.model),
                r.latency_ms,
                r.attempts,
                if r.attempts == 1 { "" } else { "s" }
            );
            if !r.text.is_empty() {
                let _ = write!(body, "<p>{}</p>", escape(&r.text));
            }
            if let Some(e) = &r.error {
                let _ = write!(body, r#"<p class="err">{}</p>"#, escape(e));
            }
            match (r.status, r.flags.is_empty()) {
                (Status::Failed, _) => "card failed",
                (Status::Dropped, _) => "card dropped",
                (Status::Ok, false) => "card flagged",
                (Status::Ok, true) => "card",
            }
        }
    };
    let img = match std::fs::read(cache.join(&row.png)) {
        Ok(b) => format!(
            r#"<img alt="{}" src="data:image/png;base64,{}">"#,
            escape(&row.slice_id),
            base64::engine::general_purpose::STANDARD.encode(b)
        ),
        Err(e) => format!(r#"<div class="err">image missing: {}</div>"#, escape(&e.to_string())),
    };
    format!(
        r#"<figure class="{class}">{img}<figcaption><div class="id">{} · {:.0}%</div>{badges}{body}</figcaption></figure>
"#,
        escape(&row.slice_id),
        row.position * 100.0
    )
}

/// Writes the sheet; `limit` caps each of the two sections.
pub fn write(cache: &Path, captions: &Path, out: &Path, limit: usize) -> Result<SheetSummary> {
    let rows = read_index(cache)?;
    let latest = Store::new(captions)?.latest()?;
    let look: Vec<&SliceRow> = rows
        .iter()
        .filter(|r| latest.slot(&r.slice_id).is_some_and(needs_look))
        .collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for s in rows.iter().filter_map(|r| latest.slot(&r.slice_id)) {
        *counts.entry(status_name(s.status).to_string()).or_default() += 1;
        for f in Flag::ALL.into_iter().filter(|f| s.has(*f)) {
            *counts.entry(f.name().to_string()).or_default() += 1;
        }
    }
    let with_caption = rows.iter().filter(|r| latest.slot(&r.slice_id).is_some()).count();
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>med3d captions: {}</title><style>{STYLE}</style></head><body>
<h1>Caption contact sheet</h1>
<div class="meta-top">cache <code>{}</code> · captions <code>{}</code> · med3d {}</div>
<div class="counts"><span>{} slices</span><span>{} with a record</span>"#,
        escape(&cache.display().to_string()),
        escape(&cache.display().to_string()),
        escape(&captions.display().to_string()),
        env!("CARGO_PKG_VERSION"),
        rows.len(),
        with_caption
    );
    let mut keys: Vec<_> = counts.into_iter().collect();
    keys.sort();
    for (k, n) in keys {
        let _ = write!(html, "<span>{} {}</span>", escape(&k), n);
    }
    html.push_str("</div>\n");
    let look_idx = spread(look.len(), limit);
    let _ = write!(
        html,
        "<h2>Needs a look: failed, dropped or flagged ({} of {})</h2>\n<div class=\"grid\">\n",
        look_idx.len(),
        look.len()
    );
    for &i in &look_idx {
        html.push_str(&card(cache, look[i], latest.read(&look[i].slice_id)?.as_ref()));
    }
    let sample = spread(rows.len(), limit);
    let _ = write!(
        html,
        "</div>\n<h2>Sample of all slices ({} of {})</h2>\n<div class=\"grid\">\n",
        sample.len(),
        rows.len()
    );
    for &i in &sample {
        html.push_str(&card(cache, &rows[i], latest.read(&rows[i].slice_id)?.as_ref()));
    }
    html.push_str("</div>\n</body></html>\n");
    if let Some(d) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d)?;
    }
    atomic_write(out, html.as_bytes())?;
    Ok(SheetSummary {
        slices: rows.len(),
        with_caption,
        needs_look_shown: look_idx.len(),
        sample_shown: sample.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_and_spread() {
        assert_eq!(
            escape(r#"<b>"a" & 'b'</b>"#),
            "&lt;b&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/b&gt;"
        );
        assert_eq!(spread(3, 5), vec![0, 1, 2]);
        assert_eq!(spread(10, 2), vec![2, 7]);
        assert!(spread(0, 4).is_empty());
    }
}
