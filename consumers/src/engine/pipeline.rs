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
use crate::engine::breaker::{Sink, Step};
use crate::engine::decode::Decoding;
use crate::engine::dlq;
use crate::engine::fairness::Fairness;
use crate::engine::ledger::{Ledger, PendingBatch};
use crate::engine::offsets_reset;
use crate::engine::rebalance::{RebalanceLog, TallyContext};
use crate::engine::reference::SharedReference;
use crate::engine::retry::backoff;
use crate::engine::stream::Stream;
use crate::errors::StageError;
use crate::metrics::{Metrics, StreamMetrics};
use crate::sinks::clickhouse::ClickHouseSink;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::Connection;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

mod buffer;
mod lag;

use buffer::Buffer;

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

    fn lock_key(&self, partition: i32) -> String {
        offsets_reset::partition_lock_key(&self.route.group, &self.route.topic, partition)
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

    /// Releases partition `p`'s lock. If the lock connection is gone, so is the
    /// lock (Postgres released it); `locks_alive` reconnects before the next batch.
    async fn unlock(&mut self, p: i32) -> Result<(), StageError> {
        if !self.held.remove(&p) {
            return Ok(());
        }
        let key = self.lock_key(p);
        // Held exactly once (`held`), so one unlock frees it.
        match sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(&key)
            .fetch_one(&mut self.lock_conn)
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(partition = p, "advisory lock was not held at unlock"),
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "advisory unlock failed; the lock connection is gone and the lock with it");
            }
        }
        Ok(())
    }

    /// Whether the connection holding the partition locks still answers; if
    /// not, every lock died with it and `recover_locks` runs before more work.
    async fn locks_alive(&mut self) -> bool {
        if !self.lock_conn_dead
            && sqlx::query("SELECT 1")
                .execute(&mut self.lock_conn)
                .await
                .is_err()
        {
            self.lock_conn_dead = true;
        }
        !self.lock_conn_dead
    }

    /// After the lock connection died (a Postgres restart): let running batches
    /// finish (their fences keep them safe), reconnect, forget all ownership and
    /// buffered work, and take every assigned partition again at its offset of record.
    async fn recover_locks(&mut self) -> Result<(), StageError> {
        if self.lock_retry.is_none() {
            tracing::warn!("advisory lock connection lost; reconnecting and re-taking partitions");
        }
        while let Some(done) = self.in_flight.join_next().await {
            self.on_batch_done(done).await?;
        }
        // One attempt per turn of the main loop, so polling (and the group
        // membership) goes on during a Postgres outage; never gives up.
        if self
            .lock_retry
            .as_ref()
            .is_some_and(|(at, _)| Instant::now() < *at)
        {
            return Ok(());
        }
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::PgConnection::connect_with(&lock_options(&self.cfg)?),
        )
        .await;
        match attempt {
            Ok(Ok(c)) => {
                self.lock_conn = c;
                self.lock_conn_dead = false;
                self.lock_retry = None;
                self.held.clear();
                crate::engine::breaker::answered(&self.sm, Sink::Postgres, Step::LockReconnect);
            }
            failed => {
                let e = match failed {
                    Ok(Err(e)) => crate::errors::classify_pg("advisory lock reconnect", e),
                    _ => StageError::Retryable("advisory lock reconnect timed out".into()),
                };
                if !e.is_retryable() {
                    return Err(e);
                }
                let policy = self.runner.breaker;
                crate::engine::breaker::failed(
                    &self.sm,
                    &policy,
                    Sink::Postgres,
                    Step::LockReconnect,
                    started,
                    &e,
                );
                let mut delays = match self.lock_retry.take() {
                    Some((_, d)) => d,
                    None => Box::new(crate::engine::breaker::probe_backoff(policy.max_backoff)),
                };
                let d = delays.next().unwrap_or(policy.max_backoff);
                tracing::warn!(error = %e, delay_ms = d.as_millis() as u64, "advisory lock reconnect: retrying");
                self.lock_retry = Some((Instant::now() + d, delays));
                return Ok(());
            }
        }
        let parts: Vec<i32> = self.parts.keys().copied().collect();
        for p in parts {
            self.retake(p).await?;
        }
        Ok(())
    }

    /// Forgets partition `p`'s buffered work and ownership, then takes it again
    /// at once and seeks to its offset of record (messages that were buffered
    /// are read again even if nothing new arrives).
    async fn retake(&mut self, p: i32) -> Result<(), StageError> {
        self.resume_if_paused(p);
        self.parts.insert(p, PartState::default());
        if self.take_ownership(p).await? {
            if let Some(at) = self.parts.get(&p).and_then(|s| s.expected) {
                let seeked = self.seek(p, at);
                if let Some(st) = self.parts.get_mut(&p) {
                    st.seeked = seeked;
                }
            }
        }
        Ok(())
    }

    /// Takes ownership of a partition: advisory lock, then offset of record.
    async fn take_ownership(&mut self, p: i32) -> Result<bool, StageError> {
        let key = self.lock_key(p);
        let got: bool = if self.held.contains(&p) {
            true // already ours: never take the re-entrant lock twice
        } else {
            match sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
                .bind(&key)
                .fetch_one(&mut self.lock_conn)
                .await
            {
                Ok(g) => g,
                Err(e) => {
                    // The lock connection died (Postgres restart): every lock is gone;
                    // the main loop recovers before anything else happens.
                    tracing::warn!(error = %e, "advisory lock connection lost");
                    self.lock_conn_dead = true;
                    return Ok(false);
                }
            }
        };
        if !got {
            return Ok(false);
        }
        self.held.insert(p);
        crate::engine::failpoint::hit("take_ownership_after_lock").await?;
        let ledger = &self.runner.ledger;
        let epoch = crate::engine::ownership::take_epoch(
            ledger.pool(),
            &ledger.partition_key(p),
            &self.owner,
        )
        .await?;
        let state = self.runner.ledger.partition_state(p).await?;
        let need = state
            .next_offset
            .into_iter()
            .chain(state.pending.map(|b| b.last + 1))
            .max()
            .unwrap_or(0);
        self.refuse_if_past_end(p, state.next_offset, state.pending, need)?;
        let st = self.parts.entry(p).or_default();
        st.owned = true;
        st.epoch = epoch;
        st.cutoff_floor = state.dedup_cutoff;
        st.record_next = state.next_offset;
        st.replay = state.pending;
        st.expected = state.pending.map(|b| b.first).or(state.next_offset);
        st.seeked = false;
        st.streaming = false;
        st.buf.clear();
        st.buf_since = None;
        if let Some(b) = state.pending {
            tracing::info!(
                partition = p,
                batch_id = b.batch_id,
                first = b.first,
                last = b.last,
                "replaying pending batch"
            );
        }
        Ok(true)
    }

    /// A hard stop when the offset of record (or the pending batch) lies past
    /// the partition's end: the topic was recreated or lost its data, and
    /// consuming would skip the new messages as already counted. Only
    /// `tally reset-offsets` resolves it (see `offsets_reset`).
    fn refuse_if_past_end(
        &self,
        p: i32,
        next_offset: Option<i64>,
        pending: Option<PendingBatch>,
        need: i64,
    ) -> Result<(), StageError> {
        if need <= 0 {
            return Ok(());
        }
        let topic = &self.route.topic;
        let end = tokio::task::block_in_place(|| {
            offsets_reset::confirmed_end_below(&self.consumer, topic, p, need)
        });
        match end {
            None => Ok(()),
            Some(end) => {
                let msg = offsets_reset::past_end_message(
                    &self.route.group,
                    topic,
                    p,
                    next_offset,
                    pending.map(|b| (b.batch_id, b.first, b.last)),
                    end,
                );
                tracing::error!("{msg}");
                Err(StageError::Fatal(msg))
            }
        }
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

    /// Whether partition `p` holds its share of the buffers while a batch
    /// runs (whose end frees room): two batches, or anything at all once
    /// every partition's buffered messages together weigh
    /// `pipeline.buffer_max_bytes`. With no batch running nothing is full:
    /// the next `process_ready` starts one.
    fn full(&self, p: i32) -> bool {
        let over = self.buffered_bytes() >= self.cfg.pipeline.buffer_max_bytes;
        self.parts.get(&p).is_some_and(|s| self.is_full(s, over))
    }

    fn is_full(&self, s: &PartState, over_budget: bool) -> bool {
        !self.in_flight.is_empty()
            && !s.paused
            && (s.buf.len() >= 2 * self.cfg.pipeline.batch_max_messages
                || (over_budget && !s.buf.is_empty()))
    }

    /// What every partition's buffered messages weigh together.
    fn buffered_bytes(&self) -> usize {
        self.parts.values().map(|s| s.buf.bytes()).sum()
    }

    /// Bounds memory: while a partition is `full` (see there), no message is taken from
    /// the consumer; librdkafka keeps what it fetched and stops fetching once
    /// its queue is full. (Pausing the partition would make librdkafka drop
    /// what it fetched and fetch it all again on resume: with a broker that
    /// answers a fetch with the whole backlog, every batch would re-read the
    /// rest of the partition.) A partition still full after a while (a batch
    /// held up) is paused, so that the other partitions and the group's
    /// rebalances are served. Returns whether the consumer is gated.
    fn gate_recv(&mut self) -> bool {
        let over = self.buffered_bytes() >= self.cfg.pipeline.buffer_max_bytes;
        let full: Vec<i32> = self
            .parts
            .iter()
            .filter(|(_, s)| self.is_full(s, over))
            .map(|(p, _)| *p)
            .collect();
        if full.is_empty() {
            self.gated_since = None;
            return false;
        }
        let pause_after = Duration::from_millis(
            u64::from(self.cfg.kafka.max_poll_interval_ms / 4).clamp(100, 10_000),
        );
        let since = *self.gated_since.get_or_insert_with(Instant::now);
        if since.elapsed() < pause_after {
            return true;
        }
        for p in full {
            tracing::info!(
                partition = p,
                waited_ms = since.elapsed().as_millis() as u64,
                "a partition stayed full while its batch ran: pausing it (the consumer serves the others)"
            );
            self.pause(p);
        }
        self.gated_since = None;
        false
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

    /// Operational fairness: how long to wait before a tenant's share of this
    /// batch fits its pace. Changes timing only, never results.
    fn fairness_wait(&self, p: i32, take: usize) -> Option<Duration> {
        let st = self.parts.get(&p)?;
        self.fairness.wait_for(
            st.buf.as_slice()[..take]
                .iter()
                .map(|m| m.key().unwrap_or_default()),
        )
    }

    fn defer(&mut self, p: i32, wait: Duration) {
        self.sm.fairness_deferrals.increment(1);
        let Some(st) = self.parts.get_mut(&p) else {
            return;
        };
        st.not_before = Some(Instant::now() + wait);
        self.pause(p);
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

    /// Circuit breaker gate (`breaker.rs`): while a sink's circuit is open or
    /// the lock connection is gone, no batch starts and every assigned
    /// partition is paused, so memory holds only what was already fetched; the
    /// running batches keep probing. Resumes when all is well. Returns whether
    /// consumption is on hold.
    fn hold(&mut self) -> bool {
        let blocked = self.lock_conn_dead || self.metrics.sinks.any_open();
        if blocked {
            let running: Vec<i32> = self
                .parts
                .iter()
                .filter(|(_, s)| !s.paused)
                .map(|(p, _)| *p)
                .collect();
            for p in running {
                self.pause(p);
                if self.parts.get(&p).is_some_and(|s| s.paused) {
                    self.breaker_paused.insert(p);
                }
            }
        } else if !self.breaker_paused.is_empty() {
            tracing::info!(partitions = ?self.breaker_paused, "sinks answer again: resuming consumption");
            for p in std::mem::take(&mut self.breaker_paused) {
                self.resume_if_paused(p);
            }
        }
        blocked
    }

    /// Stops fetching partition `p` until `resume_if_paused`.
    fn pause(&mut self, p: i32) {
        let Some(st) = self.parts.get_mut(&p) else {
            return;
        };
        if !st.paused {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.route.topic, p);
            if self.consumer.pause(&tpl).is_ok() {
                st.paused = true;
            }
        }
    }

    fn resume_if_paused(&mut self, p: i32) {
        let Some(st) = self.parts.get_mut(&p) else {
            return;
        };
        st.not_before = None;
        if st.paused {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.route.topic, p);
            if self.consumer.resume(&tpl).is_ok() {
                st.paused = false;
            }
        }
    }

    /// Copies the offsets of record to Kafka for lag tooling (never read
    /// back), only when they moved since the last copy: a commit is a write
    /// for the broker (noida-db rewrites its whole data file on each).
    fn commit_kafka_copy(&mut self) {
        let offsets: Vec<(i32, i64)> = self
            .parts
            .iter()
            .filter_map(|(p, st)| st.record_next.filter(|_| st.owned).map(|n| (*p, n)))
            .collect();
        if offsets.is_empty() || offsets == self.copied {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, n) in &offsets {
            let _ = tpl.add_partition_offset(&self.route.topic, *p, Offset::Offset(*n));
        }
        match self.consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) => self.copied = offsets,
            Err(e) => tracing::debug!(error = %e, "kafka offset copy failed (harmless)"),
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

/// Options of the connection that holds the partition locks; named so that
/// operators (and tests) can find it in `pg_stat_activity`.
fn lock_options(cfg: &Config) -> Result<sqlx::postgres::PgConnectOptions, StageError> {
    Ok(crate::sinks::postgres::pg_options(cfg)?.application_name("tally-locks"))
}
