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
use crate::decode::{Decoded, UsageDecoding};
use crate::dlq::{self, Poison};
use crate::enrich::{enrich, Enriched};
use crate::errors::StageError;
use crate::fairness::Fairness;
use crate::ledger::{CommitInput, DeadLetter, Ledger, PendingBatch};
use crate::metrics::Metrics;
use crate::rebalance::{RebalanceLog, TallyContext};
use crate::reference::SharedReference;
use crate::retry::{backoff, retry};
use crate::sink_clickhouse::ClickHouseSink;
use chrono::{DateTime, TimeZone, Utc};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use sqlx::Connection;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_schemas::UsageEvent;
use tokio::sync::watch;

/// Per-partition state of this instance.
#[derive(Default)]
struct PartState {
    /// Holds the advisory lock and has loaded the offset of record.
    owned: bool,
    retry_lock_at: Option<Instant>,
    /// Offset of record in Postgres (None: no row yet).
    record_next: Option<i64>,
    /// Next offset to accept into the buffer.
    expected: Option<i64>,
    seeked: bool,
    replay: Option<PendingBatch>,
    buf: Vec<OwnedMessage>,
    buf_since: Option<Instant>,
    not_before: Option<Instant>,
    paused: bool,
}

pub struct Pipeline {
    cfg: Config,
    consumer: StreamConsumer<TallyContext>,
    log: Arc<RebalanceLog>,
    ledger: Ledger,
    ch: ClickHouseSink,
    dlq: rdkafka::producer::FutureProducer,
    decoding: UsageDecoding,
    reference: SharedReference,
    metrics: Arc<Metrics>,
    fairness: Fairness,
    lock_conn: sqlx::PgConnection,
    parts: BTreeMap<i32, PartState>,
    tolerance: Decimal,
}

/// A batch cut from a partition's buffer, ready to process.
struct BatchWork {
    partition: i32,
    msgs: Vec<OwnedMessage>,
    replay: Option<PendingBatch>,
    record_next: Option<i64>,
}

impl Pipeline {
    pub async fn new(
        cfg: Config,
        ledger: Ledger,
        ch: ClickHouseSink,
        reference: SharedReference,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StageError> {
        let log = Arc::new(RebalanceLog::default());
        let ctx = TallyContext {
            log: log.clone(),
            topic: cfg.kafka.usage_topic.clone(),
        };
        let session = cfg.kafka.session_timeout_ms;
        let mut client = rdkafka::ClientConfig::new();
        if !cfg.kafka.instance_id.is_empty() {
            client.set("group.instance.id", &cfg.kafka.instance_id);
        }
        let consumer: StreamConsumer<TallyContext> = client
            .set("bootstrap.servers", &cfg.kafka.brokers)
            .set("group.id", &cfg.kafka.group_id)
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
            .set("queued.max.messages.kbytes", "65536")
            .create_with_context(ctx)
            .map_err(|e| StageError::Fatal(format!("kafka consumer: {e}")))?;
        consumer
            .subscribe(&[&cfg.kafka.usage_topic])
            .map_err(|e| StageError::Fatal(format!("subscribe {}: {e}", cfg.kafka.usage_topic)))?;
        let dlq = dlq::producer(&cfg.kafka.brokers, &[])?;
        let lock_conn = sqlx::PgConnection::connect_with(&crate::runner::pg_options(&cfg)?)
            .await
            .map_err(|e| crate::errors::classify_pg("advisory lock connection", e))?;
        Ok(Self {
            tolerance: cfg.cost_mismatch_tolerance(),
            consumer,
            log,
            ledger,
            ch,
            dlq,
            decoding: UsageDecoding::new(&cfg),
            reference,
            metrics,
            fairness: Fairness::new(cfg.pipeline.fairness_events_per_sec),
            lock_conn,
            parts: BTreeMap::new(),
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
            let now = Instant::now();
            let wake = self
                .parts
                .values()
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
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                m = self.consumer.recv() => match m {
                    Ok(m) => {
                        let owned = m.detach();
                        self.accept(owned).await?;
                        // Take whatever else is already fetched without going back
                        // through the timer and the scheduler for each message.
                        for _ in 0..4096 {
                            match futures::FutureExt::now_or_never(self.consumer.recv()) {
                                Some(Ok(m)) => {
                                    let owned = m.detach();
                                    self.accept(owned).await?;
                                }
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "kafka consumer error");
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            self.apply_rebalances().await?;
            self.process_ready(false).await?;
            if last_lag_check.elapsed() >= Duration::from_secs(2) {
                lagging = self.lagging();
                last_lag_check = Instant::now();
            }
            self.metrics
                .set_backlog(lagging || self.parts.values().any(|s| !s.buf.is_empty()));
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
        self.apply_rebalances().await?;
        self.process_ready(true).await?;
        self.commit_kafka_copy();
        tracing::info!("shutdown: done");
        Ok(())
    }

    fn lock_key(&self, partition: i32) -> String {
        format!(
            "tally:{}:{}:{partition}",
            self.cfg.kafka.group_id, self.cfg.kafka.usage_topic
        )
    }

    async fn apply_rebalances(&mut self) -> Result<(), StageError> {
        let events = self.log.take();
        for (assigned, parts) in events {
            for p in parts {
                if assigned {
                    self.parts.entry(p).or_default();
                } else if let Some(st) = self.parts.remove(&p) {
                    // Nothing is in flight here: batches run to completion between polls.
                    if st.owned {
                        self.unlock(p).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Releases partition `p`'s lock. If the lock connection is gone, so is the
    /// lock (Postgres released it); `locks_alive` reconnects before the next batch.
    async fn unlock(&mut self, p: i32) -> Result<(), StageError> {
        let key = self.lock_key(p);
        if let Err(e) = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(key)
            .execute(&mut self.lock_conn)
            .await
        {
            tracing::warn!(partition = p, error = %e, "advisory unlock failed; the lock connection is gone and the lock with it");
        }
        Ok(())
    }

    /// Checks that the connection holding the partition locks is alive. If it
    /// died (a Postgres restart), every lock died with it: reconnect, forget all
    /// ownership and buffered work, and take partitions again as messages arrive.
    async fn locks_alive(&mut self) -> Result<bool, StageError> {
        if sqlx::query("SELECT 1")
            .execute(&mut self.lock_conn)
            .await
            .is_ok()
        {
            return Ok(true);
        }
        tracing::warn!("advisory lock connection lost; reconnecting and re-taking partitions");
        let mut delays = backoff(self.cfg.pipeline.max_retries);
        loop {
            match sqlx::PgConnection::connect_with(&crate::runner::pg_options(&self.cfg)?).await {
                Ok(c) => {
                    self.lock_conn = c;
                    break;
                }
                Err(e) => match delays.next() {
                    Some(d) => {
                        tracing::warn!(error = %e, "advisory lock reconnect: retrying");
                        self.metrics.add(&self.metrics.retries_total, 1);
                        tokio::time::sleep(d).await;
                    }
                    None => return Err(crate::errors::classify_pg("advisory lock reconnect", e)),
                },
            }
        }
        let parts: Vec<i32> = self.parts.keys().copied().collect();
        for p in parts {
            self.retake(p).await?;
        }
        Ok(false)
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
        let got: bool = match sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(&key)
            .fetch_one(&mut self.lock_conn)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                // The lock connection died (Postgres restart): every lock is gone.
                tracing::warn!(error = %e, "advisory lock connection lost; reconnecting");
                self.lock_conn =
                    sqlx::PgConnection::connect_with(&crate::runner::pg_options(&self.cfg)?)
                        .await
                        .map_err(|e| crate::errors::classify_pg("advisory lock reconnect", e))?;
                let parts: Vec<i32> = self.parts.keys().copied().collect();
                for q in parts {
                    self.resume_if_paused(q);
                    self.parts.insert(q, PartState::default());
                }
                return Ok(false);
            }
        };
        if !got {
            return Ok(false);
        }
        let state = self.ledger.partition_state(p).await?;
        let st = self.parts.entry(p).or_default();
        st.owned = true;
        st.record_next = state.next_offset;
        st.replay = state.pending;
        st.expected = state.pending.map(|b| b.first).or(state.next_offset);
        st.seeked = false;
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

    async fn accept(&mut self, m: OwnedMessage) -> Result<(), StageError> {
        if m.topic() != self.cfg.kafka.usage_topic {
            return Ok(());
        }
        let p = m.partition();
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
                            self.metrics.add(&self.metrics.retries_total, 1);
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
        if let Some(exp) = st.expected {
            if m.offset() < exp {
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
        st.expected = Some(m.offset() + 1);
        st.buf_since.get_or_insert_with(Instant::now);
        st.buf.push(m);
        self.metrics.add(&self.metrics.messages_consumed_total, 1);
        Ok(())
    }

    /// Seeks partition `p`; librdkafka discards anything fetched before the seek.
    fn seek(&self, p: i32, offset: i64) -> bool {
        match self.consumer.seek(
            &self.cfg.kafka.usage_topic,
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

    /// Processes every partition whose batch is ready (or all, when draining).
    /// Partitions are independent, so one batch per partition runs concurrently;
    /// batches of one partition stay strictly in order.
    async fn process_ready(&mut self, draining: bool) -> Result<(), StageError> {
        let linger = Duration::from_millis(self.cfg.pipeline.batch_linger_ms);
        let max = self.cfg.pipeline.batch_max_messages;
        loop {
            let ready: Vec<i32> = self
                .parts
                .iter()
                .filter(|(_, s)| !s.buf.is_empty() && s.owned)
                .filter(|(_, s)| match s.replay {
                    Some(b) => s.buf.last().is_some_and(|m| m.offset() >= b.last),
                    None => {
                        s.not_before.is_none_or(|t| Instant::now() >= t)
                            && (draining
                                || s.buf.len() >= max
                                || s.buf_since.is_some_and(|t| t.elapsed() >= linger))
                    }
                })
                .map(|(p, _)| *p)
                .collect();
            if ready.is_empty() || !self.locks_alive().await? {
                return Ok(());
            }
            let mut work = Vec::new();
            for p in ready {
                if let Some(w) = self.take_batch(p, draining) {
                    work.push(w);
                }
            }
            if work.is_empty() {
                return Ok(());
            }
            let this = &*self;
            let results = futures::future::join_all(work.into_iter().map(|w| async move {
                let started = Instant::now();
                let r = this
                    .process_batch(w.partition, w.msgs, w.replay, w.record_next)
                    .await;
                (w.partition, started, r)
            }))
            .await;
            for (p, started, r) in results {
                match r {
                    Ok(next) => {
                        self.metrics.add(
                            &self.metrics.batch_micros_total,
                            started.elapsed().as_micros() as u64,
                        );
                        self.metrics.progressed();
                        if let Some(st) = self.parts.get_mut(&p) {
                            st.record_next = Some(next);
                        }
                    }
                    Err(StageError::LostOwnership(m)) => {
                        tracing::warn!(partition = p, reason = %m, "lost ownership; re-reading partition state");
                        self.metrics.add(&self.metrics.ownership_lost_total, 1);
                        if self.parts.get(&p).is_some_and(|s| s.owned) {
                            self.unlock(p).await?;
                        }
                        self.retake(p).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            let more = self
                .parts
                .values()
                .any(|s| s.owned && (s.buf.len() >= max || (draining && !s.buf.is_empty())));
            if !more {
                return Ok(());
            }
        }
    }

    /// Cuts the next batch of partition `p` out of its buffer (None: nothing to
    /// do now, or deferred by per-tenant pacing).
    fn take_batch(&mut self, p: i32, draining: bool) -> Option<BatchWork> {
        let max = self.cfg.pipeline.batch_max_messages;
        let st = self.parts.get(&p)?;
        let take = match st.replay {
            Some(b) => st.buf.iter().take_while(|m| m.offset() <= b.last).count(),
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
        let msgs: Vec<OwnedMessage> = st.buf.drain(..take).collect();
        let replay = st.replay.take();
        let record_next = st.record_next;
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
        })
    }

    /// Operational fairness: how long to wait before a tenant's share of this
    /// batch fits its pace. Changes timing only, never results.
    fn fairness_wait(&self, p: i32, take: usize) -> Option<Duration> {
        let st = self.parts.get(&p)?;
        self.fairness
            .wait_for(st.buf[..take].iter().map(|m| m.key().unwrap_or_default()))
    }

    fn defer(&mut self, p: i32, wait: Duration) {
        self.metrics.add(&self.metrics.fairness_deferrals_total, 1);
        let Some(st) = self.parts.get_mut(&p) else {
            return;
        };
        st.not_before = Some(Instant::now() + wait);
        if !st.paused {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.cfg.kafka.usage_topic, p);
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
            tpl.add_partition(&self.cfg.kafka.usage_topic, p);
            if self.consumer.resume(&tpl).is_ok() {
                st.paused = false;
            }
        }
    }

    /// Runs one batch through the state machine; returns the new offset of record.
    async fn process_batch(
        &self,
        p: i32,
        msgs: Vec<OwnedMessage>,
        replay: Option<PendingBatch>,
        record_next: Option<i64>,
    ) -> Result<i64, StageError> {
        let first = replay.map_or_else(|| msgs[0].offset(), |b| b.first);
        let last = replay.map_or_else(|| msgs[msgs.len() - 1].offset(), |b| b.last);

        // Decode (Confluent ids are resolved through the registry first).
        let mut t = Instant::now();
        let mut decoded = Vec::with_capacity(msgs.len());
        let mut newest: Option<DateTime<Utc>> = None;
        for m in &msgs {
            let ts = m
                .timestamp()
                .to_millis()
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
            newest = newest.max(ts);
            decoded.push(
                self.decoding
                    .decode(m.payload().unwrap_or_default(), ts, &self.metrics)
                    .await?,
            );
        }

        self.metrics.stage(0, t);
        t = Instant::now();
        // 1. Dead letters, acknowledged before anything commits.
        let poison: Vec<Poison<'_>> = msgs
            .iter()
            .zip(&decoded)
            .filter_map(|(m, d)| match d {
                Decoded::Poison { class, message } => Some(Poison {
                    key: m.key(),
                    payload: m.payload().unwrap_or_default(),
                    headers: None,
                    partition: p,
                    offset: m.offset(),
                    class,
                    message,
                }),
                Decoded::Event(_) => None,
            })
            .collect();
        let dead: Vec<DeadLetter> = poison
            .iter()
            .map(|x| DeadLetter {
                partition: p,
                offset: x.offset,
                class: x.class.to_string(),
                message: x.message.to_string(),
            })
            .collect();
        if !poison.is_empty() {
            let (dlq_topic, src) = (
                self.cfg.kafka.dlq_topic.clone(),
                self.cfg.kafka.usage_topic.clone(),
            );
            let producer = self.dlq.clone();
            let mut attempts = 0;
            loop {
                match dlq::send_all(&producer, &dlq_topic, &src, &poison).await {
                    Ok(()) => break,
                    Err(e) if e.is_retryable() && attempts < self.cfg.pipeline.max_retries => {
                        attempts += 1;
                        self.metrics.add(&self.metrics.retries_total, 1);
                        tracing::warn!(error = %e, "dead-letter send: retrying");
                        tokio::time::sleep(Duration::from_millis(200 * attempts as u64)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        drop(poison);

        // In-batch duplicates: the first occurrence wins.
        let mut seen_here: HashSet<uuid::Uuid> = HashSet::new();
        let mut events: Vec<(UsageEvent, i64)> = Vec::new();
        let mut dup_in_batch = 0u64;
        for (m, d) in msgs.iter().zip(decoded) {
            if let Decoded::Event(e) = d {
                if seen_here.insert(e.event_id) {
                    events.push((*e, m.offset()));
                } else {
                    dup_in_batch += 1;
                }
            }
        }

        self.metrics.stage(1, t);
        t = Instant::now();
        // 2. Claim the range and the event ids.
        let ids: Vec<(uuid::Uuid, DateTime<Utc>)> = events
            .iter()
            .map(|(e, _)| (e.event_id, e.occurred_at))
            .collect();
        let ledger = self.ledger.clone();
        let (batch, owned) = retry(
            &self.metrics,
            self.cfg.pipeline.max_retries,
            "claim",
            || {
                let (ledger, ids) = (ledger.clone(), ids.clone());
                Box::pin(async move {
                    ledger
                        .claim(
                            p,
                            first,
                            last,
                            record_next,
                            replay.map(|b| b.batch_id),
                            &ids,
                        )
                        .await
                })
            },
        )
        .await?;
        if replay.is_some() {
            self.metrics.add(&self.metrics.batches_replayed_total, 1);
        }
        let before = events.len();
        events.retain(|(e, _)| owned.contains(&e.event_id));
        let duplicates = dup_in_batch + (before - events.len()) as u64;

        self.metrics.stage(2, t);
        t = Instant::now();
        // Enrich against one reference snapshot; flag over-quota events.
        let reference = self.reference.get();
        let mut enriched: Vec<Enriched> = events
            .into_iter()
            .map(|(e, off)| enrich(e, &reference, self.tolerance, p, off))
            .collect();
        self.ledger
            .flag_over_quota(&mut enriched, &reference)
            .await?;

        self.metrics.stage(3, t);
        t = Instant::now();
        // 3. ClickHouse, checked first whenever an earlier attempt may have landed.
        let ch = self.ch.clone();
        let batch_id = u64::try_from(batch.batch_id).unwrap_or(0);
        let mut attempt = 0u32;
        let events_ref = &enriched;
        let outcome = retry(
            &self.metrics,
            self.cfg.pipeline.max_retries,
            "clickhouse write",
            || {
                let verify = replay.is_some() || attempt > 0;
                attempt += 1;
                let ch = ch.clone();
                Box::pin(async move { ch.write_usage_batch(batch_id, events_ref, verify).await })
            },
        )
        .await?;
        self.metrics.add(
            &self.metrics.clickhouse_rows_written_total,
            outcome.rows_written,
        );
        self.metrics.add(
            &self.metrics.clickhouse_tables_skipped_total,
            u64::from(outcome.tables_skipped),
        );

        self.metrics.stage(4, t);
        t = Instant::now();
        // 4. The single Postgres commit.
        let input = CommitInput {
            events: &enriched,
            reference: &reference,
            dead: &dead,
            newest_message_at: newest,
            tolerance: self.tolerance,
        };
        let input_ref = &input;
        let committed = retry(
            &self.metrics,
            self.cfg.pipeline.max_retries,
            "commit",
            || {
                let ledger = ledger.clone();
                Box::pin(async move {
                    match ledger.commit(p, batch, input_ref).await {
                        Ok(o) => Ok(Some(o)),
                        // A commit whose reply was lost may have landed: check.
                        Err(e @ StageError::Retryable(_)) => {
                            match ledger.batch_done(batch.batch_id).await {
                                Ok(true) => Ok(None),
                                _ => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    }
                })
            },
        )
        .await?;
        self.metrics.stage(5, t);
        let violations = committed.map(|c| c.violations_new).unwrap_or(0);
        let m = &self.metrics;
        m.add(&m.batches_committed_total, 1);
        m.add(&m.events_counted_total, enriched.len() as u64);
        m.add(&m.events_duplicate_total, duplicates);
        m.add(&m.dead_letters_total, dead.len() as u64);
        m.add(&m.violations_raised_total, violations as u64);
        tracing::debug!(
            partition = p,
            batch_id,
            first,
            last,
            events = enriched.len(),
            duplicates,
            dead_letters = dead.len(),
            violations,
            replay = replay.is_some(),
            "batch committed"
        );
        Ok(last + 1)
    }

    /// Whether an owned partition has messages beyond its offset of record
    /// (a short watermark request per owned partition, every few seconds). It
    /// feeds `/health`: lag that makes no progress is a stall, even when nothing
    /// arrives any more (e.g. a partition left paused).
    fn lagging(&self) -> bool {
        tokio::task::block_in_place(|| {
            self.parts.iter().any(|(p, st)| {
                st.owned
                    && self
                        .consumer
                        .fetch_watermarks(
                            &self.cfg.kafka.usage_topic,
                            *p,
                            Duration::from_millis(500),
                        )
                        .is_ok_and(|(_, high)| high > st.record_next.unwrap_or(0))
            })
        })
    }

    /// Copies the offsets of record to Kafka for lag tooling (never read back).
    fn commit_kafka_copy(&self) {
        let mut tpl = TopicPartitionList::new();
        for (p, st) in &self.parts {
            if let (true, Some(n)) = (st.owned, st.record_next) {
                let _ =
                    tpl.add_partition_offset(&self.cfg.kafka.usage_topic, *p, Offset::Offset(n));
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "kafka offset copy failed (harmless)");
            }
        }
    }
}
