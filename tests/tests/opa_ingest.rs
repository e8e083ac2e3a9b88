//! `tally ingest` against the real broker, ClickHouse and Postgres: real gzip
//! uploads over HTTP, as OPA's decision_logs plugin sends them, to the real
//! process, with `tally run` consuming the policy topic. An accepted upload is on
//! the topic when 200 comes back and lands exactly once in `policy_decisions`,
//! retried or not; refused uploads (auth, size, malformed) produce nothing; an
//! upload Kafka cannot acknowledge is a 503; SIGTERM lets an upload in flight finish.

use std::collections::BTreeSet;
use std::time::Duration;
use tally_tests::opa::*;
use tally_tests::streams::{count, wait_idle};
use tally_tests::*;

const TOKEN: &str = "s3cret-token";

async fn ingest_env(name: &str) -> anyhow::Result<(TestEnv, String)> {
    let addr = free_addr()?;
    let env = test_env(
        name,
        2,
        &[
            ("TALLY__STREAMS__POLICY", "true"),
            ("TALLY__STREAMS__USAGE", "false"),
            ("TALLY__STREAMS__AUDIT", "false"),
            ("TALLY__INGEST__LISTEN", addr.as_str()),
            ("TALLY__INGEST__TOKEN", TOKEN),
            ("TALLY__INGEST__MAX_BODY_BYTES", "65536"),
            ("TALLY__INGEST__MAX_DECOMPRESSED_BYTES", "1048576"),
            ("TALLY__INGEST__MAX_EVENTS", "300"),
        ],
    )
    .await?;
    Ok((env, addr))
}

fn auth() -> String {
    format!("authorization: Bearer {TOKEN}")
}

fn upload(addr: &str, body: &[u8]) -> anyhow::Result<HttpResponse> {
    post(addr, "/logs", &[&auth(), "content-encoding: gzip"], body)
}

fn topic_messages(env: &TestEnv, at_least: usize) -> anyhow::Result<Vec<TopicMessage>> {
    read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.policy.topic,
        at_least,
        Duration::from_secs(20),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opa_uploads_land_exactly_once_and_refused_ones_produce_nothing() -> anyhow::Result<()> {
    let (env, addr) = ingest_env("opa_ingest").await?;
    let mut ingest = TallyProcess(env.spawn_command(&["ingest"], "ingest", &[])?);
    wait_listening(&addr, Duration::from_secs(20))?;

    let first = opa_events("up1", 240, TenantAt::TenantId);
    let body = gzip(array(&first).as_bytes());

    // No token, a wrong one: 401 and nothing produced.
    let r = post(&addr, "/logs", &["content-encoding: gzip"], &body)?;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "www-authenticate" && v == "Bearer"));
    let r = post(
        &addr,
        "/logs",
        &["authorization: Bearer nope", "content-encoding: gzip"],
        &body,
    )?;
    assert_eq!(r.status, 401, "{r:?}");

    // A normal upload: 200, and every event is on the topic by then, as its own
    // bytes, keyed by its tenant.
    let r = upload(&addr, &body)?;
    assert_eq!(
        (r.status, r.body.trim()),
        (200, "accepted 240 events"),
        "{r:?}"
    );
    let on_topic = topic_messages(&env, 240)?;
    assert_eq!(on_topic.len(), 240, "messages on the topic after the 200");
    let sent: BTreeSet<(Option<Vec<u8>>, Vec<u8>)> = first
        .iter()
        .map(|e| {
            (
                e.tenant.clone().map(String::into_bytes),
                e.json.clone().into_bytes(),
            )
        })
        .collect();
    let got: BTreeSet<(Option<Vec<u8>>, Vec<u8>)> = on_topic
        .iter()
        .map(|m| (m.key.clone(), m.payload.clone()))
        .collect();
    assert_eq!(
        got, sent,
        "the topic holds exactly the uploaded events, keyed by tenant"
    );

    // OPA retries an upload it got no 2xx for: the same chunk again.
    let r = upload(&addr, &body)?;
    assert_eq!(r.status, 200, "{r:?}");

    // Refused uploads, each with its reason; none produces anything.
    let bad_gzip = upload(&addr, b"this is not gzip")?;
    assert_eq!(bad_gzip.status, 400, "{bad_gzip:?}");
    assert!(bad_gzip.body.contains("not valid gzip"), "{bad_gzip:?}");
    let mut cut = body.clone();
    cut.truncate(body.len() / 2);
    let r = upload(&addr, &cut)?;
    assert_eq!(r.status, 400, "truncated gzip: {r:?}");
    assert!(r.body.contains("gzip"), "{r:?}");
    let r = upload(&addr, &gzip(first[0].json.as_bytes()))?;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("JSON object, not an array"), "{r:?}");
    let r = upload(&addr, &gzip(format!("[{},", first[0].json).as_bytes()))?;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("malformed JSON array"), "{r:?}");
    let noise: Vec<u8> = (0..70_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let r = upload(&addr, &noise)?;
    assert_eq!(r.status, 413, "compressed body over 64 KiB: {r:?}");
    assert!(r.body.contains("max_body_bytes"), "{r:?}");
    let bomb = gzip(format!("[{}]", " ".repeat(4 << 20)).as_bytes());
    assert!(bomb.len() < 65_536);
    let r = upload(&addr, &bomb)?;
    assert_eq!(r.status, 413, "gzip bomb: {r:?}");
    assert!(r.body.contains("max_decompressed_bytes"), "{r:?}");
    let many = opa_events("many", 301, TenantAt::TenantId);
    let r = upload(&addr, &gzip(array(&many).as_bytes()))?;
    assert_eq!(r.status, 413, "301 events: {r:?}");
    assert!(r.body.contains("more than 300 events"), "{r:?}");
    let r = post(&addr, "/logs", &[&auth(), "content-encoding: br"], &body)?;
    assert_eq!(r.status, 415, "{r:?}");
    let (status, _) = http_get_once(&addr, "/logs")?;
    assert_eq!(status, 405);

    // Events whose tenant cannot be read are forwarded without a key: the
    // pipeline dead-letters them with the reason (and `tally dlq redrive` can
    // bring them back after the mapping is fixed).
    let mut second = opa_events("up2", 4, TenantAt::TenantId);
    let lost = opa_events("lost", 3, TenantAt::Missing);
    second.extend(lost.iter().cloned());
    let r = upload(&addr, &gzip(array(&second).as_bytes()))?;
    assert_eq!(r.status, 200, "{r:?}");
    let on_topic = topic_messages(&env, 487)?;
    assert_eq!(
        on_topic.len(),
        487,
        "240 twice, 7 more, nothing of the refused uploads"
    );
    let unkeyed = on_topic.iter().filter(|m| m.key.is_none()).count();
    assert_eq!(unkeyed, 3);

    let metrics = |series: &str| metric(&addr, series);
    assert_eq!(metrics("tally_ingest_events_total")?, 487.0);
    assert_eq!(metrics("tally_ingest_events_unkeyed_total")?, 3.0);
    assert_eq!(
        metrics("tally_ingest_requests_total{outcome=\"accepted\"}")?,
        3.0
    );
    assert_eq!(
        metrics("tally_ingest_requests_total{outcome=\"unauthorized\"}")?,
        2.0
    );
    assert_eq!(
        metrics("tally_ingest_requests_total{outcome=\"bad_request\"}")?,
        4.0
    );
    assert_eq!(
        metrics("tally_ingest_requests_total{outcome=\"too_large\"}")?,
        3.0
    );
    assert_eq!(
        metrics("tally_ingest_rejected_total{reason=\"decompressed_too_large\"}")?,
        1.0
    );

    // The pipeline counts each decision once: the retried upload's copies are duplicates.
    let mut run = TallyProcess(env.spawn_tally("run")?);
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    terminate(&mut run.0, Duration::from_secs(30))?;
    idle?;
    let want = expected_rows(first.iter().chain(&second));
    assert_eq!(want.len(), 244);
    assert_eq!(decision_rows(&env).await?, want);
    let db = &env.cfg.clickhouse.database;
    let rolled = count(
        &env,
        &format!("SELECT sum(decisions) FROM {db}.policy_decisions_1h"),
    )
    .await?;
    assert_eq!(rolled, 244, "hourly rollup");
    let dead: Vec<(String, i64)> = sqlx::query_as(
        "SELECT error_class, count(*) FROM tally.dead_letters WHERE topic = $1 GROUP BY 1",
    )
    .bind(&env.cfg.policy.topic)
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(dead, vec![("opa_missing_tenant".to_string(), 3)]);
    let duplicates: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.seen_events")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(duplicates, 244, "one claimed key per decision");

    terminate(&mut ingest.0, Duration::from_secs(20))?;
    Ok(())
}

/// Kafka cannot acknowledge: the upload is a 503 (OPA retries it), not a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_kafka_does_not_acknowledge_is_a_503() -> anyhow::Result<()> {
    let (env, addr) = ingest_env("opa_ingest_down").await?;
    let nowhere = free_addr()?;
    let mut ingest = TallyProcess(env.spawn_command(
        &["ingest"],
        "ingest",
        &[
            ("TALLY__KAFKA__BROKERS", nowhere.as_str()),
            ("TALLY__INGEST__PRODUCE_TIMEOUT_MS", "1500"),
            ("TALLY__INGEST__SHUTDOWN_GRACE_MS", "3000"),
        ],
    )?);
    wait_listening(&addr, Duration::from_secs(20))?;
    let events = opa_events("down", 5, TenantAt::TenantId);
    let started = std::time::Instant::now();
    let r = upload(&addr, &gzip(array(&events).as_bytes()))?;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("Kafka acknowledged 0 of 5 events"), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(
            &addr,
            "tally_ingest_requests_total{outcome=\"kafka_unavailable\"}"
        )?,
        1.0
    );
    assert_eq!(metric(&addr, "tally_ingest_events_total")?, 0.0);
    terminate(&mut ingest.0, Duration::from_secs(10))?;
    Ok(())
}

/// SIGTERM while an upload's body is still arriving: the listener closes, the
/// upload finishes with 200 (its events on the topic), the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_upload_in_flight_finish() -> anyhow::Result<()> {
    let (env, addr) = ingest_env("opa_ingest_term").await?;
    let mut ingest = TallyProcess(env.spawn_command(&["ingest"], "ingest", &[])?);
    wait_listening(&addr, Duration::from_secs(20))?;
    let events = opa_events("term", 50, TenantAt::TenantId);
    let body = gzip(array(&events).as_bytes());
    let head = format!(
        "POST /logs HTTP/1.1\r\nhost: {addr}\r\n{}\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\nconnection: close",
        auth(),
        body.len()
    );
    let a = addr.clone();
    let slow =
        std::thread::spawn(move || http_raw(&a, &head, &body, 2, Duration::from_millis(2000)));
    std::thread::sleep(Duration::from_millis(700));
    let pid = ingest.0.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the listener is closed once SIGTERM arrived"
    );
    let r = slow
        .join()
        .map_err(|_| anyhow::anyhow!("upload thread panicked"))??;
    assert_eq!(
        (r.status, r.body.trim()),
        (200, "accepted 50 events"),
        "{r:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = ingest.0.try_wait()? {
            break s;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "ingest did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert_eq!(topic_messages(&env, 50)?.len(), 50);
    Ok(())
}
