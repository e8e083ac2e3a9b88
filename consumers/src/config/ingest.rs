//! The `[ingest]` section: `tally ingest`, OPA's decision-log upload API.
//!
//! Guarantee: a loaded [`IngestConfig`] has a listen address that parses, a path
//! that starts with `/`, non-zero limits, a produce timeout shorter than the
//! shutdown grace, and at most one of `token` / `token_file`; the token itself
//! never reaches `Debug` or the logs.

use super::ConfigError;
use serde::Deserialize;
use std::fmt;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub listen: String,
    pub path: String,
    pub token: String,
    pub token_file: String,
    pub max_body_bytes: u64,
    pub max_decompressed_bytes: u64,
    pub max_events: u64,
    pub max_concurrent_uploads: u32,
    pub request_timeout_ms: u64,
    pub produce_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
}

impl fmt::Debug for IngestConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngestConfig")
            .field("listen", &self.listen)
            .field("path", &self.path)
            .field("token", &if self.token.is_empty() { "" } else { "***" })
            .field("token_file", &self.token_file)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_decompressed_bytes", &self.max_decompressed_bytes)
            .field("max_events", &self.max_events)
            .finish_non_exhaustive()
    }
}

impl IngestConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: format!("ingest.{key}"),
                message: message.into(),
            })
        };
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid("listen", "must be host:port, e.g. 127.0.0.1:9899");
        }
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return invalid("path", "must be a URL path starting with `/`, e.g. /logs");
        }
        if ["/livez", "/readyz", "/metrics"].contains(&self.path.as_str()) {
            return invalid("path", "must not be /livez, /readyz or /metrics");
        }
        for (key, v) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_decompressed_bytes", self.max_decompressed_bytes),
            ("max_events", self.max_events),
            (
                "max_concurrent_uploads",
                u64::from(self.max_concurrent_uploads),
            ),
            ("request_timeout_ms", self.request_timeout_ms),
            ("produce_timeout_ms", self.produce_timeout_ms),
        ] {
            if v == 0 {
                return invalid(key, "must be > 0");
            }
        }
        if self.max_decompressed_bytes < self.max_body_bytes {
            return invalid(
                "max_decompressed_bytes",
                "must be >= ingest.max_body_bytes (a gzip body is never smaller decompressed, bar overhead)",
            );
        }
        if self.shutdown_grace_ms <= self.produce_timeout_ms {
            return invalid(
                "shutdown_grace_ms",
                "must be > ingest.produce_timeout_ms, so an upload in flight at shutdown can finish",
            );
        }
        if !self.token.is_empty() && !self.token_file.is_empty() {
            return invalid("token", "set ingest.token or ingest.token_file, not both");
        }
        Ok(())
    }

    /// The bearer token uploads must present (None: no authentication), read
    /// from `token_file` when that is set (surrounding whitespace trimmed).
    pub fn bearer_token(&self) -> Result<Option<String>, ConfigError> {
        if !self.token_file.is_empty() {
            let text =
                std::fs::read_to_string(&self.token_file).map_err(|e| ConfigError::Invalid {
                    key: "ingest.token_file".into(),
                    message: format!("cannot read {}: {e}", self.token_file),
                })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "ingest.token_file".into(),
                    message: format!("{} is empty", self.token_file),
                });
            }
            return Ok(Some(token.to_string()));
        }
        Ok((!self.token.trim().is_empty()).then(|| self.token.trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, String> {
        let env: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_from(None, &env).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_named_errors() {
        let c = load(&[]).unwrap();
        assert_eq!(c.ingest.path, "/logs");
        assert_eq!(c.ingest.bearer_token().unwrap(), None);
        for (key, value, named) in [
            ("TALLY__INGEST__LISTEN", "nowhere", "ingest.listen"),
            ("TALLY__INGEST__PATH", "logs", "ingest.path"),
            ("TALLY__INGEST__PATH", "/metrics", "ingest.path"),
            ("TALLY__INGEST__MAX_EVENTS", "0", "ingest.max_events"),
            (
                "TALLY__INGEST__MAX_DECOMPRESSED_BYTES",
                "10",
                "ingest.max_decompressed_bytes",
            ),
            (
                "TALLY__INGEST__SHUTDOWN_GRACE_MS",
                "5000",
                "ingest.shutdown_grace_ms",
            ),
            (
                "TALLY__INGEST__MAX_BODY_BYTES",
                "-1",
                "ingest.max_body_bytes",
            ),
        ] {
            let e = load(&[(key, value)]).unwrap_err();
            assert!(e.contains(named), "{key}={value}: {e}");
        }
        let e = load(&[
            ("TALLY__INGEST__TOKEN", "a"),
            ("TALLY__INGEST__TOKEN_FILE", "/x"),
        ])
        .unwrap_err();
        assert!(e.contains("ingest.token"), "{e}");
    }

    #[test]
    fn tokens_inline_or_from_a_file() {
        let c = load(&[("TALLY__INGEST__TOKEN", " s3cret ")]).unwrap();
        assert_eq!(c.ingest.bearer_token().unwrap().as_deref(), Some("s3cret"));
        assert!(!format!("{:?}", c.ingest).contains("s3cret"));
        let dir = std::env::temp_dir().join(format!("tally-ingest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "from-file\n").unwrap();
        let path = f.display().to_string();
        let c = load(&[("TALLY__INGEST__TOKEN_FILE", path.as_str())]).unwrap();
        assert_eq!(
            c.ingest.bearer_token().unwrap().as_deref(),
            Some("from-file")
        );
        std::fs::write(&f, " \n").unwrap();
        let e = c.ingest.bearer_token().unwrap_err().to_string();
        assert!(
            e.contains("ingest.token_file") && e.contains("empty"),
            "{e}"
        );
        std::fs::remove_file(&f).unwrap();
        let e = c.ingest.bearer_token().unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
