//! The chat-completions wire format of the `openai` backend: what one
//! slice's request is (its body and the identity recorded with its
//! caption), how a reply is read, and how a `Retry-After` is read. No I/O:
//! the client in the parent module sends and retries.
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::super::config::OpenAiConfig;
use super::super::store::{Sampling, Usage};
use super::Reply;

/// Longest Retry-After honoured; a server asking for more is asked again then.
pub(super) const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);

/// What one slice's request asks, image aside: the settings that shape
/// the answer. The request body and the caption's identity (its prompt
/// hash, what "already captioned" compares) are both made from this one
/// struct, so a setting added to the request changes the identity too.
#[derive(Debug, Clone, Serialize)]
pub struct Request<'a> {
    pub model: &'a str,
    pub prompt: &'a str,
    pub max_tokens: u32,
    pub temperature: f64,
}

impl<'a> Request<'a> {
    pub fn new(cfg: &'a OpenAiConfig, prompt: &'a str) -> Request<'a> {
        Request {
            model: &cfg.model,
            prompt,
            max_tokens: cfg.max_tokens,
            temperature: cfg.temperature,
        }
    }

    /// The prompt hash recorded with each caption.
    pub fn identity(&self) -> String {
        #[derive(Serialize)]
        struct Identity<'b> {
            backend: &'static str,
            #[serde(flatten)]
            request: &'b Request<'b>,
        }
        // Through a JSON value: keys sorted, as every earlier hash was made.
        let v = serde_json::to_value(Identity {
            backend: "openai",
            request: self,
        })
        .unwrap_or_default();
        super::super::prompt::hash(&v)
    }

    /// The chat-completions body, with the slice's PNG as a data URL; a
    /// quality retry's changed sampling replaces the temperature and adds a
    /// seed.
    pub fn body(&self, png: &[u8], sampling: Option<Sampling>) -> Vec<u8> {
        let mut url = String::with_capacity(22 + png.len() * 4 / 3 + 4);
        url.push_str("data:image/png;base64,");
        base64::engine::general_purpose::STANDARD.encode_string(png, &mut url);
        let v = serde_json::json!({
            "model": self.model,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "text", "text": self.prompt},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        });
        let mut v = v;
        if let Some(s) = sampling {
            v["temperature"] = serde_json::json!(s.temperature);
            v["seed"] = serde_json::json!(s.seed);
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<UsageJson>,
}

#[derive(Deserialize)]
struct UsageJson {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<serde_json::Value>,
}

/// Parses a chat-completions reply: the first choice's content (a string,
/// or a list of text parts), and whether it stopped at the token limit.
pub fn parse_reply(bytes: &[u8]) -> Result<Reply, String> {
    let c: Completion = serde_json::from_slice(bytes).map_err(|e| format!("reply is not a chat completion: {e}"))?;
    let choice = c.choices.into_iter().next().ok_or("reply has no choices")?;
    let text = match choice.message.content {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
            .collect::<Vec<_>>()
            .join(""),
        Some(other) => return Err(format!("reply content is neither text nor parts: {other}")),
    };
    let usage = c.usage.and_then(|u| match (u.prompt_tokens, u.completion_tokens) {
        (None, None) => None,
        (p, c) => Some(Usage {
            prompt_tokens: p.unwrap_or(0),
            completion_tokens: c.unwrap_or(0),
        }),
    });
    Ok(Reply {
        text: text.trim().to_string(),
        truncated: choice.finish_reason.as_deref() == Some("length"),
        usage,
    })
}

/// A Retry-After value: delay-seconds (fractions accepted) or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    let d = if let Ok(s) = v.parse::<f64>() {
        if !s.is_finite() || s < 0.0 {
            return None;
        }
        Duration::from_secs_f64(s.min(RETRY_AFTER_CAP.as_secs_f64()))
    } else {
        let t = httpdate::parse_http_date(v).ok()?;
        t.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(RETRY_AFTER_CAP))
}

pub(super) fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = h
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0).min(RETRY_AFTER_CAP));
    }
    h.get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_hash_is_the_one_every_earlier_caption_recorded() {
        let cfg = OpenAiConfig {
            model: "qwen".into(),
            ..Default::default()
        };
        let old = crate::caption::prompt::hash(&serde_json::json!({
            "backend": "openai", "model": cfg.model, "prompt": "describe",
            "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
        }));
        assert_eq!(Request::new(&cfg, "describe").identity(), old);
        let mut hotter = cfg.clone();
        hotter.temperature = 0.7;
        assert_ne!(Request::new(&hotter, "describe").identity(), old);
    }

    #[test]
    fn body_carries_prompt_and_png_as_data_url() {
        let cfg = OpenAiConfig {
            model: "qwen".into(),
            ..Default::default()
        };
        let png = [0x89u8, b'P', b'N', b'G', 0, 1, 2, 255];
        let v: serde_json::Value = serde_json::from_slice(&Request::new(&cfg, "describe").body(&png, None)).unwrap();
        assert_eq!(v["model"], "qwen");
        assert_eq!(v["max_tokens"], 256);
        let parts = &v["messages"][0]["content"];
        assert_eq!(parts[0]["text"], "describe");
        let url = parts[1]["image_url"]["url"].as_str().unwrap();
        let b64 = url.strip_prefix("data:image/png;base64,").unwrap();
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64).unwrap(), png);
    }

    #[test]
    fn replies_parse_strings_parts_null_and_length() {
        let r = parse_reply(br#"{"choices":[{"message":{"content":" Axial. "},"finish_reason":"stop"}]}"#).unwrap();
        assert_eq!(
            r,
            Reply {
                text: "Axial.".into(),
                truncated: false,
                usage: None,
            }
        );
        let r = parse_reply(
            br#"{"choices":[{"message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},"finish_reason":"length"}]}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Reply {
                text: "ab".into(),
                truncated: true,
                usage: None,
            }
        );
        let r = parse_reply(br#"{"choices":[{"message":{"content":null}}]}"#).unwrap();
        assert_eq!(r.text, "");
        assert!(parse_reply(br#"{"choices":[]}"#).is_err());
        assert!(parse_reply(b"{\"choices\": [").is_err());
        assert!(parse_reply(br#"{"error":{"message":"overloaded"}}"#).is_err());
    }

    #[test]
    fn usage_is_read_when_reported() {
        let r = parse_reply(
            br#"{"choices":[{"message":{"content":"a"},"finish_reason":"stop"}],"usage":{"prompt_tokens":70,"completion_tokens":9,"total_tokens":79}}"#,
        )
        .unwrap();
        assert_eq!(
            r.usage,
            Some(Usage {
                prompt_tokens: 70,
                completion_tokens: 9
            })
        );
        let r = parse_reply(br#"{"choices":[{"message":{"content":"a"}}],"usage":null}"#).unwrap();
        assert_eq!(r.usage, None);
    }

    #[test]
    fn a_changed_retry_carries_its_temperature_and_seed() {
        let cfg = OpenAiConfig {
            model: "qwen".into(),
            ..Default::default()
        };
        let req = Request::new(&cfg, "describe");
        let plain: serde_json::Value = serde_json::from_slice(&req.body(b"png", None)).unwrap();
        assert_eq!(plain["temperature"], 0.0);
        assert!(plain.get("seed").is_none());
        let s = Sampling {
            temperature: 0.7,
            seed: 2,
        };
        let v: serde_json::Value = serde_json::from_slice(&req.body(b"png", Some(s))).unwrap();
        assert_eq!((v["temperature"].as_f64(), v["seed"].as_u64()), (Some(0.7), Some(2)));
        // the caption's identity is the plain request's
        assert_eq!(req.identity(), Request::new(&cfg, "describe").identity());
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0.5 ", now), Some(Duration::from_millis(500)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999", now), Some(RETRY_AFTER_CAP));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
