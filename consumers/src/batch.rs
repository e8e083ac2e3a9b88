//! One batch through the exactly-once state machine (see `pipeline.rs` for the
//! steps). A `BatchRunner` holds only shared, cloneable handles, so batches of
//! different partitions run as concurrent tasks while the consumer keeps polling.
//!
//! Guarantee: for a given partition the pipeline runs at most one batch at a
//! time, in offset order; each step is atomic or checked before it is repeated.

use crate::breaker::{self, Sink};
use crate::config::Config;
use crate::decode::{Decoded, UsageDecoding};
use crate::dlq::{self, Poison};
use crate::enrich::{enrich, Enriched};
use crate::errors::StageError;
use crate::ledger::{CommitInput, DeadLetter, Ledger, PendingBatch};
use crate::metrics::Metrics;
use crate::reference::SharedReference;
use crate::sink_clickhouse::ClickHouseSink;
use chrono::{DateTime, TimeZone, Utc};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use rust_decimal::Decimal;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use tally_schemas::UsageEvent;

pub struct BatchRunner {
    pub cfg: Config,
    pub ledger: Ledger,
    pub ch: ClickHouseSink,
    pub dlq: rdkafka::producer::FutureProducer,
    pub decoding: UsageDecoding,
    pub reference: SharedReference,
    pub metrics: Arc<Metrics>,
    pub tolerance: Decimal,
    /// When a sink's circuit opens (sink steps retry until the sink answers).
    pub breaker: breaker::Policy,
}

impl BatchRunner {
    /// Runs one batch through the state machine; returns the new offset of record.
    pub async fn process_batch(
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
            breaker::call(
                &self.metrics,
                &self.breaker,
                Sink::Dlq,
                "dead-letter send",
                || dlq::send_all(&producer, &dlq_topic, &src, &poison),
            )
            .await?;
            crate::failpoint::hit("after_dlq_ack").await?;
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
        let (batch, owned) = breaker::call(
            &self.metrics,
            &self.breaker,
            Sink::Postgres,
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
        crate::failpoint::hit("after_claim").await?;
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
        let mut probe = breaker::Probe::new(&self.metrics, &self.breaker, Sink::Postgres, "quota");
        loop {
            let started = Instant::now();
            match self.ledger.flag_over_quota(&mut enriched, &reference).await {
                Err(e) if e.is_retryable() => probe.failed(started, &e).await,
                r => {
                    probe.answered();
                    break r?;
                }
            }
        }

        self.metrics.stage(3, t);
        t = Instant::now();
        // 3. ClickHouse, checked first whenever an earlier attempt may have landed.
        let ch = self.ch.clone();
        let batch_id = u64::try_from(batch.batch_id).unwrap_or(0);
        let mut attempt = 0u32;
        let events_ref = &enriched;
        let outcome = breaker::call(
            &self.metrics,
            &self.breaker,
            Sink::ClickHouse,
            "clickhouse write",
            || {
                let verify = replay.is_some() || attempt > 0;
                attempt += 1;
                let ch = ch.clone();
                Box::pin(async move { ch.write_usage_batch(batch_id, events_ref, verify).await })
            },
        )
        .await?;
        crate::failpoint::hit("after_clickhouse").await?;
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
        crate::failpoint::hit("before_commit").await?;
        let committed = breaker::call(
            &self.metrics,
            &self.breaker,
            Sink::Postgres,
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
        crate::failpoint::hit("after_commit").await?;
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
}
