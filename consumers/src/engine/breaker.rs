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
use crate::metrics::StreamMetrics;
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

/// The steps that retry a sink, the `step` label of `tally_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Claim,
    Prepare,
    Commit,
    LoadReference,
    TakeOwnership,
    LockReconnect,
    ClickHouseWrite,
    DeadLetterSend,
    SchemaRegistry,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::Claim,
        Step::Prepare,
        Step::Commit,
        Step::LoadReference,
        Step::TakeOwnership,
        Step::LockReconnect,
        Step::ClickHouseWrite,
        Step::DeadLetterSend,
        Step::SchemaRegistry,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Claim => "claim",
            Step::Prepare => "prepare",
            Step::Commit => "commit",
            Step::LoadReference => "load_reference",
            Step::TakeOwnership => "take_ownership",
            Step::LockReconnect => "lock_reconnect",
            Step::ClickHouseWrite => "clickhouse_write",
            Step::DeadLetterSend => "dead_letter_send",
            Step::SchemaRegistry => "schema_registry",
        }
    }

    /// What the step talks to: a breaker's sink, or the schema registry.
    pub fn sink(self) -> &'static str {
        match self {
            Step::ClickHouseWrite => Sink::ClickHouse.name(),
            Step::DeadLetterSend => Sink::Dlq.name(),
            Step::SchemaRegistry => "registry",
            _ => Sink::Postgres.name(),
        }
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

/// One breaker per sink, shared by every task.
#[derive(Default)]
pub struct SinkBreakers {
    state: Mutex<[Breaker; 3]>,
}

impl SinkBreakers {
    pub fn failure(&self, sink: Sink, started: Instant, p: &Policy) -> Transition {
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

/// Records a Retryable failure of `step` (on `step`'s sink) in an attempt that
/// started at `started` (logs when the circuit opens).
pub fn failed(
    sm: &StreamMetrics,
    policy: &Policy,
    sink: Sink,
    step: Step,
    started: Instant,
    e: &StageError,
) {
    debug_assert_eq!(sink.name(), step.sink());
    if sm.sinks.failure(sink, started, policy) == Transition::Opened {
        tracing::error!(
            sink = sink.name(),
            step = step.name(),
            error = %e,
            "circuit open: pausing consumption until the sink answers"
        );
    }
    sm.retried(step);
}

/// Records that `sink` answered (logs when the circuit closes).
pub fn answered(sm: &StreamMetrics, sink: Sink, step: Step) {
    if sm.sinks.success(sink) == Transition::Closed {
        tracing::info!(
            sink = sink.name(),
            step = step.name(),
            "circuit closed: the sink answers again; resuming"
        );
    }
}

/// The retry state of one sink step: call `failed` after each Retryable
/// error (it records it and sleeps the next backoff delay), `answered` once the
/// sink answers. [`call`] wraps a step in it.
pub struct Probe<'a> {
    sm: &'a StreamMetrics,
    policy: &'a Policy,
    sink: Sink,
    step: Step,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl<'a> Probe<'a> {
    pub fn new(sm: &'a StreamMetrics, policy: &'a Policy, sink: Sink, step: Step) -> Self {
        Self {
            sm,
            policy,
            sink,
            step,
            delays: Box::new(probe_backoff(policy.max_backoff)),
        }
    }

    /// The attempt that started at `started` failed with Retryable `e`.
    pub async fn failed(&mut self, started: Instant, e: &StageError) {
        failed(self.sm, self.policy, self.sink, self.step, started, e);
        let d = self.delays.next().unwrap_or(self.policy.max_backoff);
        tracing::warn!(sink = self.sink.name(), step = self.step.name(), error = %e, delay_ms = d.as_millis() as u64, "retrying");
        tokio::time::sleep(d).await;
    }

    pub fn answered(&self) {
        answered(self.sm, self.sink, self.step);
    }
}

/// Runs a sink step until the sink answers: Retryable errors are retried with
/// capped exponential backoff for as long as it takes (feeding the sink's
/// breaker); anything else (success, Fatal, LostOwnership) is returned and
/// counts as an answer, which closes the breaker.
pub async fn call<T, F, Fut>(
    sm: &StreamMetrics,
    policy: &Policy,
    sink: Sink,
    step: Step,
    mut f: F,
) -> Result<T, StageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StageError>>,
{
    let mut probe = Probe::new(sm, policy, sink, step);
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
    use crate::metrics::Metrics;

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

    #[test]
    fn every_step_names_a_sink() {
        for step in Step::ALL {
            assert!(
                Sink::ALL.iter().any(|s| s.name() == step.sink()) || step == Step::SchemaRegistry,
                "{step:?}"
            );
        }
    }

    #[tokio::test]
    async fn call_retries_until_the_sink_answers() {
        let m = Metrics::default();
        let sm = m.stream("usage");
        let p = policy(2, 60_000);
        let mut n = 0;
        let r: Result<u32, StageError> = call(&sm, &p, Sink::Postgres, Step::Commit, || {
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
        assert!(m.render(Duration::from_secs(60)).contains(
            "tally_retries_total{stream=\"usage\",sink=\"postgres\",step=\"commit\"} 29"
        ));
    }

    #[tokio::test]
    async fn call_returns_fatal_at_once() {
        let m = Metrics::default();
        let sm = m.stream("usage");
        let p = policy(2, 60_000);
        let mut n = 0;
        let r: Result<(), StageError> =
            call(&sm, &p, Sink::ClickHouse, Step::ClickHouseWrite, || {
                n += 1;
                async { Err(StageError::Fatal("syntax".into())) }
            })
            .await;
        assert!(matches!(r, Err(StageError::Fatal(_))));
        assert_eq!(n, 1);
    }
}
