//! Progress bars that show on a terminal and stay silent elsewhere (batch
//! jobs get the `tracing` log lines instead).
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta}") {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_prefix(what.to_string());
    b
}
