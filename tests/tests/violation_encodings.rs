//! Violations in every output encoding, against the real broker: `tally run` with
//! `kafka.violation_encoding` = json | avro and `kafka.violation_cloudevents` off | on
//! publishes each violation once, its payload decoding back to the same violation
//! (JSON, or Avro single-object with the `compliance.violation.v1` fingerprint), keyed
//! by tenant, with exactly the documented headers (`tally.violation_id`, `tally.rule`,
//! and in CloudEvents binary mode `ce_specversion`, `ce_id`, `ce_source`, `ce_type`,
//! `ce_subject`, `ce_time`, `content-type`). And the relay's exactly-once
//! reconciliation reads violation ids back from a topic holding every encoding at
//! once (after a configuration change), so nothing found there is published again.

use chrono::{DateTime, SubsecRound, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::engine::relay::{self, RelayConfig};
use tally::engine::violation_wire::{ViolationEncoding, ViolationOutput};
use tally::metrics::Metrics;
use tally::sinks::kafka_client::KafkaClient;
use tally_schemas::apache_avro::Schema;
use tally_schemas::{
    current_schema_text, encode_json, encode_single_object, rabin_fingerprint,
    sample_compliance_violation, ComplianceViolation, Decoder,
};
use tally_tests::*;
use uuid::Uuid;

const SOURCE: &str = "https://tally.example.com/test";

/// A violation as the outbox stores it (timestamps to the microsecond).
fn violation(tenant: &str, i: i64) -> ComplianceViolation {
    let mut v = sample_compliance_violation();
    let now = Utc::now().trunc_subsecs(6);
    v.violation_id = Uuid::new_v4();
    v.tenant_id = tenant.into();
    v.rule = format!("rule_{i}");
    v.observed = Decimal::new(2_500_000_000_123 + i, 9);
    v.window_start = now - chrono::Duration::minutes(5);
    v.window_end = now;
    v.detected_at = now;
    v
}

async fn unpublished(env: &TestEnv) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM tally.violations WHERE published_at IS NULL")
            .fetch_one(&env.pool)
            .await?,
    )
}

async fn wait_all_published(env: &TestEnv, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = unpublished(env).await?;
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} violations still unpublished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The headers a message of `v` must have, exactly.
fn expected_headers(v: &ComplianceViolation, out: &ViolationOutput) -> BTreeMap<String, String> {
    let id = v.violation_id.to_string();
    let mut h = BTreeMap::from([
        ("tally.violation_id".to_string(), id.clone()),
        ("tally.rule".to_string(), v.rule.clone()),
    ]);
    if out.cloudevents {
        let content_type = match out.encoding {
            ViolationEncoding::Json => "application/json",
            ViolationEncoding::Avro => "application/avro",
        };
        for (k, value) in [
            ("ce_specversion", "1.0"),
            ("ce_id", id.as_str()),
            ("ce_source", SOURCE),
            ("ce_type", "tally.compliance.violation.v1"),
            ("ce_subject", v.tenant_id.as_str()),
            ("content-type", content_type),
        ] {
            h.insert(k.into(), value.into());
        }
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_violation_encoding_decodes_back_with_its_headers() -> anyhow::Result<()> {
    let env = test_env("violation_enc", 2, &[]).await?;
    let combos = [
        (ViolationEncoding::Json, false),
        (ViolationEncoding::Avro, false),
        (ViolationEncoding::Json, true),
        (ViolationEncoding::Avro, true),
    ];
    let mut sent: HashMap<Uuid, (ComplianceViolation, ViolationOutput)> = HashMap::new();
    for (round, (encoding, cloudevents)) in combos.into_iter().enumerate() {
        let out = ViolationOutput {
            encoding,
            cloudevents,
            source: SOURCE.into(),
        };
        for i in 0..3 {
            let v = violation(&format!("t-{round}-{i}"), i);
            insert_violation(&env.pool, &v).await?;
            sent.insert(v.violation_id, (v, out.clone()));
        }
        let ce = cloudevents.to_string();
        let mut tally = env.spawn_tally_with(
            &format!("run-{round}"),
            &[
                ("TALLY__KAFKA__VIOLATION_ENCODING", encoding.as_str()),
                ("TALLY__KAFKA__VIOLATION_CLOUDEVENTS", ce.as_str()),
                ("TALLY__KAFKA__VIOLATION_CLOUDEVENTS_SOURCE", SOURCE),
            ],
        )?;
        let done = wait_all_published(&env, Duration::from_secs(60)).await;
        terminate(&mut tally, Duration::from_secs(30))?;
        done?;
    }

    let fingerprint = rabin_fingerprint(&Schema::parse_str(
        current_schema_text("compliance.violation.v1").unwrap_or_default(),
    )?);
    let msgs = read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.kafka.violation_topic,
        sent.len(),
        Duration::from_secs(30),
    )?;
    let decoder = Decoder::new();
    let mut seen = BTreeSet::new();
    for m in &msgs {
        let back: ComplianceViolation = decoder.decode(&m.payload)?;
        let (v, out) = sent
            .get(&back.violation_id)
            .ok_or_else(|| anyhow::anyhow!("unexpected violation {}", back.violation_id))?;
        let what = format!("{:?} cloudevents={}", out.encoding, out.cloudevents);
        assert!(seen.insert(v.violation_id), "{what}: published twice");
        assert_eq!(&back, v, "{what}: decodes back to the same violation");
        match out.encoding {
            ViolationEncoding::Json => {
                assert_eq!(m.payload.first(), Some(&b'{'), "{what}");
                let json: serde_json::Value = serde_json::from_slice(&m.payload)?;
                assert_eq!(json["violation_id"], v.violation_id.to_string(), "{what}");
            }
            ViolationEncoding::Avro => {
                assert_eq!(&m.payload[..2], &[0xC3, 0x01], "{what}");
                assert_eq!(&m.payload[2..10], &fingerprint.to_le_bytes(), "{what}");
                assert_eq!(m.payload, encode_single_object(v), "{what}");
            }
        }
        assert_eq!(
            m.key.as_deref(),
            Some(v.tenant_id.as_bytes()),
            "{what}: key"
        );
        let mut headers: BTreeMap<String, String> = m.headers.clone().into_iter().collect();
        if out.cloudevents {
            let time = headers.remove("ce_time").unwrap_or_default();
            assert_eq!(
                DateTime::parse_from_rfc3339(&time).map(|t| t.with_timezone(&Utc)),
                Ok(v.detected_at),
                "{what}: ce_time {time:?}"
            );
        }
        assert_eq!(headers, expected_headers(v, out), "{what}: headers");
    }
    assert_eq!(seen.len(), sent.len(), "every violation published");
    assert_eq!(msgs.len(), sent.len(), "and nothing else");
    Ok(())
}

/// A relay died after sending: the ids of its attempt are on the topic in every
/// encoding a tally may have written (JSON and Avro, with and without headers, a
/// payload of a schema this tally does not know with only its CloudEvents id). The
/// new leader, publishing Avro CloudEvents, finds them all and publishes only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reconciles_a_topic_of_mixed_encodings() -> anyhow::Result<()> {
    let env = test_env("violation_scan", 2, &[]).await?;
    let topic = env.cfg.kafka.violation_topic.clone();
    let mut vs = Vec::new();
    for i in 0..10 {
        let v = violation(&format!("t-{i}"), i);
        insert_violation(&env.pool, &v).await?;
        vs.push(v);
    }
    let kafka = KafkaClient::new(&env.cfg.kafka);
    let ends = relay::end_offsets(&kafka, &topic).await?;
    let ids: Vec<Uuid> = vs.iter().map(|v| v.violation_id).collect();
    sqlx::query(
        "INSERT INTO tally.relay_attempts (topic, end_offsets, violation_ids, settle_after) VALUES ($1, $2, $3, now())",
    )
    .bind(&topic)
    .bind(&ends)
    .bind(&ids)
    .execute(&env.pool)
    .await?;
    let avro_ce = ViolationOutput {
        encoding: ViolationEncoding::Avro,
        cloudevents: true,
        source: SOURCE.into(),
    };
    let producer = tally::engine::dlq::producer(&kafka, &[])?;
    for (i, v) in vs[..6].iter().enumerate() {
        let (payload, headers) = match i {
            0 | 1 => (encode_json(v), OwnedHeaders::new()), // an old tally, headers stripped
            2 | 3 => (encode_single_object(v), OwnedHeaders::new()),
            4 => (avro_ce.payload(v), avro_ce.kafka_headers(v)),
            // A later schema version this tally cannot decode: its id is in ce_id only.
            _ => {
                let mut p = encode_single_object(v);
                p[2..10].copy_from_slice(&0x0123_4567_89ab_cdef_u64.to_le_bytes());
                let id = v.violation_id.to_string();
                let h = OwnedHeaders::new().insert(Header {
                    key: "ce_id",
                    value: Some(&id),
                });
                (p, h)
            }
        };
        let record = FutureRecord::to(&topic)
            .key(&v.tenant_id)
            .payload(&payload)
            .headers(headers);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("send: {e}"))?;
    }

    let (tx, rx) = tokio::sync::watch::channel(false);
    let cfg = RelayConfig {
        kafka,
        topic: topic.clone(),
        postgres: tally::sinks::postgres::pg_options(&env.cfg)?,
        batch: 100,
        output: avro_ce,
    };
    let task = tokio::spawn(relay::run(
        cfg,
        env.pool.clone(),
        Arc::new(Metrics::default()),
        rx,
    ));
    let published = wait_all_published(&env, Duration::from_secs(60)).await;
    tx.send(true)?;
    task.await??;
    published?;

    let msgs = read_topic(&env.cfg.kafka.brokers, &topic, 10, Duration::from_secs(30))?;
    let mut count: HashMap<Uuid, usize> = HashMap::new();
    let decoder = Decoder::new();
    for m in &msgs {
        let id = match decoder.decode::<ComplianceViolation>(&m.payload) {
            Ok(v) => v.violation_id,
            Err(_) => m
                .headers
                .get("ce_id")
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
        };
        *count.entry(id).or_default() += 1;
    }
    for (i, v) in vs.iter().enumerate() {
        assert_eq!(
            count.get(&v.violation_id),
            Some(&1),
            "violation {i} on the topic once"
        );
    }
    assert_eq!(msgs.len(), 10);
    // The four the relay sent itself are Avro CloudEvents.
    let fresh: Vec<_> = msgs
        .iter()
        .filter(|m| m.headers.contains_key("ce_type"))
        .collect();
    assert_eq!(
        fresh.len(),
        5,
        "one pre-existing and four new Avro CloudEvents"
    );
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.relay_attempts")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(attempts, 0, "attempts settled");
    Ok(())
}
