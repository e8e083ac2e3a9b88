//! The policy-decision and audit-event streams on the real broker, ClickHouse
//! and Postgres, beside the usage stream: exact rows and rollups, each
//! violation once, personal identifiers never stored, and every tenant's
//! Merkle log identical to one rebuilt from the produced events; then crashes
//! at the named failpoints with the audit stream running, and the logs neither
//! fork nor renumber.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::time::Duration;
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_tests::streams::*;
use tally_tests::*;

async fn streams_env(name: &str, extra: &[(&str, &str)]) -> anyhow::Result<(TestEnv, String)> {
    let mut all = vec![
        ("TALLY__STREAMS__POLICY", "true"),
        ("TALLY__STREAMS__AUDIT", "true"),
        ("TALLY__AUDIT__CHECKPOINT_INTERVAL_MS", "2000"),
    ];
    all.extend_from_slice(extra);
    let env = test_env(name, 2, &all).await?;
    let rules = setup_streams(&env).await?;
    Ok((env, rules))
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_and_audit_streams_beside_usage_count_exactly_and_logs_match_the_oracle(
) -> anyhow::Result<()> {
    let (env, rules) = streams_env("streams_exact", &[]).await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(8, change);
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 2_000, 5);
    gen.encoding = Encoding::Mixed;
    gen.duplicates = 0.05;
    gen.malformed = 0.01;
    gen.start = change - ChronoDuration::hours(1);
    gen.span = ChronoDuration::hours(2);
    let usage = generate(gen);
    let exp = expected(&usage, &world);
    produce(&env, &usage, None).await?;
    let policy = policy_traffic(1_500, 3);
    let audit = audit_traffic(1_500, 3);
    produce_to(&env, &env.cfg.policy.topic, &policy).await?;
    produce_to(&env, &env.cfg.audit.topic, &audit).await?;
    let mut tally = env.spawn_tally_with("run", &[("TALLY_CONFIG", rules.as_str())])?;
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    // An idle log's checkpoint is re-signed (interval 2 s in this test).
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.audit_checkpoints")
        .fetch_one(&env.pool)
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.audit_checkpoints")
        .fetch_one(&env.pool)
        .await?;
    terminate(&mut tally, Duration::from_secs(30))?;
    idle?;
    let mut problems = check_streams(&env, &policy, &audit).await?;
    problems.extend(check_totals(&env, &exp).await?);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        after > before,
        "idle logs were not re-signed ({before} -> {after})"
    );
    let published = read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.audit.checkpoint_topic,
        before as usize,
        Duration::from_secs(30),
    )?;
    assert!(
        published.len() as i64 >= before,
        "{} checkpoints on the topic, {before} signed",
        published.len()
    );
    Ok(())
}

/// Whether a crash at this point leaves the batch pending.
fn leaves_pending(point: &str) -> bool {
    point != "after_commit"
}

async fn audit_crash_at(point: &'static str) -> anyhow::Result<()> {
    let name = format!("sfp_{}", point.replace('_', ""));
    let (env, rules) = streams_env(
        &name,
        &[
            ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "300"),
            ("TALLY__PIPELINE__TAKEOVER_GRACE_MS", "300"),
            ("TALLY__KAFKA__INSTANCE_ID", "sfp"),
        ],
    )
    .await?;
    let policy = policy_traffic(800, 11);
    let audit = audit_traffic(1_200, 11);
    produce_to(&env, &env.cfg.audit.topic, &audit).await?;
    produce_to(&env, &env.cfg.policy.topic, &policy).await?;
    // Armed in the audit stream only: the policy stream runs on meanwhile.
    let spec = format!("audit.{point}=abort@2");
    let mut crashed = env.spawn_tally_with(
        "crash",
        &[
            ("TALLY_FAILPOINTS", spec.as_str()),
            ("TALLY_CONFIG", rules.as_str()),
        ],
    )?;
    if wait_exit(&mut crashed, Duration::from_secs(90)).is_none() {
        kill9(&mut crashed);
    }
    assert!(
        env.log_text("crash")
            .contains(&format!("failpoint {point} fired")),
        "{point}: the failpoint was never reached"
    );
    let pending = env.pending_batches().await?;
    let audit_pending: Vec<i64> = sqlx::query_scalar(
        "SELECT batch_id FROM tally.batches WHERE state = 'pending' AND topic = $1",
    )
    .bind(&env.cfg.audit.topic)
    .fetch_all(&env.pool)
    .await?;
    if leaves_pending(point) {
        assert!(
            !audit_pending.is_empty(),
            "{point}: the crash left no pending audit batch (pending: {pending:?})"
        );
    }
    let mut again = env.spawn_tally_with("again", &[("TALLY_CONFIG", rules.as_str())])?;
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    terminate(&mut again, Duration::from_secs(30))?;
    idle?;
    for b in pending {
        let (state, attempts) = env.batch_state(b).await?;
        assert_eq!(state, "done", "{point}: batch {b} was not replayed");
        assert!(attempts >= 2, "{point}: batch {b} done without a replay");
    }
    let problems = check_streams(&env, &policy, &audit).await?;
    assert!(problems.is_empty(), "{point}: {problems:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_policy_crash_after_claim() -> anyhow::Result<()> {
    audit_crash_at("after_claim").await
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_policy_crash_after_a_clickhouse_table() -> anyhow::Result<()> {
    audit_crash_at("after_clickhouse_table").await
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_policy_crash_before_commit() -> anyhow::Result<()> {
    audit_crash_at("before_commit").await
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_policy_crash_after_commit() -> anyhow::Result<()> {
    audit_crash_at("after_commit").await
}
