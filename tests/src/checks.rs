//! Setup and checks shared by the scenario tests: a seeded demo world,
//! violation topic, budget crossings, raw sends, child logs, batch states.

use crate::*;
use std::collections::HashSet;
use std::process::Child;
use std::time::{Duration, Instant};
use tally_producers::World;

/// Seeds a demo world of `tenants` into the env and returns it with a
/// generator of `n` messages of `seed` (`dups` of them re-sends) spread over
/// the two hours around the world's price change.
pub async fn seeded_demo(
    env: &TestEnv,
    tenants: usize,
    n: u64,
    seed: u64,
    dups: f64,
) -> anyhow::Result<(World, tally_producers::GenConfig)> {
    use chrono::{Duration as ChronoDuration, DurationRound, Utc};
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = tally_producers::demo_world(tenants, change);
    env.seed(&world).await?;
    let mut gen = tally_producers::GenConfig::new(world.clone(), n, seed);
    gen.duplicates = dups;
    gen.start = change - ChronoDuration::hours(1);
    gen.span = ChronoDuration::hours(2);
    Ok((world, gen))
}

/// Violations on the topic: every id at most once, and as many as in Postgres.
pub async fn check_violation_topic(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    let in_pg: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.violations")
        .fetch_one(&env.pool)
        .await?;
    let msgs = read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.kafka.violation_topic,
        in_pg as usize,
        Duration::from_secs(60),
    )?;
    let mut problems = Vec::new();
    let mut ids = HashSet::new();
    for m in &msgs {
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        let id = v["violation_id"].as_str().unwrap_or_default().to_string();
        if !ids.insert(id.clone()) {
            problems.push(format!("violation {id} appears twice on the topic"));
        }
    }
    if msgs.len() as i64 != in_pg {
        problems.push(format!(
            "violation topic has {} messages, postgres has {in_pg} violations",
            msgs.len()
        ));
    }
    Ok(problems)
}

pub async fn check_budgets(
    env: &TestEnv,
    exp: &Expected,
    world: &World,
) -> anyhow::Result<Vec<String>> {
    let expected = expected_budget_crossings(exp, world);
    let actual = actual_budget_crossings(&env.pool).await?;
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    for a in &actual {
        if !seen.insert(a.clone()) {
            problems.push(format!("budget crossing {a:?} recorded twice"));
        }
    }
    let actual: std::collections::BTreeSet<_> = actual.into_iter().collect();
    for e in expected.difference(&actual) {
        problems.push(format!("budget crossing {e:?} missing"));
    }
    for a in actual.difference(&expected) {
        problems.push(format!("budget crossing {a:?} not expected"));
    }
    if expected.is_empty() {
        problems
            .push("test setup: no budget crossings expected; the test would prove nothing".into());
    }
    Ok(problems)
}

/// Sends one raw message to the test's usage topic (optionally to a partition
/// and with an explicit CreateTime in milliseconds), waiting for the ack.
pub async fn send_raw(
    env: &TestEnv,
    partition: Option<i32>,
    key: &[u8],
    payload: &[u8],
    timestamp_ms: Option<i64>,
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("acks", "all")
        .create()?;
    let mut rec = FutureRecord::to(&env.cfg.kafka.usage_topic)
        .key(key)
        .payload(payload);
    if let Some(p) = partition {
        rec = rec.partition(p);
    }
    if let Some(ts) = timestamp_ms {
        rec = rec.timestamp(ts);
    }
    producer
        .send(rec, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("send: {e}"))?;
    Ok(())
}

impl TestEnv {
    /// The stderr log of a child started with `spawn_tally(log_name)`.
    pub fn log_text(&self, log_name: &str) -> String {
        std::fs::read_to_string(
            repo_root()
                .join(".local/logs")
                .join(format!("{}-{log_name}.log", self.name)),
        )
        .unwrap_or_default()
    }

    /// Ids of the batches that are pending now.
    pub async fn pending_batches(&self) -> anyhow::Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT batch_id FROM tally.batches WHERE state = 'pending' ORDER BY batch_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// (state, attempts) of a batch.
    pub async fn batch_state(&self, batch_id: i64) -> anyhow::Result<(String, i32)> {
        Ok(
            sqlx::query_as("SELECT state, attempts FROM tally.batches WHERE batch_id = $1")
                .bind(batch_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

/// Waits up to `within` for a child to exit on its own; None if it did not.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Waits up to `within` for a child to exit; kills it (and fails) if it does not.
pub fn wait_exit_or_kill(
    child: &mut Child,
    within: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            kill9(child);
            anyhow::bail!("tally did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child's log without ANSI colour codes.
/// Waits until child log `name` shows `line` (e.g. `failpoint X fired`);
/// fails with the log after `within`.
pub async fn wait_log_line(
    env: &TestEnv,
    name: &str,
    line: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !log_plain(env, name).contains(line) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "`{line}` never appeared in the log:\n{}",
            log_plain(env, name)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub fn log_plain(env: &TestEnv, name: &str) -> String {
    let raw =
        std::fs::read_to_string(repo_root().join(format!(".local/logs/{}-{name}.log", env.name)))
            .unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
