//! Telemetry: one Prometheus recorder per process (the `metrics` facade with
//! `metrics-exporter-prometheus`), rendered by the health server's `/metrics`.
//!
//! Guarantee: every series is named `tally_<what>_<unit>` (`_total` for
//! counters, `_seconds` for durations) and its labels are bounded: `stream`
//! (usage, policy, audit), `partition` (partitions of the stream's topic),
//! `stage`, `sink` and `step` (fixed enums), dead-letter `class` and violation
//! `rule` (compile-time constants of the code). The series a dashboard or an
//! alert needs exist from the moment a stream starts (registered at zero).
//! Readiness inputs (progress per stream, sink breakers, relay health) live
//! beside the recorder, so `/readyz` never depends on what is rendered.

use crate::engine::breaker::{Sink, SinkBreakers, Step};
use crate::engine::health::RelayHealth;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Names of every series tally exports.
pub mod names {
    pub const MESSAGES_CONSUMED: &str = "tally_messages_consumed_total";
    pub const EVENTS_COUNTED: &str = "tally_events_counted_total";
    pub const EVENTS_DUPLICATE: &str = "tally_events_duplicate_total";
    pub const DEAD_LETTERS: &str = "tally_dead_letters_total";
    pub const BATCHES_COMMITTED: &str = "tally_batches_committed_total";
    pub const BATCHES_REPLAYED: &str = "tally_batches_replayed_total";
    pub const CLICKHOUSE_ROWS_WRITTEN: &str = "tally_clickhouse_rows_written_total";
    pub const CLICKHOUSE_TABLES_SKIPPED: &str = "tally_clickhouse_tables_skipped_total";
    pub const VIOLATIONS_RAISED: &str = "tally_violations_raised_total";
    pub const VIOLATIONS_PUBLISHED: &str = "tally_violations_published_total";
    pub const RETRIES: &str = "tally_retries_total";
    pub const OWNERSHIP_LOST: &str = "tally_ownership_lost_total";
    pub const FAIRNESS_DEFERRALS: &str = "tally_fairness_deferrals_total";
    pub const RELAY_RESTARTS: &str = "tally_relay_restarts_total";
    pub const REFERENCE_REFRESHES: &str = "tally_reference_refreshes_total";
    pub const BATCH_DURATION: &str = "tally_batch_duration_seconds";
    pub const STAGE_DURATION: &str = "tally_stage_duration_seconds";
    pub const OWNED_PARTITIONS: &str = "tally_owned_partitions";
    pub const PARTITION_LAG: &str = "tally_partition_lag_messages";
    pub const LAST_COMMIT_AGE: &str = "tally_last_commit_age_seconds";
    pub const VIOLATIONS_UNPUBLISHED: &str = "tally_violations_unpublished";
    pub const SINK_CIRCUIT_OPEN: &str = "tally_sink_circuit_open";
    pub const RELAY_ALIVE: &str = "tally_relay_alive";
    pub const AUDIT_CHECKPOINT_AGE: &str = "tally_audit_checkpoint_age_seconds";
    pub const BUILD_INFO: &str = "tally_build_info";
}

use names::*;

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// `# HELP` of each series.
#[rustfmt::skip]
const DESCRIPTIONS: [(&str, Kind, &str); 25] = [
    (MESSAGES_CONSUMED, Kind::Counter, "Messages read from the stream's topic."),
    (EVENTS_COUNTED, Kind::Counter, "Events counted (after dedup)."),
    (EVENTS_DUPLICATE, Kind::Counter, "Re-sent events recognised and not counted again."),
    (DEAD_LETTERS, Kind::Counter, "Messages dead-lettered, by error class."),
    (BATCHES_COMMITTED, Kind::Counter, "Batches committed."),
    (BATCHES_REPLAYED, Kind::Counter, "Pending batches replayed after a crash or takeover."),
    (CLICKHOUSE_ROWS_WRITTEN, Kind::Counter, "Rows inserted into ClickHouse."),
    (CLICKHOUSE_TABLES_SKIPPED, Kind::Counter, "Tables skipped on replay because they already held the batch."),
    (VIOLATIONS_RAISED, Kind::Counter, "New violations recorded in the outbox, by rule."),
    (VIOLATIONS_PUBLISHED, Kind::Counter, "Violations published to the violation topic."),
    (RETRIES, Kind::Counter, "Retryable errors retried, by sink and step."),
    (OWNERSHIP_LOST, Kind::Counter, "Batches abandoned because another instance owns the partition."),
    (FAIRNESS_DEFERRALS, Kind::Counter, "Batches deferred by per-tenant pacing."),
    (RELAY_RESTARTS, Kind::Counter, "Violation relay restarts after it failed."),
    (REFERENCE_REFRESHES, Kind::Counter, "Reference data (prices, tenants, budgets) re-read, by outcome: loaded (changed), unchanged, failed."),
    (BATCH_DURATION, Kind::Histogram, "Time from a batch's start to its commit."),
    (STAGE_DURATION, Kind::Histogram, "Time a batch spends in each stage."),
    (OWNED_PARTITIONS, Kind::Gauge, "Partitions this instance owns."),
    (PARTITION_LAG, Kind::Gauge, "High watermark minus the offset of record, per owned partition (0 once released)."),
    (LAST_COMMIT_AGE, Kind::Gauge, "Seconds since the stream last committed a batch (or since start)."),
    (VIOLATIONS_UNPUBLISHED, Kind::Gauge, "Violations in the outbox not yet published."),
    (SINK_CIRCUIT_OPEN, Kind::Gauge, "1 while the sink's circuit breaker is open (consumption paused)."),
    (RELAY_ALIVE, Kind::Gauge, "1 while the violation relay runs and makes progress."),
    (AUDIT_CHECKPOINT_AGE, Kind::Gauge, "Seconds since the newest checkpoint of the tenant whose newest is oldest."),
    (BUILD_INFO, Kind::Gauge, "Always 1; the version of the running build."),
];

/// Upper bounds of the duration histograms' buckets, in seconds.
const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

static META: Metadata<'static> = Metadata::new("tally", Level::INFO, Some(module_path!()));

/// Stages of a batch, the `stage` label of `tally_stage_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Decode,
    DeadLetter,
    Claim,
    Enrich,
    ClickHouse,
    Commit,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Decode,
        Stage::DeadLetter,
        Stage::Claim,
        Stage::Enrich,
        Stage::ClickHouse,
        Stage::Commit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::DeadLetter => "dead_letter",
            Stage::Claim => "claim",
            Stage::Enrich => "enrich",
            Stage::ClickHouse => "clickhouse",
            Stage::Commit => "commit",
        }
    }
}

/// The process's recorder and the state readiness is decided on.
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    streams: Mutex<BTreeMap<&'static str, Arc<StreamMetrics>>>,
    /// Progress per stream (`usage`, `policy`, `audit`), for `/readyz`.
    progress: Mutex<BTreeMap<&'static str, Progress>>,
    /// Circuit breakers per sink (`breaker.rs`).
    pub sinks: Arc<SinkBreakers>,
    /// Whether the violation relay runs and progresses (`health.rs`).
    pub relay: RelayHealth,
    pub relay_restarts: Counter,
    /// Reference refreshes: loaded (a changed snapshot), unchanged, failed.
    pub reference_refreshes: [Counter; 3],
    pub violations_published: Counter,
    /// Violations in the outbox not yet published (read from Postgres).
    pub violations_unpublished: Gauge,
    relay_alive: Gauge,
    circuit_open: [Gauge; 3],
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn labels(pairs: &[(&'static str, &'static str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label::from_static_parts(k, v))
        .collect()
}

fn counter(r: &PrometheusRecorder, name: &'static str, l: Vec<Label>) -> Counter {
    r.register_counter(&Key::from_parts(name, l), &META)
}

fn gauge(r: &PrometheusRecorder, name: &'static str, l: Vec<Label>) -> Gauge {
    r.register_gauge(&Key::from_parts(name, l), &META)
}

impl Metrics {
    /// A new recorder with every process-wide series registered.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_duration_seconds".into()),
                &DURATION_BUCKETS,
            )
            .expect("the duration buckets are not empty")
            .build_recorder();
        for (name, kind, help) in DESCRIPTIONS {
            let (name, help) = (KeyName::from_const_str(name), help.into());
            match kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram => recorder.describe_histogram(name, None, help),
            }
        }
        let r = &recorder;
        gauge(
            r,
            BUILD_INFO,
            labels(&[("version", env!("CARGO_PKG_VERSION"))]),
        )
        .set(1.0);
        let circuit_open =
            Sink::ALL.map(|s| gauge(r, SINK_CIRCUIT_OPEN, labels(&[("sink", s.name())])));
        Self {
            relay_restarts: counter(r, RELAY_RESTARTS, vec![]),
            reference_refreshes: ["loaded", "unchanged", "failed"]
                .map(|o| counter(r, REFERENCE_REFRESHES, labels(&[("outcome", o)]))),
            violations_published: counter(r, VIOLATIONS_PUBLISHED, vec![]),
            violations_unpublished: gauge(r, VIOLATIONS_UNPUBLISHED, vec![]),
            relay_alive: gauge(r, RELAY_ALIVE, vec![]),
            circuit_open,
            handle: recorder.handle(),
            recorder: Arc::new(recorder),
            streams: Mutex::default(),
            progress: Mutex::default(),
            sinks: Arc::default(),
            relay: RelayHealth::default(),
        }
    }

    /// Makes this recorder the process's global one, so that code recording
    /// through the `metrics` macros lands in the same `/metrics`. Only the
    /// first call in a process succeeds; later ones are ignored.
    pub fn install_global(&self) {
        if metrics::set_global_recorder(self.recorder.clone()).is_err() {
            tracing::debug!("a global metrics recorder is already installed");
        }
    }

    /// The series of stream `name`, registered on first use.
    pub fn stream(&self, name: &'static str) -> Arc<StreamMetrics> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .entry(name)
            .or_insert_with(|| Arc::new(StreamMetrics::new(name, &self.recorder, &self.sinks)))
            .clone()
    }

    /// The series of stream `S`, with its dead-letter classes and violation
    /// rules registered at zero (so a rate over them works from the first one).
    pub fn stream_for<S: crate::engine::stream::Stream>(&self) -> Arc<StreamMetrics> {
        let sm = self.stream(S::NAME);
        let classes = crate::engine::decode::ENGINE_CLASSES
            .iter()
            .chain(tally_schemas::DecodeError::CLASSES.iter())
            .chain(S::PARSE_CLASSES);
        for class in classes {
            sm.dead_letters(class, 0);
        }
        for rule in S::RULES {
            sm.violation_counter(rule).increment(0);
        }
        sm
    }

    /// The audit checkpoint age gauge (registered only where the checkpointer runs).
    pub fn checkpoint_age(&self) -> Gauge {
        gauge(&self.recorder, AUDIT_CHECKPOINT_AGE, vec![])
    }

    /// Drains histogram samples; run it every few seconds, scraped or not,
    /// so memory stays bounded.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition, with the gauges that derive from
    /// time or health refreshed first.
    pub fn render(&self, stall_after: Duration) -> String {
        let open = self.sinks.open();
        for (sink, g) in Sink::ALL.iter().zip(&self.circuit_open) {
            g.set(u8::from(open.iter().any(|(s, _)| s == sink)));
        }
        self.relay_alive
            .set(u8::from(self.relay.problem(stall_after).is_none()));
        let streams: Vec<_> = match self.streams.lock() {
            Ok(s) => s.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        for sm in streams {
            sm.refresh();
        }
        self.handle.render()
    }

    /// The series that are not zero, histograms as sums and counts (no
    /// buckets), sorted: what the final log line of `tally run` reports.
    pub fn summary(&self, stall_after: Duration) -> Vec<String> {
        let mut out: Vec<String> = self
            .render(stall_after)
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.contains("_bucket{"))
            .filter(|l| !l.ends_with(" 0"))
            .map(str::to_string)
            .collect();
        out.sort();
        out
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
    pub fn stalled_for(&self) -> Option<Duration> {
        let p = self.progress.lock().ok()?;
        p.values()
            .filter(|p| p.backlog)
            .map(|p| p.last_progress.elapsed())
            .max()
    }
}

/// The series of one stream, registered once; the engine updates them.
pub struct StreamMetrics {
    pub name: &'static str,
    recorder: Arc<PrometheusRecorder>,
    /// The process's sink breakers (shared by every stream).
    pub sinks: Arc<SinkBreakers>,
    pub messages_consumed: Counter,
    pub events_counted: Counter,
    pub events_duplicate: Counter,
    pub batches_committed: Counter,
    pub batches_replayed: Counter,
    pub clickhouse_rows_written: Counter,
    pub clickhouse_tables_skipped: Counter,
    pub ownership_lost: Counter,
    pub fairness_deferrals: Counter,
    pub owned_partitions: Gauge,
    batch_duration: Histogram,
    stage_duration: [Histogram; 6],
    last_commit: Mutex<Instant>,
    last_commit_age: Gauge,
}

impl StreamMetrics {
    fn new(
        name: &'static str,
        recorder: &Arc<PrometheusRecorder>,
        sinks: &Arc<SinkBreakers>,
    ) -> Self {
        let r = &**recorder;
        let c = |n| counter(r, n, labels(&[("stream", name)]));
        let stage_duration = Stage::ALL.map(|s| {
            let key = Key::from_parts(
                STAGE_DURATION,
                labels(&[("stream", name), ("stage", s.name())]),
            );
            r.register_histogram(&key, &META)
        });
        let sm = Self {
            name,
            recorder: recorder.clone(),
            sinks: sinks.clone(),
            messages_consumed: c(MESSAGES_CONSUMED),
            events_counted: c(EVENTS_COUNTED),
            events_duplicate: c(EVENTS_DUPLICATE),
            batches_committed: c(BATCHES_COMMITTED),
            batches_replayed: c(BATCHES_REPLAYED),
            clickhouse_rows_written: c(CLICKHOUSE_ROWS_WRITTEN),
            clickhouse_tables_skipped: c(CLICKHOUSE_TABLES_SKIPPED),
            ownership_lost: c(OWNERSHIP_LOST),
            fairness_deferrals: c(FAIRNESS_DEFERRALS),
            owned_partitions: gauge(r, OWNED_PARTITIONS, labels(&[("stream", name)])),
            batch_duration: r.register_histogram(
                &Key::from_parts(BATCH_DURATION, labels(&[("stream", name)])),
                &META,
            ),
            stage_duration,
            last_commit: Mutex::new(Instant::now()),
            last_commit_age: gauge(r, LAST_COMMIT_AGE, labels(&[("stream", name)])),
        };
        for step in Step::ALL {
            sm.retry_counter(step).increment(0);
        }
        sm
    }

    /// Time spent in `stage` since `since`.
    pub fn stage(&self, stage: Stage, since: Instant) {
        if let Some(h) = Stage::ALL
            .iter()
            .position(|s| *s == stage)
            .and_then(|i| self.stage_duration.get(i))
        {
            h.record(since.elapsed());
        }
    }

    /// A batch that ran for `took` committed.
    pub fn batch_committed(&self, took: Duration) {
        self.batch_duration.record(took);
        if let Ok(mut t) = self.last_commit.lock() {
            *t = Instant::now();
        }
    }

    fn refresh(&self) {
        if let Ok(t) = self.last_commit.lock() {
            self.last_commit_age.set(t.elapsed());
        }
    }

    /// `n` messages of `class` dead-lettered (`class` is one of the code's
    /// constant classes: see [`Metrics::stream_for`]).
    pub fn dead_letters(&self, class: &str, n: u64) {
        let l = vec![
            Label::from_static_parts("stream", self.name),
            Label::new("class", class.to_string()),
        ];
        counter(&self.recorder, DEAD_LETTERS, l).increment(n);
    }

    fn violation_counter(&self, rule: &str) -> Counter {
        let l = vec![
            Label::from_static_parts("stream", self.name),
            Label::new("rule", rule.to_string()),
        ];
        counter(&self.recorder, VIOLATIONS_RAISED, l)
    }

    /// New violations recorded, one rule name per violation.
    pub fn violations_raised<'a>(&self, rules: impl IntoIterator<Item = &'a str>) {
        let mut by_rule: BTreeMap<&str, u64> = BTreeMap::new();
        for r in rules {
            *by_rule.entry(r).or_default() += 1;
        }
        for (rule, n) in by_rule {
            self.violation_counter(rule).increment(n);
        }
    }

    fn retry_counter(&self, step: Step) -> Counter {
        let l = labels(&[
            ("stream", self.name),
            ("sink", step.sink()),
            ("step", step.name()),
        ]);
        counter(&self.recorder, RETRIES, l)
    }

    /// A Retryable error of `step` is retried.
    pub fn retried(&self, step: Step) {
        self.retry_counter(step).increment(1);
    }

    /// The lag of owned partition `p` (0 once it is released).
    pub fn set_lag(&self, p: i32, lag: i64) {
        let l = vec![
            Label::from_static_parts("stream", self.name),
            Label::new("partition", p.to_string()),
        ];
        gauge(&self.recorder, PARTITION_LAG, l).set(lag.max(0) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(text: &str, series: &str) -> bool {
        text.lines().any(|l| l.starts_with(series))
    }

    #[test]
    fn render_contains_the_updated_series() {
        let m = Metrics::new();
        let sm = m.stream_for::<crate::streams::usage::UsageStream>();
        let stall = Duration::from_secs(60);
        sm.messages_consumed.increment(5);
        sm.events_counted.increment(3);
        sm.dead_letters("invalid_json", 2);
        sm.violations_raised(["budget_threshold", "budget_threshold"]);
        sm.retried(Step::Commit);
        sm.stage(Stage::ClickHouse, Instant::now());
        sm.batch_committed(Duration::from_millis(20));
        sm.set_lag(3, 42);
        sm.owned_partitions.set(2);
        m.violations_unpublished.set(7);
        let text = m.render(stall);
        for series in [
            "tally_messages_consumed_total{stream=\"usage\"} 5",
            "tally_events_counted_total{stream=\"usage\"} 3",
            "tally_dead_letters_total{stream=\"usage\",class=\"invalid_json\"} 2",
            "tally_dead_letters_total{stream=\"usage\",class=\"dedup_conflict\"} 0",
            "tally_violations_raised_total{stream=\"usage\",rule=\"budget_threshold\"} 2",
            "tally_violations_raised_total{stream=\"usage\",rule=\"unpriced_model\"} 0",
            "tally_retries_total{stream=\"usage\",sink=\"postgres\",step=\"commit\"} 1",
            "tally_retries_total{stream=\"usage\",sink=\"clickhouse\",step=\"clickhouse_write\"} 0",
            "tally_stage_duration_seconds_bucket{stream=\"usage\",stage=\"clickhouse\",le=\"0.005\"} 1",
            "tally_stage_duration_seconds_count{stream=\"usage\",stage=\"commit\"} 0",
            "tally_batch_duration_seconds_bucket{stream=\"usage\",le=\"0.025\"} 1",
            "tally_batch_duration_seconds_count{stream=\"usage\"} 1",
            "tally_partition_lag_messages{stream=\"usage\",partition=\"3\"} 42",
            "tally_owned_partitions{stream=\"usage\"} 2",
            "tally_last_commit_age_seconds{stream=\"usage\"} 0",
            "tally_violations_unpublished 7",
            "tally_sink_circuit_open{sink=\"clickhouse\"} 0",
            "tally_relay_alive 0",
            "tally_relay_restarts_total 0",
            "tally_reference_refreshes_total{outcome=\"unchanged\"} 0",
            "tally_violations_published_total 0",
            "tally_ownership_lost_total{stream=\"usage\"} 0",
            "tally_batches_replayed_total{stream=\"usage\"} 0",
            "tally_build_info{version=\"",
            "# TYPE tally_stage_duration_seconds histogram",
            "# HELP tally_partition_lag_messages ",
        ] {
            assert!(has(&text, series), "{series} missing in:\n{text}");
        }
        assert!(
            !text.contains("tally_audit_checkpoint_age_seconds"),
            "only where audit runs"
        );
        m.checkpoint_age().set(12);
        sm.set_lag(3, 0);
        let text = m.render(stall);
        assert!(
            has(&text, "tally_audit_checkpoint_age_seconds 12"),
            "{text}"
        );
        assert!(has(
            &text,
            "tally_partition_lag_messages{stream=\"usage\",partition=\"3\"} 0"
        ));
    }

    #[test]
    fn every_series_has_a_help_line_and_a_tally_name() {
        let m = Metrics::new();
        let sm = m.stream("audit");
        m.checkpoint_age().set(1);
        sm.set_lag(0, 1);
        sm.dead_letters("empty", 1);
        sm.violations_raised(["privileged_action"]);
        let text = m.render(Duration::from_secs(60));
        for (name, _, _) in DESCRIPTIONS {
            assert!(name.starts_with("tally_"), "{name}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no help for {name}:\n{text}"
            );
        }
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            assert!(line.starts_with("tally_"), "{line}");
        }
    }

    #[test]
    fn circuits_and_relay_are_rendered_from_their_state() {
        let m = Metrics::new();
        let stall = Duration::from_secs(60);
        m.relay.started();
        m.relay.progressed();
        let p = crate::engine::breaker::Policy {
            open_after_failures: 1,
            open_after: Duration::from_secs(60),
            max_backoff: Duration::from_secs(1),
        };
        m.sinks.failure(Sink::Postgres, Instant::now(), &p);
        let text = m.render(stall);
        assert!(
            has(&text, "tally_sink_circuit_open{sink=\"postgres\"} 1"),
            "{text}"
        );
        assert!(
            has(&text, "tally_sink_circuit_open{sink=\"dlq\"} 0"),
            "{text}"
        );
        assert!(has(&text, "tally_relay_alive 1"), "{text}");
        m.sinks.success(Sink::Postgres);
        m.relay.stopped("boom");
        let text = m.render(stall);
        assert!(
            has(&text, "tally_sink_circuit_open{sink=\"postgres\"} 0"),
            "{text}"
        );
        assert!(has(&text, "tally_relay_alive 0"), "{text}");
        let summary = m.summary(stall);
        assert!(summary.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert!(summary.iter().all(|l| !l.contains("_bucket")));
        assert!(summary.iter().all(|l| !l.ends_with(" 0")), "{summary:?}");
        assert!(summary.iter().any(|l| l.starts_with("tally_build_info")));
    }
}
