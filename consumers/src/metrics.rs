//! Telemetry: counters named `tally_<what>_<unit>`, bounded labels, updated per
//! batch, rendered in the Prometheus text format by the health server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
pub struct Metrics {
    pub messages_consumed_total: AtomicU64,
    pub events_counted_total: AtomicU64,
    pub events_duplicate_total: AtomicU64,
    pub dead_letters_total: AtomicU64,
    pub batches_committed_total: AtomicU64,
    pub batches_replayed_total: AtomicU64,
    pub clickhouse_rows_written_total: AtomicU64,
    pub clickhouse_tables_skipped_total: AtomicU64,
    pub violations_raised_total: AtomicU64,
    pub violations_published_total: AtomicU64,
    pub retries_total: AtomicU64,
    pub ownership_lost_total: AtomicU64,
    pub fairness_deferrals_total: AtomicU64,
    /// Sum of batch processing seconds, in microseconds.
    pub batch_micros_total: AtomicU64,
    /// Time per stage of a batch, in microseconds (see `STAGES`).
    pub stage_micros_total: [AtomicU64; 7],
    /// Progress per stream (`usage`, `policy`, `audit`).
    progress: Mutex<std::collections::BTreeMap<&'static str, Progress>>,
    /// Circuit breakers and retry counts per sink (`breaker.rs`).
    pub sinks: crate::engine::breaker::SinkBreakers,
    /// Whether the violation relay runs and progresses (`health.rs`).
    pub relay: crate::engine::health::RelayHealth,
    pub relay_restarts_total: AtomicU64,
    /// Gauge: violations in the outbox not yet published (read from Postgres).
    pub violations_unpublished: AtomicU64,
}

struct Progress {
    /// Last time a batch committed (or the pipeline had nothing to do).
    last_progress: Instant,
    /// Whether messages are buffered and waiting.
    backlog: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            last_progress: Instant::now(),
            backlog: false,
        }
    }
}

/// Stages of a batch, in order, as labels of `tally_stage_seconds_total`.
pub const STAGES: [&str; 7] = [
    "decode",
    "dead_letter",
    "claim",
    "enrich",
    "clickhouse",
    "commit",
    "other",
];

impl Metrics {
    pub fn stage(&self, i: usize, since: std::time::Instant) {
        if let Some(c) = self.stage_micros_total.get(i) {
            c.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
    }

    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Record that `stream`'s work made progress now.
    pub fn progressed(&self, stream: &'static str) {
        if let Ok(mut p) = self.progress.lock() {
            p.entry(stream).or_default().last_progress = Instant::now();
        }
    }

    pub fn set_backlog(&self, stream: &'static str, backlog: bool) {
        if let Ok(mut p) = self.progress.lock() {
            let p = p.entry(stream).or_default();
            if !backlog {
                p.last_progress = Instant::now();
            }
            p.backlog = backlog;
        }
    }

    /// Healthy unless some stream's buffered work has made no progress for
    /// `stall_after`: the longest such stall.
    pub fn stalled_for(&self) -> Option<std::time::Duration> {
        let p = self.progress.lock().ok()?;
        p.values()
            .filter(|p| p.backlog)
            .map(|p| p.last_progress.elapsed())
            .max()
    }

    pub fn render(&self) -> String {
        let counters: [(&str, &AtomicU64, &str); 13] = [
            (
                "tally_messages_consumed_total",
                &self.messages_consumed_total,
                "Messages read from the usage topic.",
            ),
            (
                "tally_events_counted_total",
                &self.events_counted_total,
                "Usage events counted (after dedup).",
            ),
            (
                "tally_events_duplicate_total",
                &self.events_duplicate_total,
                "Re-sent events recognised and not counted again.",
            ),
            (
                "tally_dead_letters_total",
                &self.dead_letters_total,
                "Messages sent to the dead-letter topic.",
            ),
            (
                "tally_batches_committed_total",
                &self.batches_committed_total,
                "Batches committed.",
            ),
            (
                "tally_batches_replayed_total",
                &self.batches_replayed_total,
                "Pending batches replayed after a crash or takeover.",
            ),
            (
                "tally_clickhouse_rows_written_total",
                &self.clickhouse_rows_written_total,
                "Rows inserted into ClickHouse.",
            ),
            (
                "tally_clickhouse_tables_skipped_total",
                &self.clickhouse_tables_skipped_total,
                "Tables skipped on replay because they already held the batch.",
            ),
            (
                "tally_violations_raised_total",
                &self.violations_raised_total,
                "New violations recorded.",
            ),
            (
                "tally_violations_published_total",
                &self.violations_published_total,
                "Violations published to the violation topic.",
            ),
            (
                "tally_retries_total",
                &self.retries_total,
                "Retryable errors retried.",
            ),
            (
                "tally_ownership_lost_total",
                &self.ownership_lost_total,
                "Batches abandoned because another instance owns the partition.",
            ),
            (
                "tally_fairness_deferrals_total",
                &self.fairness_deferrals_total,
                "Batches deferred by per-tenant pacing.",
            ),
        ];
        let mut out = String::new();
        for (name, c, help) in counters {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                c.load(Ordering::Relaxed)
            ));
        }
        let micros = self.batch_micros_total.load(Ordering::Relaxed);
        out.push_str(&format!(
            "# HELP tally_batch_processing_seconds_total Time spent processing batches.\n# TYPE tally_batch_processing_seconds_total counter\ntally_batch_processing_seconds_total {}.{:06}\n",
            micros / 1_000_000,
            micros % 1_000_000
        ));
        out.push_str("# HELP tally_stage_seconds_total Time spent per batch stage.\n# TYPE tally_stage_seconds_total counter\n");
        for (name, c) in STAGES.iter().zip(&self.stage_micros_total) {
            let m = c.load(Ordering::Relaxed);
            out.push_str(&format!(
                "tally_stage_seconds_total{{stage=\"{name}\"}} {}.{:06}\n",
                m / 1_000_000,
                m % 1_000_000
            ));
        }
        out.push_str(&self.sinks.render());
        out.push_str(&format!(
            "# HELP tally_relay_restarts_total Violation relay restarts after it failed.\n# TYPE tally_relay_restarts_total counter\ntally_relay_restarts_total {}\n\
             # HELP tally_violations_unpublished Violations in the outbox not yet published.\n# TYPE tally_violations_unpublished gauge\ntally_violations_unpublished {}\n",
            self.relay_restarts_total.load(Ordering::Relaxed),
            self.violations_unpublished.load(Ordering::Relaxed)
        ));
        out
    }
}
