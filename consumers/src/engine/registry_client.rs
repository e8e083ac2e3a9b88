//! Confluent Schema Registry client: fetches writer schemas by id, once; registers
//! a schema under a subject (`tally gen --encoding confluent`).
//!
//! Guarantee: a schema id the registry does not know is a poison message
//! (dead-lettered as `unknown_schema_id`); a registry that cannot be reached or
//! answers 5xx is Retryable, so an outage delays messages but never dead-letters them.
//! [`RegistryClient::register`] returns the id the registry assigned (the existing
//! one for a schema registered before), never an assumed one.
//! An https:// registry is verified against `registry.ca_file` (or the system's
//! CAs); basic-auth credentials never appear in an error.

use crate::errors::StageError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tally_schemas::Decoder;

#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Registered,
    Unknown,
}

#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    timeout: Duration,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `Basic <base64>` when registry.username is set.
    authorization: Option<String>,
}

impl RegistryClient {
    /// No credentials; an https:// URL is verified against the system's CAs.
    pub fn new(base: &str, timeout: Duration) -> Self {
        let connector = HttpsConnector::new();
        Self {
            base: base.trim_end_matches('/').to_string(),
            timeout,
            http: Client::builder(TokioExecutor::new()).build(connector),
            authorization: None,
        }
    }

    /// From `[registry]`: its CA file and basic-auth credentials.
    pub fn from_config(cfg: &crate::config::RegistryConfig) -> Result<Self, StageError> {
        use base64::Engine as _;
        let connector = crate::sinks::https::connector(&cfg.ca_file, "registry.ca_file")?;
        let authorization = (!cfg.username.is_empty()).then(|| {
            let pair = format!("{}:{}", cfg.username, cfg.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Ok(Self {
            base: cfg.url.trim_end_matches('/').to_string(),
            timeout: Duration::from_millis(cfg.timeout_ms),
            http: Client::builder(TokioExecutor::new()).build(connector),
            authorization,
        })
    }

    /// Sends one request (with the basic-auth header when configured) and reads
    /// the whole answer, both within the timeout. A URL that does not parse is
    /// Fatal; no answer, or a cut one, is Retryable.
    async fn send(
        &self,
        url: &str,
        request: hyper::http::request::Builder,
        body: Full<Bytes>,
    ) -> Result<(hyper::StatusCode, Bytes), StageError> {
        let mut request = request;
        if let Some(auth) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, auth);
        }
        let request = request
            .body(body)
            .map_err(|e| StageError::Fatal(format!("registry request {url}: {e}")))?;
        let resp = tokio::time::timeout(self.timeout, self.http.request(request))
            .await
            .map_err(|_| StageError::Retryable(format!("schema registry timed out: {url}")))?
            .map_err(|e| StageError::Retryable(format!("schema registry {url}: {e}")))?;
        let status = resp.status();
        let body = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| StageError::Retryable(format!("schema registry timed out: {url}")))?
            .map_err(|e| StageError::Retryable(format!("schema registry body {url}: {e}")))?
            .to_bytes();
        Ok((status, body))
    }

    /// Makes sure `id` is registered in `decoder`, fetching it if needed.
    pub async fn ensure(&self, decoder: &Decoder, id: u32) -> Result<Lookup, StageError> {
        if decoder.has_confluent_schema(id) {
            return Ok(Lookup::Registered);
        }
        let url = format!("{}/schemas/ids/{id}", self.base);
        let (status, body) = self
            .send(&url, hyper::Request::get(&url), Full::default())
            .await?;
        if status.as_u16() == 404 {
            return Ok(Lookup::Unknown);
        }
        if status.as_u16() == 401 || status.as_u16() == 403 {
            // Wrong or missing credentials: no message is poison for it, and
            // retrying will not help until the configuration is fixed.
            return Err(StageError::Fatal(format!(
                "schema registry {url}: HTTP {status} (check registry.username and registry.password)"
            )));
        }
        if !status.is_success() {
            return Err(StageError::Retryable(format!(
                "schema registry {url}: HTTP {status}"
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| StageError::Retryable(format!("schema registry {url}: bad JSON: {e}")))?;
        let Some(schema) = v.get("schema").and_then(|s| s.as_str()) else {
            return Err(StageError::Retryable(format!(
                "schema registry {url}: no `schema` field"
            )));
        };
        match decoder.register_confluent_schema(id, schema) {
            Ok(()) => Ok(Lookup::Registered),
            // The registry holds a schema we cannot use: its messages are poison.
            Err(_) => Ok(Lookup::Unknown),
        }
    }

    /// Registers `schema` (Avro schema JSON) under `subject` with the Confluent
    /// REST API (`POST /subjects/<subject>/versions`) and returns its schema id.
    /// Registering a schema the subject already has returns its existing id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, StageError> {
        let url = format!("{}/subjects/{}/versions", self.base, path_segment(subject));
        let body = serde_json::json!({ "schema": schema }).to_string();
        let request = hyper::Request::post(&url)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/vnd.schemaregistry.v1+json",
            )
            .header(
                hyper::header::ACCEPT,
                "application/vnd.schemaregistry.v1+json",
            );
        let (status, body) = self
            .send(&url, request, Full::new(Bytes::from(body)))
            .await?;
        let text = String::from_utf8_lossy(&body);
        if status.is_server_error() {
            return Err(StageError::Retryable(format!(
                "schema registry {url}: HTTP {status}: {text}"
            )));
        }
        if !status.is_success() {
            // 401/403 credentials, 409 incompatible with the subject's compatibility
            // setting, 422 an invalid schema: retrying does not help.
            let hint = match status.as_u16() {
                401 | 403 => " (check registry.username and registry.password)",
                409 => " (incompatible with the subject's earlier versions)",
                _ => "",
            };
            return Err(StageError::Fatal(format!(
                "registering {subject} at {url}: HTTP {status}{hint}: {text}"
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| StageError::Fatal(format!("schema registry {url}: bad JSON: {e}")))?;
        v.get("id")
            .and_then(serde_json::Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| {
                StageError::Fatal(format!("schema registry {url}: no schema `id` in {text}"))
            })
    }
}

/// `s` percent-encoded for one URL path segment (subjects are topic names plus
/// `-value`: letters, digits, `.`, `_`, `-`; anything else is escaped).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_are_one_path_segment() {
        assert_eq!(
            super::path_segment("llm.usage.v1-value"),
            "llm.usage.v1-value"
        );
        assert_eq!(super::path_segment("a/b c"), "a%2Fb%20c");
    }
}
