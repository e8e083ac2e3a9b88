//! A crash at every named boundary of the state machine: for each failpoint,
//! tally aborts there (as on kill -9: no cleanup), a fresh instance takes
//! over, and every store is compared with totals computed from what was sent.
//! Each test asserts that the failpoint fired and, where the crash left a
//! batch pending, that the replay path ran (the batch is done with at least
//! two attempts).

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::time::Duration;
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_tests::*;

/// Whether a crash at this point leaves the batch pending (claimed, not committed).
fn leaves_pending(point: &str) -> bool {
    !matches!(
        point,
        "after_dlq_ack" | "after_commit" | "relay_after_publish"
    )
}

async fn crash_at(point: &'static str, hit: u32) -> anyhow::Result<()> {
    let name = format!("fp_{}", point.replace('_', ""));
    let env = test_env(
        &name,
        2,
        &[
            ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "700"),
            ("TALLY__PIPELINE__TAKEOVER_GRACE_MS", "300"),
            ("TALLY__KAFKA__INSTANCE_ID", "fp"),
        ],
    )
    .await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let mut world = demo_world(8, change);
    // Budgets small enough that this run crosses thresholds (violations to relay).
    for b in &mut world.budgets {
        b.amount = (b.amount / rust_decimal::Decimal::from(100)).round_dp(6);
    }
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 3_000, 17);
    gen.encoding = Encoding::Mixed;
    gen.duplicates = 0.05;
    gen.malformed = 0.01;
    gen.late = 0.02;
    gen.start = change - ChronoDuration::hours(1);
    gen.span = ChronoDuration::hours(2);
    let msgs = generate(gen);
    let exp = expected(&msgs, &world);
    produce(&env, &msgs, None).await?;

    let spec = format!("{point}=abort@{hit}");
    let mut crashed = env.spawn_tally_with("crash", &[("TALLY_FAILPOINTS", spec.as_str())])?;
    let status = wait_exit(&mut crashed, Duration::from_secs(90));
    if status.is_none() {
        kill9(&mut crashed);
    }
    assert!(
        env.log_text("crash")
            .contains(&format!("failpoint {point} fired")),
        "{point}: the failpoint was never reached"
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "{point}: tally did not die there"
    );
    let pending = env.pending_batches().await?;
    if leaves_pending(point) {
        assert!(
            !pending.is_empty(),
            "{point}: the crash left no pending batch"
        );
    }

    let mut last = env.spawn_tally("recover")?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let caught_up = env
        .wait_handled(exp.messages as i64, Duration::from_secs(120))
        .await;
    terminate(&mut last, Duration::from_secs(30))?;
    caught_up?;
    for id in &pending {
        let (state, attempts) = env.batch_state(*id).await?;
        assert_eq!(state, "done", "{point}: batch {id}");
        assert!(
            attempts >= 2,
            "{point}: batch {id} was not replayed ({attempts} attempt)"
        );
    }
    if leaves_pending(point) {
        assert!(env.log_text("recover").contains("replaying pending batch"));
    }
    let mut problems = check_totals(&env, &exp).await?;
    problems.extend(check_violation_topic(&env).await?);
    problems.extend(check_budgets(&env, &exp, &world).await?);
    for p in problems.iter().take(20) {
        eprintln!("  {point}: {p}");
    }
    assert!(
        problems.is_empty(),
        "{point}: {} differences",
        problems.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_dlq_ack() -> anyhow::Result<()> {
    crash_at("after_dlq_ack", 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_claim() -> anyhow::Result<()> {
    crash_at("after_claim", 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_clickhouse_insert() -> anyhow::Result<()> {
    crash_at("before_clickhouse_insert", 6).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_one_clickhouse_table() -> anyhow::Result<()> {
    crash_at("after_clickhouse_table", 6).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_clickhouse() -> anyhow::Result<()> {
    crash_at("after_clickhouse", 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit() -> anyhow::Result<()> {
    crash_at("before_commit", 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_inside_commit() -> anyhow::Result<()> {
    crash_at("commit_after_budget_read", 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit() -> anyhow::Result<()> {
    crash_at("after_commit", 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_relay_publish_and_mark() -> anyhow::Result<()> {
    crash_at("relay_after_publish", 1).await
}
