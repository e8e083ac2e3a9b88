//! `/metrics` of a real `tally run` over mixed traffic on all three streams:
//! every metric the Grafana dashboard (deploy/grafana/tally-dashboard.json) and
//! the alert rules (deploy/prometheus/alerts.yml) reference exists in the
//! scrape, the counters agree with what Postgres holds (messages, dead letters
//! per stream, violations per rule), the gauges describe a caught-up pipeline
//! (no lag, every partition owned, fresh commits and audit checkpoints), and
//! the dashboard's ClickHouse spend query runs on the test's ClickHouse.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_tests::prom::{tally_names, Scrape};
use tally_tests::servers::free_port;
use tally_tests::streams::*;
use tally_tests::*;

const STREAMS: [&str; 3] = ["usage", "policy", "audit"];

fn scrape(listen: &str) -> anyhow::Result<Scrape> {
    let (status, body) = http_get(listen, "/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Scrape::parse(&body)
}

/// The PromQL expressions of the dashboard's Prometheus targets, and its
/// ClickHouse queries.
fn dashboard_queries() -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let path = repo_root().join("deploy/grafana/tally-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let (mut promql, mut sql) = (Vec::new(), Vec::new());
    let panels = dash["panels"].as_array().cloned().unwrap_or_default();
    for p in &panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                promql.push(e.to_string());
            }
            if let Some(q) = t["query"].as_str() {
                sql.push(q.to_string());
            }
        }
    }
    Ok((promql, sql))
}

/// Every `tally_*` family referenced by the dashboard and the alert rules.
fn referenced(s: &Scrape, promql: &[String]) -> anyhow::Result<BTreeSet<String>> {
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))?;
    let mut names = tally_names(&rules);
    for e in promql {
        names.extend(tally_names(e));
    }
    Ok(names.iter().map(|n| s.family_of(n)).collect())
}

/// The labels an expression groups or matches on (`by (...)`, `on (...)`),
/// less those Prometheus adds (`job`, `instance`) and `le` of histogram buckets.
fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for kw in ["by (", "on ("] {
        for part in expr.split(kw).skip(1) {
            let inner = part.split(')').next().unwrap_or_default();
            out.extend(
                inner
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty() && !["job", "instance", "le"].contains(&l.as_str())),
            );
        }
    }
    out
}

/// Grouping labels that no series of the expression's families carries.
fn unknown_labels(s: &Scrape, expr: &str) -> Vec<String> {
    let families: Vec<String> = tally_names(expr).iter().map(|n| s.family_of(n)).collect();
    grouping_labels(expr)
        .into_iter()
        .filter(|l| {
            !s.samples.iter().any(|x| {
                families.iter().any(|f| x.name.starts_with(f.as_str())) && x.labels.contains_key(l)
            })
        })
        .map(|l| format!("{l} in {expr}"))
        .collect()
}

/// Scrapes until `ok` holds for the scrape (the lag and checkpoint gauges
/// are refreshed every few seconds); returns the last scrape.
async fn scrape_until(
    listen: &str,
    within: Duration,
    ok: impl Fn(&Scrape) -> Vec<String>,
) -> anyhow::Result<Scrape> {
    let deadline = Instant::now() + within;
    loop {
        let s = scrape(listen)?;
        let problems = ok(&s);
        if problems.is_empty() {
            return Ok(s);
        }
        anyhow::ensure!(Instant::now() < deadline, "after {within:?}: {problems:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn caught_up(s: &Scrape, produced: &[(&str, usize)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (stream, n) in produced {
        let want = [("stream", *stream)];
        let consumed = s.sum("tally_messages_consumed_total", &want);
        if consumed != *n as f64 {
            problems.push(format!("{stream}: consumed {consumed} of {n}"));
        }
        if s.sum("tally_owned_partitions", &want) != 2.0 {
            problems.push(format!("{stream}: not both partitions owned"));
        }
        let lags: Vec<f64> = s
            .matching("tally_partition_lag_messages", &want)
            .map(|x| x.value)
            .collect();
        if lags.len() != 2 || lags.iter().any(|l| *l != 0.0) {
            problems.push(format!("{stream}: lag per partition {lags:?}"));
        }
    }
    if s.sum("tally_violations_unpublished", &[]) != 0.0 {
        problems.push("violations unpublished".into());
    }
    if !s.has_family("tally_audit_checkpoint_age_seconds") {
        problems.push("no audit checkpoint age yet".into());
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_the_dashboard_and_alerts_and_agree_with_postgres() -> anyhow::Result<()> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let env = test_env(
        "observability",
        2,
        &[
            ("TALLY__SERVER__LISTEN", listen.as_str()),
            ("TALLY__STREAMS__POLICY", "true"),
            ("TALLY__STREAMS__AUDIT", "true"),
            ("TALLY__AUDIT__CHECKPOINT_INTERVAL_MS", "2000"),
        ],
    )
    .await?;
    let rules = setup_streams(&env).await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(6, change);
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 1_200, 17);
    gen.encoding = Encoding::Mixed;
    gen.duplicates = 0.05;
    gen.malformed = 0.02;
    gen.start = change - ChronoDuration::hours(1);
    gen.span = ChronoDuration::hours(2);
    let usage = generate(gen);
    produce(&env, &usage, None).await?;
    let policy = policy_traffic(600, 17);
    let audit = audit_traffic(600, 17);
    produce_to(&env, &env.cfg.policy.topic, &policy).await?;
    produce_to(&env, &env.cfg.audit.topic, &audit).await?;

    let mut tally = TallyProcess(env.spawn_tally_with("run", &[("TALLY_CONFIG", rules.as_str())])?);
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    let produced = [
        ("usage", usage.len()),
        ("policy", policy.len()),
        ("audit", audit.len()),
    ];
    let s = match idle {
        Ok(()) => {
            scrape_until(&listen, Duration::from_secs(30), |s| {
                caught_up(s, &produced)
            })
            .await
        }
        Err(e) => Err(e),
    };
    let ready = http_get(&listen, "/readyz");
    terminate(&mut tally.0, Duration::from_secs(30))?;
    let s = s?;
    assert_eq!(ready?.0, 200, "/readyz of a caught-up pipeline");

    // Every name the dashboard and the alerts use is exported.
    let (promql, sql) = dashboard_queries()?;
    assert!(
        promql.len() >= 15,
        "dashboard has {} PromQL targets",
        promql.len()
    );
    let names = referenced(&s, &promql)?;
    assert!(names.len() >= 15, "only {names:?} referenced");
    let missing: Vec<&String> = names.iter().filter(|n| !s.has_family(n)).collect();
    assert!(
        missing.is_empty(),
        "referenced but not in /metrics: {missing:?}"
    );
    // ... with the labels they group and match on.
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))?;
    let exprs: Vec<String> = rules
        .split("expr:")
        .skip(1)
        .filter_map(|r| r.split("labels:").next())
        .map(|r| r.split("for:").next().unwrap_or(r).to_string())
        .chain(promql.iter().cloned())
        .collect();
    assert!(
        exprs.len() >= promql.len() + 9,
        "{} expressions",
        exprs.len()
    );
    let unknown: Vec<String> = exprs.iter().flat_map(|e| unknown_labels(&s, e)).collect();
    assert!(unknown.is_empty(), "labels no series has: {unknown:#?}");

    // Counters agree with Postgres.
    for (stream, topic) in [
        ("usage", &env.cfg.kafka.usage_topic),
        ("policy", &env.cfg.policy.topic),
        ("audit", &env.cfg.audit.topic),
    ] {
        let dead: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tally.dead_letters WHERE topic = $1")
                .bind(topic)
                .fetch_one(&env.pool)
                .await?;
        let want = [("stream", stream)];
        assert_eq!(
            s.sum("tally_dead_letters_total", &want),
            dead as f64,
            "{stream} dead letters"
        );
        assert!(
            s.sum("tally_events_counted_total", &want) > 0.0,
            "{stream} counted"
        );
        assert!(
            s.sum("tally_batch_duration_seconds_count", &want) > 0.0,
            "{stream} batches"
        );
        assert!(
            s.sum("tally_last_commit_age_seconds", &want) < 120.0,
            "{stream} commit age"
        );
        for stage in ["decode", "claim", "clickhouse", "commit"] {
            let n = s.sum(
                "tally_stage_duration_seconds_count",
                &[("stream", stream), ("stage", stage)],
            );
            assert!(n > 0.0, "{stream} {stage} never timed");
        }
        assert!(
            s.matching("tally_dead_letters_total", &want)
                .any(|x| x.labels["class"] == "dedup_conflict"),
            "{stream}: classes registered at zero"
        );
    }
    assert!(s.sum("tally_dead_letters_total", &[("class", "invalid_json")]) > 0.0);
    let by_rule = violations_by_rule(&env).await?;
    assert!(!by_rule.is_empty(), "the traffic raised no violation");
    for (rule, n) in &by_rule {
        assert_eq!(
            s.sum("tally_violations_raised_total", &[("rule", rule.as_str())]),
            *n as f64,
            "violations of {rule}"
        );
    }
    let published = s.sum("tally_violations_published_total", &[]);
    assert_eq!(published, by_rule.values().sum::<u64>() as f64, "published");
    assert!(s.sum("tally_audit_checkpoint_age_seconds", &[]) < 30.0);
    assert_eq!(s.sum("tally_relay_alive", &[]), 1.0);
    for sink in ["clickhouse", "postgres", "dlq"] {
        assert_eq!(
            s.sum("tally_sink_circuit_open", &[("sink", sink)]),
            0.0,
            "{sink}"
        );
    }
    let build: Vec<_> = s.matching("tally_build_info", &[]).collect();
    assert!(build.len() == 1 && build[0].value == 1.0 && !build[0].labels["version"].is_empty());
    for stream in STREAMS {
        assert!(
            s.matching(
                "tally_retries_total",
                &[("stream", stream), ("sink", "postgres")]
            )
            .count()
                >= 4,
            "{stream}: retry steps registered at zero"
        );
    }

    // The dashboard's ClickHouse spend query runs (macros filled in as the
    // ClickHouse datasource would) and finds every seeded tenant that spent.
    assert_eq!(sql.len(), 1, "one ClickHouse panel");
    let query = sql[0]
        .replace("$ch_database", &env.cfg.clickhouse.database)
        .replace("$timeFilter", "bucket >= toDateTime(0)");
    let rows = ch_query(&env.cfg.clickhouse.url, &format!("{query} FORMAT TSV")).await?;
    let tenants: BTreeSet<&str> = rows.lines().filter_map(|l| l.split('\t').next()).collect();
    let spent: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tenant_id FROM tally.spend_daily WHERE cost > 0")
            .fetch_all(&env.pool)
            .await?;
    assert!(!spent.is_empty());
    for t in &spent {
        assert!(
            tenants.contains(t.as_str()),
            "tenant {t} missing from the spend panel: {rows}"
        );
    }
    Ok(())
}
