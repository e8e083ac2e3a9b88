//! `tally report` against the real servers: every format (table, json, csv) and
//! every filter (--from/--to on hour and day bounds, --tenant) compared with an
//! oracle computed from the data the test inserted, money exact to the last of
//! 12 decimals; then the spend section of a real pipeline run compared with
//! the generator's own record of what it sent.

use chrono::{DateTime, Duration as ChronoDuration, DurationRound, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_tests::*;

/// Runs the tally binary in the test's namespace: (exit code, stdout, stderr).
fn tally(env: &TestEnv, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let mut cmd = Command::new(tally_binary()?);
    cmd.args(args).current_dir(repo_root());
    for (k, v) in &env.env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn json_report(env: &TestEnv, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["report", "--format", "json"];
    all.extend_from_slice(args);
    let (code, out, err) = tally(env, &all)?;
    anyhow::ensure!(code == 0, "tally {all:?} exited {code}: {err}");
    Ok(serde_json::from_str(&out)?)
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

fn at(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, day, hour, 0, 0)
        .single()
        .expect("time")
}

/// Spend per (tenant, provider, model): requests, tokens, exact cost, unpriced.
type Spend = BTreeMap<(String, String, String), (u64, u64, Decimal, u64)>;

/// One inserted usage_1h row.
struct Usage {
    bucket: DateTime<Utc>,
    tenant: &'static str,
    provider: &'static str,
    model: &'static str,
    requests: u64,
    input: u64,
    output: u64,
    cost: &'static str,
    unpriced: u64,
}

/// The usage_1h rows the test inserts: hours on both sides of a midnight,
/// tiny and large exact costs, and one key written by two batches.
fn usage() -> Vec<Usage> {
    #[allow(clippy::too_many_arguments)]
    fn u(
        day: u32,
        hour: u32,
        tenant: &'static str,
        provider: &'static str,
        model: &'static str,
        requests: u64,
        cost: &'static str,
        unpriced: u64,
    ) -> Usage {
        Usage {
            bucket: at(day, hour),
            tenant,
            provider,
            model,
            requests,
            input: requests * 100,
            output: requests * 7,
            cost,
            unpriced,
        }
    }
    vec![
        u(10, 21, "ta", "openai", "gpt-x", 3, "0.000000000001", 0),
        u(
            10,
            22,
            "ta",
            "openai",
            "gpt-x",
            2,
            "1234567.123456789012",
            0,
        ),
        u(10, 22, "ta", "openai", "gpt-x", 1, "0.000000000009", 0),
        u(10, 23, "ta", "anthropic", "claude-y", 4, "3.5", 1),
        u(10, 23, "tb", "openai", "gpt-x", 5, "7.000000000003", 0),
        u(11, 0, "ta", "openai", "gpt-x", 6, "0.1", 0),
        u(
            11,
            0,
            "tb",
            "anthropic",
            "claude-y",
            7,
            "99999.999999999999",
            2,
        ),
        u(11, 1, "ta", "openai", "gpt-x", 8, "5", 0),
        u(12, 0, "tb", "openai", "gpt-x", 9, "0.333333333333", 0),
    ]
}

/// What the spend section must hold for the filters.
fn spend_oracle(
    rows: &[Usage],
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    tenant: Option<&str>,
) -> Spend {
    let mut out = Spend::new();
    for u in rows.iter().filter(|u| {
        from.is_none_or(|f| u.bucket >= f)
            && to.is_none_or(|t| u.bucket < t)
            && tenant.is_none_or(|t| u.tenant == t)
    }) {
        let e = out
            .entry((u.tenant.into(), u.provider.into(), u.model.into()))
            .or_default();
        e.0 += u.requests;
        e.1 += u.input + u.output;
        e.2 += d(u.cost);
        e.3 += u.unpriced;
    }
    out
}

fn spend_of_json(v: &Value) -> anyhow::Result<Spend> {
    let mut out = Spend::new();
    for r in v["spend"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no spend in {v}"))?
    {
        let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(r["cost"].is_string(), "cost is not a string: {r}");
        out.insert(
            (s("tenant_id"), s("provider"), s("model")),
            (
                r["requests"].as_u64().unwrap_or(u64::MAX),
                r["tokens"].as_u64().unwrap_or(u64::MAX),
                d(r["cost"].as_str().unwrap_or("-1")),
                r["unpriced_requests"].as_u64().unwrap_or(u64::MAX),
            ),
        );
    }
    Ok(out)
}

async fn insert_fixture(env: &TestEnv) -> anyhow::Result<()> {
    let (url, db) = (&env.cfg.clickhouse.url, &env.cfg.clickhouse.database);
    // TabSeparated: decimals are parsed from their text, exactly.
    let mut tsv = format!(
        "INSERT INTO {db}.usage_1h (bucket, tenant_id, provider, model, requests, input_tokens, output_tokens, \
         cost, unpriced_requests, batch_id) FORMAT TabSeparated\n"
    );
    for (i, u) in usage().iter().enumerate() {
        tsv.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            u.bucket.format("%Y-%m-%d %H:%M:%S"),
            u.tenant,
            u.provider,
            u.model,
            u.requests,
            u.input,
            u.output,
            u.cost,
            u.unpriced,
            i + 1
        ));
    }
    ch_query(url, &tsv).await?;
    // Postgres spend_daily, per day, as the pipeline would keep it.
    for u in usage() {
        sqlx::query(
            "INSERT INTO tally.spend_daily (day, tenant_id, provider, model, requests, input_tokens, output_tokens, cost, unpriced_requests) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (day, tenant_id, team_id, provider, model) DO UPDATE SET \
             requests = spend_daily.requests + EXCLUDED.requests, cost = spend_daily.cost + EXCLUDED.cost, \
             unpriced_requests = spend_daily.unpriced_requests + EXCLUDED.unpriced_requests",
        )
        .bind(u.bucket.date_naive())
        .bind(u.tenant)
        .bind(u.provider)
        .bind(u.model)
        .bind(i64::try_from(u.requests)?)
        .bind(i64::try_from(u.input)?)
        .bind(i64::try_from(u.output)?)
        .bind(d(u.cost))
        .bind(i64::try_from(u.unpriced)?)
        .execute(&env.pool)
        .await?;
    }
    ch_query(
        url,
        &format!(
            "INSERT INTO {db}.policy_decisions_1h (bucket, tenant_id, policy_id, decision, enforcement, decisions, batch_id) VALUES \
             ('2025-03-10 22:00:00', 'ta', 'p.allow', 'allow', 'enforce', 5, 1), \
             ('2025-03-10 23:00:00', 'ta', 'p.allow', 'deny', 'enforce', 2, 1), \
             ('2025-03-11 02:00:00', 'tb', 'p.allow', 'deny', 'monitor', 4, 1)"
        ),
    )
    .await?;
    ch_query(
        url,
        &format!(
            "INSERT INTO {db}.audit_events (event_id, occurred_at, tenant_id, leaf_index, batch_id) VALUES \
             ('00000000-0000-4000-8000-000000000001', '2025-03-10 22:10:00', 'ta', 0, 1), \
             ('00000000-0000-4000-8000-000000000002', '2025-03-10 22:20:00', 'ta', 1, 1), \
             ('00000000-0000-4000-8000-000000000003', '2025-03-12 05:00:00', 'tb', 0, 1)"
        ),
    )
    .await?;
    sqlx::query(
        "INSERT INTO tally.audit_trees (tenant_id, next_index, tree_size) VALUES ('ta', 2, 2), ('tb', 1, 1)",
    )
    .execute(&env.pool)
    .await?;
    for (rule, tenant, start, end, published) in [
        ("budget_threshold", "ta", at(1, 0), at(31, 0), true),
        (
            "rate_limit_exceeded",
            "ta",
            at(10, 22),
            at(10, 22) + ChronoDuration::minutes(1),
            false,
        ),
        ("unknown_tenant", "tb", at(11, 3), at(11, 3), true), // one instant
        (
            "rate_limit_exceeded",
            "tb",
            at(12, 1),
            at(12, 1) + ChronoDuration::minutes(1),
            true,
        ),
    ] {
        sqlx::query(
            "INSERT INTO tally.violations (violation_id, rule, severity, tenant_id, subject_type, subject_id, window_start, \
             window_end, observed, threshold, detected_at, message, published_at) \
             VALUES (gen_random_uuid(), $1, 'low', $2, 'tenant', $2, $3, $4, 1, 1, now(), 'm', CASE WHEN $5 THEN now() END)",
        )
        .bind(rule)
        .bind(tenant)
        .bind(start)
        .bind(end)
        .bind(published)
        .execute(&env.pool)
        .await?;
    }
    for (offset, class, recorded) in [
        (1, "invalid_json", at(10, 22)),
        (2, "invalid_json", at(11, 5)),
        (3, "schema", at(12, 0)),
    ] {
        sqlx::query(
            "INSERT INTO tally.dead_letters (topic, partition, \"offset\", error_class, error_message, recorded_at) \
             VALUES ('usage', 0, $1, $2, 'x', $3)",
        )
        .bind(offset as i64)
        .bind(class)
        .bind(recorded)
        .execute(&env.pool)
        .await?;
    }
    // Budgets: a monthly one with two versions (February 100, March 200) and a daily one.
    let file = std::env::temp_dir().join(format!("{}-budgets.csv", env.cfg.clickhouse.database));
    std::fs::write(
        &file,
        "budget_id,scope,tenant_id,team_id,period,amount,thresholds_pct,effective_from\n\
         ta-month,tenant,ta,,month,100,50;100,2025-02-01\n\
         ta-month,tenant,ta,,month,200,50;100,2025-03-01\n\
         tb-day,team,tb,ml,day,10,80,\n",
    )?;
    tally::cli::import::budgets::import(&env.pool, &file, false).await?;
    for (id, start, spent) in [
        ("ta-month", "2025-02-01", "50"),
        ("ta-month", "2025-03-01", "150.000000000001"),
        ("tb-day", "2025-03-10", "4"),
        ("tb-day", "2025-03-11", "12"),
    ] {
        sqlx::query(
            "INSERT INTO tally.budget_spend (budget_id, period_start, spent) VALUES ($1, $2, $3)",
        )
        .bind(id)
        .bind(NaiveDate::from_str(start)?)
        .bind(d(spent))
        .execute(&env.pool)
        .await?;
    }
    Ok(())
}

fn rows_of(v: &Value, key: &str) -> Vec<Value> {
    v[key].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_filters_and_formats_match_the_inserted_data() -> anyhow::Result<()> {
    let env = test_env("opsreport", 1, &[]).await?;
    insert_fixture(&env).await?;
    let rows = usage();

    // 1. Everything, as one JSON document.
    let all = json_report(&env, &[])?;
    assert_eq!(spend_of_json(&all)?, spend_oracle(&rows, None, None, None));
    let total: Decimal = rows.iter().map(|u| d(u.cost)).sum();
    assert_eq!(d(all["spend_totals"]["cost"].as_str().unwrap_or("")), total);
    assert_eq!(
        d(all["spend_totals"]["postgres"]["cost"]
            .as_str()
            .unwrap_or("")),
        total
    );
    assert_eq!(all["currency"], "USD");
    assert_eq!(all["filters"]["tenant"], Value::Null);
    assert_eq!(rows_of(&all, "dlq").len(), 2, "{}", all["dlq"]);
    assert_eq!(
        rows_of(&all, "violations").len(),
        3,
        "{}",
        all["violations"]
    );
    assert_eq!(rows_of(&all, "budgets").len(), 4, "{}", all["budgets"]);

    // 2. Hours across midnight, one tenant: not whole days, so no Postgres totals.
    let (from, to) = ("2025-03-10T22:00:00Z", "2025-03-11T01:00:00Z");
    let v = json_report(&env, &["--from", from, "--to", to, "--tenant", "ta"])?;
    let want = spend_oracle(&rows, Some(at(10, 22)), Some(at(11, 1)), Some("ta"));
    assert_eq!(spend_of_json(&v)?, want);
    assert_eq!(
        want.get(&("ta".into(), "openai".into(), "gpt-x".into()))
            .map(|s| s.2),
        Some(d("1234567.223456789021")),
        "the oracle itself"
    );
    assert_eq!(v["spend_totals"]["postgres"], Value::Null);
    assert_eq!(v["filters"]["from"], from);
    assert_eq!(v["dlq"], Value::Null, "dead letters carry no tenant");
    let budgets = rows_of(&v, "budgets");
    assert_eq!(budgets.len(), 1, "{budgets:?}");
    assert_eq!(budgets[0]["budget_id"], "ta-month");
    assert_eq!(budgets[0]["period_start"], "2025-03-01");
    assert_eq!(
        budgets[0]["amount"], "200",
        "the version in force for March"
    );
    assert_eq!(budgets[0]["spent"], "150.000000000001");
    assert_eq!(budgets[0]["used_pct"], "75");
    let rules: Vec<(String, i64, i64)> = rows_of(&v, "violations")
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap_or("").into(),
                r["raised"].as_i64().unwrap_or(-1),
                r["published"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            ("budget_threshold".into(), 1, 1),
            ("rate_limit_exceeded".into(), 1, 0)
        ]
    );
    let decisions = rows_of(&v, "decisions");
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert_eq!(
        decisions
            .iter()
            .map(|r| r["decisions"].as_u64().unwrap_or(0))
            .sum::<u64>(),
        7
    );
    let audit = rows_of(&v, "audit");
    assert_eq!(
        (
            audit.len(),
            audit[0]["events"].as_u64(),
            audit[0]["tree_size"].as_i64()
        ),
        (1, Some(2), Some(2))
    );

    // 3. Whole days, every tenant: the Postgres totals agree with ClickHouse.
    let v = json_report(&env, &["--from", "2025-03-11", "--to", "2025-03-12"])?;
    let want = spend_oracle(&rows, Some(at(11, 0)), Some(at(12, 0)), None);
    assert_eq!(spend_of_json(&v)?, want);
    let cost: Decimal = want.values().map(|s| s.2).sum();
    assert_eq!(d(v["spend_totals"]["cost"].as_str().unwrap_or("")), cost);
    assert_eq!(
        d(v["spend_totals"]["postgres"]["cost"].as_str().unwrap_or("")),
        cost
    );
    assert_eq!(v["spend_totals"]["postgres"]["requests"].as_i64(), Some(21));
    let dlq = rows_of(&v, "dlq");
    assert_eq!(
        (dlq.len(), dlq[0]["messages"].as_i64()),
        (1, Some(1)),
        "{dlq:?}"
    );
    let violations: Vec<Value> = rows_of(&v, "violations");
    assert_eq!(
        violations.len(),
        2,
        "budget month + the instant of 11 03:00: {violations:?}"
    );
    let days: Vec<(String, String)> = rows_of(&v, "budgets")
        .iter()
        .map(|b| {
            (
                b["budget_id"].as_str().unwrap_or("").into(),
                b["period_start"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(
        days,
        [
            ("tb-day".into(), "2025-03-11".into()),
            ("ta-month".into(), "2025-03-01".into())
        ]
    );

    // 4. CSV: one section, same rows, exact money.
    let (code, out, err) = tally(
        &env,
        &[
            "report",
            "--format",
            "csv",
            "--section",
            "spend",
            "--from",
            from,
            "--to",
            to,
            "--tenant",
            "ta",
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    let recs = tally::cli::csv::parse(&out).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(
        recs[0].fields,
        [
            "tenant_id",
            "provider",
            "model",
            "requests",
            "tokens",
            "cost",
            "unpriced_requests"
        ]
    );
    let csv_spend: Spend = recs[1..]
        .iter()
        .map(|r| {
            let f = &r.fields;
            (
                (f[0].clone(), f[1].clone(), f[2].clone()),
                (
                    f[3].parse().unwrap_or(0),
                    f[4].parse().unwrap_or(0),
                    d(&f[5]),
                    f[6].parse().unwrap_or(0),
                ),
            )
        })
        .collect();
    assert_eq!(
        csv_spend,
        spend_oracle(&rows, Some(at(10, 22)), Some(at(11, 1)), Some("ta"))
    );
    let (code, out, err) = tally(&env, &["report", "--format", "csv", "--section", "budgets"])?;
    assert_eq!(code, 0, "{err}");
    let recs = tally::cli::csv::parse(&out).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(recs.len(), 5, "{out}");
    assert!(
        out.contains("ta-month,tenant,ta,,month,2025-02-01,2025-03-01,50,100,50\n"),
        "{out}"
    );
    assert!(
        out.contains("tb-day,team,tb,ml,day,2025-03-11,2025-03-12,12,10,120\n"),
        "{out}"
    );

    // 5. Table for people; usage errors before anything is read.
    let (code, out, err) = tally(&env, &["report", "--tenant", "tb", "--limit", "1"])?;
    assert_eq!(code, 0, "{err}");
    for needle in [
        "Spend by tenant and model",
        "tenant tb",
        "Budget periods",
        "Violations raised",
        "dead letters carry no tenant",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    let (code, _, err) = tally(&env, &["report", "--format", "csv"])?;
    assert!(code != 0 && err.contains("--section"), "{code} {err}");
    let (code, _, err) = tally(&env, &["report", "--from", "2025-03-10T22:30:00Z"])?;
    assert!(code == 2 && err.contains("whole hour"), "{code} {err}");
    let (code, _, err) = tally(
        &env,
        &["report", "--from", "2025-03-11", "--to", "2025-03-11"],
    )?;
    assert!(code != 0 && err.contains("before --to"), "{code} {err}");
    let (code, _, err) = tally(
        &env,
        &[
            "report",
            "--format",
            "csv",
            "--section",
            "dlq",
            "--tenant",
            "ta",
        ],
    )?;
    assert!(code != 0 && err.contains("no tenant"), "{code} {err}");
    Ok(())
}

/// The spend section of a real run (priced by tally from a price book with a
/// price change, late events and duplicates included) equals the generator's
/// record of what it sent, for an hour range across midnight and one tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_spend_of_a_real_run_matches_the_generator() -> anyhow::Result<()> {
    let env = test_env("opsreportrun", 2, &[]).await?;
    let midnight = Utc::now().duration_trunc(ChronoDuration::days(1))?;
    let world = demo_world(6, midnight - ChronoDuration::hours(2));
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 3_000, 17);
    gen.encoding = Encoding::Json;
    gen.start = midnight - ChronoDuration::hours(10);
    gen.span = ChronoDuration::hours(12);
    gen.unpriced = 0.02;
    let msgs = generate(gen);
    let exp = expected(&msgs, &world);
    produce(&env, &msgs, None).await?;
    let mut run = TallyProcess(env.spawn_tally("run")?);
    env.wait_handled(i64::try_from(msgs.len())?, Duration::from_secs(120))
        .await?;
    terminate(&mut run.0, Duration::from_secs(30))?;

    let (from, to) = (
        midnight - ChronoDuration::hours(5),
        midnight + ChronoDuration::hours(1),
    );
    let tenant = exp.events[0].tenant_id.clone();
    let mut want = Spend::new();
    for e in exp
        .events
        .iter()
        .filter(|e| e.occurred_at >= from && e.occurred_at < to && e.tenant_id == tenant)
    {
        let s = want
            .entry((e.tenant_id.clone(), e.provider.clone(), e.model.clone()))
            .or_default();
        s.0 += 1;
        let tokens = e.input_tokens
            + e.cached_input_tokens
            + e.cache_write_tokens
            + e.output_tokens
            + e.reasoning_tokens;
        s.1 += u64::try_from(tokens)?;
        match world.price_at(&e.provider, &e.model, e.occurred_at) {
            Some(p) => {
                s.2 += p.cost(
                    e.input_tokens,
                    e.cached_input_tokens,
                    e.cache_write_tokens,
                    e.output_tokens,
                    e.reasoning_tokens,
                )
            }
            None => s.3 += 1,
        }
    }
    assert!(want.len() > 1, "the oracle selects too little: {want:?}");
    let fmt = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let v = json_report(
        &env,
        &["--from", &fmt(from), "--to", &fmt(to), "--tenant", &tenant],
    )?;
    let got: Spend = spend_of_json(&v)?
        .into_iter()
        .map(|(k, (r, t, c, u))| (k, (r, t, c.normalize(), u)))
        .collect();
    let want: Spend = want
        .into_iter()
        .map(|(k, (r, t, c, u))| (k, (r, t, c.normalize(), u)))
        .collect();
    assert_eq!(got, want);
    Ok(())
}
