//! `tally ingest`: Open Policy Agent's decision-log upload API in front of the policy topic.
//!
//! Guarantee: an upload (OPA's `decision_logs` plugin POSTs a gzip-compressed
//! JSON array of events) is answered 2xx only after every one of its events is
//! on `policy.topic`, acknowledged with acks=all by an idempotent producer, one
//! message per event holding its original bytes and keyed by its tenant.
//! Otherwise nothing is acknowledged to OPA: a malformed or oversized body is
//! refused whole (400, 413) before anything is produced, and a Kafka problem is
//! a 503 that OPA retries; the copies a retry sends again are dropped downstream
//! as duplicates of (tenant, decision_id). Events whose tenant cannot be read are
//! forwarded without a key and dead-lettered by the pipeline with their reason.
//!
//! Modules: [`body`] (gzip, limits, splitting the array; pure), [`forward`]
//! (Kafka), [`server`] (HTTP, auth, shutdown), [`metrics`] (`tally_ingest_*`).

pub mod body;
pub mod forward;
pub mod metrics;
pub mod server;

use crate::config::Config;
use crate::errors::StageError;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Runs the upload API until `shutdown` turns true, then drains and returns.
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), StageError> {
    let ic = cfg.ingest.clone();
    let token = ic
        .bearer_token()
        .map_err(|e| StageError::Fatal(e.to_string()))?;
    if token.is_none() {
        tracing::warn!(
            "ingest.token and ingest.token_file are empty: uploads are not authenticated"
        );
    }
    let forwarder = forward::Forwarder::new(
        &crate::sinks::kafka_client::KafkaClient::new(&cfg.kafka),
        &cfg.policy.topic,
        Duration::from_millis(ic.produce_timeout_ms),
    )?;
    let listener = tokio::net::TcpListener::bind(&ic.listen)
        .await
        .map_err(|e| StageError::Fatal(format!("ingest.listen {}: {e}", ic.listen)))?;
    tracing::info!(
        listen = %ic.listen,
        path = %ic.path,
        topic = %cfg.policy.topic,
        authenticated = token.is_some(),
        "tally ingest: accepting OPA decision-log uploads"
    );
    let ingest = Arc::new(server::Ingest {
        uploads: Semaphore::new(ic.max_concurrent_uploads as usize),
        cfg: ic,
        token,
        mapping: cfg.opa.clone(),
        forwarder,
        metrics: metrics::IngestMetrics::new(),
        draining: AtomicBool::new(false),
    });
    server::serve(ingest.clone(), listener, shutdown).await;
    let summary: Vec<String> = ingest
        .metrics
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains("_bucket{") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect();
    tracing::info!(metrics = ?summary, "tally ingest stopped");
    Ok(())
}
