//! The `openai` backend: OpenAI chat-completions over HTTP, which vLLM,
//! SGLang, Ollama, llama.cpp's server and hosted endpoints all speak. One
//! request per slice: a text part (the rendered prompt) and an image part
//! (the slice's PNG as a `data:image/png;base64,` URL).
//!
//! Failure handling, per slice, within `max_attempts` requests:
//! - 429, 408, 409, 425, 5xx, timeouts, connection errors and replies that
//!   are not the expected JSON are retried after a full-jitter exponential
//!   backoff (uniform in [0, min(max, base * 2^(attempt-1))]);
//! - a `Retry-After` (seconds or HTTP date; or `retry-after-ms`) is
//!   honoured: that slice waits at least that long, and every other request
//!   waits for the same moment before it is sent (one shared gate);
//! - 401, 403 and 404 mean no request can succeed (key, permission, URL or
//!   model name): the run stops sending and reports it; so does a server
//!   that refuses `3 * max(max_in_flight, 8)` connections in a row with no
//!   reply in between (down, or the wrong address), rather than every
//!   slice spending its whole retry budget on it;
//! - other 4xx fail that slice at once.
//!
//! Before the first slice, `GET <base_url>/models` is asked (waiting up to
//! `wait_for_server_s` for a server that is still starting): a model the
//! server does not list stops the run with the names it does. Then the
//! first slice is asked alone: when it fails on a server error, every slice
//! would, and the run stops there; later, the same error on
//! `stop_after_same_errors` slices in a row stops it too. Once the run is
//! stopping no request leaves the process: each is checked when it gets its
//! in-flight slot, so at most the requests already on the wire finish.
//! A quality retry (an empty reply, a refusal) is sent at
//! `retry_temperature` with a `seed`, so that a deterministic server can
//! answer differently. Token usage, when a reply reports it, is summed per
//! slice.
//!
//! Several servers (`base_urls`): each request goes to the server with the
//! fewest requests outstanding relative to its `max_in_flight` (its own
//! in-flight limit holds). A server whose request fails in transport (no
//! connection, a reply cut off, a timeout) or with a 5xx is set aside for a
//! cooldown that doubles with each failure in a row (from
//! `backoff_base_ms` up to `backoff_max_ms`); the failed slice's retry goes
//! to another server, and when the cooldown ends one request tries it
//! again. Only when every server has refused `3 * max(max_in_flight, 8)`
//! connections in a row does the run stop for it. The preflight asks each
//! server; one that fails it is left out with a warning, and the run goes
//! on while one passes. Requests, failures and tokens are counted per
//! server ([`ServerStats`]).
//!
//! The API key is read once, sent as a Bearer header marked sensitive, and
//! scrubbed from any error text before it can reach a record or a log.
use std::error::Error as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::config::{Action, FlagPolicy, OpenAiConfig};
use super::quality::{self, Flag};
use super::store::{Sampling, Status, Usage};

mod key;
mod preflight;
mod servers;
mod wire;

pub use key::{read_api_key, ApiKey};
pub use servers::ServerStats;
use servers::{Assigned, Server};
use wire::retry_after;
pub use wire::{parse_reply, parse_retry_after, Request};

/// A usable reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    /// finish_reason was `length`.
    pub truncated: bool,
    /// The reply's `usage`, when the server reports it.
    pub usage: Option<Usage>,
}

/// Why one request did not give a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Retry {
        msg: String,
        after: Option<Duration>,
    },
    Slice(String),
    Run(String),
    /// Not sent: the run is stopping.
    Stopped,
}

/// How a slice ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub text: String,
    pub flags: Vec<Flag>,
    pub attempts: u32,
    pub latency_ms: u64,
    pub error: Option<String>,
    /// Set when no request can succeed; the run stops.
    pub fatal: Option<String>,
    /// Tokens reported over this slice's requests.
    pub usage: Option<Usage>,
    /// What the kept reply was asked with, when a quality retry changed it.
    pub sampling: Option<Sampling>,
    /// For a slice that failed on a server or transport error (not on the
    /// quality of a reply): the error with its numbers masked, to tell the
    /// same error on consecutive slices.
    pub error_key: Option<String>,
}

pub struct Client {
    http: reqwest::Client,
    servers: Vec<Server>,
    key: Option<ApiKey>,
    cfg: OpenAiConfig,
    gate: Mutex<Option<tokio::time::Instant>>,
    /// Set with the first run-stopping error, before its in-flight slot is
    /// given back: no request is sent after it.
    halted: AtomicBool,
    /// Whether the first slice has been asked (alone, holding this lock).
    probed: tokio::sync::Mutex<bool>,
    /// The same, readable without waiting.
    probe_done: AtomicBool,
    /// The last failed slice's error key and how many slices in a row had it.
    same_errors: Mutex<(String, u32)>,
}

/// Full-jitter exponential backoff before attempt `attempt + 1`.
pub fn backoff(attempt: u32, base_ms: u64, max_ms: u64) -> Duration {
    let cap = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
        .min(max_ms);
    Duration::from_millis(fastrand::u64(0..=cap))
}

fn chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn excerpt(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.chars().count() > 300 {
        format!("{}...", s.chars().take(300).collect::<String>())
    } else {
        s.to_string()
    }
}

impl Client {
    pub fn new(cfg: &OpenAiConfig, key: Option<ApiKey>) -> Result<Client> {
        let timeout = Duration::from_secs_f64(cfg.timeout_s);
        let servers: Vec<Server> = cfg
            .servers()
            .into_iter()
            .map(|s| Server {
                url: format!("{}/chat/completions", s.base_url.trim_end_matches('/')),
                in_flight: tokio::sync::Semaphore::new(s.max_in_flight),
                max_in_flight: s.max_in_flight,
                outstanding: AtomicUsize::new(0),
                refused_in_a_row: AtomicU32::new(0),
                failing: Mutex::new((0, None)),
                left_out: Mutex::new(None),
                stats: Mutex::new(ServerStats {
                    base_url: s.base_url.clone(),
                    ..Default::default()
                }),
                base_url: s.base_url,
            })
            .collect();
        let most = servers.iter().map(|s| s.max_in_flight).max().unwrap_or(1);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(most)
            .tcp_nodelay(true)
            .user_agent(concat!("med3d/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            http,
            servers,
            key,
            cfg: cfg.clone(),
            gate: Mutex::new(None),
            halted: AtomicBool::new(false),
            probed: tokio::sync::Mutex::new(false),
            probe_done: AtomicBool::new(false),
            same_errors: Mutex::new((String::new(), 0)),
        })
    }

    /// Removes the key from text that may reach a record or a log.
    fn scrub(&self, s: String) -> String {
        match &self.key {
            Some(k) if !k.0.is_empty() && s.contains(&k.0) => s.replace(&k.0, "<redacted>"),
            _ => s,
        }
    }

    async fn wait_gate(&self) {
        loop {
            let until = self.gate.lock().ok().and_then(|g| *g);
            match until {
                Some(t) if t > tokio::time::Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }

    fn close_gate_for(&self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        if let Ok(mut g) = self.gate.lock() {
            if g.is_none_or(|t| t < until) {
                *g = Some(until);
            }
        }
    }

    fn halting(&self, stop: &AtomicBool) -> bool {
        stop.load(Ordering::SeqCst) || self.halted.load(Ordering::SeqCst)
    }

    /// One request, to the server [`Client::pick`] chooses; returns its
    /// outcome and how long it took. Not sent (`Failure::Stopped`) when
    /// the run is stopping by the time it gets its in-flight slot.
    pub async fn request(&self, body: &[u8], stop: &AtomicBool) -> (Result<Reply, Failure>, Duration) {
        let server = self.pick();
        server.outstanding.fetch_add(1, Ordering::SeqCst);
        let _assigned = Assigned(server);
        let Ok(_permit) = server.in_flight.acquire().await else {
            return (Err(Failure::Run("client closed".into())), Duration::ZERO);
        };
        if self.halting(stop) {
            return (Err(Failure::Stopped), Duration::ZERO);
        }
        let t0 = Instant::now();
        let mut req = self
            .http
            .post(&server.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(k) = &self.key {
            req = req.bearer_auth(&k.0);
        }
        let mut server_fault;
        let r = match req.send().await {
            Ok(resp) => {
                server.refused_in_a_row.store(0, Ordering::Relaxed);
                let status = resp.status();
                let after = retry_after(resp.headers());
                server_fault = status.is_server_error();
                match resp.bytes().await {
                    Err(e) if e.is_timeout() => {
                        server_fault = true;
                        Err(Failure::Retry {
                            msg: format!("no complete reply from {} within {} s", server.url, self.cfg.timeout_s),
                            after: None,
                        })
                    }
                    Err(e) => {
                        server_fault = true;
                        Err(Failure::Retry {
                            msg: format!("reply from {} cut off: {}", server.url, chain(&e)),
                            after: None,
                        })
                    }
                    Ok(bytes) => self.judge(&server.url, status, after, &bytes),
                }
            }
            Err(e) if e.is_timeout() => {
                server_fault = true;
                Err(Failure::Retry {
                    msg: format!("no reply from {} within {} s", server.url, self.cfg.timeout_s),
                    after: None,
                })
            }
            Err(e) => {
                server_fault = true;
                let msg = format!("request to {} failed: {}", server.url, chain(&e));
                if e.is_connect() {
                    server.refused_in_a_row.fetch_add(1, Ordering::Relaxed);
                }
                let limit = |s: &Server| 3 * s.max_in_flight.max(8) as u32;
                let all_refusing = self
                    .servers
                    .iter()
                    .filter(|s| !s.is_left_out())
                    .all(|s| s.refused_in_a_row.load(Ordering::Relaxed) >= limit(s));
                if e.is_connect() && all_refusing {
                    Err(Failure::Run(format!(
                        "{msg} ({} connection attempts in a row failed{}: is the server up, and is caption.openai.base_url right?)",
                        limit(server),
                        if self.servers.len() > 1 { " on every server" } else { "" }
                    )))
                } else {
                    Err(Failure::Retry { msg, after: None })
                }
            }
        };
        if let Ok(mut st) = server.stats.lock() {
            st.requests += 1;
            match &r {
                Ok(reply) => {
                    if let Some(u) = &reply.usage {
                        st.prompt_tokens += u.prompt_tokens;
                        st.completion_tokens += u.completion_tokens;
                    }
                }
                Err(_) => st.failed_requests += 1,
            }
        }
        if server_fault {
            self.set_aside(server);
        } else if r.is_ok() {
            if let Ok(mut f) = server.failing.lock() {
                *f = (0, None);
            }
        }
        let r = r.map_err(|f| match f {
            Failure::Retry { msg, after } => Failure::Retry {
                msg: self.scrub(msg),
                after,
            },
            Failure::Slice(m) => Failure::Slice(self.scrub(m)),
            Failure::Run(m) => {
                // before the slot is given back: nothing is sent after this
                self.halted.store(true, Ordering::SeqCst);
                Failure::Run(self.scrub(m))
            }
            Failure::Stopped => Failure::Stopped,
        });
        (r, t0.elapsed())
    }

    fn judge(
        &self,
        url: &str,
        status: reqwest::StatusCode,
        after: Option<Duration>,
        bytes: &[u8],
    ) -> Result<Reply, Failure> {
        let code = status.as_u16();
        if status.is_success() {
            return parse_reply(bytes).map_err(|msg| Failure::Retry {
                msg: format!("malformed reply: {msg}"),
                after: None,
            });
        }
        let msg = format!("HTTP {code} from {url}: {}", excerpt(bytes));
        match code {
            408 | 409 | 425 | 429 | 500..=599 => Err(Failure::Retry { msg, after }),
            401 | 403 => Err(Failure::Run(format!(
                "{msg} (check the key in ${} or caption.openai.api_key_file)",
                self.cfg.api_key_env
            ))),
            404 => Err(Failure::Run(format!(
                "{msg} (check caption.openai.base_url, which should end in the API version such as /v1, and caption.openai.model)"
            ))),
            _ => Err(Failure::Slice(msg)),
        }
    }

    /// Captions one slice: requests, retries and applies the flag policy.
    /// `body` makes the request (with a quality retry's changed sampling).
    /// None when the run was stopped before this slice was asked. The first
    /// slice to get here is asked alone, and when it fails on a server
    /// error the run stops; so does the same error on
    /// `stop_after_same_errors` slices in a row.
    pub async fn caption(
        &self,
        body: &(dyn Fn(Option<Sampling>) -> Vec<u8> + Sync),
        policy: &FlagPolicy,
        stop: &AtomicBool,
    ) -> Option<Outcome> {
        let mut probed = self.probed.lock().await;
        if *probed {
            drop(probed);
            let mut out = self.ask(body, policy, stop).await?;
            self.count_same_errors(&mut out);
            return Some(out);
        }
        let mut out = self.ask(body, policy, stop).await;
        *probed = true;
        self.probe_done.store(true, Ordering::SeqCst);
        if let Some(o) = out.as_mut() {
            if o.fatal.is_none() && o.error_key.is_some() {
                let why = format!(
                    "the first slice failed: {}; every slice would, so the run stops before sending more \
                     (nothing is lost: fix the cause and rerun)",
                    o.error.clone().unwrap_or_default()
                );
                self.halted.store(true, Ordering::SeqCst);
                o.fatal = Some(why);
            }
        }
        out
    }

    /// Whether the first slice has been asked (the run may go concurrent).
    pub fn probe_done(&self) -> bool {
        self.probe_done.load(Ordering::SeqCst)
    }

    /// Counts a finished slice towards the same-error stop.
    fn count_same_errors(&self, out: &mut Outcome) {
        let Ok(mut same) = self.same_errors.lock() else { return };
        match &out.error_key {
            Some(k) if out.fatal.is_none() => {
                if same.0 == *k {
                    same.1 += 1;
                } else {
                    *same = (k.clone(), 1);
                }
                if same.1 >= self.cfg.stop_after_same_errors {
                    self.halted.store(true, Ordering::SeqCst);
                    out.fatal = Some(format!(
                        "the same error on {} slices in a row (caption.openai.stop_after_same_errors): {}",
                        same.1,
                        out.error.clone().unwrap_or_default()
                    ));
                }
            }
            _ => *same = (String::new(), 0),
        }
    }

    async fn ask(
        &self,
        body: &(dyn Fn(Option<Sampling>) -> Vec<u8> + Sync),
        policy: &FlagPolicy,
        stop: &AtomicBool,
    ) -> Option<Outcome> {
        let max = self.cfg.max_attempts;
        let mut out = Outcome {
            status: Status::Failed,
            text: String::new(),
            flags: Vec::new(),
            attempts: 0,
            latency_ms: 0,
            error: None,
            fatal: None,
            usage: None,
            sampling: None,
            error_key: None,
        };
        let mut sampling: Option<Sampling> = None;
        let mut request = body(None);
        loop {
            if self.halting(stop) {
                if out.attempts == 0 {
                    return None;
                }
                out.error = Some(format!(
                    "{} (the run stopped before the next attempt)",
                    out.error.unwrap_or_default()
                ));
                return Some(out);
            }
            self.wait_gate().await;
            out.attempts += 1;
            let (r, took) = self.request(&request, stop).await;
            out.latency_ms = took.as_millis() as u64;
            let mut wait = backoff(out.attempts, self.cfg.backoff_base_ms, self.cfg.backoff_max_ms);
            match r {
                Ok(reply) => {
                    out.error_key = None;
                    if let Some(u) = reply.usage {
                        *out.usage.get_or_insert_with(Usage::default) += u;
                    }
                    let flags = quality::reply_flags(&reply.text, reply.truncated);
                    out.text = reply.text;
                    out.flags = flags;
                    out.sampling = sampling;
                    match quality::verdict(&out.flags, policy) {
                        Action::Keep => {
                            out.status = Status::Ok;
                            out.error = None;
                            return Some(out);
                        }
                        Action::Drop => {
                            out.status = Status::Dropped;
                            out.error = None;
                            return Some(out);
                        }
                        Action::Retry => {
                            let names: Vec<&str> = out.flags.iter().map(|f| f.name()).collect();
                            out.error = Some(format!("reply flagged {}", names.join(", ")));
                            // Ask differently: the same request to a
                            // deterministic server gets the same answer.
                            sampling = Some(Sampling {
                                temperature: self.cfg.temperature.max(self.cfg.retry_temperature),
                                seed: u64::from(out.attempts),
                            });
                            request = body(sampling);
                            wait = Duration::ZERO;
                        }
                    }
                }
                Err(Failure::Retry { msg, after }) => {
                    tracing::debug!("attempt {}: {msg}", out.attempts);
                    out.error_key = Some(error_key(&msg));
                    out.error = Some(msg);
                    out.text.clear();
                    out.flags.clear();
                    if let Some(a) = after {
                        self.close_gate_for(a);
                        wait = wait.max(a);
                    }
                }
                Err(Failure::Slice(msg)) => {
                    out.error_key = Some(error_key(&msg));
                    out.error = Some(msg);
                    out.text.clear();
                    out.flags.clear();
                    return Some(out);
                }
                Err(Failure::Run(msg)) => {
                    out.error = Some(msg.clone());
                    out.fatal = Some(msg);
                    return Some(out);
                }
                Err(Failure::Stopped) => {
                    out.attempts -= 1;
                    continue;
                }
            }
            if out.attempts >= max {
                out.status = Status::Failed;
                out.error = Some(format!(
                    "{} (gave up after {} attempt{})",
                    out.error.take().unwrap_or_default(),
                    out.attempts,
                    if out.attempts == 1 { "" } else { "s" }
                ));
                return Some(out);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// An error message with its digits masked (request ids, byte counts and
/// timings differ between slices that fail the same way).
fn error_key(msg: &str) -> String {
    msg.chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_differing_in_numbers_only_are_the_same() {
        assert_eq!(
            error_key("HTTP 500 from x: id 123"),
            error_key("HTTP 500 from x: id 987")
        );
    }

    #[test]
    fn backoff_is_bounded_by_the_exponential_cap() {
        for attempt in 1..40 {
            let cap = (100u64 << (attempt - 1).min(32)).min(5_000);
            for _ in 0..50 {
                assert!(backoff(attempt, 100, 5_000) <= Duration::from_millis(cap));
            }
        }
        // full jitter: not always the cap
        assert!((0..100).any(|_| backoff(5, 100, 5_000) < Duration::from_millis(1_000)));
    }

    #[test]
    fn key_is_scrubbed_and_not_debug_printed() {
        let cfg = OpenAiConfig {
            model: "m".into(),
            ..Default::default()
        };
        let c = Client::new(&cfg, Some(ApiKey("sk-secret-123".into()))).unwrap();
        assert_eq!(c.scrub("bad key sk-secret-123!".into()), "bad key <redacted>!");
        assert_eq!(format!("{:?}", ApiKey("sk-secret-123".into())), "ApiKey(<redacted>)");
    }
}
