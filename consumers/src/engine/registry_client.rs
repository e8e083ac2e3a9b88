//! Confluent Schema Registry client: fetches writer schemas by id, once.
//!
//! Guarantee: a schema id the registry does not know is a poison message
//! (dead-lettered as `unknown_schema_id`); a registry that cannot be reached or
//! answers 5xx is Retryable, so an outage delays messages but never dead-letters them.
//! An https:// registry is verified against `registry.ca_file` (or the system's
//! CAs); basic-auth credentials never appear in an error.

use crate::errors::StageError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
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
    http: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
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

    /// Makes sure `id` is registered in `decoder`, fetching it if needed.
    pub async fn ensure(&self, decoder: &Decoder, id: u32) -> Result<Lookup, StageError> {
        if decoder.has_confluent_schema(id) {
            return Ok(Lookup::Registered);
        }
        let url = format!("{}/schemas/ids/{id}", self.base);
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| StageError::Fatal(format!("registry url {url}: {e}")))?;
        let mut request = hyper::Request::get(uri);
        if let Some(auth) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, auth);
        }
        let request = request
            .body(Empty::new())
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
}
