//! Infrastructure restarts mid-run: ClickHouse, PostgreSQL and the broker are
//! each restarted while tally works; afterwards every total is still exact.
//!
//! This file holds a single test on purpose: cargo runs test binaries one after
//! another, so no other test sees the servers go away.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::process::Command;
use std::time::Duration;
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_tests::*;

/// Runs a deploy/local script as the owner of the service (the checkout that started it,
/// maybe another one: see `owner`), so that `down` really stops it and `up` restarts it
/// from the same state.
fn local(script: &str, action: &str, state: &str) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg(repo_root().join("deploy/local").join(script))
        .arg(action)
        .env("TALLY_STATE_DIR", state)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "{script} {action} failed");
    Ok(())
}

/// The state dir of the checkout that started the service behind `script`.
fn owner(script: &str) -> anyhow::Result<String> {
    let out = Command::new("bash")
        .arg(repo_root().join("deploy/local").join(script))
        .arg("owner")
        .output()?;
    anyhow::ensure!(out.status.success(), "{script} owner failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Restarts the machine's PostgreSQL cluster (pg_ctlcluster), if it has one.
fn restart_postgres() -> anyhow::Result<bool> {
    let Ok(out) = Command::new("pg_lsclusters").arg("-h").output() else {
        return Ok(false);
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let Some(line) = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("5432"))
    else {
        return Ok(false);
    };
    let mut f = line.split_whitespace();
    let (version, cluster) = (f.next().unwrap_or_default(), f.next().unwrap_or_default());
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, cluster, "restart"])
        .status()?;
    anyhow::ensure!(status.success(), "pg_ctlcluster restart failed");
    Ok(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_postgres_and_broker_restarts_keep_totals_exact() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = test_env(
        "restarts",
        4,
        &[
            ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "1000"),
            ("TALLY__KAFKA__INSTANCE_ID", "restarts-1"),
            ("TALLY__SERVER__LISTEN", listen.as_str()),
            ("TALLY__SERVER__STALL_AFTER_MS", "1500"),
        ],
    )
    .await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(30, change);
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 30_000, 5);
    gen.encoding = Encoding::Mixed;
    gen.malformed = 0.002;
    gen.start = change - ChronoDuration::hours(1);
    let msgs = generate(gen);
    let exp = expected(&msgs, &world);
    // The second half goes out after the broker restart.
    let half = msgs.len() / 2;
    let producer = spawn_producer(&env, &msgs[..half], 1_000);
    let mut tally = env.spawn_tally("run")?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("restarting ClickHouse (handled {})", env.handled().await?);
    // A crash, not a polite stop (18.16 can take a minute to shut down).
    let ch_state = owner("clickhouse.sh")?;
    let pid = std::fs::read_to_string(std::path::Path::new(&ch_state).join("run/clickhouse.pid"))?;
    let killed = Command::new("kill").args(["-KILL", pid.trim()]).status()?;
    anyhow::ensure!(
        killed.success(),
        "could not kill ClickHouse (pid {})",
        pid.trim()
    );
    // With ClickHouse gone and messages waiting, no batch can finish: /health
    // must say so (a stalled consumer must not look healthy).
    let mut stalled = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if http_get(&listen, "/health")
            .map(|(status, _)| status)
            .unwrap_or(0)
            == 503
        {
            stalled = true;
            break;
        }
    }
    local("clickhouse.sh", "up", &ch_state)?;
    assert!(
        stalled,
        "/health never reported the stall while ClickHouse was down"
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    eprintln!("restarting PostgreSQL (handled {})", env.handled().await?);
    let pg_restarted = restart_postgres()?;
    anyhow::ensure!(
        pg_restarted,
        "could not restart PostgreSQL: pg_lsclusters shows no cluster on port 5432, so this test would prove nothing"
    );

    producer.await??;
    eprintln!("restarting the broker (handled {})", env.handled().await?);
    let broker_state = owner("broker.sh")?;
    local("broker.sh", "down", &broker_state)?;
    local("broker.sh", "up", &broker_state)?;
    spawn_producer(&env, &msgs[half..], 2_000).await??;
    let caught_up = env
        .wait_handled(exp.messages as i64, Duration::from_secs(240))
        .await;
    let health = http_get(&listen, "/health");
    terminate(&mut tally, Duration::from_secs(30))?;
    assert_eq!(health?.0, 200, "/health after catching up");
    caught_up?;
    let problems = check_totals(&env, &exp).await?;
    for p in problems.iter().take(20) {
        eprintln!("  {p}");
    }
    assert!(
        problems.is_empty(),
        "{} differences after restarts",
        problems.len()
    );
    Ok(())
}
