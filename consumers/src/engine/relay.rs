//! Outbox relay: publishes `tally.violations` rows to the violation topic.
//!
//! Guarantee: each violation id appears on the topic exactly once, without Kafka
//! transactions (the test brokers do not all have them), even when two relays
//! run at once (a leader whose lock connection died keeps going until its next
//! round; a paused process wakes up). A Postgres advisory lock elects one relay
//! per topic, but safety does not rest on it:
//!
//! - **Claims.** An attempt claims the rows it sends: in one transaction it
//!   notes the topic's end offsets in `relay_attempts` and sets the rows'
//!   `attempt_id`, taking only unclaimed rows (`FOR UPDATE SKIP LOCKED`). A
//!   claimed row is never picked by another attempt, so two relays send
//!   disjoint rows.
//! - **Bounded sends.** The attempt enqueues its sends only within
//!   [`ENQUEUE_WINDOW`] of its claim (measured from before the claim, so never
//!   past `enqueue_until`), and the producer gives up on a send after
//!   [`DELIVERY_TIMEOUT`]. By `settle_after` (= claim + window + timeout +
//!   [`SETTLE_MARGIN`]) every send of the attempt is on the topic or never will be.
//! - **Settling.** The owner marks its delivered rows published, releases the
//!   rest and deletes the attempt, in one transaction that first locks the
//!   attempt row (if it is gone, another relay settled it). A relay that finds
//!   an attempt past its `settle_after` (its owner died or stalled) locks it,
//!   reads the topic from the noted offsets, marks the ids it finds there as
//!   published and releases the others for a later attempt. Never earlier: a
//!   send still in flight would be missed and repeated.
//!
//! Assumptions: the broker applies a produce request within [`SETTLE_MARGIN`]
//! after the client gave up on it, and a relay process is not frozen for longer
//! than that margin while librdkafka holds an already built request (the
//! residual zombie case that only broker-side fencing, i.e. Kafka transactions,
//! would close). Clocks may differ between hosts; only their rates are assumed
//! equal over a minute (deadlines are Postgres `now()` plus durations measured
//! with monotonic clocks).

use crate::engine::violation_wire;
use crate::errors::{classify_kafka, pg, StageError};
use crate::metrics::Metrics;
use crate::sinks::kafka_client::KafkaClient;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use sqlx::postgres::PgPool;
use sqlx::{Connection, Row};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally_schemas::{ComplianceViolation, Decoder, Severity};
use tokio::sync::watch;
use uuid::Uuid;

/// librdkafka `message.timeout.ms` of the relay's producer: a send is
/// delivered or failed (queueing and retries included) within this.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);
/// An attempt enqueues sends only this long after it started claiming.
pub const ENQUEUE_WINDOW: Duration = Duration::from_secs(5);
/// Slack after the delivery timeout before another relay may read the topic.
pub const SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// `application_name` of the relay's lock connection (with the process id),
/// so operators and tests can find the leader in `pg_stat_activity`.
pub const LOCK_APPLICATION_NAME: &str = "tally-relay-lock";

#[derive(Clone)]
pub struct RelayConfig {
    pub kafka: crate::sinks::kafka_client::KafkaClient,
    pub topic: String,
    pub postgres: sqlx::postgres::PgConnectOptions,
    pub batch: i64,
    /// Payload encoding and headers (`kafka.violation_*`).
    pub output: crate::engine::violation_wire::ViolationOutput,
}

/// Runs until `shutdown` flips; retries Retryable errors, returns Fatal ones.
pub async fn run(
    cfg: RelayConfig,
    pool: PgPool,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StageError> {
    let timeout_ms = DELIVERY_TIMEOUT.as_millis().to_string();
    let producer =
        crate::engine::dlq::producer(&cfg.kafka, &[("message.timeout.ms", &timeout_ms)])?;
    // Recorded with each attempt, for operators: which process claimed what.
    let host = std::env::var("HOSTNAME")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    let owner = format!("{}:{}", host.trim(), std::process::id());
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        match relay_while_leader(&cfg, &pool, &producer, &owner, &metrics, &mut shutdown).await {
            Ok(()) => return Ok(()),
            Err(StageError::Fatal(m)) => return Err(StageError::Fatal(m)),
            Err(e) => {
                tracing::warn!(error = %e, "violation relay: retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}

async fn relay_while_leader(
    cfg: &RelayConfig,
    pool: &PgPool,
    producer: &FutureProducer,
    owner: &str,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), StageError> {
    // The advisory lock lives as long as this connection: a crashed leader's
    // lock is released by Postgres when its connection drops.
    let opts = cfg
        .postgres
        .clone()
        .application_name(&format!("{LOCK_APPLICATION_NAME}:{}", std::process::id()));
    let mut lock_conn = sqlx::PgConnection::connect_with(&opts)
        .await
        .map_err(pg("relay lock connect"))?;
    loop {
        let got: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('tally-relay:' || $1))")
                .bind(&cfg.topic)
                .fetch_one(&mut lock_conn)
                .await
                .map_err(pg("relay lock"))?;
        if got {
            break;
        }
        metrics.relay.progressed(); // a follower that can poll the lock works
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
    tracing::info!(topic = %cfg.topic, owner, "violation relay: leader");
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        // Step down as soon as the lock connection is gone (the claims keep a
        // relay that learns it late from repeating anything).
        sqlx::query("SELECT 1")
            .execute(&mut lock_conn)
            .await
            .map_err(pg("relay lock ping"))?;
        reconcile(cfg, pool).await?;
        let sent = publish_once(cfg, pool, producer, owner).await?;
        metrics.relay.progressed();
        metrics.violations_published.increment(sent as u64);
        if sent == 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

fn row_to_violation(r: &sqlx::postgres::PgRow) -> ComplianceViolation {
    let severity: String = r.get("severity");
    ComplianceViolation {
        violation_id: r.get("violation_id"),
        rule: r.get("rule"),
        severity: Severity::from_symbol(&severity).unwrap_or(Severity::Medium),
        tenant_id: r.get("tenant_id"),
        subject_type: r.get("subject_type"),
        subject_id: r.get("subject_id"),
        window_start: r.get::<DateTime<Utc>, _>("window_start"),
        window_end: r.get::<DateTime<Utc>, _>("window_end"),
        observed: r.get::<Decimal, _>("observed"),
        threshold: r.get::<Decimal, _>("threshold"),
        evidence_event_ids: r.get::<Vec<String>, _>("evidence_event_ids"),
        detected_at: r.get::<DateTime<Utc>, _>("detected_at"),
        message: r.get("message"),
    }
}

/// The trace context stored with a violation (`0009_violation_trace_context.sql`).
fn row_trace(r: &sqlx::postgres::PgRow) -> Option<crate::engine::trace::MessageTrace> {
    let traceparent: Option<String> = r.try_get("traceparent").ok().flatten();
    Some(crate::engine::trace::MessageTrace {
        traceparent: traceparent.filter(|t| !t.is_empty())?,
        tracestate: r.try_get("tracestate").ok().flatten(),
    })
}

/// A claimed violation and the trace context its message headers carry.
type Outgoing = (
    ComplianceViolation,
    Option<crate::engine::trace::MessageTrace>,
);

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Claims up to one batch of unclaimed, unpublished violations for a new
/// attempt. Returns the attempt id and its rows in outbox order.
async fn claim(
    cfg: &RelayConfig,
    pool: &PgPool,
    owner: &str,
    ends: &[i64],
) -> Result<Option<(i64, Vec<Outgoing>)>, StageError> {
    let mut tx = pool.begin().await.map_err(pg("relay claim begin"))?;
    let attempt_id: i64 = sqlx::query_scalar(
        "INSERT INTO tally.relay_attempts (topic, end_offsets, violation_ids, owner, enqueue_until, settle_after) \
         VALUES ($1, $2, '{}', $3, now() + $4 * interval '1 millisecond', now() + $5 * interval '1 millisecond') \
         RETURNING attempt_id",
    )
    .bind(&cfg.topic)
    .bind(ends)
    .bind(owner)
    .bind(millis(ENQUEUE_WINDOW))
    .bind(millis(ENQUEUE_WINDOW + DELIVERY_TIMEOUT + SETTLE_MARGIN))
    .fetch_one(&mut *tx)
    .await
    .map_err(pg("relay record attempt"))?;
    let rows = sqlx::query(
        "WITH c AS (SELECT violation_id FROM tally.violations \
                    WHERE published_at IS NULL AND attempt_id IS NULL \
                    ORDER BY detected_at, violation_id LIMIT $1 FOR UPDATE SKIP LOCKED) \
         UPDATE tally.violations v SET attempt_id = $2 FROM c \
         WHERE v.violation_id = c.violation_id RETURNING v.*",
    )
    .bind(cfg.batch)
    .bind(attempt_id)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("relay claim rows"))?;
    if rows.is_empty() {
        tx.rollback().await.map_err(pg("relay claim rollback"))?;
        return Ok(None);
    }
    let mut violations: Vec<Outgoing> = rows
        .iter()
        .map(|r| (row_to_violation(r), row_trace(r)))
        .collect();
    violations.sort_by_key(|(v, _)| (v.detected_at, v.violation_id));
    let ids: Vec<Uuid> = violations.iter().map(|(v, _)| v.violation_id).collect();
    sqlx::query("UPDATE tally.relay_attempts SET violation_ids = $2 WHERE attempt_id = $1")
        .bind(attempt_id)
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(pg("relay attempt ids"))?;
    tx.commit().await.map_err(pg("relay claim commit"))?;
    Ok(Some((attempt_id, violations)))
}

/// Publishes up to one batch of unpublished violations; returns how many
/// this relay delivered.
async fn publish_once(
    cfg: &RelayConfig,
    pool: &PgPool,
    producer: &FutureProducer,
    owner: &str,
) -> Result<usize, StageError> {
    let any: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM tally.violations WHERE published_at IS NULL AND attempt_id IS NULL)",
    )
    .fetch_one(pool)
    .await
    .map_err(pg("relay read outbox"))?;
    if !any {
        return Ok(0);
    }
    // Noted before the claim: every send of this attempt lands at or after them.
    let ends = end_offsets(&cfg.kafka, &cfg.topic).await?;
    // Measured from before the claim transaction starts, so the local window
    // ends no later than the attempt's `enqueue_until` (Postgres time).
    let started = Instant::now();
    let Some((attempt_id, violations)) = claim(cfg, pool, owner, &ends).await? else {
        return Ok(0);
    };
    crate::engine::failpoint::hit("relay_before_send").await?;
    let mut pending = Vec::with_capacity(violations.len());
    let mut enqueue_error = None;
    for (v, trace) in &violations {
        if started.elapsed() >= ENQUEUE_WINDOW {
            tracing::warn!(
                attempt_id,
                enqueued = pending.len(),
                of = violations.len(),
                "violation relay: enqueue window over; the rest go in a later attempt"
            );
            break;
        }
        let payload = cfg.output.payload(v);
        let mut headers = cfg.output.kafka_headers(v);
        // The trace context of the event that caused it (`trace.rs`).
        for (key, value) in trace.iter().flat_map(|t| t.headers()) {
            headers = headers.insert(rdkafka::message::Header {
                key,
                value: Some(value),
            });
        }
        let record = FutureRecord::to(&cfg.topic)
            .key(&v.tenant_id)
            .payload(&payload)
            .headers(headers);
        match producer.send_result(record) {
            Ok(fut) => pending.push((v.violation_id, fut)),
            Err((e, _)) => {
                if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                    enqueue_error = Some(classify_kafka("violation enqueue", &e));
                }
                break;
            }
        }
    }
    let mut delivered = Vec::with_capacity(pending.len());
    for (id, fut) in pending {
        match tokio::time::timeout(DELIVERY_TIMEOUT + Duration::from_secs(5), fut).await {
            Ok(Ok(Ok(_))) => delivered.push(id),
            // Possibly on the topic: the attempt stays for a relay to settle
            // once its deadline passed.
            Ok(Ok(Err((e, _)))) => return Err(classify_kafka("violation delivery", &e)),
            _ => return Err(StageError::Retryable("violation delivery timed out".into())),
        }
    }
    if let Some(e) = enqueue_error {
        return Err(e);
    }
    crate::engine::failpoint::hit("relay_after_publish").await?;
    let mut tx = pool.begin().await.map_err(pg("relay mark begin"))?;
    let ours: Option<i64> = sqlx::query_scalar(
        "SELECT attempt_id FROM tally.relay_attempts WHERE attempt_id = $1 FOR UPDATE",
    )
    .bind(attempt_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(pg("relay lock attempt"))?;
    if ours.is_none() {
        // Another relay found it past its deadline and settled it from the
        // topic, where every send above already was.
        tracing::warn!(
            attempt_id,
            "violation relay: attempt settled by another relay"
        );
        return Ok(delivered.len());
    }
    sqlx::query(
        "UPDATE tally.violations SET published_at = now() \
         WHERE violation_id = ANY($2) AND attempt_id = $1 AND published_at IS NULL",
    )
    .bind(attempt_id)
    .bind(&delivered)
    .execute(&mut *tx)
    .await
    .map_err(pg("relay mark published"))?;
    settle_attempt(&mut tx, attempt_id).await?;
    tx.commit().await.map_err(pg("relay mark commit"))?;
    Ok(delivered.len())
}

/// Releases an attempt's rows that are still unpublished and deletes it.
async fn settle_attempt(tx: &mut sqlx::PgConnection, attempt_id: i64) -> Result<(), StageError> {
    sqlx::query(
        "UPDATE tally.violations SET attempt_id = NULL WHERE attempt_id = $1 AND published_at IS NULL",
    )
    .bind(attempt_id)
    .execute(&mut *tx)
    .await
    .map_err(pg("relay release claims"))?;
    sqlx::query("DELETE FROM tally.relay_attempts WHERE attempt_id = $1")
        .bind(attempt_id)
        .execute(&mut *tx)
        .await
        .map_err(pg("relay clear attempt"))?;
    Ok(())
}

/// Settles attempts whose deadline passed (their relay died or stalled): ids
/// already on the topic are marked published; the rest are released and go
/// out again. Returns how many attempts it settled.
async fn reconcile(cfg: &RelayConfig, pool: &PgPool) -> Result<usize, StageError> {
    let due: Vec<i64> = sqlx::query_scalar(
        "SELECT attempt_id FROM tally.relay_attempts WHERE topic = $1 AND settle_after <= now() ORDER BY attempt_id",
    )
    .bind(&cfg.topic)
    .fetch_all(pool)
    .await
    .map_err(pg("relay read attempts"))?;
    let mut settled = 0;
    for attempt_id in due {
        let mut tx = pool.begin().await.map_err(pg("relay reconcile begin"))?;
        // Locked for the whole scan: the owner's own mark waits, then finds it gone.
        let Some(a) = sqlx::query(
            "SELECT end_offsets, violation_ids, owner FROM tally.relay_attempts \
             WHERE attempt_id = $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(attempt_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(pg("relay lock attempt"))?
        else {
            continue;
        };
        let from: Vec<i64> = a.get(0);
        let ids: Vec<Uuid> = a.get(1);
        let owner: String = a.get(2);
        let on_topic = ids_on_topic(&cfg.kafka, &cfg.topic, &from).await?;
        let found: Vec<Uuid> = ids
            .iter()
            .copied()
            .filter(|id| on_topic.contains(id))
            .collect();
        tracing::info!(
            attempt_id,
            owner,
            found = found.len(),
            of = ids.len(),
            "violation relay: reconciled an unfinished attempt"
        );
        sqlx::query("UPDATE tally.violations SET published_at = now() WHERE violation_id = ANY($1) AND published_at IS NULL")
            .bind(&found)
            .execute(&mut *tx)
            .await
            .map_err(pg("relay reconcile mark"))?;
        settle_attempt(&mut tx, attempt_id).await?;
        tx.commit().await.map_err(pg("relay reconcile commit"))?;
        settled += 1;
    }
    Ok(settled)
}

fn scan_consumer(kafka: &KafkaClient) -> Result<BaseConsumer, StageError> {
    kafka
        .config()
        .set("group.id", "tally-relay-scan")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("receive.message.max.bytes", "2147483647")
        .create()
        .map_err(|e| StageError::Fatal(format!("kafka consumer: {e}")))
}

/// Current end (high watermark) of each partition of `topic`, by partition index.
pub async fn end_offsets(kafka: &KafkaClient, topic: &str) -> Result<Vec<i64>, StageError> {
    let kafka = kafka.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let c = scan_consumer(&kafka)?;
        let md = c
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| classify_kafka("topic metadata", &e))?;
        let n = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if n == 0 {
            return Err(StageError::Retryable(format!(
                "topic {topic} has no partitions (not created yet?)"
            )));
        }
        (0..n)
            .map(|p| {
                let p = i32::try_from(p).unwrap_or(0);
                c.fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .map(|(_, high)| high)
                    .map_err(|e| classify_kafka("watermarks", &e))
            })
            .collect()
    })
    .await
    .map_err(|e| StageError::Fatal(format!("relay task: {e}")))?
}

/// Violation ids present on `topic` from `from[p]` to the end of each partition.
async fn ids_on_topic(
    kafka: &KafkaClient,
    topic: &str,
    from: &[i64],
) -> Result<HashSet<Uuid>, StageError> {
    let ends = end_offsets(kafka, topic).await?;
    let kafka = kafka.clone();
    let topic = topic.to_string();
    let from = from.to_vec();
    tokio::task::spawn_blocking(move || {
        let c = scan_consumer(&kafka)?;
        let mut tpl = TopicPartitionList::new();
        for (p, start) in from.iter().enumerate() {
            let p = i32::try_from(p).unwrap_or(0);
            tpl.add_partition_offset(&topic, p, Offset::Offset(*start))
                .map_err(|e| classify_kafka("relay scan assign", &e))?;
        }
        c.assign(&tpl)
            .map_err(|e| classify_kafka("relay scan assign", &e))?;
        let mut found = HashSet::new();
        let decoder = Decoder::new();
        let mut reached = vec![false; from.len()];
        for (p, (s, e)) in from.iter().zip(ends.iter()).enumerate() {
            reached[p] = s >= e;
        }
        // Read to the high watermark and then until the topic is quiet (some
        // brokers report the watermark too low).
        let mut idle = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while idle < 4 {
            if std::time::Instant::now() > deadline {
                return Err(StageError::Retryable(format!(
                    "relay scan of {topic} did not reach the end"
                )));
            }
            match c.poll(Duration::from_millis(250)) {
                Some(Ok(m)) => {
                    idle = if reached.iter().all(|r| *r) { idle } else { 0 };
                    let p = usize::try_from(m.partition()).unwrap_or(0);
                    if p < reached.len() && m.offset() + 1 >= ends[p] {
                        reached[p] = true;
                    }
                    // Any encoding tally may have written (violation_wire.rs).
                    let header = |name: &str| {
                        m.headers()
                            .and_then(|h| h.iter().find(|x| x.key == name))
                            .and_then(|x| x.value)
                    };
                    let id = violation_wire::violation_id_in(&decoder, m.payload(), header);
                    if let Some(u) = id {
                        found.insert(u);
                    }
                }
                Some(Err(e)) => return Err(classify_kafka("relay scan", &e)),
                None => {
                    if reached.iter().all(|r| *r) {
                        idle += 1;
                    }
                }
            }
        }
        Ok(found)
    })
    .await
    .map_err(|e| StageError::Fatal(format!("relay task: {e}")))?
}
