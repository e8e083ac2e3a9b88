//! Batches whose events span a month boundary (late events: `occurred_at` in
//! the previous month and the current one). ClickHouse partitions every usage
//! table by month and commits one part per partition, so tally cuts each
//! table's insert per month and, on a replay, checks each (table, month) on
//! its own. Totals are compared with an oracle computed from the produced
//! events, without tally's code.

use chrono::{DateTime, Datelike, Duration as ChronoDuration, TimeZone, Utc};
use std::collections::BTreeMap;
use std::time::Duration;
use tally_producers::{demo_world, Encoding, GenConfig, GenMessage, World};
use tally_tests::*;

/// A month boundary at least 3 h in the past: the start of this month, or of
/// the previous one early on the 1st.
fn month_boundary() -> DateTime<Utc> {
    let now = Utc::now();
    let this = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .expect("first of month");
    if now - this >= ChronoDuration::hours(3) {
        this
    } else {
        let prev = this - ChronoDuration::days(1);
        Utc.with_ymd_and_hms(prev.year(), prev.month(), 1, 0, 0, 0)
            .single()
            .expect("first of month")
    }
}

fn yyyymm(t: DateTime<Utc>) -> u32 {
    u32::try_from(t.year()).unwrap_or(0) * 100 + t.month()
}

/// Events from an hour before the boundary to an hour after it, with late
/// events (1-6 h behind) so that batches after the boundary hold both months.
fn month_spanning(count: u64, seed: u64) -> (World, GenConfig, DateTime<Utc>) {
    let boundary = month_boundary();
    let world = demo_world(12, boundary);
    let mut g = GenConfig::new(world.clone(), count, seed);
    g.encoding = Encoding::Mixed;
    g.duplicates = 0.02;
    g.late = 0.1;
    g.malformed = 0.0;
    g.unpriced = 0.0;
    g.unknown_tenant = 0.0;
    g.start = boundary - ChronoDuration::hours(1);
    g.span = ChronoDuration::hours(2);
    (world, g, boundary)
}

/// The test's env, with a dedup look-back long enough for last month's events,
/// and static membership (noida-db never expires a member killed by abort).
async fn month_env(name: &str) -> anyhow::Result<TestEnv> {
    test_env(
        name,
        1,
        &[
            ("TALLY__PIPELINE__DEDUP_LOOKBACK_HOURS", "1680"),
            ("TALLY__KAFKA__INSTANCE_ID", "month-instance"),
        ],
    )
    .await
}

fn with_env(env: &TestEnv, extra: &[(&str, &str)]) -> TestEnv {
    let mut vars = env.env.clone();
    for (k, v) in extra {
        vars.push((k.to_string(), v.to_string()));
    }
    TestEnv {
        name: env.name.clone(),
        cfg: env.cfg.clone(),
        env: vars,
        pool: env.pool.clone(),
    }
}

/// Rows per (table, month) of one batch in ClickHouse.
async fn batch_parts(env: &TestEnv, batch_id: i64) -> anyhow::Result<BTreeMap<(String, u32), u64>> {
    let mut out = BTreeMap::new();
    for (table, col) in [
        ("usage_events", "occurred_at"),
        ("usage_1m", "bucket"),
        ("usage_1h", "bucket"),
        ("usage_1d", "bucket"),
    ] {
        let text = ch_query(
            &env.cfg.clickhouse.url,
            &format!(
                "SELECT toYYYYMM({col}) AS m, count() FROM {}.{table} WHERE batch_id = {batch_id} GROUP BY m FORMAT TabSeparated",
                env.cfg.clickhouse.database
            ),
        )
        .await?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (m, n) = line.split_once('\t').unwrap_or_default();
            out.insert((table.to_string(), m.parse()?), n.parse()?);
        }
    }
    Ok(out)
}

async fn pending_batch(env: &TestEnv) -> anyhow::Result<(i64, i64, i64)> {
    Ok(sqlx::query_as::<_, (i64, i64, i64)>(
        "SELECT batch_id, first_offset, last_offset FROM tally.batches WHERE state = 'pending'",
    )
    .fetch_one(&env.pool)
    .await?)
}

/// Killed (abort) between the two monthly parts of one table's insert, then
/// restarted: the replay finds that table's first month complete and its
/// second month empty, writes only the second, and every total is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn month_spanning_batch_killed_between_parts_loses_nothing() -> anyhow::Result<()> {
    let env = month_env("monthkill").await?;
    let (world, gen, boundary) = month_spanning(4_000, 31);
    env.seed(&world).await?;
    let msgs = generate(gen);
    let exp = expected(&msgs, &world);
    let months: std::collections::BTreeSet<u32> =
        exp.events.iter().map(|e| yyyymm(e.occurred_at)).collect();
    assert_eq!(
        months,
        [
            yyyymm(boundary - ChronoDuration::hours(1)),
            yyyymm(boundary)
        ]
        .into(),
        "test setup: events must span the month boundary"
    );
    produce(&env, &msgs, None).await?;

    let armed = with_env(
        &env,
        &[("TALLY_FAILPOINTS", "between_insert_parts=abort@1")],
    );
    let mut child = armed.spawn_tally("abort")?;
    let status = wait_exit_or_kill(&mut child, Duration::from_secs(120))?;
    assert!(
        !status.success(),
        "tally should have been aborted: {status}"
    );
    let log = log_plain(&env, "abort");
    assert!(
        log.contains("failpoint between_insert_parts fired"),
        "the failpoint was not reached:\n{log}"
    );
    // The state the test claims: a pending batch with a table holding one
    // month of its rows but not the other.
    let (batch_id, _, _) = pending_batch(&env).await?;
    let parts = batch_parts(&env, batch_id).await?;
    let per_table: BTreeMap<&str, usize> = parts.keys().fold(BTreeMap::new(), |mut m, (t, _)| {
        *m.entry(t.as_str()).or_default() += 1;
        m
    });
    assert!(
        per_table.values().any(|n| *n == 1),
        "no table holds exactly one month of batch {batch_id}: {parts:?}"
    );
    eprintln!("monthkill: batch {batch_id} left partly written: {parts:?}");

    let mut child = env.spawn_tally("replay")?;
    let caught_up = env
        .wait_handled(exp.messages as i64, Duration::from_secs(180))
        .await;
    terminate(&mut child, Duration::from_secs(30))?;
    caught_up?;
    let log = log_plain(&env, "replay");
    assert!(
        log.contains("replaying pending batch") && log.contains(&format!("batch_id={batch_id}")),
        "no replay of batch {batch_id} in the log:\n{log}"
    );
    // Parts that landed stay (an insert of another table may have been in
    // flight at the abort: ClickHouse commits what it received, and the
    // replay completes that part by key). Exactness is the totals check below.
    let after = batch_parts(&env, batch_id).await?;
    for ((t, m), n) in &parts {
        let now = after.get(&(t.clone(), *m)).copied().unwrap_or(0);
        assert!(
            now >= *n,
            "{t} {m}: {n} rows before the replay, {now} after"
        );
    }
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}

/// A `usage_1d` row of the oracle: (day, tenant, team, project, provider,
/// model, status) -> (requests, input, cached, cache write, output, reasoning,
/// cost, unpriced).
type DayKey = (String, String, String, String, String, String, String);
type DayRow = (i64, i64, i64, i64, i64, i64, rust_decimal::Decimal, i64);

/// `usage_1d` rows of the month `month` for the events of `msgs`
/// (first occurrence of each id), computed without tally's code.
fn oracle_day_rows(msgs: &[GenMessage], world: &World, month: u32) -> BTreeMap<DayKey, DayRow> {
    let mut seen = std::collections::HashSet::new();
    let mut out: BTreeMap<DayKey, DayRow> = BTreeMap::new();
    for e in msgs.iter().filter_map(|m| m.event.as_ref()) {
        if !seen.insert(e.event_id) || yyyymm(e.occurred_at) != month {
            continue;
        }
        let key = (
            format!("{} 00:00:00", e.occurred_at.date_naive()),
            e.tenant_id.clone(),
            e.team_id.clone().unwrap_or_default(),
            e.project_id.clone().unwrap_or_default(),
            e.provider.clone(),
            e.model.clone(),
            e.status.as_str().to_string(),
        );
        let r = out.entry(key).or_default();
        r.0 += 1;
        r.1 += e.input_tokens;
        r.2 += e.cached_input_tokens;
        r.3 += e.cache_write_tokens;
        r.4 += e.output_tokens;
        r.5 += e.reasoning_tokens;
        match world.price_at(&e.provider, &e.model, e.occurred_at) {
            Some(p) => {
                r.6 += p.cost(
                    e.input_tokens,
                    e.cached_input_tokens,
                    e.cache_write_tokens,
                    e.output_tokens,
                    e.reasoning_tokens,
                )
            }
            None => r.7 += 1,
        }
    }
    out
}

async fn insert_day_rows(
    env: &TestEnv,
    batch_id: i64,
    rows: &[(&DayKey, &DayRow)],
) -> anyhow::Result<()> {
    let mut sql = format!(
        "INSERT INTO {}.usage_1d (bucket, tenant_id, team_id, project_id, provider, model, status, requests, \
         input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, cost, \
         unpriced_requests, batch_id) FORMAT TabSeparated\n",
        env.cfg.clickhouse.database
    );
    for (k, r) in rows {
        sql.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{batch_id}\n",
            k.0, k.1, k.2, k.3, k.4, k.5, k.6, r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7
        ));
    }
    ch_query(&env.cfg.clickhouse.url, &sql).await?;
    Ok(())
}

/// The state a server death between two parts leaves, built by hand so that
/// it does not depend on the new code: a pending batch whose `usage_1d` holds
/// previous-month rows only, and not even all of them (ClickHouse 18.16
/// commits what it received of an INSERT whose client died mid-request). A
/// replay must write exactly the missing rows of that month and the whole
/// current month (the old replay saw "rows present" and skipped the table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_completes_a_partly_landed_month_and_writes_the_missing_one() -> anyhow::Result<()> {
    let env = month_env("monthpart").await?;
    let (world, gen, boundary) = month_spanning(1_500, 32);
    env.seed(&world).await?;
    let msgs = generate(gen);
    let exp = expected(&msgs, &world);
    produce(&env, &msgs, None).await?;

    // A pending batch with nothing in ClickHouse yet.
    let armed = with_env(&env, &[("TALLY_FAILPOINTS", "after_claim=abort@1")]);
    let mut child = armed.spawn_tally("claim")?;
    let status = wait_exit_or_kill(&mut child, Duration::from_secs(120))?;
    assert!(
        !status.success(),
        "tally should have been aborted: {status}"
    );
    let (batch_id, first, last) = pending_batch(&env).await?;
    assert_eq!(first, 0, "the first batch is the pending one");
    let in_batch = &msgs[usize::try_from(first)?..=usize::try_from(last)?];
    let prev = yyyymm(boundary - ChronoDuration::hours(1));
    let day_rows = oracle_day_rows(in_batch, &world, prev);
    let later_rows = oracle_day_rows(in_batch, &world, yyyymm(boundary));
    assert!(
        day_rows.len() >= 2 && !later_rows.is_empty(),
        "test setup: batch {batch_id} ({first}..={last}) must hold both months ({} / {} day rows)",
        day_rows.len(),
        later_rows.len()
    );
    let rows: Vec<(&DayKey, &DayRow)> = day_rows.iter().collect();

    // All but one of the previous month's rows: a partly landed part.
    insert_day_rows(&env, batch_id, &rows[1..]).await?;
    let mut child = env.spawn_tally("replay")?;
    let caught_up = env
        .wait_handled(exp.messages as i64, Duration::from_secs(180))
        .await;
    terminate(&mut child, Duration::from_secs(30))?;
    caught_up?;
    let log = log_plain(&env, "replay");
    assert!(log.contains("replaying pending batch"));
    assert!(
        log.contains("partly landed insert: writing only the missing rows"),
        "the repair path ran:\n{log}"
    );
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}
