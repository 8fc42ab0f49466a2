//! The API key: read once from `api_key_file` or the `api_key_env`
//! variable, and never shown by its Debug form.
use anyhow::{Context, Result};

use super::OpenAiConfig;

/// The API key; its Debug form never shows it.
pub struct ApiKey(pub(super) String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The key from `api_key_file` (first line) if set, else from the
/// `api_key_env` variable; none is fine for local servers.
pub fn read_api_key(cfg: &OpenAiConfig) -> Result<Option<ApiKey>> {
    if let Some(p) = &cfg.api_key_file {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("caption.openai.api_key_file: cannot read {}", p.display()))?;
        let key = text.lines().next().unwrap_or("").trim().to_string();
        anyhow::ensure!(!key.is_empty(), "caption.openai.api_key_file: {} is empty", p.display());
        return Ok(Some(ApiKey(key)));
    }
    match std::env::var(&cfg.api_key_env) {
        Ok(k) if !k.trim().is_empty() => Ok(Some(ApiKey(k.trim().to_string()))),
        _ => {
            tracing::info!(
                "no API key in ${} and no caption.openai.api_key_file: sending requests without one",
                cfg.api_key_env
            );
            Ok(None)
        }
    }
}
