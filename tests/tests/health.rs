//! Failures that must not leave the process looking healthy, against the real
//! broker and Postgres: a relay that cannot publish fails `/readyz` (while
//! `/livez` stays 200), shows in `tally_violations_unpublished`, is restarted,
//! and publishes each violation exactly once when it recovers; a topic written
//! by a transactional producer (commit markers the consumer never receives)
//! does not look like lag once everything is counted.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_schemas::sample_compliance_violation;
use tally_tests::servers::free_port;
use tally_tests::*;
use uuid::Uuid;

const READY: &str = "/readyz";
const LIVE: &str = "/livez";

fn status(addr: &str, path: &str) -> u16 {
    http_get_once(addr, path).map(|(s, _)| s).unwrap_or(0)
}

/// Waits until `path` answers `want`; returns the last body.
async fn wait_status(addr: &str, path: &str, want: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let got = http_get_once(addr, path);
        if got.as_ref().is_ok_and(|(s, _)| *s == want) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{path} did not answer {want} within {within:?}; last: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn unpublished(env: &TestEnv) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM tally.violations WHERE published_at IS NULL")
            .fetch_one(&env.pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_that_cannot_publish_fails_readiness_then_publishes_each_violation_once(
) -> anyhow::Result<()> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let env = test_env(
        "healthrelay",
        1,
        &[
            ("TALLY__SERVER__LISTEN", listen.as_str()),
            ("TALLY__SERVER__STALL_AFTER_MS", "1500"),
        ],
    )
    .await?;
    let mut tally = TallyProcess(env.spawn_tally("run")?);
    wait_status(&listen, READY, 200, Duration::from_secs(30)).await?;

    // Finishing a publish (marking the rows, clearing the attempt) fails with
    // an error no retry heals: the relay publishes, then dies with a Fatal
    // error; every restart dies again in its reconciliation.
    sqlx::query(
        "CREATE FUNCTION tally.test_refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'injected: relay cannot finish'; END $$",
    )
    .execute(&env.pool)
    .await?;
    sqlx::query(
        "CREATE TRIGGER test_refuse BEFORE DELETE ON tally.relay_attempts \
         FOR EACH ROW EXECUTE FUNCTION tally.test_refuse()",
    )
    .execute(&env.pool)
    .await?;
    let mut ids = Vec::new();
    for i in 0..8 {
        let mut v = sample_compliance_violation();
        v.violation_id = Uuid::new_v4();
        v.tenant_id = format!("t-{i}");
        v.observed = Decimal::new(i, 2);
        v.detected_at = Utc::now();
        insert_violation(&env.pool, &v).await?;
        ids.push(v.violation_id);
    }

    // While it cannot publish: /readyz 503 naming the relay, the backlog
    // visible, /livez 200 throughout, the process up, the relay restarted.
    let deadline = Instant::now() + Duration::from_secs(25);
    let (mut not_ready, mut backlog_seen, mut restarts) = (None, 0.0, 0.0);
    while Instant::now() < deadline {
        assert_eq!(status(&listen, LIVE), 200, "/livez while the relay fails");
        assert!(tally.alive(), "tally exited while the relay failed");
        if let Ok((503, body)) = http_get_once(&listen, READY) {
            not_ready.get_or_insert(body);
        }
        let gauge = metric(&listen, "tally_violations_unpublished").unwrap_or(0.0);
        backlog_seen = gauge.max(backlog_seen);
        restarts = metric(&listen, "tally_relay_restarts_total").unwrap_or(0.0);
        // (A restarted relay dies again only when it settles its
        // predecessor's attempt, after the attempt's settle deadline, 30 s.)
        if not_ready.is_some() && backlog_seen > 0.0 && restarts >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = not_ready
        .ok_or_else(|| anyhow::anyhow!("{READY} never failed while the relay could not publish"))?;
    assert!(body.contains("relay"), "{READY} body: {body}");
    assert_eq!(backlog_seen, 8.0, "tally_violations_unpublished");
    assert!(restarts >= 1.0, "relay restarted {restarts} times");
    // (tally_relay_alive is 1 again while a restarted relay waits for the
    // settle deadline, so readiness and restarts are what this checks.)
    assert_eq!(unpublished(&env).await?, 8);

    // It recovers: the next restart reconciles what reached the topic.
    sqlx::query("DROP TRIGGER test_refuse ON tally.relay_attempts")
        .execute(&env.pool)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while unpublished(&env).await? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "violations still unpublished after the relay could publish again"
        );
        assert_eq!(status(&listen, LIVE), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_status(&listen, READY, 200, Duration::from_secs(30)).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(&listen, "tally_violations_unpublished")? > 0.0 {
        anyhow::ensure!(Instant::now() < deadline, "gauge did not return to 0");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(&listen, "tally_relay_alive")?, 1.0);

    let msgs = read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.kafka.violation_topic,
        ids.len(),
        Duration::from_secs(30),
    )?;
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        *count
            .entry(v["violation_id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            count.get(&id.to_string()),
            Some(&1),
            "violation {id} on the topic"
        );
    }
    assert_eq!(msgs.len(), ids.len(), "nothing else on the topic");
    terminate(&mut tally.0, Duration::from_secs(30))?;
    Ok(())
}

/// Produces `msgs` in transactions of `per_txn` messages; every third
/// transaction is aborted. Returns the messages of committed transactions.
async fn produce_transactional(
    env: &TestEnv,
    msgs: &[tally_producers::GenMessage],
    per_txn: usize,
) -> anyhow::Result<Vec<tally_producers::GenMessage>> {
    use tokio::task::block_in_place;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set(
            "transactional.id",
            format!("tx-{}", env.cfg.kafka.usage_topic),
        )
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let t = Duration::from_secs(30);
    block_in_place(|| producer.init_transactions(t))?;
    let mut committed = Vec::new();
    for (i, chunk) in msgs.chunks(per_txn).enumerate() {
        producer.begin_transaction()?;
        let mut deliveries = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut record = FutureRecord::<[u8], [u8]>::to(&env.cfg.kafka.usage_topic)
                .payload(m.payload.as_slice());
            if let Some(k) = &m.key {
                record = record.key(k.as_slice());
            }
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?,
            );
        }
        if i % 3 == 1 {
            block_in_place(|| producer.abort_transaction(t))?;
            drop(deliveries); // purged with the transaction
        } else {
            block_in_place(|| producer.commit_transaction(t))?;
            for d in deliveries {
                if !matches!(d.await, Ok(Ok(_))) {
                    anyhow::bail!("a delivery of a committed transaction failed");
                }
            }
            committed.extend_from_slice(chunk);
        }
    }
    Ok(committed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_markers_are_not_lag_once_everything_is_counted() -> anyhow::Result<()> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let env = test_env(
        "healthtxn",
        2,
        &[
            ("TALLY__SERVER__LISTEN", listen.as_str()),
            ("TALLY__SERVER__STALL_AFTER_MS", "1500"),
        ],
    )
    .await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(10, change);
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 1_200, 11);
    gen.encoding = Encoding::Mixed;
    gen.start = change - ChronoDuration::hours(1);
    let msgs = generate(gen);
    let committed = produce_transactional(&env, &msgs, 100).await?;
    let exp = expected(&committed, &world);
    assert!(
        committed.len() < msgs.len(),
        "some transactions were aborted"
    );

    let mut tally = TallyProcess(env.spawn_tally("run")?);
    // Everything committed is counted, nothing aborted is.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let busy: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM tally.batches WHERE state = 'pending') + \
             (SELECT count(*) FROM tally.violations WHERE published_at IS NULL)",
        )
        .fetch_one(&env.pool)
        .await?;
        let problems = check_totals(&env, &exp).await?;
        if problems.is_empty() && busy == 0 {
            break;
        }
        if Instant::now() > deadline {
            for p in problems.iter().take(10) {
                eprintln!("  {p}");
            }
            anyhow::bail!(
                "totals not exact after 90 s ({} differences)",
                problems.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The scenario: the high watermarks are past the offsets of record (markers).
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("group.id", format!("wm-{}", env.cfg.kafka.group_id))
        .create()?;
    let mut beyond = 0;
    for p in 0..2 {
        let (_, high) = tokio::task::block_in_place(|| {
            c.fetch_watermarks(&env.cfg.kafka.usage_topic, p, Duration::from_secs(10))
        })?;
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM tally.consumer_offsets WHERE group_id = $1 AND topic = $2 AND partition = $3",
        )
        .bind(&env.cfg.kafka.group_id)
        .bind(&env.cfg.kafka.usage_topic)
        .bind(p)
        .fetch_optional(&env.pool)
        .await?;
        eprintln!("partition {p}: high watermark {high}, offset of record {next:?}");
        if high > next.unwrap_or(0) {
            beyond += 1;
        }
    }
    assert!(beyond > 0, "no partition ends with a transaction marker");

    // Counted and idle: ready, and it stays ready past the stall threshold.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for _ in 0..4 {
        let (s, body) = http_get_once(&listen, READY)?;
        assert_eq!(s, 200, "{READY} after everything was counted: {body}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(status(&listen, LIVE), 200);
    terminate(&mut tally.0, Duration::from_secs(30))?;
    Ok(())
}
