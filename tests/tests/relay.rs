//! The outbox relay against the real broker and Postgres: a publish attempt that
//! died after sending (ids already on the topic, rows not marked) is reconciled
//! by reading the topic, so no violation id is ever published twice.

use chrono::Utc;
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::metrics::Metrics;
use tally::relay::{self, RelayConfig};
use tally_schemas::{encode_json, sample_compliance_violation, ComplianceViolation};
use tally_tests::*;
use uuid::Uuid;

async fn insert_violation(env: &TestEnv, v: &ComplianceViolation) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tally.violations (violation_id, rule, severity, tenant_id, subject_type, subject_id, \
         window_start, window_end, observed, threshold, evidence_event_ids, detected_at, message) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(v.violation_id)
    .bind(&v.rule)
    .bind(v.severity.as_str())
    .bind(&v.tenant_id)
    .bind(&v.subject_type)
    .bind(&v.subject_id)
    .bind(v.window_start)
    .bind(v.window_end)
    .bind(v.observed)
    .bind(v.threshold)
    .bind(&v.evidence_event_ids)
    .bind(v.detected_at)
    .bind(&v.message)
    .execute(&env.pool)
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_publish_is_reconciled_not_repeated() -> anyhow::Result<()> {
    let env = test_env("relay", 2, &[]).await?;
    let topic = env.cfg.kafka.violation_topic.clone();
    let mut vs = Vec::new();
    for i in 0..10 {
        let mut v = sample_compliance_violation();
        v.violation_id = Uuid::new_v4();
        v.tenant_id = format!("t-{i}");
        v.observed = Decimal::new(i, 2);
        v.detected_at = Utc::now();
        insert_violation(&env, &v).await?;
        vs.push(v);
    }
    // A previous leader noted the topic's end, sent the first 6, and died
    // before marking them published.
    let ends = relay::end_offsets(&env.cfg.kafka.brokers, &topic).await?;
    let ids: Vec<Uuid> = vs.iter().map(|v| v.violation_id).collect();
    sqlx::query(
        "INSERT INTO tally.relay_attempts (topic, end_offsets, violation_ids) VALUES ($1, $2, $3)",
    )
    .bind(&topic)
    .bind(&ends)
    .bind(&ids)
    .execute(&env.pool)
    .await?;
    let producer = tally::dlq::producer(&env.cfg.kafka.brokers, &[])?;
    for v in &vs[..6] {
        let payload = encode_json(v);
        let record = rdkafka::producer::FutureRecord::to(&topic)
            .key(&v.tenant_id)
            .payload(&payload);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("send: {e}"))?;
    }

    let (tx, rx) = tokio::sync::watch::channel(false);
    let cfg = RelayConfig {
        brokers: env.cfg.kafka.brokers.clone(),
        topic: topic.clone(),
        postgres_url: env.cfg.postgres.url.clone(),
        batch: 100,
    };
    let task = tokio::spawn(relay::run(
        cfg,
        env.pool.clone(),
        Arc::new(Metrics::default()),
        rx,
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tally.violations WHERE published_at IS NULL")
                .fetch_one(&env.pool)
                .await?;
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} violations still unpublished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tx.send(true)?;
    task.await??;

    let msgs = read_topic(&env.cfg.kafka.brokers, &topic, 10, Duration::from_secs(30))?;
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        *count
            .entry(v["violation_id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    for v in &vs {
        assert_eq!(
            count.get(&v.violation_id.to_string()),
            Some(&1),
            "violation {} on the topic",
            v.violation_id
        );
    }
    assert_eq!(msgs.len(), 10);
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.relay_attempts")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(attempts, 0, "attempts settled");
    Ok(())
}
