//! `tally run`: wires the pipeline, the outbox relay, reference refresh, dedup
//! pruning and the health server together, with shutdown as an input.
//!
//! Shutdown (SIGTERM/SIGINT or the `shutdown` channel): stop polling, finish
//! and commit buffered batches, let the relay finish its publish, exit within
//! the deadline. Anything cut short is safe: Postgres state is the truth.

use crate::config::Config;
use crate::engine::ledger::Ledger;
use crate::engine::pipeline::Pipeline;
use crate::engine::reference::{self, SharedReference};
use crate::engine::relay::RelayConfig;
use crate::errors::StageError;
use crate::metrics::Metrics;
use crate::sinks::clickhouse::ClickHouseSink;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Connect options from the configured URL. The search path is pinned to
/// `public` so sqlx's `_sqlx_migrations` table never lands in a `tally` schema
/// that `"$user"` (a role named tally) would put first.
pub fn pg_options(cfg: &Config) -> Result<PgConnectOptions, StageError> {
    let opts = PgConnectOptions::from_str(&cfg.postgres.url)
        .map_err(|e| StageError::Fatal(format!("config key `postgres.url`: {e}")))?;
    Ok(opts.options([("search_path", "public")]))
}

pub async fn connect_pg(cfg: &Config) -> Result<PgPool, StageError> {
    PgPoolOptions::new()
        .max_connections(cfg.postgres.max_connections)
        .acquire_timeout(Duration::from_secs(15))
        .connect_with(pg_options(cfg)?)
        .await
        .map_err(|e| crate::errors::classify_pg("connect to postgres", e))
}

/// Runs until `shutdown` flips (or a Fatal error).
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), StageError> {
    let pool = connect_pg(&cfg).await?;
    let metrics = Arc::new(Metrics::default());
    let reference = SharedReference::new(reference::load_and_store(&pool).await?);
    let ledger = Ledger::new(pool.clone(), &cfg.kafka.group_id, &cfg.kafka.usage_topic);
    let ch = ClickHouseSink::new(&cfg.clickhouse);
    tracing::info!(config = ?cfg, "tally run starting");

    let mut tasks = Vec::new();
    {
        let (pool, reference, every) = (
            pool.clone(),
            reference.clone(),
            Duration::from_millis(cfg.pipeline.reference_refresh_ms),
        );
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                match reference::load_and_store(&pool).await {
                    Ok(r) => reference.set(r),
                    Err(e) => tracing::warn!(error = %e, "reference refresh failed; keeping the previous snapshot"),
                }
            }
        }));
    }
    {
        let (ledger, every) = (
            ledger.clone(),
            Duration::from_millis(cfg.pipeline.prune_interval_ms),
        );
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                match ledger.prune_seen().await {
                    Ok(n) => {
                        tracing::info!(pruned = n, "pruned event ids beyond the dedup look-back")
                    }
                    Err(e) => tracing::warn!(error = %e, "pruning seen events failed"),
                }
            }
        }));
    }
    if !cfg.server.listen.is_empty() {
        let (listen, m, stall) = (
            cfg.server.listen.clone(),
            metrics.clone(),
            Duration::from_millis(cfg.server.stall_after_ms),
        );
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::engine::health::serve(listen, m, stall, stop).await {
                tracing::error!(error = %e, "health server failed");
            }
        }));
    }
    let relay_task = {
        let rc = RelayConfig {
            brokers: cfg.kafka.brokers.clone(),
            topic: cfg.kafka.violation_topic.clone(),
            postgres_url: cfg.postgres.url.clone(),
            batch: 1000,
        };
        tokio::spawn(crate::engine::relay_watch::supervise(
            rc,
            pool.clone(),
            metrics.clone(),
            shutdown.clone(),
        ))
    };

    let pipeline = Pipeline::new(cfg, ledger, ch, reference, metrics.clone()).await?;
    let result = pipeline.run(shutdown.clone()).await;
    if result.is_err() {
        relay_task.abort();
    } else {
        match tokio::time::timeout(Duration::from_secs(20), relay_task).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "violation relay stopped with an error"),
            Err(_) => tracing::warn!("violation relay did not stop in time"),
            _ => {}
        }
    }
    for t in tasks {
        t.abort();
    }
    tracing::info!(metrics = %metrics.render().lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join(", "), "tally run stopped");
    result
}
