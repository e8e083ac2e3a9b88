//! Scenario tests for the exactly-once holes found in review (issue 6), each
//! against the real broker, ClickHouse and Postgres, each reaching its failure
//! deterministically (failpoints, explicit partitions and timestamps) and
//! checked against totals computed here, independently of tally's code.

use chrono::{DateTime, Duration as ChronoDuration, DurationRound, TimeZone, Utc};
use rust_decimal::Decimal;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tally_schemas::{encode_json, sample_usage, UsageEvent};
use tally_tests::*;
use uuid::Uuid;

/// One tenant-scoped usage event of model acme/m1 (1000 input tokens = 1.00 USD
/// with the price `seed_minimal` writes).
fn ev(tenant: &str, id: Uuid, at: DateTime<Utc>, input: i64) -> UsageEvent {
    let mut e = sample_usage();
    e.event_id = id;
    e.occurred_at = at;
    e.tenant_id = tenant.into();
    e.team_id = None;
    e.provider = "acme".into();
    e.model = "m1".into();
    e.input_tokens = input;
    e.cached_input_tokens = 0;
    e.cache_write_tokens = 0;
    e.output_tokens = 0;
    e.reasoning_tokens = 0;
    e.reported_cost = None;
    e.currency = "USD".into();
    e
}

/// Tenants t-a and t-b, a price for acme/m1 of 1000 per 1M input tokens.
async fn seed_minimal(env: &TestEnv, rpm: Option<i64>) -> anyhow::Result<()> {
    for t in ["t-a", "t-b"] {
        sqlx::query(
            "INSERT INTO tally.tenants (tenant_id, name, requests_per_minute) VALUES ($1, $1, $2)",
        )
        .bind(t)
        .bind(rpm)
        .execute(&env.pool)
        .await?;
    }
    set_price(
        env,
        Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap(),
        "1000",
    )
    .await
}

async fn set_price(env: &TestEnv, from: DateTime<Utc>, input_per_m: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tally.prices (provider, model, effective_from, currency, input_per_m, cached_input_per_m, \
         cache_write_per_m, output_per_m, reasoning_per_m) VALUES ('acme', 'm1', $1, 'USD', $2::numeric, 0, 0, 0, 0)",
    )
    .bind(from)
    .bind(input_per_m)
    .execute(&env.pool)
    .await?;
    Ok(())
}

async fn send_event(
    env: &TestEnv,
    partition: Option<i32>,
    e: &UsageEvent,
    ts: Option<i64>,
) -> anyhow::Result<()> {
    send_raw(env, partition, e.tenant_id.as_bytes(), &encode_json(e), ts).await
}

/// (rows, distinct event ids, total cost) of a ClickHouse table.
async fn ch_rows(env: &TestEnv, table: &str) -> anyhow::Result<(i64, i64, Decimal)> {
    let db = &env.cfg.clickhouse.database;
    let (count_expr, distinct) = if table == "usage_events" {
        ("count()", "uniqExact(event_id)")
    } else {
        ("sum(requests)", "0")
    };
    let out = ch_query(
        &env.cfg.clickhouse.url,
        &format!("SELECT {count_expr}, {distinct}, toString(sum(cost)) FROM {db}.{table} FORMAT TabSeparated"),
    )
    .await?;
    let f: Vec<&str> = out.trim().split('\t').collect();
    anyhow::ensure!(f.len() == 3, "unexpected answer {out:?}");
    Ok((
        f[0].parse()?,
        f[1].parse()?,
        Decimal::from_str(f[2])?.normalize(),
    ))
}

async fn pg_requests_cost(env: &TestEnv) -> anyhow::Result<(i64, Decimal)> {
    let (r, c): (Option<i64>, Option<Decimal>) =
        sqlx::query_as("SELECT sum(requests)::bigint, sum(cost) FROM tally.spend_daily")
            .fetch_one(&env.pool)
            .await?;
    Ok((r.unwrap_or(0), c.unwrap_or_default().normalize()))
}

async fn dead_classes(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT error_class FROM tally.dead_letters ORDER BY partition, \"offset\"",
    )
    .fetch_all(&env.pool)
    .await?)
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("timed out waiting for {what}")
}

/// Hole 2: the dedup look-back is bounded by a clock the producer cannot set.
/// A message stamped 2099 must not make pruning forget every claimed id, and an
/// event the producer stamps with its own (old) occurred_at must not slip past
/// the look-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_cutoff_ignores_producer_timestamps() -> anyhow::Result<()> {
    let env = test_env(
        "cutoff",
        1,
        &[("TALLY__PIPELINE__PRUNE_INTERVAL_MS", "300")],
    )
    .await?;
    seed_minimal(&env, None).await?;
    let now = Utc::now();
    let firsts: Vec<UsageEvent> = (0..20)
        .map(|i| {
            ev(
                "t-a",
                Uuid::new_v4(),
                now - ChronoDuration::minutes(60 - i),
                1000,
            )
        })
        .collect();
    let mut tally = env.spawn_tally("run")?;
    for e in &firsts {
        send_event(&env, None, e, None).await?;
    }
    env.wait_handled(20, Duration::from_secs(60)).await?;
    // A message whose CreateTime is in 2099 (the event itself is ordinary).
    let far = Utc
        .with_ymd_and_hms(2099, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis();
    send_event(&env, None, &ev("t-a", Uuid::new_v4(), now, 1000), Some(far)).await?;
    env.wait_handled(21, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await; // several prune rounds
                                                           // Re-sends of the first 20: duplicates, whatever was pruned.
    for e in &firsts {
        send_event(&env, None, e, None).await?;
    }
    // An event 8 days old whose producer stamps CreateTime = occurred_at.
    let old = ev("t-a", Uuid::new_v4(), now - ChronoDuration::days(8), 1000);
    send_event(&env, None, &old, Some(old.occurred_at.timestamp_millis())).await?;
    env.wait_handled(42, Duration::from_secs(60)).await?;
    terminate(&mut tally, Duration::from_secs(30))?;

    let (rows, distinct, _) = ch_rows(&env, "usage_events").await?;
    assert_eq!(
        (rows, distinct),
        (21, 21),
        "re-sends after a 2099 timestamp were counted again"
    );
    assert_eq!(pg_requests_cost(&env).await?.0, 21);
    assert_eq!(
        dead_classes(&env).await?,
        vec!["beyond_dedup_horizon".to_string()]
    );
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.seen_events")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(kept, 21, "pruning kept every id inside the look-back");
    Ok(())
}

/// Hole 3: a replay enriches with the reference snapshot of its first attempt,
/// even if a price changed in between (here: a retroactive price).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_prices_with_the_first_attempts_reference() -> anyhow::Result<()> {
    // Static membership: noida-db never expires a member that died without leaving.
    let env = test_env(
        "refreplay",
        1,
        &[
            ("TALLY__PIPELINE__TAKEOVER_GRACE_MS", "200"),
            ("TALLY__KAFKA__INSTANCE_ID", "refreplay"),
        ],
    )
    .await?;
    seed_minimal(&env, None).await?;
    let now = Utc::now();
    for i in 0..30 {
        let e = ev(
            "t-a",
            Uuid::new_v4(),
            now - ChronoDuration::minutes(30 - i),
            1000,
        );
        send_event(&env, None, &e, None).await?;
    }
    let mut first = env.spawn_tally_with(
        "first",
        &[("TALLY_FAILPOINTS", "after_clickhouse_table=abort@1")],
    )?;
    let status = wait_exit(&mut first, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "tally did not abort at the failpoint"
    );
    assert!(env
        .log_text("first")
        .contains("failpoint after_clickhouse_table fired"));
    let pending = env.pending_batches().await?;
    assert_eq!(pending.len(), 1, "the crash left the batch pending");
    // A new price, effective before every event: today's reference would price them at 2.00.
    set_price(&env, now - ChronoDuration::hours(2), "2000").await?;
    let mut second = env.spawn_tally("second")?;
    env.wait_handled(30, Duration::from_secs(60)).await?;
    terminate(&mut second, Duration::from_secs(30))?;
    assert_eq!(
        env.batch_state(pending[0]).await?,
        ("done".to_string(), 2),
        "the batch was replayed"
    );

    let expected = Decimal::from(30); // 30 events x 1.00, the first attempt's price
    assert_eq!(pg_requests_cost(&env).await?, (30, expected));
    for table in ["usage_events", "usage_1m", "usage_1h", "usage_1d"] {
        let (rows, _, cost) = ch_rows(&env, table).await?;
        assert_eq!(
            (rows, cost),
            (30, expected),
            "{table} disagrees with Postgres"
        );
    }
    Ok(())
}

/// Hole 4: one tenant's events on two partitions, committed concurrently (held
/// inside the commit by a failpoint). The partitions carry different models, so
/// their spend_daily rows differ and nothing else serialises the two commits
/// before the quota and budget reads. `with_quota`: the tenant has a request
/// quota of 8 per minute (its rows then serialise the budget part too, so the
/// budget case runs without a quota). Returns (budget thresholds raised,
/// quota violations, budget spent).
async fn concurrent_crossings(
    name: &str,
    with_quota: bool,
) -> anyhow::Result<(Vec<Decimal>, i64, Decimal)> {
    let env = test_env(name, 2, &[]).await?;
    seed_minimal(&env, with_quota.then_some(8)).await?;
    sqlx::query(
        "INSERT INTO tally.prices (provider, model, effective_from, currency, input_per_m, cached_input_per_m, \
         cache_write_per_m, output_per_m, reasoning_per_m) VALUES ('acme', 'm2', '2020-01-01', 'USD', 1000, 0, 0, 0, 0)",
    )
    .execute(&env.pool)
    .await?;
    sqlx::query(
        "INSERT INTO tally.budgets (budget_id, scope, tenant_id, period, amount, thresholds_pct) \
         VALUES ('b-a', 'tenant', 't-a', 'day', 10, '{50,80,100}')",
    )
    .execute(&env.pool)
    .await?;
    let at = Utc::now() - ChronoDuration::minutes(5);
    for p in 0..2 {
        for _ in 0..6 {
            let mut e = ev("t-a", Uuid::new_v4(), at, 1000);
            e.model = format!("m{}", p + 1);
            send_event(&env, Some(p), &e, None).await?;
        }
    }
    let mut tally = env.spawn_tally_with(
        "run",
        &[("TALLY_FAILPOINTS", "commit_after_budget_read=sleep(1500)")],
    )?;
    env.wait_handled(12, Duration::from_secs(60)).await?;
    terminate(&mut tally, Duration::from_secs(30))?;
    let log = env.log_text("run");
    assert!(
        log.matches("failpoint commit_after_budget_read fired")
            .count()
            >= 2,
        "both commits reached the failpoint"
    );
    let budget: Vec<Decimal> = sqlx::query_scalar(
        "SELECT threshold FROM tally.violations WHERE rule = 'budget_threshold' ORDER BY threshold",
    )
    .fetch_all(&env.pool)
    .await?;
    let quota: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tally.violations WHERE rule = 'rate_limit_exceeded'",
    )
    .fetch_one(&env.pool)
    .await?;
    let spent: Decimal =
        sqlx::query_scalar("SELECT spent FROM tally.budget_spend WHERE budget_id = 'b-a'")
            .fetch_one(&env.pool)
            .await?;
    Ok((
        budget.into_iter().map(|d| d.normalize()).collect(),
        quota,
        spent.normalize(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_of_one_tenant_cross_every_budget_threshold() -> anyhow::Result<()> {
    let (budget, _, spent) = concurrent_crossings("crossbudget", false).await?;
    assert_eq!(
        budget,
        vec![Decimal::from(5), Decimal::from(8), Decimal::from(10)],
        "budget crossings"
    );
    assert_eq!(spent, Decimal::from(12));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_of_one_tenant_cross_the_quota_once() -> anyhow::Result<()> {
    let (_, quota, spent) = concurrent_crossings("crossquota", true).await?;
    assert_eq!(
        quota, 1,
        "the per-minute request quota (8) was crossed once"
    );
    assert_eq!(spent, Decimal::from(12));
    Ok(())
}

/// Hole 6: instance A loses its lock connection while its batches sit right
/// before their ClickHouse inserts; B takes a partition over and replays it.
/// A's late inserts must not land (rows would be doubled in ClickHouse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_cannot_write_clickhouse() -> anyhow::Result<()> {
    let env = test_env(
        "stale",
        2,
        &[("TALLY__PIPELINE__TAKEOVER_GRACE_MS", "1000")],
    )
    .await?;
    seed_minimal(&env, None).await?;
    let now = Utc::now();
    for p in 0..2 {
        for i in 0..50 {
            let e = ev(
                "t-a",
                Uuid::new_v4(),
                now - ChronoDuration::seconds(i),
                1000,
            );
            send_event(&env, Some(p), &e, None).await?;
        }
    }
    let mut a = env.spawn_tally_with(
        "a",
        &[
            ("TALLY__KAFKA__INSTANCE_ID", "a"),
            ("TALLY_FAILPOINTS", "before_clickhouse_insert=sleep(12000)"),
        ],
    )?;
    wait_until("two pending batches", Duration::from_secs(30), || async {
        Ok(env.pending_batches().await?.len() == 2)
    })
    .await?;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'tally-locks' AND datname = current_database()) t",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(killed, 1, "A's lock connection was found and terminated");
    let mut b = env.spawn_tally_with("b", &[("TALLY__KAFKA__INSTANCE_ID", "b")])?;
    let caught_up = env.wait_handled(100, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // any late insert of A would have landed
    terminate(&mut b, Duration::from_secs(30))?;
    terminate(&mut a, Duration::from_secs(30))?;
    caught_up?;
    assert!(env
        .log_text("a")
        .contains("failpoint before_clickhouse_insert fired"));
    assert!(
        env.log_text("b").contains("waiting out the takeover grace"),
        "B replayed a batch A had started"
    );
    let (rows, distinct, cost) = ch_rows(&env, "usage_events").await?;
    assert_eq!((rows, distinct), (100, 100), "usage_events rows");
    assert_eq!(cost, Decimal::from(100));
    for table in ["usage_1m", "usage_1h", "usage_1d"] {
        assert_eq!(ch_rows(&env, table).await?.0, 100, "{table} requests");
    }
    assert_eq!(pg_requests_cost(&env).await?, (100, Decimal::from(100)));
    Ok(())
}

/// Hole 8: the advisory lock is re-entrant. A retry after the lock was taken
/// (injected error right after it) must not take it twice, or a revoke leaves
/// the partition locked by an instance that no longer owns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_during_a_retry_is_released_on_revoke() -> anyhow::Result<()> {
    let env = test_env("relock", 2, &[]).await?;
    seed_minimal(&env, None).await?;
    let now = Utc::now();
    let send_round = |round: i64| {
        let env = &env;
        async move {
            for p in 0..2 {
                for i in 0..20 {
                    let at = now - ChronoDuration::seconds(round * 100 + i);
                    send_event(env, Some(p), &ev("t-a", Uuid::new_v4(), at, 1000), None).await?;
                }
            }
            anyhow::Ok(())
        }
    };
    send_round(0).await?;
    let mut a = env.spawn_tally_with(
        "a",
        &[
            ("TALLY__KAFKA__INSTANCE_ID", "z-first"),
            ("TALLY_FAILPOINTS", "take_ownership_after_lock=error@1,3"),
        ],
    )?;
    env.wait_handled(40, Duration::from_secs(60)).await?;
    assert_eq!(
        env.log_text("a")
            .matches("failpoint take_ownership_after_lock fired")
            .count(),
        2
    );
    // B joins: one partition moves to it.
    let mut b = env.spawn_tally_with("b", &[("TALLY__KAFKA__INSTANCE_ID", "a-second")])?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    send_round(1).await?;
    let caught_up = env.wait_handled(80, Duration::from_secs(45)).await;
    terminate(&mut b, Duration::from_secs(30))?;
    terminate(&mut a, Duration::from_secs(30))?;
    caught_up.map_err(|e| anyhow::anyhow!("a partition stalled after the rebalance: {e}"))?;
    assert_eq!(ch_rows(&env, "usage_events").await?.0, 80);
    Ok(())
}

/// Hole 9: dedup is per (tenant, event id); a re-send with the same key and
/// other content is dead-lettered as a conflict, never silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_ids_in_two_tenants_both_count_and_conflicts_are_dead_lettered() -> anyhow::Result<()>
{
    let env = test_env("tenantdedup", 1, &[]).await?;
    seed_minimal(&env, None).await?;
    let now = Utc::now() - ChronoDuration::minutes(1);
    let id = Uuid::new_v4();
    let a = ev("t-a", id, now, 1000);
    let b = ev("t-b", id, now, 2000);
    let mut a_changed = a.clone();
    a_changed.input_tokens = 5000;
    let mut b_changed = b.clone();
    b_changed.input_tokens = 7000;
    // One batch: a, b, a again (duplicate), a with other content (conflict).
    for e in [&a, &b, &a, &a_changed] {
        send_event(&env, None, e, None).await?;
    }
    let mut tally = env.spawn_tally("run")?;
    env.wait_handled(4, Duration::from_secs(60)).await?;
    // A later batch: b again (duplicate), b with other content (conflict).
    for e in [&b, &b_changed] {
        send_event(&env, None, e, None).await?;
    }
    env.wait_handled(6, Duration::from_secs(60)).await?;
    terminate(&mut tally, Duration::from_secs(30))?;

    let (rows, _, cost) = ch_rows(&env, "usage_events").await?;
    assert_eq!(
        (rows, cost),
        (2, Decimal::from(3)),
        "both tenants' events count once"
    );
    assert_eq!(pg_requests_cost(&env).await?, (2, Decimal::from(3)));
    assert_eq!(
        dead_classes(&env).await?,
        vec!["dedup_conflict".to_string(); 2]
    );
    let dlq = read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.kafka.dlq_topic,
        2,
        Duration::from_secs(30),
    )?;
    assert_eq!(dlq.len(), 2);
    for m in &dlq {
        assert_eq!(
            m.headers.get("tally.error.class").map(String::as_str),
            Some("dedup_conflict")
        );
    }
    Ok(())
}

/// The informational over-quota flag on raw rows counts what earlier batches
/// of the minute already counted (read from `quota_usage`): 20 requests of one
/// tenant in one minute, one partition, batches of 5, a quota of 8 requests a
/// minute: exactly the last 12 rows are flagged, whatever the batch split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_flags_count_the_minutes_earlier_batches() -> anyhow::Result<()> {
    let env = test_env(
        "overquota",
        1,
        &[("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "5")],
    )
    .await?;
    seed_minimal(&env, Some(8)).await?;
    let minute =
        Utc::now().duration_trunc(ChronoDuration::minutes(1))? - ChronoDuration::minutes(2);
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = Uuid::new_v4();
        let e = ev("t-a", id, minute + ChronoDuration::seconds(i), 1000);
        send_event(&env, Some(0), &e, None).await?;
        ids.push(id);
    }
    let mut child = env.spawn_tally("run")?;
    let waited = env.wait_handled(20, Duration::from_secs(60)).await;
    terminate(&mut child, Duration::from_secs(30))?;
    waited?;
    let db = &env.cfg.clickhouse.database;
    let out = ch_query(
        &env.cfg.clickhouse.url,
        &format!("SELECT toString(event_id) FROM {db}.usage_events WHERE over_quota = 1 FORMAT TabSeparated"),
    )
    .await?;
    let flagged: std::collections::BTreeSet<Uuid> =
        out.lines().map(Uuid::parse_str).collect::<Result<_, _>>()?;
    let want: std::collections::BTreeSet<Uuid> = ids[8..].iter().copied().collect();
    assert_eq!(
        flagged, want,
        "the 9th to 20th requests of the minute are over the quota"
    );
    Ok(())
}
