//! The `caption:` section of an experiment config: which backend, the
//! prompt, the quality policy, and the HTTP client's limits. Unknown keys
//! are rejected like everywhere else in the config.
use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

use super::prompt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Offline, deterministic facts computed from the cached volume.
    Descriptor,
    /// Any server speaking the OpenAI chat-completions API.
    Openai,
}

/// What to do with a caption that carries a quality flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Ask again (within `max_attempts`); still flagged after that: failed.
    Retry,
    /// Keep the caption as `ok`, with the flag on its record.
    Keep,
    /// Record the slice as `dropped` (done, but not to be trained on).
    Drop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlagPolicy {
    pub empty: Action,
    pub refusal: Action,
    pub truncated: Action,
    pub not_english: Action,
    /// Decided at the end of a run over every record; `retry` asks once
    /// more for the repeated slices, and keeps what is still repeated.
    pub repeated: Action,
}

impl Default for FlagPolicy {
    fn default() -> Self {
        FlagPolicy {
            empty: Action::Retry,
            refusal: Action::Retry,
            truncated: Action::Keep,
            not_english: Action::Keep,
            repeated: Action::Keep,
        }
    }
}

pub const DEFAULT_PROMPT: &str = "This image is one 2D {plane} slice of a 3D {modality} scan, taken at \
{position_pct}% along the {axis} axis. Describe the anatomy it shows: the structures you can identify, \
the imaging plane, and any notable findings. Answer in English, in plain text, in at most {max_words} words.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionConfig {
    /// Absent: `openai` when an `openai:` section is given, else `descriptor`.
    pub backend: Option<BackendKind>,
    /// Template; variables {plane} {modality} {position_pct} {axis}
    /// {max_words}; `{{` and `}}` for literal braces.
    pub prompt: String,
    pub max_words: usize,
    pub policy: FlagPolicy,
    /// The same normalised text on at least this many different slices is
    /// flagged `repeated`.
    pub repeated_threshold: usize,
    pub openai: Option<OpenAiConfig>,
    pub descriptor: DescriptorConfig,
}

/// The offline `descriptor` backend's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DescriptorConfig {
    /// State the plane, slice number and position (the first sentence) and
    /// the in-plane axis names. `false` gives captions of the content alone,
    /// for measuring alignment beyond what the plane-slice input tells
    /// (`med3d evaluate-alignment --embeddings`).
    pub plane_and_position: bool,
}

impl Default for DescriptorConfig {
    fn default() -> Self {
        DescriptorConfig {
            plane_and_position: true,
        }
    }
}

impl Default for CaptionConfig {
    fn default() -> Self {
        CaptionConfig {
            backend: None,
            prompt: DEFAULT_PROMPT.to_string(),
            max_words: 60,
            policy: FlagPolicy::default(),
            repeated_threshold: 10,
            openai: None,
            descriptor: DescriptorConfig::default(),
        }
    }
}

/// One entry of `caption.openai.base_urls`: a URL, or a URL with its own
/// `max_in_flight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerEntry {
    Url(String),
    Full(ServerSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    pub url: String,
    /// Requests in flight to this server at once (default: the section's
    /// `max_in_flight`).
    pub max_in_flight: Option<usize>,
}

/// A server the client sends to: its base URL and how many requests it
/// may have in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub base_url: String,
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Up to and including the API version, e.g. `http://127.0.0.1:8000/v1`;
    /// requests go to `<base_url>/chat/completions`. Ignored when
    /// `base_urls` is given.
    pub base_url: String,
    /// Several servers of the same model (one per GPU node): each slice
    /// goes to the one with the fewest requests outstanding for its
    /// `max_in_flight`; entries are URLs or `{url, max_in_flight}`.
    pub base_urls: Vec<ServerEntry>,
    pub model: String,
    /// Environment variable holding the API key (read when no file is given).
    pub api_key_env: String,
    /// File holding the API key (first line); takes precedence over the variable.
    pub api_key_file: Option<PathBuf>,
    pub max_in_flight: usize,
    /// Per request, connection to last byte.
    pub timeout_s: f64,
    /// Requests per slice in one run, the first included.
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Before the first slice: how long to wait for the server to answer
    /// `GET <base_url>/models` (a vLLM server takes 30-60 s to listen), with
    /// a line on the terminal while waiting. 0: do not wait.
    pub wait_for_server_s: f64,
    /// The same non-transient error (one HTTP status and body, retries
    /// spent) on this many slices in a row stops the run.
    pub stop_after_same_errors: u32,
    /// A retry asked by the quality policy (an empty reply, a refusal) is
    /// sent at at least this temperature, with `seed` set to the attempt
    /// number, so that a deterministic server can answer differently; the
    /// record says what the kept reply was asked with.
    pub retry_temperature: f64,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "http://127.0.0.1:8000/v1".into(),
            base_urls: Vec::new(),
            model: String::new(),
            api_key_env: "OPENAI_API_KEY".into(),
            api_key_file: None,
            max_in_flight: 64,
            timeout_s: 120.0,
            max_attempts: 6,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
            max_tokens: 256,
            temperature: 0.0,
            wait_for_server_s: 120.0,
            stop_after_same_errors: 5,
            retry_temperature: 0.7,
        }
    }
}

impl CaptionConfig {
    pub fn backend(&self) -> BackendKind {
        self.backend.unwrap_or(if self.openai.is_some() {
            BackendKind::Openai
        } else {
            BackendKind::Descriptor
        })
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.max_words >= 1, "caption.max_words must be at least 1");
        ensure!(
            self.repeated_threshold >= 2,
            "caption.repeated_threshold must be at least 2 (it counts different slices)"
        );
        prompt::check(&self.prompt).map_err(|e| anyhow::anyhow!("caption.prompt: {e}"))?;
        if self.backend() == BackendKind::Openai {
            let Some(o) = &self.openai else {
                bail!("caption.backend is openai but there is no caption.openai section (base_url, model)");
            };
            o.validate()?;
        }
        Ok(())
    }
}

impl OpenAiConfig {
    /// The servers to send to: `base_urls`, or the one `base_url`.
    pub fn servers(&self) -> Vec<Server> {
        if self.base_urls.is_empty() {
            return vec![Server {
                base_url: self.base_url.clone(),
                max_in_flight: self.max_in_flight,
            }];
        }
        self.base_urls
            .iter()
            .map(|e| match e {
                ServerEntry::Url(u) => Server {
                    base_url: u.clone(),
                    max_in_flight: self.max_in_flight,
                },
                ServerEntry::Full(s) => Server {
                    base_url: s.url.clone(),
                    max_in_flight: s.max_in_flight.unwrap_or(self.max_in_flight),
                },
            })
            .collect()
    }

    fn validate(&self) -> Result<()> {
        let key = if self.base_urls.is_empty() {
            "caption.openai.base_url"
        } else {
            "caption.openai.base_urls"
        };
        let servers = self.servers();
        for s in &servers {
            ensure!(
                s.base_url.starts_with("http://") || s.base_url.starts_with("https://"),
                "{key}: {:?} must start with http:// or https://",
                s.base_url
            );
            ensure!(
                s.max_in_flight >= 1,
                "{key}: {} has max_in_flight 0; it must be at least 1",
                s.base_url
            );
        }
        for (i, s) in servers.iter().enumerate() {
            ensure!(
                !servers[..i]
                    .iter()
                    .any(|o| o.base_url.trim_end_matches('/') == s.base_url.trim_end_matches('/')),
                "{key}: {} is listed twice",
                s.base_url
            );
        }
        ensure!(
            !self.model.trim().is_empty(),
            "caption.openai.model is required (the model name the server serves)"
        );
        ensure!(
            self.max_in_flight >= 1,
            "caption.openai.max_in_flight must be at least 1"
        );
        ensure!(
            self.timeout_s.is_finite() && self.timeout_s > 0.0,
            "caption.openai.timeout_s must be positive"
        );
        ensure!(self.max_attempts >= 1, "caption.openai.max_attempts must be at least 1");
        ensure!(
            self.backoff_base_ms >= 1 && self.backoff_base_ms <= self.backoff_max_ms,
            "caption.openai: need 1 <= backoff_base_ms <= backoff_max_ms"
        );
        ensure!(self.max_tokens >= 1, "caption.openai.max_tokens must be at least 1");
        ensure!(
            (0.0..=2.0).contains(&self.temperature),
            "caption.openai.temperature must be within 0..2"
        );
        ensure!(
            (0.0..=2.0).contains(&self.retry_temperature),
            "caption.openai.retry_temperature must be within 0..2"
        );
        ensure!(
            self.wait_for_server_s.is_finite() && self.wait_for_server_s >= 0.0,
            "caption.openai.wait_for_server_s must be 0 or more"
        );
        ensure!(
            self.stop_after_same_errors >= 1,
            "caption.openai.stop_after_same_errors must be at least 1"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_follows_the_openai_section_unless_named() {
        let mut c = CaptionConfig::default();
        assert_eq!(c.backend(), BackendKind::Descriptor);
        c.openai = Some(OpenAiConfig {
            model: "m".into(),
            ..Default::default()
        });
        assert_eq!(c.backend(), BackendKind::Openai);
        c.validate().unwrap();
        c.backend = Some(BackendKind::Descriptor);
        assert_eq!(c.backend(), BackendKind::Descriptor);
    }

    #[test]
    fn bad_sections_are_named() {
        let c: CaptionConfig = serde_yaml::from_str("backend: openai\n").unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("caption.openai"));
        let c: CaptionConfig = serde_yaml::from_str("openai: {base_url: 'http://x/v1'}\n").unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("model"));
        let c: CaptionConfig = serde_yaml::from_str("prompt: 'a {plnae} slice'\n").unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("plnae"));
        let e = serde_yaml::from_str::<CaptionConfig>("policy: {refusal: retyr}\n").unwrap_err();
        assert!(e.to_string().contains("retyr"), "{e}");
        let e = serde_yaml::from_str::<CaptionConfig>("openai: {max_inflight: 3}\n").unwrap_err();
        assert!(e.to_string().contains("max_inflight"), "{e}");
    }

    #[test]
    fn base_urls_take_urls_or_entries_with_their_own_limit() {
        let c: CaptionConfig = serde_yaml::from_str(
            "openai: {model: m, max_in_flight: 8, base_urls: ['http://a:8000/v1', {url: 'http://b:8000/v1', max_in_flight: 2}]}\n",
        )
        .unwrap();
        c.validate().unwrap();
        let s = c.openai.unwrap().servers();
        assert_eq!(
            s.iter()
                .map(|s| (s.base_url.as_str(), s.max_in_flight))
                .collect::<Vec<_>>(),
            vec![("http://a:8000/v1", 8), ("http://b:8000/v1", 2)]
        );
        // one base_url is one server
        let c: CaptionConfig = serde_yaml::from_str("openai: {model: m, base_url: 'http://a/v1'}\n").unwrap();
        assert_eq!(c.openai.unwrap().servers().len(), 1);
        for (text, want) in [
            ("openai: {model: m, base_urls: ['ftp://a']}\n", "base_urls"),
            (
                "openai: {model: m, base_urls: ['http://a/v1', 'http://a/v1/']}\n",
                "listed twice",
            ),
            (
                "openai: {model: m, base_urls: [{url: 'http://a/v1', max_in_flight: 0}]}\n",
                "max_in_flight 0",
            ),
        ] {
            let c: CaptionConfig = serde_yaml::from_str(text).unwrap();
            let e = format!("{:#}", c.validate().unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(
            serde_yaml::from_str::<CaptionConfig>("openai: {base_urls: [{url: 'http://a', max_inflight: 2}]}\n")
                .is_err()
        );
    }
}
