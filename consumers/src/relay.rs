//! Outbox relay: publishes `tally.violations` rows to the violation topic.
//!
//! Guarantee: each violation id appears on the topic exactly once, without Kafka
//! transactions (the test brokers do not all have them). One relay runs per
//! group (a Postgres advisory lock elects it). Before publishing, the relay
//! records the topic's end offsets and the ids it is about to send; after every
//! send is acknowledged it marks them published. If it dies in between, the next
//! relay reads the topic from the recorded offsets, marks the ids it finds there
//! as published, and only publishes the rest.

use crate::errors::{classify_kafka, pg, StageError};
use crate::metrics::Metrics;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use sqlx::postgres::PgPool;
use sqlx::{Connection, Row};
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tally_schemas::{encode_json, ComplianceViolation, Severity};
use tokio::sync::watch;
use uuid::Uuid;

#[derive(Clone)]
pub struct RelayConfig {
    pub brokers: String,
    pub topic: String,
    pub postgres_url: String,
    pub batch: i64,
}

/// Runs until `shutdown` flips; retries Retryable errors, returns Fatal ones.
pub async fn run(
    cfg: RelayConfig,
    pool: PgPool,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StageError> {
    let producer = crate::dlq::producer(&cfg.brokers, &[])?;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        match relay_while_leader(&cfg, &pool, &producer, &metrics, &mut shutdown).await {
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
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), StageError> {
    // The advisory lock lives as long as this connection: a crashed leader's
    // lock is released by Postgres when its connection drops.
    let opts = sqlx::postgres::PgConnectOptions::from_str(&cfg.postgres_url)
        .map_err(|e| StageError::Fatal(format!("config key `postgres.url`: {e}")))?;
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
    tracing::info!(topic = %cfg.topic, "violation relay: leader");
    reconcile(cfg, pool).await?;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let sent = publish_once(cfg, pool, producer).await?;
        metrics.relay.progressed();
        metrics.add(&metrics.violations_published_total, sent as u64);
        if sent == 0 {
            // keep the lock connection alive and notice if it died
            sqlx::query("SELECT 1")
                .execute(&mut lock_conn)
                .await
                .map_err(pg("relay lock ping"))?;
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

/// Publishes up to one batch of unpublished violations; returns how many.
async fn publish_once(
    cfg: &RelayConfig,
    pool: &PgPool,
    producer: &FutureProducer,
) -> Result<usize, StageError> {
    let rows = sqlx::query(
        "SELECT * FROM tally.violations WHERE published_at IS NULL ORDER BY detected_at, violation_id LIMIT $1",
    )
    .bind(cfg.batch)
    .fetch_all(pool)
    .await
    .map_err(pg("relay read outbox"))?;
    if rows.is_empty() {
        return Ok(0);
    }
    let violations: Vec<ComplianceViolation> = rows.iter().map(row_to_violation).collect();
    let ids: Vec<Uuid> = violations.iter().map(|v| v.violation_id).collect();
    let ends = end_offsets(&cfg.brokers, &cfg.topic).await?;
    let attempt_id: i64 = sqlx::query_scalar(
        "INSERT INTO tally.relay_attempts (topic, end_offsets, violation_ids) VALUES ($1, $2, $3) RETURNING attempt_id",
    )
    .bind(&cfg.topic)
    .bind(&ends)
    .bind(&ids)
    .fetch_one(pool)
    .await
    .map_err(pg("relay record attempt"))?;
    let mut pending = Vec::with_capacity(violations.len());
    for v in &violations {
        let payload = encode_json(v);
        let id = v.violation_id.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "tally.violation_id",
                value: Some(&id),
            })
            .insert(Header {
                key: "tally.rule",
                value: Some(&v.rule),
            });
        let record = FutureRecord::to(&cfg.topic)
            .key(&v.tenant_id)
            .payload(&payload)
            .headers(headers);
        let fut = producer
            .send_result(record)
            .map_err(|(e, _)| classify_kafka("violation enqueue", &e))?;
        pending.push(fut);
    }
    for fut in pending {
        match tokio::time::timeout(Duration::from_secs(60), fut).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) => return Err(classify_kafka("violation delivery", &e)),
            _ => return Err(StageError::Retryable("violation delivery timed out".into())),
        }
    }
    crate::failpoint::hit("relay_after_publish").await?;
    let mut tx = pool.begin().await.map_err(pg("relay mark begin"))?;
    sqlx::query("UPDATE tally.violations SET published_at = now() WHERE violation_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(pg("relay mark published"))?;
    sqlx::query("DELETE FROM tally.relay_attempts WHERE attempt_id = $1")
        .bind(attempt_id)
        .execute(&mut *tx)
        .await
        .map_err(pg("relay clear attempt"))?;
    tx.commit().await.map_err(pg("relay mark commit"))?;
    Ok(ids.len())
}

/// Settles attempts a previous leader left unfinished: ids already on the topic
/// are marked published; the rest stay in the outbox and go out again.
async fn reconcile(cfg: &RelayConfig, pool: &PgPool) -> Result<(), StageError> {
    let attempts = sqlx::query(
        "SELECT attempt_id, end_offsets, violation_ids FROM tally.relay_attempts WHERE topic = $1",
    )
    .bind(&cfg.topic)
    .fetch_all(pool)
    .await
    .map_err(pg("relay read attempts"))?;
    for a in attempts {
        let attempt_id: i64 = a.get(0);
        let from: Vec<i64> = a.get(1);
        let ids: Vec<Uuid> = a.get(2);
        let on_topic = ids_on_topic(&cfg.brokers, &cfg.topic, &from).await?;
        let found: Vec<Uuid> = ids
            .iter()
            .copied()
            .filter(|id| on_topic.contains(id))
            .collect();
        tracing::info!(
            attempt_id,
            found = found.len(),
            of = ids.len(),
            "violation relay: reconciled an unfinished attempt"
        );
        let mut tx = pool.begin().await.map_err(pg("relay reconcile begin"))?;
        sqlx::query("UPDATE tally.violations SET published_at = now() WHERE violation_id = ANY($1) AND published_at IS NULL")
            .bind(&found)
            .execute(&mut *tx)
            .await
            .map_err(pg("relay reconcile mark"))?;
        sqlx::query("DELETE FROM tally.relay_attempts WHERE attempt_id = $1")
            .bind(attempt_id)
            .execute(&mut *tx)
            .await
            .map_err(pg("relay reconcile clear"))?;
        tx.commit().await.map_err(pg("relay reconcile commit"))?;
    }
    Ok(())
}

fn scan_consumer(brokers: &str) -> Result<BaseConsumer, StageError> {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tally-relay-scan")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("receive.message.max.bytes", "2147483647")
        .create()
        .map_err(|e| StageError::Fatal(format!("kafka consumer: {e}")))
}

/// Current end (high watermark) of each partition of `topic`, by partition index.
pub async fn end_offsets(brokers: &str, topic: &str) -> Result<Vec<i64>, StageError> {
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let c = scan_consumer(&brokers)?;
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
    brokers: &str,
    topic: &str,
    from: &[i64],
) -> Result<HashSet<Uuid>, StageError> {
    let ends = end_offsets(brokers, topic).await?;
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    let from = from.to_vec();
    tokio::task::spawn_blocking(move || {
        let c = scan_consumer(&brokers)?;
        let mut tpl = TopicPartitionList::new();
        for (p, start) in from.iter().enumerate() {
            let p = i32::try_from(p).unwrap_or(0);
            tpl.add_partition_offset(&topic, p, Offset::Offset(*start))
                .map_err(|e| classify_kafka("relay scan assign", &e))?;
        }
        c.assign(&tpl)
            .map_err(|e| classify_kafka("relay scan assign", &e))?;
        let mut found = HashSet::new();
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
                    if let Some(payload) = m.payload() {
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
                            if let Some(id) = v.get("violation_id").and_then(|x| x.as_str()) {
                                if let Ok(u) = Uuid::parse_str(id) {
                                    found.insert(u);
                                }
                            }
                        }
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
