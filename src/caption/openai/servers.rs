//! The servers of one client (`caption.openai.base_urls`): which one the
//! next request goes to (the least loaded for its `max_in_flight`, not a
//! server left out by the preflight nor one set aside after a failure),
//! the rests that keep a failing server aside, and each server's counts.
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Client;

/// What one server did in a run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServerStats {
    pub base_url: String,
    /// Requests sent (every attempt, failed ones included).
    pub requests: u64,
    /// Of those, the ones that got no usable reply.
    pub failed_requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Completion tokens per second of the run.
    pub completion_tokens_per_s: f64,
    /// Why the preflight left it out, if it did.
    pub left_out: Option<String>,
}

impl ServerStats {
    /// Adds another round's counts of the same server.
    pub fn add(&mut self, other: &ServerStats) {
        self.requests += other.requests;
        self.failed_requests += other.failed_requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }

    /// Completion tokens per second over a run of `seconds`.
    pub fn set_rate(&mut self, seconds: f64) {
        self.completion_tokens_per_s = if seconds > 0.0 {
            self.completion_tokens as f64 / seconds
        } else {
            0.0
        };
    }
}

/// One server of the client.
pub(super) struct Server {
    pub(super) base_url: String,
    /// `<base_url>/chat/completions`.
    pub(super) url: String,
    pub(super) max_in_flight: usize,
    pub(super) in_flight: tokio::sync::Semaphore,
    /// Requests assigned to it and not finished (waiting for a slot or on
    /// the wire).
    pub(super) outstanding: AtomicUsize,
    /// Connection failures since its last reply of any kind.
    pub(super) refused_in_a_row: AtomicU32,
    /// Transport or server failures in a row, and until when it is set aside.
    pub(super) failing: Mutex<(u32, Option<Instant>)>,
    pub(super) left_out: Mutex<Option<String>>,
    pub(super) stats: Mutex<ServerStats>,
}

impl Server {
    pub(super) fn is_left_out(&self) -> bool {
        self.left_out.lock().map(|l| l.is_some()).unwrap_or(false)
    }

    /// Until when it is set aside (None: available).
    pub(super) fn resting_until(&self) -> Option<Instant> {
        self.failing
            .lock()
            .ok()
            .and_then(|f| f.1)
            .filter(|t| *t > Instant::now())
    }

    fn load(&self) -> f64 {
        self.outstanding.load(Ordering::SeqCst) as f64 / self.max_in_flight as f64
    }
}

/// Decrements a server's outstanding count when a request ends.
pub(super) struct Assigned<'a>(pub(super) &'a Server);

impl Drop for Assigned<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The exponential cap of [`backoff`] (no jitter): a server's rest after
/// `failures` failures in a row.
pub(super) fn backoff_cap(failures: u32, base_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(
        base_ms
            .saturating_mul(1u64 << failures.saturating_sub(1).min(32))
            .min(max_ms),
    )
}

impl Client {
    /// Requests all servers may have in flight together.
    pub fn capacity(&self) -> usize {
        self.servers
            .iter()
            .filter(|s| !s.is_left_out())
            .map(|s| s.max_in_flight)
            .sum::<usize>()
            .max(1)
    }

    /// Each server's counts so far.
    /// (The rate is left to the caller, which knows the run's duration.)
    pub fn stats(&self) -> Vec<ServerStats> {
        self.servers
            .iter()
            .map(|s| {
                let mut st = s.stats.lock().map(|g| g.clone()).unwrap_or_default();
                st.left_out = s.left_out.lock().ok().and_then(|l| l.clone());
                st
            })
            .collect()
    }

    /// The server for the next request: of those not left out and not set
    /// aside, the least loaded for its limit (the first such on a tie);
    /// when all are set aside, the one whose rest ends first.
    pub(super) fn pick(&self) -> &Server {
        let usable: Vec<&Server> = self.servers.iter().filter(|s| !s.is_left_out()).collect();
        let pool = if usable.is_empty() {
            self.servers.iter().collect()
        } else {
            usable
        };
        let ready: Vec<&Server> = pool.iter().copied().filter(|s| s.resting_until().is_none()).collect();
        if let Some(s) = ready
            .iter()
            .copied()
            .min_by(|a, b| a.load().partial_cmp(&b.load()).unwrap_or(std::cmp::Ordering::Equal))
        {
            return s;
        }
        let s = pool
            .iter()
            .copied()
            .min_by_key(|s| s.resting_until())
            .unwrap_or(&self.servers[0]);
        // half-open: this request tries it; others keep away meanwhile
        if let Ok(mut f) = s.failing.lock() {
            let rest = backoff_cap(f.0, self.cfg.backoff_base_ms, self.cfg.backoff_max_ms);
            f.1 = Some(Instant::now() + rest);
        }
        s
    }

    /// A failure of `s` that another server may not share: set it aside.
    pub(super) fn set_aside(&self, s: &Server) {
        if self.servers.len() < 2 {
            return;
        }
        if let Ok(mut f) = s.failing.lock() {
            f.0 += 1;
            let rest = backoff_cap(f.0, self.cfg.backoff_base_ms, self.cfg.backoff_max_ms);
            f.1 = Some(Instant::now() + rest);
            tracing::info!(
                "caption: {} set aside for {:.1} s after {} failure(s) in a row",
                s.base_url,
                rest.as_secs_f64(),
                f.0
            );
        }
    }
}
