//! The outbox relay against the real broker and Postgres: a publish attempt that
//! died after sending (ids already on the topic, rows not marked) is reconciled
//! by reading the topic; two relays that both believe they lead (a lock
//! connection terminated mid-publish) send disjoint rows; a new leader waits
//! out a send still in flight before reading the topic. No violation id is
//! ever published twice.

use chrono::Utc;
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::engine::relay::{self, RelayConfig};
use tally::metrics::Metrics;
use tally::sinks::kafka_client::KafkaClient;
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
    // before marking them published, long enough ago that its delivery
    // window is over (settle_after now).
    let ends = relay::end_offsets(&KafkaClient::new(&env.cfg.kafka), &topic).await?;
    let ids: Vec<Uuid> = vs.iter().map(|v| v.violation_id).collect();
    sqlx::query(
        "INSERT INTO tally.relay_attempts (topic, end_offsets, violation_ids, settle_after) VALUES ($1, $2, $3, now())",
    )
    .bind(&topic)
    .bind(&ends)
    .bind(&ids)
    .execute(&env.pool)
    .await?;
    let producer = tally::engine::dlq::producer(&KafkaClient::new(&env.cfg.kafka), &[])?;
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
        kafka: KafkaClient::new(&env.cfg.kafka),
        topic: topic.clone(),
        postgres: tally::sinks::postgres::pg_options(&env.cfg)?,
        batch: 100,
        output: Default::default(),
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

/// Puts `n` violations straight into the outbox: a backlog the relay needs
/// many rounds for.
async fn insert_backlog(env: &TestEnv, n: i64) -> anyhow::Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO tally.violations (violation_id, rule, severity, tenant_id, subject_type, subject_id, \
         window_start, window_end, observed, threshold, evidence_event_ids, detected_at, message) \
         SELECT gen_random_uuid(), 'unknown_tenant', 'medium', 't-' || (i % 37), 'tenant', 't-' || (i % 37), \
                now(), now(), 1, 0, '{}', now() + i * interval '1 microsecond', 'backlog ' || i \
         FROM generate_series(1, $1) AS i RETURNING violation_id",
    )
    .bind(n)
    .fetch_all(&env.pool)
    .await?)
}

async fn published(env: &TestEnv) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM tally.violations WHERE published_at IS NOT NULL")
            .fetch_one(&env.pool)
            .await?,
    )
}

/// The relay lock's holder in this test's database: (backend pid, application_name).
async fn relay_lock_holder(env: &TestEnv) -> anyhow::Result<Option<(i32, String)>> {
    // pg_try_advisory_lock(int8): classid = high 32 bits, objid = low 32 bits.
    Ok(sqlx::query_as(
        "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND a.datname = current_database() \
           AND l.objid::bigint = (hashtext('tally-relay:' || $1)::bigint & 4294967295)",
    )
    .bind(&env.cfg.kafka.violation_topic)
    .fetch_optional(&env.pool)
    .await?)
}

fn log_of(env: &TestEnv, name: &str) -> String {
    std::fs::read_to_string(repo_root().join(format!(".local/logs/{}-{name}.log", env.name)))
        .unwrap_or_default()
}

async fn wait_published(env: &TestEnv, n: i64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let done = published(env).await?;
        if done >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out: {done} of {n} violations published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every id exactly once on the topic, nothing else there, every row published,
/// no attempt or claim left.
async fn assert_published_once(env: &TestEnv, ids: &[Uuid]) -> anyhow::Result<()> {
    let topic = &env.cfg.kafka.violation_topic;
    let msgs = read_topic(
        &env.cfg.kafka.brokers,
        topic,
        ids.len(),
        Duration::from_secs(60),
    )?;
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        *count
            .entry(v["violation_id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    let twice = count.values().filter(|n| **n > 1).count();
    let missing = ids
        .iter()
        .filter(|id| !count.contains_key(&id.to_string()))
        .count();
    assert_eq!(
        (twice, missing, msgs.len()),
        (0, 0, ids.len()),
        "(ids sent more than once, ids missing, messages) on the topic"
    );
    let left: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tally.violations WHERE published_at IS NULL), \
                (SELECT count(*) FROM tally.violations WHERE published_at IS NULL AND attempt_id IS NOT NULL), \
                (SELECT count(*) FROM tally.relay_attempts)",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(left, (0, 0, 0), "(unpublished, claimed, attempts) left");
    Ok(())
}

/// Two `tally run` processes share one outbox with a backlog of thousands. The
/// leader's lock connection is terminated mid-publish (until the standby leads),
/// so for a while both believe they lead: still every id goes out exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_through_a_leadership_change_publish_each_violation_once() -> anyhow::Result<()>
{
    let mut env = test_env("relay_two", 1, &[]).await?;
    let ids = insert_backlog(&env, 8000).await?;
    // Every round (1000 rows in `tally run`) holds on 800 ms before marking.
    env.env.push((
        "TALLY_FAILPOINTS".into(),
        "relay_after_publish=sleep(800)".into(),
    ));
    let mut a = env.spawn_tally("a")?;
    wait_published(&env, 1000, Duration::from_secs(60)).await?;
    let mut b = env.spawn_tally("b")?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Take the lock away from A until B leads (A may win the lock back).
    let mut killed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log_of(&env, "b").contains("violation relay: leader") {
        anyhow::ensure!(Instant::now() < deadline, "the standby relay never led");
        if let Some((pid, app)) = relay_lock_holder(&env).await? {
            if !app.ends_with(&format!(":{}", b.id())) {
                sqlx::query("SELECT pg_terminate_backend($1)")
                    .bind(pid)
                    .execute(&env.pool)
                    .await?;
                killed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let at_change = published(&env).await?;
    eprintln!("lock connections terminated: {killed}; published when B led: {at_change}");
    assert!(killed >= 1);
    assert!(
        at_change < 8000,
        "the backlog ran out before the leadership changed ({at_change})"
    );
    wait_published(&env, 8000, Duration::from_secs(180)).await?;
    // Let any late duplicate land before reading the topic.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        a.try_wait()?.is_none() && b.try_wait()?.is_none(),
        "both still running"
    );
    terminate(&mut a, Duration::from_secs(30))?;
    terminate(&mut b, Duration::from_secs(30))?;
    assert_published_once(&env, &ids).await
}

/// A leader claims a batch, stalls for `stall_ms` before sending, and its lock
/// connection is terminated meanwhile, so a standby takes over; then the old
/// leader sends (if it still may) and dies before marking. The new leader must
/// not read the topic for that attempt before the attempt's sends have all
/// landed or failed, or it would miss them and publish them a second time.
async fn stalled_leader(name: &str, stall_ms: u64) -> anyhow::Result<()> {
    let mut env = test_env(name, 1, &[]).await?;
    let ids = insert_backlog(&env, 3000).await?;
    env.env.push((
        "TALLY_FAILPOINTS".into(),
        format!("relay_before_send=sleep({stall_ms})@2;relay_after_publish=abort@2"),
    ));
    let mut a = env.spawn_tally("a")?;
    env.env.pop(); // only A stalls and dies
    wait_published(&env, 1000, Duration::from_secs(60)).await?;
    let mut b = env.spawn_tally("b")?;
    wait_log_line(
        &env,
        "a",
        "failpoint relay_before_send fired",
        Duration::from_secs(30),
    )
    .await?;
    let (pid, _) = relay_lock_holder(&env)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no relay lock holder"))?;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&env.pool)
        .await?;
    wait_log_line(
        &env,
        "b",
        "violation relay: leader",
        Duration::from_secs(30),
    )
    .await?;
    wait_log_line(
        &env,
        "a",
        "failpoint relay_after_publish fired",
        Duration::from_secs(60),
    )
    .await?;
    let _ = a.wait();
    wait_published(&env, 3000, Duration::from_secs(180)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    terminate(&mut b, Duration::from_secs(30))?;
    assert_published_once(&env, &ids).await
}

/// The old leader wakes within its enqueue window and sends while the new
/// leader leads: the new leader waits out the delivery window, then finds
/// those sends on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_leader_waits_out_a_send_still_in_flight() -> anyhow::Result<()> {
    let window = u64::try_from(relay::ENQUEUE_WINDOW.as_millis())?;
    stalled_leader("relay_inflight", window - 500).await
}

/// The old leader wakes after its enqueue window: it must not send at all
/// (the new leader may already have settled the attempt and sent its rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leader_does_not_send_after_its_window() -> anyhow::Result<()> {
    let window = u64::try_from(relay::ENQUEUE_WINDOW.as_millis())?;
    stalled_leader("relay_stalled", window + 3000).await
}
