//! Before the first slice: is the server there, and does it serve the
//! model? `GET <base_url>/models`, waiting for a server that is starting.
use std::time::{Duration, Instant};

use super::{chain, excerpt, Client};

impl Client {
    fn models_url(&self) -> String {
        format!("{}/models", self.cfg.base_url.trim_end_matches('/'))
    }

    /// `GET <base_url>/models`, waiting up to `wait_for_server_s` for a
    /// server that does not accept connections yet (`say` gets a line when
    /// the wait starts and every 15 s). Err: the run cannot start (no
    /// server, a refused key, a model the server does not serve). A server
    /// without the endpoint, or with a list med3d cannot read, is let be.
    pub async fn preflight(&self, say: &(dyn Fn(&str) + Sync)) -> Result<(), String> {
        let url = self.models_url();
        let wait = Duration::from_secs_f64(self.cfg.wait_for_server_s);
        let t0 = Instant::now();
        let mut said: Option<Instant> = None;
        loop {
            let mut req = self.http.get(&url);
            if let Some(k) = &self.key {
                req = req.bearer_auth(&k.0);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if (e.is_connect() || e.is_timeout()) && t0.elapsed() < wait => {
                    if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(15)) {
                        say(&format!(
                            "caption: waiting for the server at {url} ({:.0} of up to {:.0} s, caption.openai.wait_for_server_s)",
                            t0.elapsed().as_secs_f64(),
                            wait.as_secs_f64()
                        ));
                        said = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => {
                    return Err(self.scrub(format!(
                        "no server answers at {url} (waited {:.0} s): {}; is it started, and is caption.openai.base_url right?",
                        t0.elapsed().as_secs_f64(),
                        chain(&e)
                    )))
                }
            };
            let code = resp.status().as_u16();
            let bytes = resp.bytes().await.unwrap_or_default();
            if code == 401 || code == 403 {
                return Err(self.scrub(format!(
                    "HTTP {code} from {url}: {} (check the key in ${} or caption.openai.api_key_file)",
                    excerpt(&bytes),
                    self.cfg.api_key_env
                )));
            }
            if !(200..300).contains(&code) {
                say(&format!(
                    "caption: {url} answered HTTP {code}, so whether it serves {:?} is not checked before the first slice",
                    self.cfg.model
                ));
                return Ok(());
            }
            let served = served_models(&bytes);
            if served.is_empty() {
                say(&format!(
                    "caption: {url} lists no models med3d can read, so whether it serves {:?} is not checked",
                    self.cfg.model
                ));
                return Ok(());
            }
            if served.iter().any(|m| same_model(m, &self.cfg.model)) {
                return Ok(());
            }
            let shown: Vec<&str> = served.iter().take(20).map(String::as_str).collect();
            return Err(format!(
                "the server at {} does not serve caption.openai.model {:?}; it serves: {}{} (set caption.openai.model to one of these)",
                self.cfg.base_url,
                self.cfg.model,
                shown.join(", "),
                if served.len() > shown.len() {
                    format!(" and {} more", served.len() - shown.len())
                } else {
                    String::new()
                }
            ));
        }
    }
}

/// The model ids of a `/models` reply (`{"data": [{"id": ...}]}`; Ollama's
/// `{"models": [{"name": ...}]}` too).
fn served_models(bytes: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let list = v.get("data").or_else(|| v.get("models")).and_then(|d| d.as_array());
    list.into_iter()
        .flatten()
        .filter_map(|m| m.get("id").or_else(|| m.get("name")).and_then(|x| x.as_str()))
        .map(str::to_string)
        .collect()
}

/// Whether a listed id names the configured model: equal, or equal but for
/// Ollama's `:latest` tag.
fn same_model(listed: &str, model: &str) -> bool {
    let bare = |s: &str| s.strip_suffix(":latest").unwrap_or(s).to_string();
    listed == model || bare(listed) == bare(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_models_are_read_from_openai_and_ollama_lists() {
        let openai = br#"{"object":"list","data":[{"id":"Qwen/Qwen2.5-VL-7B-Instruct","object":"model"},{"id":"b"}]}"#;
        assert_eq!(served_models(openai), vec!["Qwen/Qwen2.5-VL-7B-Instruct", "b"]);
        assert_eq!(
            served_models(br#"{"models":[{"name":"qwen2.5vl:latest"}]}"#),
            vec!["qwen2.5vl:latest"]
        );
        assert!(served_models(b"Not Found").is_empty());
        assert!(same_model("qwen2.5vl:latest", "qwen2.5vl"));
        assert!(same_model("m", "m"));
        assert!(!same_model("Qwen/Qwen2.5-VL-7B-Instruct", "qwen"));
    }
}
