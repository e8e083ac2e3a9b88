//! `tally run`: wires the pipeline, the outbox relay, reference refresh, dedup
//! pruning and the health server together, with shutdown as an input.
//!
//! Shutdown (SIGTERM/SIGINT or the `shutdown` channel): stop polling, finish
//! and commit buffered batches, let the relay finish its publish, exit within
//! the deadline. Anything cut short is safe: Postgres state is the truth.

use crate::config::Config;
use crate::engine::ledger::Ledger;
use crate::engine::pipeline::{Pipeline, Route};
use crate::engine::reference::{self, SharedReference};
use crate::engine::relay::RelayConfig;
use crate::engine::stream::Stream;
use crate::errors::StageError;
use crate::metrics::Metrics;
use crate::sinks::clickhouse::ClickHouseSink;
use crate::sinks::postgres::connect_pg;
use crate::streams::audit::AuditStream;
use crate::streams::policy::PolicyStream;
use crate::streams::usage::UsageStream;
use sqlx::postgres::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Runs until `shutdown` flips (or a Fatal error).
pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<(), StageError> {
    let pool = connect_pg(&cfg).await?;
    let metrics = Arc::new(Metrics::new());
    metrics.install_global();
    let stall_after = Duration::from_millis(cfg.server.stall_after_ms);
    let reference = SharedReference::new(reference::load_and_store(&pool).await?);
    let ledgers: Vec<Ledger> = [
        (cfg.streams.usage, "usage", &cfg.kafka.usage_topic),
        (cfg.streams.policy, "policy", &cfg.policy.topic),
        (cfg.streams.audit, "audit", &cfg.audit.topic),
    ]
    .into_iter()
    .filter(|(on, _, _)| *on)
    .map(|(_, name, topic)| Ledger::new(pool.clone(), &cfg.group_for(name), topic))
    .collect();
    let ch = ClickHouseSink::new(&cfg.clickhouse);
    cfg.require_audit_keys()
        .map_err(|e| StageError::Fatal(e.to_string()))?;
    tracing::info!(config = ?cfg, "tally run starting");

    let mut tasks = Vec::new();
    {
        let (pool, reference, every, m) = (
            pool.clone(),
            reference.clone(),
            Duration::from_millis(cfg.pipeline.reference_refresh_ms),
            metrics.clone(),
        );
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                let current = reference.get().version.clone();
                let [loaded, unchanged, failed] = &m.reference_refreshes;
                match reference::refresh(&pool, Some(&current)).await {
                    Ok(Some(r)) => {
                        tracing::info!(version = %r.version, "reference data changed: new snapshot in use");
                        reference.set(r);
                        loaded.increment(1);
                    }
                    Ok(None) => unchanged.increment(1),
                    Err(e) => {
                        failed.increment(1);
                        tracing::warn!(error = %e, "reference refresh failed; keeping the previous snapshot");
                    }
                }
            }
        }));
    }
    {
        let (ledgers, every) = (
            ledgers.clone(),
            Duration::from_millis(cfg.pipeline.prune_interval_ms),
        );
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                for ledger in &ledgers {
                    match ledger.prune_seen().await {
                        Ok(n) => tracing::info!(topic = %ledger.topic, pruned = n, "pruned event ids beyond the dedup look-back"),
                        Err(e) => tracing::warn!(error = %e, "pruning seen events failed"),
                    }
                }
            }
        }));
    }
    {
        // Histogram samples are drained on every scrape, and here whether
        // anything scrapes or not.
        let (m, mut stop) = (metrics.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => m.upkeep(),
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    if !cfg.server.listen.is_empty() {
        let (listen, m, stall) = (cfg.server.listen.clone(), metrics.clone(), stall_after);
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::engine::health::serve(listen, m, stall, stop).await {
                tracing::error!(error = %e, "health server failed");
            }
        }));
    }
    let relay_task = {
        let rc = RelayConfig {
            kafka: crate::sinks::kafka_client::KafkaClient::new(&cfg.kafka),
            topic: cfg.kafka.violation_topic.clone(),
            postgres: crate::sinks::postgres::pg_options(&cfg)?,
            batch: 1000,
            output: crate::engine::violation_wire::ViolationOutput::from_config(&cfg.kafka),
        };
        tokio::spawn(crate::engine::relay_watch::supervise(
            rc,
            pool.clone(),
            metrics.clone(),
            shutdown.clone(),
        ))
    };

    if cfg.streams.audit {
        let c = crate::streams::audit::checkpointer::Checkpointer {
            pool: pool.clone(),
            signer: cfg
                .audit
                .signer()
                .map_err(|e| StageError::Fatal(e.to_string()))?,
            producer: crate::engine::dlq::producer(
                &crate::sinks::kafka_client::KafkaClient::new(&cfg.kafka),
                &[],
            )?,
            topic: cfg.audit.checkpoint_topic.clone(),
            interval: Duration::from_millis(cfg.audit.checkpoint_interval_ms),
            age: metrics.checkpoint_age(),
        };
        tasks.push(tokio::spawn(c.run(shutdown.clone())));
    }
    let result = run_streams(&cfg, &pool, &ch, &reference, &metrics, shutdown.clone()).await;
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
    tracing::info!(metrics = %metrics.summary(stall_after).join(", "), "tally run stopped");
    result
}

/// Runs one pipeline per enabled stream until `shutdown` flips; the first
/// pipeline to fail stops the others (they drain and commit) and its error is returned.
async fn run_streams(
    cfg: &Config,
    pool: &PgPool,
    ch: &ClickHouseSink,
    reference: &SharedReference,
    metrics: &Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StageError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut outer = shutdown.clone();
    let forward = {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            while outer.changed().await.is_ok() {
                if *outer.borrow() {
                    let _ = stop_tx.send(true);
                    return;
                }
            }
        })
    };
    let mut set = tokio::task::JoinSet::new();
    let parts = Parts {
        cfg,
        pool,
        ch,
        reference,
        metrics,
        stop: &stop_rx,
    };
    if cfg.streams.usage {
        let stream = Arc::new(UsageStream::new(cfg));
        set.spawn(parts.pipeline(stream, cfg.route("usage")).await?);
    }
    if cfg.streams.policy {
        let stream = Arc::new(PolicyStream::new(cfg));
        set.spawn(parts.pipeline(stream, cfg.route("policy")).await?);
    }
    if cfg.streams.audit {
        let stream = AuditStream::new(cfg).map_err(|e| StageError::Fatal(e.to_string()))?;
        set.spawn(parts.pipeline(Arc::new(stream), cfg.route("audit")).await?);
    }
    let mut result = Ok(());
    while let Some(done) = set.join_next().await {
        let r = done
            .map_err(|e| StageError::Fatal(format!("pipeline task: {e}")))
            .and_then(|r| r);
        if let Err(e) = r {
            tracing::error!(error = %e, "a stream's pipeline stopped; stopping the others");
            let _ = stop_tx.send(true);
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    forward.abort();
    result
}

/// What every stream's pipeline is built from.
struct Parts<'a> {
    cfg: &'a Config,
    pool: &'a PgPool,
    ch: &'a ClickHouseSink,
    reference: &'a SharedReference,
    metrics: &'a Arc<Metrics>,
    stop: &'a watch::Receiver<bool>,
}

impl Parts<'_> {
    /// A pipeline for `stream`, ready to run as a task.
    async fn pipeline<S: Stream>(
        &self,
        stream: Arc<S>,
        route: Route,
    ) -> Result<
        impl std::future::Future<Output = Result<(), StageError>> + Send + 'static,
        StageError,
    > {
        let ledger = Ledger::new(self.pool.clone(), &route.group, &route.topic);
        tracing::info!(stream = S::NAME, topic = %route.topic, group = %route.group, "consuming");
        let pipeline = Pipeline::new(
            self.cfg.clone(),
            stream,
            route,
            ledger,
            self.ch.clone(),
            self.reference.clone(),
            self.metrics.clone(),
        )
        .await?;
        let stop = self.stop.clone();
        Ok(pipeline.run(stop))
    }
}
