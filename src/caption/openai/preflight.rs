//! Before the first slice: is the server there, and does it serve the
//! model? `GET <base_url>/models`, waiting for a server that is starting.
use std::time::{Duration, Instant};

use super::{chain, excerpt, Client, Server};

/// One server's answer to the preflight.
enum Check {
    Ready,
    /// No connection (yet): it may be starting.
    NotUp(String),
    /// It answers, and no request to it can succeed.
    Fail(String),
}

impl Client {
    /// `GET <base_url>/models` on one server, once.
    async fn check(&self, s: &Server, say: &(dyn Fn(&str) + Sync)) -> Check {
        let url = format!("{}/models", s.base_url.trim_end_matches('/'));
        let mut req = self.http.get(&url);
        if let Some(k) = &self.key {
            req = req.bearer_auth(&k.0);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() || e.is_timeout() => return Check::NotUp(self.scrub(chain(&e))),
            Err(e) => return Check::Fail(self.scrub(format!("no server answers at {url}: {}", chain(&e)))),
        };
        let code = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        if code == 401 || code == 403 {
            return Check::Fail(self.scrub(format!(
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
            return Check::Ready;
        }
        let served = served_models(&bytes);
        if served.is_empty() {
            say(&format!(
                "caption: {url} lists no models med3d can read, so whether it serves {:?} is not checked",
                self.cfg.model
            ));
            return Check::Ready;
        }
        if served.iter().any(|m| same_model(m, &self.cfg.model)) {
            return Check::Ready;
        }
        let shown: Vec<&str> = served.iter().take(20).map(String::as_str).collect();
        Check::Fail(format!(
            "the server at {} does not serve caption.openai.model {:?}; it serves: {}{} (set caption.openai.model to one of these)",
            s.base_url,
            self.cfg.model,
            shown.join(", "),
            if served.len() > shown.len() {
                format!(" and {} more", served.len() - shown.len())
            } else {
                String::new()
            }
        ))
    }

    /// Asks every server `GET <base_url>/models`, waiting up to
    /// `wait_for_server_s` while none answers (`say` gets a line when the
    /// wait starts and every 15 s). A server that answers and cannot
    /// serve (a refused key, a model it does not serve) is left out with a
    /// warning; one that does not answer while another does is set aside
    /// and tried again during the run. Err: no server can be used. A
    /// server without the endpoint, or with a list med3d cannot read, is
    /// let be.
    pub async fn preflight(&self, say: &(dyn Fn(&str) + Sync)) -> Result<(), String> {
        let wait = Duration::from_secs_f64(self.cfg.wait_for_server_s);
        let t0 = Instant::now();
        let mut said: Option<Instant> = None;
        let several = self.servers.len() > 1;
        loop {
            let mut ready = 0;
            let mut not_up = Vec::new();
            for s in self.servers.iter().filter(|s| !s.is_left_out()) {
                match self.check(s, say).await {
                    Check::Ready => ready += 1,
                    Check::NotUp(why) => not_up.push((s, why)),
                    Check::Fail(why) => {
                        if several {
                            say(&format!("caption: leaving out {}: {why}", s.base_url));
                        }
                        if let Ok(mut l) = s.left_out.lock() {
                            *l = Some(why);
                        }
                    }
                }
            }
            let reasons = || {
                self.servers
                    .iter()
                    .filter_map(|s| s.left_out.lock().ok().and_then(|l| l.clone()))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            if self.servers.iter().all(|s| s.is_left_out()) {
                return Err(reasons());
            }
            if ready > 0 {
                for (s, why) in not_up {
                    say(&format!(
                        "caption: {} does not answer ({why}); set aside, tried again during the run",
                        s.base_url
                    ));
                    self.set_aside(s);
                }
                return Ok(());
            }
            if t0.elapsed() >= wait {
                let (s, why) = &not_up[0];
                return Err(format!(
                    "no server answers at {}/models{} (waited {:.0} s): {why}; is it started, and is caption.openai.base_url right?",
                    s.base_url.trim_end_matches('/'),
                    if not_up.len() > 1 {
                        format!(" nor at the {} other servers", not_up.len() - 1)
                    } else {
                        String::new()
                    },
                    t0.elapsed().as_secs_f64()
                ));
            }
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(15)) {
                say(&format!(
                    "caption: waiting for the server at {}/models ({:.0} of up to {:.0} s, caption.openai.wait_for_server_s)",
                    not_up[0].0.base_url.trim_end_matches('/'),
                    t0.elapsed().as_secs_f64(),
                    wait.as_secs_f64()
                ));
                said = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
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
