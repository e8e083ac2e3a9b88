//! Confluent Schema Registry client: fetches writer schemas by id, once.
//!
//! Guarantee: a schema id the registry does not know is a poison message
//! (dead-lettered as `unknown_schema_id`); a registry that cannot be reached or
//! answers 5xx is Retryable, so an outage delays messages but never dead-letters them.

use crate::errors::StageError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
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
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl RegistryClient {
    pub fn new(base: &str, timeout: Duration) -> Self {
        let http = Client::builder(TokioExecutor::new()).build_http();
        Self {
            base: base.trim_end_matches('/').to_string(),
            timeout,
            http,
        }
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
        let resp = tokio::time::timeout(self.timeout, self.http.get(uri))
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
