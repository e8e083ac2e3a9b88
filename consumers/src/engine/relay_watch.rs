//! Keeps the outbox relay running and its backlog visible.
//!
//! Guarantee: the relay never dies silently. If it fails (a Fatal error or a
//! panic) it is restarted with capped exponential backoff, and `/readyz` fails
//! until the restarted relay progresses again (`RelayHealth`). A restarted relay
//! reconciles its predecessor's unfinished attempt first (`relay.rs`), so a
//! restart never publishes a violation twice. `tally_violations_unpublished`
//! is read from Postgres every few seconds, whether the relay works or not.

use crate::engine::relay::{self, RelayConfig};
use crate::errors::StageError;
use crate::metrics::Metrics;
use sqlx::postgres::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the unpublished-violations gauge is refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(3);
/// A relay that ran this long before failing starts over at the shortest delay.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

fn restart_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
        .build()
}

/// Runs the relay until `shutdown` flips, restarting it whenever it fails.
pub async fn supervise(
    cfg: RelayConfig,
    pool: PgPool,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StageError> {
    let gauge = tokio::spawn(unpublished_gauge(
        pool.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let mut delays = restart_backoff();
    loop {
        if *shutdown.borrow() {
            break;
        }
        metrics.relay.started();
        let started = Instant::now();
        let task = tokio::spawn(relay::run(
            cfg.clone(),
            pool.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let reason = match task.await {
            Ok(Ok(())) if *shutdown.borrow() => break,
            Ok(Ok(())) => "the relay stopped without being asked to".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the relay task panicked: {e}"),
        };
        metrics.relay.stopped(&reason);
        metrics.relay_restarts.increment(1);
        if started.elapsed() >= HEALTHY_RUN {
            delays = restart_backoff();
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tracing::error!(
            error = %reason,
            restart_in_ms = delay.as_millis() as u64,
            "violation relay failed; restarting it (readiness fails meanwhile)"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
        }
    }
    gauge.abort();
    Ok(())
}

/// Refreshes `tally_violations_unpublished` (the outbox's partial index makes
/// the count cheap); a failed read keeps the previous value.
async fn unpublished_gauge(
    pool: PgPool,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tally.violations WHERE published_at IS NULL",
        )
        .fetch_one(&pool)
        .await
        {
            Ok(n) => metrics
                .violations_unpublished
                .set(u32::try_from(n).unwrap_or(u32::MAX)),
            Err(e) => tracing::debug!(error = %e, "reading the outbox backlog failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(GAUGE_EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
