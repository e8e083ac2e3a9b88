//! Sink outages while traffic flows: ClickHouse down, then Postgres down, on
//! PRIVATE servers (`tally_tests::servers`; the shared ones are never stopped).
//! tally must stay up (no crash loop: its circuit breakers pause consumption
//! and probe), `/livez` must answer 200 throughout, `/readyz` 503 during each
//! outage and 200 after, and every total must be exact afterwards.
//!
//! `make test` runs 15 s outages; `make test-chaos` runs the 60 s ClickHouse and
//! 30 s Postgres outages (`--ignored`).

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::time::{Duration, Instant};
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_tests::servers::{free_port, PrivateClickHouse, PrivatePostgres};
use tally_tests::*;

/// What was seen while a server was down.
#[derive(Debug, Default)]
struct Seen {
    polls: u32,
    not_ready: u32,
    /// /readyz answered 200 after it had failed (a flapping readiness).
    ready_again: u32,
    circuit_open: bool,
    reasons: Vec<String>,
}

/// Polls the health endpoints for `down`; /livez must answer 200 and the
/// process must stay up the whole time.
async fn watch_outage(
    listen: &str,
    tally: &mut TallyProcess,
    sink: &str,
    down: Duration,
) -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    let until = Instant::now() + down;
    let series = format!("tally_sink_circuit_open{{sink=\"{sink}\"}}");
    while Instant::now() < until {
        anyhow::ensure!(tally.alive(), "tally exited during the {sink} outage");
        let live = http_get_once(listen, "/livez");
        anyhow::ensure!(
            live.as_ref().is_ok_and(|(s, _)| *s == 200),
            "/livez during the {sink} outage: {live:?}"
        );
        seen.polls += 1;
        match http_get_once(listen, "/readyz") {
            Ok((503, body)) => {
                seen.not_ready += 1;
                for r in body.lines() {
                    let r = r.split(" for ").next().unwrap_or(r).to_string();
                    if !seen.reasons.contains(&r) {
                        seen.reasons.push(r);
                    }
                }
            }
            Ok((200, _)) if seen.not_ready > 0 => seen.ready_again += 1,
            _ => {}
        }
        if metric(listen, &series).is_ok_and(|v| v == 1.0) {
            seen.circuit_open = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("{sink} outage: {seen:?}");
    Ok(seen)
}

async fn wait_ready(
    listen: &str,
    tally: &mut TallyProcess,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        anyhow::ensure!(tally.alive(), "tally exited while recovering");
        anyhow::ensure!(http_get_once(listen, "/livez")?.0 == 200, "/livez");
        if http_get_once(listen, "/readyz")?.0 == 200 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "/readyz not 200 within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn outage_run(
    name: &str,
    ch_down: Duration,
    pg_down: Duration,
    count: u64,
    rate: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut ch = PrivateClickHouse::start()?;
    let pg = PrivatePostgres::start()?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let env = test_env_on(
        name,
        4,
        &[
            ("TALLY__SERVER__LISTEN", listen.as_str()),
            ("TALLY__SERVER__STALL_AFTER_MS", "2000"),
            ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "500"),
            ("TALLY__PIPELINE__CIRCUIT_MAX_BACKOFF_MS", "2000"),
            // Sink writes must not depend on it any more (the old code gave
            // up after this many retries and exited: a crash loop).
            ("TALLY__PIPELINE__MAX_RETRIES", "3"),
        ],
        &pg.url("postgres"),
        &ch.url(),
    )
    .await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(20, change);
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), count, 7);
    gen.encoding = Encoding::Mixed;
    gen.malformed = 0.003;
    gen.start = change - ChronoDuration::hours(1);
    let msgs = generate(gen);
    let exp = expected(&msgs, &world);
    let producer = spawn_producer(&env, &msgs, rate);
    let mut tally = TallyProcess(env.spawn_tally("run")?);

    // Working first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.handled().await? == 0 {
        anyhow::ensure!(Instant::now() < deadline, "nothing handled within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_ready(&listen, &mut tally, Duration::from_secs(30)).await?;

    eprintln!(
        "killing ClickHouse for {ch_down:?} (handled {})",
        env.handled().await?
    );
    ch.kill();
    let seen = watch_outage(&listen, &mut tally, "clickhouse", ch_down).await?;
    ch.restart()?;
    anyhow::ensure!(
        seen.not_ready > 0,
        "/readyz never failed while ClickHouse was down"
    );
    anyhow::ensure!(seen.circuit_open, "the ClickHouse circuit never opened");
    wait_ready(&listen, &mut tally, Duration::from_secs(90)).await?;
    eprintln!("ClickHouse back; ready after {:?}", started.elapsed());

    eprintln!(
        "stopping Postgres for {pg_down:?} (handled {})",
        env.handled().await?
    );
    pg.stop()?;
    let seen = watch_outage(&listen, &mut tally, "postgres", pg_down).await?;
    pg.start_again()?;
    anyhow::ensure!(
        seen.not_ready > 0,
        "/readyz never failed while Postgres was down"
    );
    wait_ready(&listen, &mut tally, Duration::from_secs(90)).await?;
    eprintln!("Postgres back; ready after {:?}", started.elapsed());

    producer.await??;
    env.wait_handled(exp.messages as i64, Duration::from_secs(180))
        .await?;
    anyhow::ensure!(tally.alive(), "tally exited");
    let problems = check_totals(&env, &exp).await?;
    for p in problems.iter().take(20) {
        eprintln!("  {p}");
    }
    assert!(
        problems.is_empty(),
        "{} differences after the outages",
        problems.len()
    );
    wait_ready(&listen, &mut tally, Duration::from_secs(30)).await?;
    terminate(&mut tally.0, Duration::from_secs(30))?;
    eprintln!("{name}: {count} messages, done in {:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_and_postgres_down_15s_tally_stays_up_totals_exact() -> anyhow::Result<()> {
    outage_run(
        "outage15",
        Duration::from_secs(15),
        Duration::from_secs(15),
        16_000,
        400,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: make test-chaos"]
async fn chaos_clickhouse_down_60s_postgres_down_30s_tally_stays_up_totals_exact(
) -> anyhow::Result<()> {
    outage_run(
        "outage60",
        Duration::from_secs(60),
        Duration::from_secs(30),
        36_000,
        300,
    )
    .await
}
