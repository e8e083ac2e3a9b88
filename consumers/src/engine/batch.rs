//! One batch through the exactly-once state machine (see `pipeline.rs` for the
//! steps). A `BatchRunner` holds only shared, cloneable handles, so batches of
//! different partitions run as concurrent tasks while the consumer keeps polling.
//!
//! Guarantee: for a given partition the pipeline runs at most one batch at a
//! time, in offset order; each step is atomic or checked before it is repeated,
//! and a replay decides exactly what the first attempt decided (same dedup
//! clock and cutoff, same reference snapshot, same claimed keys).

use crate::config::Config;
use crate::engine::breaker::{self, Sink, Step};
use crate::engine::claim::{ClaimInput, KeyClaim, PendingBatch};
use crate::engine::decode::{Decoded, Decoding};
use crate::engine::dlq::{self, Poison};
use crate::engine::ledger::{CommitInput, DeadLetter, Ledger};
use crate::engine::ownership::Fence;
use crate::engine::reference::SharedReference;
use crate::engine::stream::{BatchCtx, Owned, Stream};
use crate::engine::trace::{self, Carry, MessageTrace};
use crate::errors::StageError;
use crate::fasthash::Map;
use crate::metrics::{Stage, StreamMetrics};
use crate::sinks::clickhouse::ClickHouseSink;
use crate::streams::usage::enrich::Reference;
use chrono::{DateTime, TimeZone, Utc};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Timestamp};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;
use uuid::Uuid;

pub struct BatchRunner<S: Stream> {
    pub stream: Arc<S>,
    /// The stream's source and dead-letter topics.
    pub topic: String,
    pub dlq_topic: String,
    pub cfg: Config,
    pub ledger: Ledger,
    pub ch: ClickHouseSink,
    pub dlq: rdkafka::producer::FutureProducer,
    pub decoding: Decoding,
    pub reference: SharedReference,
    /// The stream's series (and the process's sink breakers).
    pub sm: Arc<StreamMetrics>,
    /// When a sink's circuit opens (sink steps retry until the sink answers).
    pub breaker: breaker::Policy,
    /// The last reference snapshot loaded for a replay (by version).
    pub replay_reference: Mutex<Option<Arc<Reference>>>,
}

/// A batch cut from a partition's buffer, ready to process.
pub struct BatchWork {
    pub partition: i32,
    pub msgs: Vec<OwnedMessage>,
    /// The pending batch to replay (as read when the partition was taken).
    pub replay: Option<PendingBatch>,
    pub record_next: Option<i64>,
    /// Ownership epoch of this instance for the partition.
    pub epoch: i64,
    /// The partition's dedup cutoff so far (never moves back).
    pub cutoff_floor: Option<DateTime<Utc>>,
}

/// What a committed batch reports back to the partition's state.
#[derive(Debug, Clone, Copy)]
pub struct BatchResult {
    pub next_offset: i64,
    pub dedup_cutoff: DateTime<Utc>,
}

/// What a batch's claim records besides its keys.
struct Claim<'a> {
    first: i64,
    last: i64,
    clock: DateTime<Utc>,
    cutoff: DateTime<Utc>,
    reference_version: &'a str,
}

/// A message to dead-letter: its index in the batch, class and reason.
type DeadItem = (usize, &'static str, String);

/// A decoded event that survived in-batch dedup, with its message index.
struct Candidate<E> {
    event: E,
    msg: usize,
    key: Uuid,
    fingerprint: i64,
    occurred_at: DateTime<Utc>,
}

impl<S: Stream> BatchRunner<S> {
    /// Runs one batch through the state machine: decode, dead letters, claim,
    /// enrich and prepare, ClickHouse, the single Postgres commit; traced as
    /// one span with a child span per stage (`trace.rs`).
    pub async fn process_batch(&self, w: BatchWork) -> Result<BatchResult, StageError> {
        let first = w.replay.map_or_else(|| w.msgs[0].offset(), |b| b.first);
        let last = w
            .replay
            .map_or_else(|| w.msgs[w.msgs.len() - 1].offset(), |b| b.last);
        let info = trace::BatchInfo {
            stream: S::NAME,
            topic: &self.topic,
            group: self.ledger.group(),
            partition: w.partition,
            first,
            last,
            replay: w.replay.is_some(),
        };
        let span = trace::batch_span(&info, &w.msgs);
        let r = self
            .run_batch(w, first, last, &span)
            .instrument(span.clone())
            .await;
        trace::finish(&span, &r);
        r
    }

    async fn run_batch(
        &self,
        w: BatchWork,
        first: i64,
        last: i64,
        span: &tracing::Span,
    ) -> Result<BatchResult, StageError> {
        let p = w.partition;
        let reference = self.reference_for(w.replay).await?;
        let (clock, cutoff) = self.dedup_clock(&w);

        let mut t = Instant::now();
        let decoded = self
            .decode_all(&w, clock, cutoff)
            .instrument(trace::stage("decode"))
            .await?;
        self.sm.stage(Stage::Decode, t);
        t = Instant::now();

        // 1. Dead letters, acknowledged before anything commits.
        let mut dead = Vec::new();
        let (candidates, dup_in_batch) = self
            .screen(&w, decoded, &mut dead)
            .instrument(trace::stage("screen"))
            .await?;
        self.sm.stage(Stage::DeadLetter, t);
        t = Instant::now();

        // 2. Claim the range and the dedup keys.
        let claim = Claim {
            first,
            last,
            clock,
            cutoff,
            reference_version: &reference.version,
        };
        let (batch, candidates, duplicates) = self
            .claim(&w, &claim, candidates, dup_in_batch, &mut dead)
            .instrument(trace::stage("claim"))
            .await?;
        self.sm.stage(Stage::Claim, t);
        span.record("tally.batch_id", batch.batch_id);
        let carry = self.carry(&w.msgs, &candidates);
        t = Instant::now();

        // Enrich against the batch's reference snapshot, then read or reserve
        // what the records need.
        let ctx = BatchCtx {
            partition: p,
            batch_id: batch.batch_id,
            epoch: w.epoch,
            reference: &reference,
            ledger: &self.ledger,
            now: Utc::now(),
        };
        let records = self
            .prepare(&ctx, &w.msgs, candidates)
            .instrument(trace::stage("prepare"))
            .await?;
        self.sm.stage(Stage::Enrich, t);
        t = Instant::now();

        // 3. ClickHouse, fenced by the ownership epoch, checked first whenever an
        // earlier attempt may have landed.
        self.write_clickhouse(&w, batch, &records)
            .instrument(trace::stage("clickhouse"))
            .await?;
        self.sm.stage(Stage::ClickHouse, t);
        t = Instant::now();

        // 4. The single Postgres commit.
        let ctx = BatchCtx {
            now: Utc::now(),
            ..ctx
        };
        let input = CommitInput {
            ctx: &ctx,
            stream: &*self.stream,
            records: &records,
            dead: &dead,
            newest_message_at: w.msgs.iter().filter_map(message_time).max(),
            dedup_cutoff: cutoff,
            carry: &carry,
        };
        let committed = async {
            crate::engine::failpoint::hit("before_commit").await?;
            let committed = breaker::call(
                &self.sm,
                &self.breaker,
                Sink::Postgres,
                Step::Commit,
                || self.commit_once(p, batch, &input),
            )
            .await?;
            crate::engine::failpoint::hit("after_commit").await?;
            Ok::<_, StageError>(committed)
        }
        .instrument(trace::stage("commit"))
        .await?;
        self.sm.stage(Stage::Commit, t);
        let rules = committed.map(|c| c.violations_new).unwrap_or_default();
        let violations = rules.len();
        self.count_committed(records.len(), duplicates, &dead, &rules);
        span.record("tally.events", trace::count(records.len()));
        span.record(
            "tally.duplicates",
            i64::try_from(duplicates).unwrap_or(i64::MAX),
        );
        span.record("tally.dead_letters", trace::count(dead.len()));
        span.record("tally.violations", trace::count(violations));
        tracing::debug!(
            stream = S::NAME,
            partition = p,
            batch_id = batch.batch_id,
            first,
            last,
            events = records.len(),
            duplicates,
            dead_letters = dead.len(),
            violations,
            replay = w.replay.is_some(),
            "batch committed"
        );
        Ok(BatchResult {
            next_offset: last + 1,
            dedup_cutoff: cutoff,
        })
    }

    /// Counts what a committed batch did.
    fn count_committed(
        &self,
        events: usize,
        duplicates: u64,
        dead: &[DeadLetter],
        rules: &[String],
    ) {
        let sm = &self.sm;
        sm.batches_committed.increment(1);
        sm.events_counted.increment(events as u64);
        sm.events_duplicate.increment(duplicates);
        let mut by_class: Map<&str, u64> = Map::default();
        for d in dead {
            *by_class.entry(d.class.as_str()).or_default() += 1;
        }
        for (class, n) in by_class {
            sm.dead_letters(class, n);
        }
        sm.violations_raised(rules.iter().map(String::as_str));
    }

    /// Which owned events' messages carry a trace context, for the violations
    /// they cause (a header scan; parsed only for a violation).
    fn carry<'m>(&self, msgs: &'m [OwnedMessage], candidates: &[Candidate<S::Event>]) -> Carry<'m> {
        let mut carry = Carry::new(msgs);
        for c in candidates {
            carry.note(&c.event, c.msg);
        }
        carry
    }

    /// Decodes every message (Confluent ids are resolved through the registry first).
    async fn decode_all(
        &self,
        w: &BatchWork,
        clock: DateTime<Utc>,
        cutoff: DateTime<Utc>,
    ) -> Result<Vec<Decoded<S::Event>>, StageError> {
        let mut decoded = Vec::with_capacity(w.msgs.len());
        for m in &w.msgs {
            let payload = m.payload().unwrap_or_default();
            decoded.push(
                self.decoding
                    .decode(&*self.stream, payload, clock, cutoff, &self.sm)
                    .await?,
            );
        }
        Ok(decoded)
    }

    /// Dead-letters poison and in-batch conflicts (the first occurrence of a key
    /// wins; the same payload again is a duplicate, another one a conflict).
    /// Returns the candidates and the in-batch duplicate count.
    async fn screen(
        &self,
        w: &BatchWork,
        decoded: Vec<Decoded<S::Event>>,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(Vec<Candidate<S::Event>>, u64), StageError> {
        let poison: Vec<DeadItem> = decoded
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d {
                Decoded::Poison { class, message } => Some((i, *class, message.clone())),
                Decoded::Event(_) => None,
            })
            .collect();
        self.dead_letter(w.partition, &w.msgs, &poison, dead)
            .await?;
        if !poison.is_empty() {
            crate::engine::failpoint::hit("after_dlq_ack").await?;
        }
        let (candidates, dups, conflicts) = in_batch_dedup(&*self.stream, decoded);
        self.dead_letter(w.partition, &w.msgs, &conflicts, dead)
            .await?;
        Ok((candidates, dups))
    }

    /// Claims the range and the candidates' keys; dead-letters keys counted
    /// before with other content. Returns the pending batch, the candidates
    /// this batch owns and the duplicate count.
    async fn claim(
        &self,
        w: &BatchWork,
        c: &Claim<'_>,
        mut candidates: Vec<Candidate<S::Event>>,
        dup_in_batch: u64,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(PendingBatch, Vec<Candidate<S::Event>>, u64), StageError> {
        let keys: Vec<KeyClaim> = candidates
            .iter()
            .map(|c| KeyClaim {
                key: c.key,
                occurred_at: c.occurred_at,
                fingerprint: c.fingerprint,
            })
            .collect();
        let input = ClaimInput {
            partition: w.partition,
            first: c.first,
            last: c.last,
            expected_next: w.record_next,
            replay_of: w.replay.map(|b| b.batch_id),
            epoch: w.epoch,
            reference_version: c.reference_version,
            clock_at: c.clock,
            dedup_cutoff: c.cutoff,
            keys: &keys,
        };
        crate::engine::failpoint::hit("before_claim").await?;
        let claimed = breaker::call(&self.sm, &self.breaker, Sink::Postgres, Step::Claim, || {
            self.ledger.claim(&input)
        })
        .await?;
        crate::engine::failpoint::hit("after_claim").await?;
        if w.replay.is_some() {
            self.sm.batches_replayed.increment(1);
        }
        let conflicts: Vec<DeadItem> = candidates
            .iter()
            .filter(|c| {
                claimed
                    .conflicts
                    .get(&c.key)
                    .is_some_and(|stored| *stored != crate::engine::fingerprint::v1(&c.event))
            })
            .map(|c| {
                let why = self.stream.conflict_message(&c.event, false);
                (c.msg, "dedup_conflict", why)
            })
            .collect();
        self.dead_letter(w.partition, &w.msgs, &conflicts, dead)
            .await?;
        let before = candidates.len();
        candidates.retain(|c| claimed.owned.contains(&c.key));
        let duplicates = dup_in_batch + (before - candidates.len() - conflicts.len()) as u64;
        Ok((claimed.batch, candidates, duplicates))
    }

    /// Enriches the owned candidates and runs the stream's `prepare`, retried
    /// while Postgres is down (it is idempotent per batch).
    async fn prepare(
        &self,
        ctx: &BatchCtx<'_>,
        msgs: &[OwnedMessage],
        candidates: Vec<Candidate<S::Event>>,
    ) -> Result<Vec<S::Record>, StageError> {
        let owned: Vec<Owned<S::Event>> = candidates
            .into_iter()
            .map(|c| Owned {
                offset: msgs[c.msg].offset(),
                event: c.event,
                key: c.key,
            })
            .collect();
        let mut records = self.stream.enrich(ctx, owned);
        let mut probe = breaker::Probe::new(&self.sm, &self.breaker, Sink::Postgres, Step::Prepare);
        loop {
            let started = Instant::now();
            match self.stream.prepare(ctx, &mut records).await {
                Err(e) if e.is_retryable() => probe.failed(started, &e).await,
                r => {
                    probe.answered();
                    r?;
                    return Ok(records);
                }
            }
        }
    }

    /// Writes the records' rows, every insert fenced; after a takeover, first
    /// waits out the grace in which an earlier owner may still insert.
    async fn write_clickhouse(
        &self,
        w: &BatchWork,
        batch: PendingBatch,
        records: &[S::Record],
    ) -> Result<(), StageError> {
        let grace = Duration::from_millis(self.cfg.pipeline.takeover_grace_ms);
        if w.replay.is_some_and(|b| b.owner_epoch != Some(w.epoch)) {
            tracing::info!(
                stream = S::NAME,
                partition = w.partition,
                batch_id = batch.batch_id,
                grace_ms = grace.as_millis() as u64,
                "waiting out the takeover grace"
            );
            tokio::time::sleep(grace).await;
        }
        let fence = Fence::new(
            self.ledger.pool().clone(),
            self.ledger.partition_key(w.partition),
            w.epoch,
            grace,
        );
        let batch_id = u64::try_from(batch.batch_id).unwrap_or(0);
        let mut attempt = 0u32;
        let fence_ref = &fence;
        let outcome = breaker::call(
            &self.sm,
            &self.breaker,
            Sink::ClickHouse,
            Step::ClickHouseWrite,
            || {
                let verify = w.replay.is_some() || attempt > 0;
                attempt += 1;
                self.stream
                    .write_clickhouse(&self.ch, batch_id, records, verify, fence_ref)
            },
        )
        .await?;
        crate::engine::failpoint::hit("after_clickhouse").await?;
        self.sm
            .clickhouse_rows_written
            .increment(outcome.rows_written);
        self.sm
            .clickhouse_tables_skipped
            .increment(u64::from(outcome.tables_skipped));
        Ok(())
    }

    /// One commit attempt; a commit whose reply was lost may have landed, so a
    /// Retryable error is resolved by reading the batch state.
    async fn commit_once(
        &self,
        p: i32,
        batch: PendingBatch,
        input: &CommitInput<'_, S>,
    ) -> Result<Option<crate::engine::ledger::CommitOutcome>, StageError> {
        match self.ledger.commit(p, batch, input).await {
            Ok(o) => Ok(Some(o)),
            Err(e @ StageError::Retryable(_)) => match self.ledger.batch_done(batch.batch_id).await
            {
                Ok(true) => Ok(None),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The reference snapshot of this batch: the current one for a new batch,
    /// the first attempt's for a replay.
    async fn reference_for(
        &self,
        replay: Option<PendingBatch>,
    ) -> Result<Arc<Reference>, StageError> {
        let current = self.reference.get();
        let Some(version) = replay.and_then(|b| b.reference_version) else {
            return Ok(current);
        };
        let version = version.simple().to_string();
        if current.version == version {
            return Ok(current);
        }
        if let Some(r) = self
            .replay_reference
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .filter(|r| r.version == version)
        {
            return Ok(r);
        }
        let pool = self.ledger.pool().clone();
        let r = Arc::new(
            breaker::call(
                &self.sm,
                &self.breaker,
                Sink::Postgres,
                Step::LoadReference,
                || crate::engine::reference::load_snapshot(&pool, &version),
            )
            .await?,
        );
        tracing::info!(version = %version, "replay uses its first attempt's reference snapshot");
        if let Ok(mut g) = self.replay_reference.lock() {
            *g = Some(r.clone());
        }
        Ok(r)
    }

    /// The dedup clock (a time the producer cannot set: the broker's
    /// LogAppendTime when every message carries one, else this consumer's
    /// clock) and the cutoff (clock minus look-back, never below the
    /// partition's earlier cutoff). A replay reuses what its claim recorded.
    fn dedup_clock(&self, w: &BatchWork) -> (DateTime<Utc>, DateTime<Utc>) {
        if let Some(PendingBatch {
            clock_at: Some(c),
            dedup_cutoff: Some(k),
            ..
        }) = w.replay
        {
            return (c, k);
        }
        let appended: Option<Vec<i64>> = w
            .msgs
            .iter()
            .map(|m| match m.timestamp() {
                Timestamp::LogAppendTime(ms) => Some(ms),
                _ => None,
            })
            .collect();
        let clock = appended
            .and_then(|v| v.into_iter().max())
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .unwrap_or_else(Utc::now);
        let lookback = chrono::Duration::hours(self.cfg.pipeline.dedup_lookback_hours);
        let cutoff = (clock - lookback).max(w.cutoff_floor.unwrap_or(DateTime::<Utc>::MIN_UTC));
        (clock, cutoff)
    }

    /// Sends `items` (message index, class, reason) to the DLQ, waits for the
    /// acks, and adds them to the batch's dead letters.
    async fn dead_letter(
        &self,
        p: i32,
        msgs: &[OwnedMessage],
        items: &[DeadItem],
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(), StageError> {
        if items.is_empty() {
            return Ok(());
        }
        let traces: Vec<Option<MessageTrace>> = items
            .iter()
            .map(|(i, _, _)| MessageTrace::of(&msgs[*i]))
            .collect();
        let poison: Vec<Poison<'_>> = items
            .iter()
            .zip(&traces)
            .map(|((i, class, message), trace)| {
                let m = &msgs[*i];
                Poison {
                    key: m.key(),
                    payload: m.payload().unwrap_or_default(),
                    headers: None,
                    trace: trace.as_ref(),
                    partition: p,
                    offset: m.offset(),
                    class,
                    message,
                }
            })
            .collect();
        let (dlq_topic, src) = (&self.dlq_topic, &self.topic);
        breaker::call(
            &self.sm,
            &self.breaker,
            Sink::Dlq,
            Step::DeadLetterSend,
            || dlq::send_all(&self.dlq, dlq_topic, src, &poison),
        )
        .instrument(trace::stage("dlq"))
        .await?;
        dead.extend(poison.iter().map(|x| DeadLetter {
            partition: p,
            offset: x.offset,
            class: x.class.to_string(),
            message: x.message.to_string(),
        }));
        Ok(())
    }
}

fn message_time(m: &OwnedMessage) -> Option<DateTime<Utc>> {
    m.timestamp()
        .to_millis()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
}

/// Keeps the first occurrence of each dedup key in the batch; a later one
/// with the same fingerprint is a duplicate, with another a conflict.
/// Returns the candidates, the duplicate count and the conflicts (message
/// index, class, reason).
fn in_batch_dedup<S: Stream>(
    stream: &S,
    decoded: Vec<Decoded<S::Event>>,
) -> (Vec<Candidate<S::Event>>, u64, Vec<DeadItem>) {
    let mut seen: Map<Uuid, i64> = Map::with_capacity_and_hasher(decoded.len(), Default::default());
    let mut out = Vec::with_capacity(decoded.len());
    let mut dups = 0u64;
    let mut conflicts = Vec::new();
    for (i, d) in decoded.into_iter().enumerate() {
        let Decoded::Event(e) = d else { continue };
        let id = stream.identity(&e);
        match seen.get(&id.key) {
            Some(p) if *p == id.fingerprint => dups += 1,
            Some(_) => conflicts.push((i, "dedup_conflict", stream.conflict_message(&e, true))),
            None => {
                seen.insert(id.key, id.fingerprint);
                out.push(Candidate {
                    event: *e,
                    msg: i,
                    key: id.key,
                    fingerprint: id.fingerprint,
                    occurred_at: id.occurred_at,
                });
            }
        }
    }
    (out, dups, conflicts)
}
