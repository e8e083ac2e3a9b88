//! Circuit breakers, one per sink (ClickHouse, Postgres, the dead-letter producer).
//!
//! Guarantee: a sink outage never stops the process and never loses work. A
//! Retryable sink error is retried for as long as it takes, with capped
//! exponential backoff (`backon`); after repeated failures the sink's breaker
//! opens, which pauses consumption (no new batch starts, fetched partitions are
//! paused) and fails `/readyz`, while the batch that was running keeps probing
//! the sink. The first answer from the sink closes the breaker and everything
//! resumes. Only Fatal errors (our bug: schema, syntax) stop the process.
//!
//! [`Breaker`] is a small pure state machine (time is an input); [`SinkBreakers`]
//! shares one per sink between the batch tasks, the pipeline and `/readyz`.

use crate::config::Config;
use crate::errors::StageError;
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The sinks a batch writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    ClickHouse,
    Postgres,
    Dlq,
}

impl Sink {
    pub const ALL: [Sink; 3] = [Sink::ClickHouse, Sink::Postgres, Sink::Dlq];

    pub fn name(self) -> &'static str {
        match self {
            Sink::ClickHouse => "clickhouse",
            Sink::Postgres => "postgres",
            Sink::Dlq => "dlq",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// When a breaker opens.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Consecutive failures that open the breaker.
    pub open_after_failures: u32,
    /// Or: failing continuously for this long (counted from the start of the
    /// first failed attempt, so one attempt that hangs until a timeout counts).
    pub open_after: Duration,
    /// Longest wait between two probes of a failing sink.
    pub max_backoff: Duration,
}

impl Policy {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            open_after_failures: cfg.pipeline.circuit_open_after_failures.max(1),
            open_after: Duration::from_millis(cfg.pipeline.circuit_open_after_ms),
            max_backoff: Duration::from_millis(cfg.pipeline.circuit_max_backoff_ms.max(100)),
        }
    }
}

/// What an event did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Opened,
    Closed,
}

/// Closed (counting consecutive failures) or open (since a given time).
#[derive(Debug, Default, Clone)]
pub struct Breaker {
    failures: u32,
    failing_since: Option<Instant>,
    open_since: Option<Instant>,
}

impl Breaker {
    /// An attempt that started at `started` failed at `now`.
    pub fn failure(&mut self, started: Instant, now: Instant, p: &Policy) -> Transition {
        self.failures = self.failures.saturating_add(1);
        let since = *self.failing_since.get_or_insert(started);
        if self.open_since.is_some() {
            return Transition::None;
        }
        if self.failures >= p.open_after_failures
            || now.saturating_duration_since(since) >= p.open_after
        {
            self.open_since = Some(now);
            return Transition::Opened;
        }
        Transition::None
    }

    /// The sink answered (anything but a Retryable error).
    pub fn success(&mut self) -> Transition {
        let was_open = self.open_since.is_some();
        *self = Self::default();
        if was_open {
            Transition::Closed
        } else {
            Transition::None
        }
    }

    pub fn is_open(&self) -> bool {
        self.open_since.is_some()
    }

    /// How long the breaker has been open.
    pub fn open_for(&self, now: Instant) -> Option<Duration> {
        self.open_since.map(|t| now.saturating_duration_since(t))
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// One breaker per sink plus per-sink retry counters, shared by every task.
#[derive(Default)]
pub struct SinkBreakers {
    state: Mutex<[Breaker; 3]>,
    retries: [AtomicU64; 3],
}

impl SinkBreakers {
    pub fn failure(&self, sink: Sink, started: Instant, p: &Policy) -> Transition {
        self.retries[sink.index()].fetch_add(1, Ordering::Relaxed);
        match self.state.lock() {
            Ok(mut s) => s[sink.index()].failure(started, Instant::now(), p),
            Err(_) => Transition::None,
        }
    }

    pub fn success(&self, sink: Sink) -> Transition {
        match self.state.lock() {
            Ok(mut s) => s[sink.index()].success(),
            Err(_) => Transition::None,
        }
    }

    pub fn any_open(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.iter().any(Breaker::is_open))
            .unwrap_or(false)
    }

    /// Open sinks and for how long they have been open.
    pub fn open(&self) -> Vec<(Sink, Duration)> {
        let now = Instant::now();
        let Ok(s) = self.state.lock() else {
            return Vec::new();
        };
        Sink::ALL
            .iter()
            .filter_map(|k| s[k.index()].open_for(now).map(|d| (*k, d)))
            .collect()
    }

    /// `tally_sink_circuit_open{sink}` and `tally_sink_retries_total{sink}`.
    pub fn render(&self) -> String {
        let open = self.open();
        let mut out = String::from(
            "# HELP tally_sink_circuit_open 1 while the sink's circuit breaker is open (consumption paused).\n# TYPE tally_sink_circuit_open gauge\n",
        );
        for k in Sink::ALL {
            let v = u8::from(open.iter().any(|(s, _)| *s == k));
            out.push_str(&format!(
                "tally_sink_circuit_open{{sink=\"{}\"}} {v}\n",
                k.name()
            ));
        }
        out.push_str("# HELP tally_sink_retries_total Retryable sink errors retried, per sink.\n# TYPE tally_sink_retries_total counter\n");
        for k in Sink::ALL {
            out.push_str(&format!(
                "tally_sink_retries_total{{sink=\"{}\"}} {}\n",
                k.name(),
                self.retries[k.index()].load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// Capped exponential backoff between probes of a failing sink, without end.
pub fn probe_backoff(max: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100).min(max))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Records a Retryable failure of `sink` in an attempt that started at
/// `started` (logs when the circuit opens).
pub fn failed(
    metrics: &Metrics,
    policy: &Policy,
    sink: Sink,
    what: &str,
    started: Instant,
    e: &StageError,
) {
    if metrics.sinks.failure(sink, started, policy) == Transition::Opened {
        tracing::error!(
            sink = sink.name(),
            step = what,
            error = %e,
            "circuit open: pausing consumption until the sink answers"
        );
    }
    metrics.add(&metrics.retries_total, 1);
}

/// Records that `sink` answered (logs when the circuit closes).
pub fn answered(metrics: &Metrics, sink: Sink, what: &str) {
    if metrics.sinks.success(sink) == Transition::Closed {
        tracing::info!(
            sink = sink.name(),
            step = what,
            "circuit closed: the sink answers again; resuming"
        );
    }
}

/// The retry state of one sink step: call `failed` after each Retryable
/// error (it records it and sleeps the next backoff delay), `answered` once the
/// sink answers. [`call`] wraps a step in it.
pub struct Probe<'a> {
    metrics: &'a Metrics,
    policy: &'a Policy,
    sink: Sink,
    what: &'static str,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl<'a> Probe<'a> {
    pub fn new(metrics: &'a Metrics, policy: &'a Policy, sink: Sink, what: &'static str) -> Self {
        Self {
            metrics,
            policy,
            sink,
            what,
            delays: Box::new(probe_backoff(policy.max_backoff)),
        }
    }

    /// The attempt that started at `started` failed with Retryable `e`.
    pub async fn failed(&mut self, started: Instant, e: &StageError) {
        failed(self.metrics, self.policy, self.sink, self.what, started, e);
        let d = self.delays.next().unwrap_or(self.policy.max_backoff);
        tracing::warn!(sink = self.sink.name(), step = self.what, error = %e, delay_ms = d.as_millis() as u64, "retrying");
        tokio::time::sleep(d).await;
    }

    pub fn answered(&self) {
        answered(self.metrics, self.sink, self.what);
    }
}

/// Runs a sink step until the sink answers: Retryable errors are retried with
/// capped exponential backoff for as long as it takes (feeding the sink's
/// breaker); anything else (success, Fatal, LostOwnership) is returned and
/// counts as an answer, which closes the breaker.
pub async fn call<T, F, Fut>(
    metrics: &Metrics,
    policy: &Policy,
    sink: Sink,
    what: &'static str,
    mut f: F,
) -> Result<T, StageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StageError>>,
{
    let mut probe = Probe::new(metrics, policy, sink, what);
    loop {
        let started = Instant::now();
        match f().await {
            Err(e) if e.is_retryable() => probe.failed(started, &e).await,
            other => {
                probe.answered();
                return other;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(n: u32, after_ms: u64) -> Policy {
        Policy {
            open_after_failures: n,
            open_after: Duration::from_millis(after_ms),
            max_backoff: Duration::from_millis(1),
        }
    }

    #[test]
    fn opens_after_consecutive_failures() {
        let p = policy(3, 60_000);
        let mut b = Breaker::default();
        let t = Instant::now();
        assert_eq!(b.failure(t, t, &p), Transition::None);
        assert_eq!(b.failure(t, t, &p), Transition::None);
        assert!(!b.is_open());
        assert_eq!(b.failure(t, t, &p), Transition::Opened);
        assert!(b.is_open());
        // Further failures keep it open without another transition.
        assert_eq!(b.failure(t, t, &p), Transition::None);
        assert!(b.is_open());
        assert_eq!(b.failures(), 4);
    }

    #[test]
    fn a_success_resets_the_count() {
        let p = policy(3, 60_000);
        let mut b = Breaker::default();
        let t = Instant::now();
        b.failure(t, t, &p);
        b.failure(t, t, &p);
        assert_eq!(b.success(), Transition::None);
        assert_eq!(b.failures(), 0);
        b.failure(t, t, &p);
        b.failure(t, t, &p);
        assert!(!b.is_open(), "the streak restarted after the success");
    }

    #[test]
    fn opens_after_failing_for_long_enough() {
        let p = policy(100, 5_000);
        let mut b = Breaker::default();
        let t0 = Instant::now();
        // One attempt that hung until a 15 s timeout opens it at once.
        assert_eq!(
            b.failure(t0, t0 + Duration::from_secs(15), &p),
            Transition::Opened
        );
        let mut b = Breaker::default();
        assert_eq!(
            b.failure(t0, t0 + Duration::from_secs(1), &p),
            Transition::None
        );
        // Measured from the first failed attempt's start, not the latest.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.failure(t1, t1, &p), Transition::Opened);
    }

    #[test]
    fn success_closes_an_open_breaker() {
        let p = policy(1, 60_000);
        let mut b = Breaker::default();
        let t = Instant::now();
        assert_eq!(b.failure(t, t, &p), Transition::Opened);
        assert_eq!(
            b.open_for(t + Duration::from_secs(2)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(b.success(), Transition::Closed);
        assert!(!b.is_open());
        assert_eq!(b.open_for(t), None);
        assert_eq!(b.success(), Transition::None);
    }

    #[test]
    fn sinks_are_independent() {
        let p = policy(1, 60_000);
        let s = SinkBreakers::default();
        assert!(!s.any_open());
        assert_eq!(
            s.failure(Sink::ClickHouse, Instant::now(), &p),
            Transition::Opened
        );
        assert!(s.any_open());
        assert_eq!(s.success(Sink::Postgres), Transition::None);
        assert_eq!(s.open().len(), 1);
        assert_eq!(s.open()[0].0, Sink::ClickHouse);
        let text = s.render();
        assert!(text.contains("tally_sink_circuit_open{sink=\"clickhouse\"} 1"));
        assert!(text.contains("tally_sink_circuit_open{sink=\"postgres\"} 0"));
        assert!(text.contains("tally_sink_retries_total{sink=\"clickhouse\"} 1"));
        assert_eq!(s.success(Sink::ClickHouse), Transition::Closed);
        assert!(!s.any_open());
    }

    #[test]
    fn probe_backoff_is_capped_and_endless() {
        let delays: Vec<Duration> = probe_backoff(Duration::from_secs(2)).take(50).collect();
        assert_eq!(delays.len(), 50);
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(4)),
            "{delays:?}"
        );
        assert!(delays[0] < Duration::from_millis(300));
    }

    #[tokio::test]
    async fn call_retries_until_the_sink_answers() {
        let m = Metrics::default();
        let p = policy(2, 60_000);
        let mut n = 0;
        let r: Result<u32, StageError> = call(&m, &p, Sink::Postgres, "test", || {
            n += 1;
            let k = n;
            async move {
                if k < 30 {
                    Err(StageError::Retryable("down".into()))
                } else {
                    Ok(k)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 30, "retried past any retry limit");
        assert!(!m.sinks.any_open(), "closed after the answer");
        assert!(m
            .sinks
            .render()
            .contains("tally_sink_retries_total{sink=\"postgres\"} 29"));
    }

    #[tokio::test]
    async fn call_returns_fatal_at_once() {
        let m = Metrics::default();
        let p = policy(2, 60_000);
        let mut n = 0;
        let r: Result<(), StageError> = call(&m, &p, Sink::ClickHouse, "test", || {
            n += 1;
            async { Err(StageError::Fatal("syntax".into())) }
        })
        .await;
        assert!(matches!(r, Err(StageError::Fatal(_))));
        assert_eq!(n, 1);
    }
}
