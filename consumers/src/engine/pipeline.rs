//! The usage pipeline: consume, decode, dedup, enrich, write, commit.
//!
//! Guarantee: every usage event is counted exactly once in ClickHouse and
//! Postgres, whatever crashes, because each per-partition batch walks this state
//! machine, and every step is either atomic or checked before it is repeated:
//!
//! 1. dead letters: poison messages are sent to the DLQ and acknowledged;
//! 2. claim (Postgres txn): the batch's offset range becomes `pending` and its
//!    event ids are claimed (a re-send of an id claimed earlier is a duplicate);
//! 3. ClickHouse: one insert per table, rows tagged with the batch id; skipped
//!    for a table that already holds the batch when the outcome was unknown;
//! 4. commit (Postgres txn): spend, quotas, budgets, violations (outbox), dead
//!    letters, `done`, and the offset of record move together.
//!
//! A crash between 2 and 4 leaves the batch `pending`: the next owner of the
//! partition (found through the Postgres offset of record, never Kafka's) seeks
//! to its first offset and replays exactly that range. A partition is owned only
//! while holding its Postgres advisory lock, so two instances never work on one
//! partition at once, even mid-rebalance.

use crate::config::Config;
use crate::engine::batch::{BatchResult, BatchRunner, BatchWork};
use crate::engine::breaker::Step;
use crate::engine::decode::Decoding;
use crate::engine::dlq;
use crate::engine::fairness::Fairness;
use crate::engine::ledger::{Ledger, PendingBatch};
use crate::engine::rebalance::{RebalanceLog, TallyContext};
use crate::engine::reference::SharedReference;
use crate::engine::retry::backoff;
use crate::engine::stream::Stream;
use crate::errors::StageError;
use crate::metrics::{Metrics, StreamMetrics};
use crate::sinks::clickhouse::ClickHouseSink;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset};
use sqlx::Connection;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

mod buffer;
mod flow;
mod lag;
mod locks;

use buffer::Buffer;
use locks::lock_options;

/// Per-partition state of this instance.
#[derive(Default)]
struct PartState {
    /// Holds the advisory lock and has loaded the offset of record.
    owned: bool,
    retry_lock_at: Option<Instant>,
    /// Offset of record in Postgres (None: no row yet).
    record_next: Option<i64>,
    /// Ownership epoch taken with the lock (see `ownership.rs`).
    epoch: i64,
    /// The dedup cutoff applied so far (never moves back).
    cutoff_floor: Option<chrono::DateTime<chrono::Utc>>,
    /// Next offset to accept into the buffer.
    expected: Option<i64>,
    seeked: bool,
    replay: Option<PendingBatch>,
    buf: Buffer,
    buf_since: Option<Instant>,
    not_before: Option<Instant>,
    paused: bool,
    /// A batch of this partition is running as a task.
    in_flight: bool,
    /// Revoked while a batch was in flight: release it once that batch ends.
    revoked: bool,
    /// Buffered messages were dropped while a batch ran (a revoke): ignore
    /// messages until that batch ends, then seek to its end.
    resync: bool,
    /// The fetcher reached the partition's end (PartitionEOF) and nothing
    /// arrived or was sought since: every message was delivered to us (the
    /// high watermark may still count transaction markers, never delivered).
    eof: bool,
    /// Messages were accepted since ownership: the stream is past `expected`.
    streaming: bool,
}

pub struct Pipeline<S: Stream> {
    /// The stream's topic, dead-letter topic and consumer group.
    route: Route,
    cfg: Config,
    consumer: StreamConsumer<TallyContext>,
    log: Arc<RebalanceLog>,
    runner: Arc<BatchRunner<S>>,
    in_flight: JoinSet<BatchDone>,
    lock_conn_dead: bool,
    metrics: Arc<Metrics>,
    /// This stream's series.
    sm: Arc<StreamMetrics>,
    /// Partitions whose lag gauge was last set by this instance.
    lag_reported: BTreeSet<i32>,
    fairness: Fairness,
    lock_conn: sqlx::PgConnection,
    /// Partitions whose advisory lock this instance's lock connection holds
    /// (exactly once each: the lock is re-entrant, so it is never taken twice).
    held: BTreeSet<i32>,
    /// Who this instance is, in `tally.partition_owners`.
    owner: String,
    parts: BTreeMap<i32, PartState>,
    /// Partitions paused because a sink's circuit is open (`hold`).
    breaker_paused: std::collections::BTreeSet<i32>,
    /// Next reconnect attempt of a dead lock connection, and its backoff.
    lock_retry: Option<(Instant, Box<dyn Iterator<Item = Duration> + Send>)>,
    /// Since when no message is taken from the consumer (`gate_recv`).
    gated_since: Option<Instant>,
    /// The offsets last copied to Kafka (`commit_kafka_copy`).
    copied: Vec<(i32, i64)>,
}

/// What a finished batch task reports: partition, start, outcome.
type BatchDone = (i32, Instant, Result<BatchResult, StageError>);

impl<S: Stream> Pipeline<S> {
    pub async fn new(
        cfg: Config,
        stream: Arc<S>,
        route: Route,
        ledger: Ledger,
        ch: ClickHouseSink,
        reference: SharedReference,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StageError> {
        let log = Arc::new(RebalanceLog::default());
        let ctx = TallyContext {
            log: log.clone(),
            topic: route.topic.clone(),
        };
        let session = cfg.kafka.session_timeout_ms;
        let kafka = crate::sinks::kafka_client::KafkaClient::new(&cfg.kafka);
        let mut client = kafka.config();
        if !cfg.kafka.instance_id.is_empty() {
            client.set("group.instance.id", &cfg.kafka.instance_id);
        }
        let consumer: StreamConsumer<TallyContext> = client
            .set("group.id", &route.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", session.to_string())
            .set("heartbeat.interval.ms", (session / 6).max(100).to_string())
            .set(
                "max.poll.interval.ms",
                cfg.kafka.max_poll_interval_ms.max(session).to_string(),
            )
            .set(
                "receive.message.max.bytes",
                cfg.kafka.receive_message_max_bytes.to_string(),
            )
            .set(
                "queued.max.messages.kbytes",
                cfg.kafka.fetch_queue_max_kbytes.to_string(),
            )
            // Tells `check_lag` a partition was read to its end (transaction
            // markers keep the high watermark past the last message).
            .set("enable.partition.eof", "true")
            .create_with_context(ctx)
            .map_err(|e| StageError::Fatal(format!("kafka consumer: {e}")))?;
        consumer
            .subscribe(&[&route.topic])
            .map_err(|e| StageError::Fatal(format!("subscribe {}: {e}", route.topic)))?;
        let dlq = dlq::producer(&kafka, &[])?;
        let lock_conn = sqlx::PgConnection::connect_with(&lock_options(&cfg)?)
            .await
            .map_err(|e| crate::errors::classify_pg("advisory lock connection", e))?;
        let runner = Arc::new(BatchRunner {
            stream,
            topic: route.topic.clone(),
            dlq_topic: route.dlq_topic.clone(),
            cfg: cfg.clone(),
            ledger,
            ch,
            dlq,
            decoding: Decoding::new(&cfg),
            reference,
            sm: metrics.stream_for::<S>(),
            replay_reference: std::sync::Mutex::new(None),
            breaker: crate::engine::breaker::Policy::from_config(&cfg),
        });
        let sm = runner.sm.clone();
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let owner = format!(
            "{}/{}/{}",
            if cfg.kafka.instance_id.is_empty() {
                "-"
            } else {
                cfg.kafka.instance_id.as_str()
            },
            host,
            std::process::id()
        );
        Ok(Self {
            route,
            consumer,
            log,
            runner,
            in_flight: JoinSet::new(),
            lock_conn_dead: false,
            sm,
            lag_reported: BTreeSet::new(),
            metrics,
            fairness: Fairness::new(cfg.pipeline.fairness_events_per_sec),
            lock_conn,
            held: BTreeSet::new(),
            owner,
            parts: BTreeMap::new(),
            breaker_paused: Default::default(),
            lock_retry: None,
            gated_since: None,
            copied: Vec::new(),
            cfg,
        })
    }

    /// Runs until `shutdown` flips, then drains buffered work and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), StageError> {
        let linger = Duration::from_millis(self.cfg.pipeline.batch_linger_ms);
        let mut last_commit = Instant::now();
        let mut last_retain = Instant::now();
        let mut last_lag_check = Instant::now();
        let mut lagging = false;
        loop {
            self.apply_rebalances().await?;
            if self.lock_conn_dead && self.in_flight.is_empty() {
                self.recover_locks().await?;
            }
            let now = Instant::now();
            // A partition with a batch running wakes the loop when that batch
            // ends (`join_next`), not by its linger.
            let wake = self
                .parts
                .values()
                .filter(|s| !s.in_flight)
                .filter_map(|s| {
                    let linger_at = s.buf_since.map(|t| t + linger);
                    match (linger_at, s.not_before) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    }
                })
                .min()
                .unwrap_or(now + Duration::from_millis(200))
                .max(now + Duration::from_millis(1));
            let gated = self.gate_recv();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                m = self.consumer.recv(), if !gated => match m {
                    Ok(m) => {
                        let owned = m.detach();
                        let mut p = owned.partition();
                        self.accept(owned).await?;
                        // Take whatever else is already fetched without going back
                        // through the timer and the scheduler for each message.
                        for _ in 0..4096 {
                            if self.full(p) {
                                break;
                            }
                            match futures::FutureExt::now_or_never(self.consumer.recv()) {
                                Some(Ok(m)) => {
                                    let owned = m.detach();
                                    p = owned.partition();
                                    self.accept(owned).await?;
                                }
                                Some(Err(e)) => {
                                    if !self.on_consumer_error(e) {
                                        break;
                                    }
                                }
                                None => break,
                            }
                        }
                    }
                    Err(e) => {
                        self.on_consumer_error(e);
                    }
                },
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    self.on_batch_done(done).await?;
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            self.apply_rebalances().await?;
            self.process_ready(false).await?;
            if last_lag_check.elapsed() >= Duration::from_secs(2) {
                lagging = self.check_lag();
                last_lag_check = Instant::now();
            }
            self.metrics.set_backlog(
                S::NAME,
                lagging || self.parts.values().any(|s| !s.buf.is_empty()),
            );
            if last_commit.elapsed() >= Duration::from_millis(self.cfg.kafka.commit_interval_ms) {
                self.commit_kafka_copy();
                last_commit = Instant::now();
            }
            if last_retain.elapsed() >= Duration::from_secs(60) {
                self.fairness.evict_idle();
                last_retain = Instant::now();
            }
        }
        tracing::info!("shutdown: draining buffered batches");
        loop {
            self.apply_rebalances().await?;
            self.process_ready(true).await?;
            match self.in_flight.join_next().await {
                Some(done) => self.on_batch_done(done).await?,
                None => break,
            }
        }
        self.commit_kafka_copy();
        tracing::info!("shutdown: done");
        Ok(())
    }

    async fn apply_rebalances(&mut self) -> Result<(), StageError> {
        let events = self.log.take();
        for (assigned, parts) in events {
            for p in parts {
                if assigned {
                    let st = self.parts.entry(p).or_default();
                    st.revoked = false;
                } else if self.parts.get(&p).is_some_and(|s| s.in_flight) {
                    // Keep the lock until the running batch ends (on_batch_done).
                    if let Some(st) = self.parts.get_mut(&p) {
                        st.revoked = true;
                        st.resync = true;
                        st.buf.clear();
                        st.buf_since = None;
                    }
                } else {
                    // Whatever the partition's state, a lock held for it goes.
                    self.parts.remove(&p);
                    self.unlock(p).await?;
                }
            }
        }
        Ok(())
    }

    async fn accept(&mut self, m: OwnedMessage) -> Result<(), StageError> {
        if m.topic() != self.route.topic {
            return Ok(());
        }
        let p = m.partition();
        if let Some(st) = self.parts.get_mut(&p) {
            st.eof = false;
        }
        let owned = self.parts.get(&p).is_some_and(|s| s.owned);
        if !owned {
            let st = self.parts.entry(p).or_default();
            if st.retry_lock_at.is_some_and(|t| Instant::now() < t) {
                return Ok(());
            }
            let mut backoff = backoff(self.cfg.pipeline.max_retries);
            let got = loop {
                match self.take_ownership(p).await {
                    Err(e) if e.is_retryable() => match backoff.next() {
                        Some(d) => {
                            tracing::warn!(step = "take ownership", error = %e, "retrying");
                            self.sm.retried(Step::TakeOwnership);
                            tokio::time::sleep(d).await;
                        }
                        None => return Err(StageError::Fatal(format!("take ownership: {e}"))),
                    },
                    other => break other?,
                }
            };
            if !got {
                // Another instance still holds it (finishing its last batch).
                if let Some(st) = self.parts.get_mut(&p) {
                    st.retry_lock_at = Some(Instant::now() + Duration::from_millis(500));
                }
                let _ = self.seek(p, m.offset());
                return Ok(());
            }
        }
        let Some(st) = self.parts.get_mut(&p) else {
            return Ok(());
        };
        if st.resync {
            return Ok(()); // read again from the end of the running batch
        }
        if let Some(exp) = st.expected {
            if m.offset() < exp {
                if std::mem::take(&mut st.streaming) {
                    // Behind what this partition already delivered, with no seek
                    // of ours: the broker reset the position (out of range). Was
                    // the topic recreated under us?
                    let record = st.record_next;
                    self.refuse_if_past_end(p, record, None, exp)?;
                }
                return Ok(()); // already counted or before the range
            }
            if m.offset() > exp && !st.seeked {
                // Only a successful seek makes a later gap acceptable.
                let seeked = self.seek(p, exp);
                if let Some(st) = self.parts.get_mut(&p) {
                    st.seeked = seeked;
                }
                return Ok(());
            }
        }
        if let Some(exp) = st.expected.filter(|e| m.offset() > *e) {
            // After a seek: the offsets between held no message (transaction
            // markers, compaction, retention).
            tracing::debug!(
                partition = p,
                expected = exp,
                offset = m.offset(),
                "offset gap after a seek"
            );
        }
        st.seeked = false;
        st.streaming = true;
        st.expected = Some(m.offset() + 1);
        st.buf_since.get_or_insert_with(Instant::now);
        st.buf.push(m);
        self.sm.messages_consumed.increment(1);
        Ok(())
    }

    /// Seeks partition `p`; librdkafka discards anything fetched before the seek.
    fn seek(&mut self, p: i32, offset: i64) -> bool {
        if let Some(st) = self.parts.get_mut(&p) {
            st.eof = false;
        }
        match self.consumer.seek(
            &self.route.topic,
            p,
            Offset::Offset(offset),
            Duration::from_secs(5),
        ) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(partition = p, offset, error = %e, "seek failed; will retry on the next message");
                false
            }
        }
    }

    /// Starts a batch for every partition whose batch is ready (or that has
    /// anything buffered, when draining). Partitions are independent, so their
    /// batches run as concurrent tasks while the consumer keeps polling; a
    /// partition never has more than one batch running, so its batches stay in order.
    async fn process_ready(&mut self, draining: bool) -> Result<(), StageError> {
        if self.hold() {
            return Ok(());
        }
        let linger = Duration::from_millis(self.cfg.pipeline.batch_linger_ms);
        let max = self.cfg.pipeline.batch_max_messages;
        let slots = self
            .cfg
            .pipeline
            .max_batches_in_flight
            .saturating_sub(self.in_flight.len());
        if slots == 0 {
            return Ok(());
        }
        let mut ready: Vec<(Option<Instant>, i32)> = self
            .parts
            .iter()
            .filter(|(_, s)| !s.buf.is_empty() && s.owned && !s.in_flight && !s.revoked)
            .filter(|(_, s)| match s.replay {
                Some(b) => s
                    .buf
                    .as_slice()
                    .last()
                    .is_some_and(|m| m.offset() >= b.last),
                None => {
                    s.not_before.is_none_or(|t| Instant::now() >= t)
                        && (draining
                            || s.buf.len() >= max
                            || s.buf_since.is_some_and(|t| t.elapsed() >= linger))
                }
            })
            .map(|(p, s)| (s.buf_since, *p))
            .collect();
        if ready.is_empty() || !self.locks_alive().await {
            return Ok(());
        }
        // The partition waiting longest goes first, so that with fewer slots
        // than ready partitions none is starved.
        ready.sort_unstable();
        let mut started = 0;
        for (_, p) in ready {
            if started == slots {
                break;
            }
            if let Some(w) = self.take_batch(p, draining) {
                if let Some(st) = self.parts.get_mut(&p) {
                    st.in_flight = true;
                }
                started += 1;
                let runner = self.runner.clone();
                self.in_flight.spawn(async move {
                    let started = Instant::now();
                    let p = w.partition;
                    let r =
                        crate::engine::failpoint::in_stream(S::NAME, runner.process_batch(w)).await;
                    (p, started, r)
                });
            }
        }
        Ok(())
    }

    /// Applies the outcome of a finished batch task.
    async fn on_batch_done(
        &mut self,
        done: Result<BatchDone, tokio::task::JoinError>,
    ) -> Result<(), StageError> {
        let (p, started, r) =
            done.map_err(|e| StageError::Fatal(format!("batch task failed: {e}")))?;
        let revoked = match self.parts.get_mut(&p) {
            Some(st) => {
                st.in_flight = false;
                st.revoked
            }
            None => false,
        };
        match r {
            Ok(BatchResult {
                next_offset: next,
                dedup_cutoff,
            }) => {
                self.sm.batch_committed(started.elapsed());
                self.metrics.progressed(S::NAME);
                let mut seek_to = None;
                if let Some(st) = self.parts.get_mut(&p) {
                    st.record_next = Some(next);
                    st.cutoff_floor = st.cutoff_floor.max(Some(dedup_cutoff));
                    if st.resync {
                        // Messages after the batch were dropped: read them again.
                        st.resync = false;
                        st.buf.clear();
                        st.buf_since = None;
                        st.expected = Some(next);
                        st.seeked = false;
                        seek_to = Some(next);
                    } else if st.buf.is_empty() {
                        st.expected = Some(next);
                        st.seeked = false;
                    }
                }
                if let (Some(at), false) = (seek_to, revoked) {
                    let seeked = self.seek(p, at);
                    if let Some(st) = self.parts.get_mut(&p) {
                        st.seeked = seeked;
                    }
                }
            }
            Err(StageError::LostOwnership(m)) => {
                tracing::warn!(partition = p, reason = %m, "lost ownership; re-reading partition state");
                self.sm.ownership_lost.increment(1);
                if self.parts.get(&p).is_some_and(|s| s.owned) {
                    self.unlock(p).await?;
                }
                if !revoked {
                    self.retake(p).await?;
                }
            }
            Err(e) => return Err(e),
        }
        if revoked {
            self.parts.remove(&p);
            self.unlock(p).await?;
        } else {
            self.resume_if_paused(p);
        }
        Ok(())
    }

    /// Cuts the next batch of partition `p` out of its buffer (None: nothing to
    /// do now, or deferred by per-tenant pacing).
    fn take_batch(&mut self, p: i32, draining: bool) -> Option<BatchWork> {
        let max = self.cfg.pipeline.batch_max_messages;
        let st = self.parts.get(&p)?;
        let take = match st.replay {
            Some(b) => st
                .buf
                .as_slice()
                .iter()
                .take_while(|m| m.offset() <= b.last)
                .count(),
            None => st.buf.len().min(max),
        };
        if take == 0 {
            return None;
        }
        if st.replay.is_none() && !draining {
            if let Some(wait) = self.fairness_wait(p, take) {
                self.defer(p, wait);
                return None;
            }
        }
        let st = self.parts.get_mut(&p)?;
        let msgs: Vec<OwnedMessage> = st.buf.take(take);
        let replay = st.replay.take();
        let record_next = st.record_next;
        let (epoch, cutoff_floor) = (st.epoch, st.cutoff_floor);
        st.buf_since = if st.buf.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        self.resume_if_paused(p);
        Some(BatchWork {
            partition: p,
            msgs,
            replay,
            record_next,
            epoch,
            cutoff_floor,
        })
    }

    /// A consumer error; PartitionEOF is not one (returns true for it): it
    /// marks the partition as read to its end (see `check_lag`).
    fn on_consumer_error(&mut self, e: rdkafka::error::KafkaError) -> bool {
        match e {
            rdkafka::error::KafkaError::PartitionEOF(p) => {
                if let Some(st) = self.parts.get_mut(&p) {
                    st.eof = true;
                }
                true
            }
            e => {
                tracing::warn!(error = %e, "kafka consumer error");
                false
            }
        }
    }
}

/// Where a stream's messages come from and go when they are poison, and the
/// consumer group that reads them.
#[derive(Debug, Clone)]
pub struct Route {
    pub topic: String,
    pub dlq_topic: String,
    pub group: String,
}
