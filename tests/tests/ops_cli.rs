//! Operator commands against the real servers: `tally prices import` and
//! `tally budgets import` (a bad file is rejected naming every line and column
//! and writes nothing; the same file twice changes nothing; a later effective
//! date supersedes the version in force; the pipeline's reference data then
//! picks the right version), the example files, and `tally migrate` with
//! `--skip-topics`, `kafka.replication_factor` and `kafka.topic_config`.

use chrono::{NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use tally_tests::*;

/// Runs the tally binary with the test's environment plus `extra`:
/// (exit code, stdout, stderr).
fn tally(
    env: &[(String, String)],
    args: &[&str],
    extra: &[(&str, &str)],
) -> anyhow::Result<(i32, String, String)> {
    let mut cmd = Command::new(tally_binary()?);
    cmd.args(args).current_dir(repo_root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Writes `text` to a file named after the test's database.
fn file(env: &TestEnv, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(&env.cfg.clickhouse.database);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn import(env: &TestEnv, what: &str, path: &Path) -> anyhow::Result<(i32, String, String)> {
    tally(
        &env.env,
        &[what, "import", &path.display().to_string()],
        &[],
    )
}

/// Every row of a table, as text, in a fixed order (to compare before and after).
async fn snapshot(env: &TestEnv, table: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar::<_, String>(&format!(
        "SELECT t::text FROM tally.{table} t ORDER BY t::text"
    ))
    .fetch_all(&env.pool)
    .await?)
}

const PRICES_HEADER: &str = "provider,model,effective_from,currency,input_per_m,cached_input_per_m,cache_write_per_m,output_per_m,reasoning_per_m\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_import_validates_first_is_idempotent_and_supersedes() -> anyhow::Result<()> {
    let env = test_env("opsprices", 1, &[]).await?;
    // A bad file: one valid row and four bad ones; nothing may be written.
    let bad = file(
        &env,
        "bad-prices.csv",
        &format!(
            "{PRICES_HEADER}\
             openai,gpt-4o,2025-01-01,USD,2.5,1.25,0,10,0\n\
             openai,gpt-4o-mini,2025-01-01,USD,0.15,0.075,0,abc,0\n\
             anthropic,claude-s,2025-13-01,USD,3,0.3,3.75,15,15\n\
             anthropic,claude-h,2025-01-01,USD,0.8000001,0,0,4,0\n\
             openai,gpt-4o,2025-01-01T00:00:00Z,USD,2.5,1.25,0,10,0\n"
        ),
    )?;
    let (code, out, err) = import(&env, "prices", &bad)?;
    assert_eq!(code, 1, "{out}{err}");
    for needle in [
        "4 problems found, nothing was written",
        "line 3, column output_per_m (8)",
        "line 4, column effective_from (3)",
        "line 5, column input_per_m (5): 0.8000001 has more than 6 decimals",
        "line 6, column effective_from (3): openai gpt-4o effective 2025-01-01T00:00:00Z is already on line 2",
    ] {
        assert!(err.contains(needle), "{needle:?} not in:\n{err}");
    }
    assert!(err.contains("bad-prices.csv"), "the file is named: {err}");
    assert!(snapshot(&env, "prices").await?.is_empty());
    let unknown = file(&env, "unknown.csv", "provider,model,price\nx,y,1\n")?;
    let (code, _, err) = import(&env, "prices", &unknown)?;
    assert!(
        code == 1 && err.contains("line 1, column 3: unknown column \"price\""),
        "{err}"
    );
    assert!(err.contains("lacks the column effective_from"), "{err}");

    // A good file, twice: the second import changes nothing.
    let v1 = format!(
        "{PRICES_HEADER}\
         openai,gpt-4o,2025-01-01,USD,2.5,1.25,0,10,0\n\
         openai,gpt-4o-mini,2025-01-01,USD,0.15,0.075,0,0.6,0\n\
         anthropic,claude-s,2025-01-01T00:00:00Z,USD,3,0.3,3.75,15,15\n"
    );
    let good = file(&env, "prices-v1.csv", &v1)?;
    let (code, out, err) = import(&env, "prices", &good)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("3 rows valid; inserted 3, unchanged 0, superseded 0"),
        "{out}"
    );
    let stored = snapshot(&env, "prices").await?;
    assert_eq!(stored.len(), 3);
    let (code, out, err) = import(&env, "prices", &good)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("inserted 0, unchanged 3, superseded 0"),
        "{out}"
    );
    assert_eq!(snapshot(&env, "prices").await?, stored);

    // A later version of gpt-4o (columns in another order): supersedes one.
    let v2 = "model,provider,effective_from,currency,input_per_m,cached_input_per_m,cache_write_per_m,output_per_m,reasoning_per_m\n\
              gpt-4o,openai,2025-01-01,USD,2.50,1.25,0,10,0\n\
              gpt-4o,openai,2025-06-01T00:00:00Z,USD,2,1,0,8,0\n";
    let later = file(&env, "prices-v2.csv", v2)?;
    let (code, out, err) = import(&env, "prices", &later)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("inserted 1, unchanged 1, superseded 1"),
        "{out}"
    );
    assert!(
        out.contains("superseded: openai gpt-4o effective 2025-01-01T00:00:00Z now ends at 2025-06-01T00:00:00Z"),
        "{out}"
    );
    let book = tally::engine::reference::load(&env.pool).await?.prices;
    let at = |m, d, h| {
        Utc.with_ymd_and_hms(2025, m, d, h, 0, 0)
            .single()
            .expect("time")
    };
    let input = |t| book.price_at("openai", "gpt-4o", t).map(|p| p.input_per_m);
    assert_eq!(input(at(5, 31, 23)), Some(Decimal::from_str("2.5")?));
    assert_eq!(input(at(6, 1, 0)), Some(Decimal::from(2)));

    // A stored version never changes; another currency is refused; nothing written.
    let before = snapshot(&env, "prices").await?;
    let changed = file(
        &env,
        "changed.csv",
        &format!("{PRICES_HEADER}openai,gpt-4o,2025-01-01,USD,2.5,1.25,0,11,0\n"),
    )?;
    let (code, _, err) = import(&env, "prices", &changed)?;
    assert!(
        code == 1
            && err.contains("line 2, column output_per_m (8)")
            && err.contains("stored with output_per_m = 10"),
        "{err}"
    );
    let eur = file(
        &env,
        "eur.csv",
        &format!("{PRICES_HEADER}openai,o9,2025-01-01,EUR,1,1,1,1,1\n"),
    )?;
    let (code, _, err) = import(&env, "prices", &eur)?;
    assert!(
        code == 1
            && err
                .contains("line 2, column currency (4): EUR is not the price book's currency USD"),
        "{err}"
    );
    assert_eq!(snapshot(&env, "prices").await?, before);

    // --dry-run reports and writes nothing.
    let new = file(
        &env,
        "new.csv",
        &format!("{PRICES_HEADER}openai,o9,2025-01-01,USD,1,1,1,1,1\n"),
    )?;
    let (code, out, _) = tally(
        &env.env,
        &["prices", "import", "--dry-run", &new.display().to_string()],
        &[],
    )?;
    assert!(
        code == 0 && out.contains("inserted 1") && out.contains("dry run"),
        "{out}"
    );
    assert_eq!(snapshot(&env, "prices").await?, before);
    Ok(())
}

const BUDGETS_HEADER: &str =
    "budget_id,scope,tenant_id,team_id,period,amount,thresholds_pct,effective_from\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_import_validates_first_is_idempotent_and_supersedes() -> anyhow::Result<()> {
    let env = test_env("opsbudgets", 1, &[]).await?;
    let bad = file(
        &env,
        "bad-budgets.csv",
        &format!(
            "{BUDGETS_HEADER}\
             acme-m,tenant,acme,,month,1000,50;80;100,2025-03-15\n\
             acme-ml,team,acme,,day,50,80;100,2025-03-01\n\
             acme-d,tenant,acme,,day,0,80,2025-03-01\n\
             acme-x,tenant,acme,,week,10,80,2025-03-01\n\
             acme-y,tenant,acme,,day,10,80;abc,2025-03-01\n\
             acme-ok,tenant,acme,,day,10,80,2025-03-01\n"
        ),
    )?;
    let (code, _, err) = import(&env, "budgets", &bad)?;
    assert_eq!(code, 1, "{err}");
    for needle in [
        "5 problems found, nothing was written",
        "line 2, column effective_from (8): 2025-03-15 is not the first day of a month",
        "line 3, column team_id (4): must not be empty",
        "line 4, column amount (6): 0 must be > 0",
        "line 5, column period (5)",
        "line 6, column thresholds_pct (7)",
    ] {
        assert!(err.contains(needle), "{needle:?} not in:\n{err}");
    }
    assert!(snapshot(&env, "budgets").await?.is_empty());

    let v1 = format!(
        "{BUDGETS_HEADER}\
         acme-m,tenant,acme,,month,1000,50;80;100,2025-02-01\n\
         acme-ml-d,team,acme,ml,day,50.5,100;80,\n"
    );
    let good = file(&env, "budgets-v1.csv", &v1)?;
    let (code, out, err) = import(&env, "budgets", &good)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 rows valid; inserted 2, unchanged 0, superseded 0"),
        "{out}"
    );
    let stored = (
        snapshot(&env, "budgets").await?,
        snapshot(&env, "budget_versions").await?,
    );
    let (code, out, _) = import(&env, "budgets", &good)?;
    assert!(
        code == 0 && out.contains("inserted 0, unchanged 2, superseded 0"),
        "{out}"
    );
    assert_eq!(
        (
            snapshot(&env, "budgets").await?,
            snapshot(&env, "budget_versions").await?
        ),
        stored
    );

    // A later version supersedes; an earlier one becomes the first version.
    let later = file(
        &env,
        "budgets-v2.csv",
        &format!("{v1}acme-m,tenant,acme,,month,1500,50;80;100,2025-04-01\n"),
    )?;
    let (code, out, err) = import(&env, "budgets", &later)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("inserted 1, unchanged 2, superseded 1"),
        "{out}"
    );
    assert!(
        out.contains(
            "superseded: budget acme-m effective from 2025-02-01 now ends before 2025-04-01"
        ),
        "{out}"
    );
    let earlier = file(
        &env,
        "budgets-v3.csv",
        &format!("{BUDGETS_HEADER}acme-m,tenant,acme,,month,800,100,2025-01-01\n"),
    )?;
    let (code, out, err) = import(&env, "budgets", &earlier)?;
    assert!(
        code == 0 && out.contains("inserted 1, unchanged 0, superseded 0"),
        "{out}{err}"
    );
    let (code, out, _) = import(&env, "budgets", &later)?;
    assert!(
        code == 0 && out.contains("inserted 0, unchanged 3, superseded 0"),
        "{out}"
    );

    // The pipeline's reference data: one version in force per period.
    let r = tally::engine::reference::load(&env.pool).await?;
    let day = |m, d| NaiveDate::from_ymd_opt(2025, m, d).expect("date");
    let amount = |start| {
        r.budgets_for("acme", None)
            .filter(|i| r.budgets[*i].budget_id == "acme-m" && r.budget_in_force(*i, start))
            .map(|i| r.budgets[i].amount)
            .collect::<Vec<_>>()
    };
    let dec_2024 = NaiveDate::from_ymd_opt(2024, 12, 1).expect("date");
    assert_eq!(amount(dec_2024), Vec::<Decimal>::new());
    assert_eq!(amount(day(1, 1)), [Decimal::from(800)]);
    assert_eq!(amount(day(3, 1)), [Decimal::from(1000)]);
    assert_eq!(amount(day(5, 1)), [Decimal::from(1500)]);

    // Identity and stored versions never change; nothing written.
    let before = (
        snapshot(&env, "budgets").await?,
        snapshot(&env, "budget_versions").await?,
    );
    let moved = file(
        &env,
        "moved.csv",
        &format!("{BUDGETS_HEADER}acme-m,tenant,acme,,day,1000,50;80;100,2025-02-01\n"),
    )?;
    let (code, _, err) = import(&env, "budgets", &moved)?;
    assert!(
        code == 1 && err.contains("line 2, column period (5)") && err.contains("never change"),
        "{err}"
    );
    let changed = file(
        &env,
        "changed.csv",
        &format!("{BUDGETS_HEADER}acme-m,tenant,acme,,month,999,50;80;100,2025-02-01\n"),
    )?;
    let (code, _, err) = import(&env, "budgets", &changed)?;
    assert!(
        code == 1
            && err.contains("line 2, column amount (6)")
            && err.contains("stored with amount 1000"),
        "{err}"
    );
    assert_eq!(
        (
            snapshot(&env, "budgets").await?,
            snapshot(&env, "budget_versions").await?
        ),
        before
    );
    Ok(())
}

/// The shipped examples import cleanly, and again as no-ops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_reference_files_import_twice() -> anyhow::Result<()> {
    let env = test_env("opsexamples", 1, &[]).await?;
    for what in ["prices", "budgets"] {
        let path = repo_root().join(format!("examples/reference/{what}.csv"));
        let (code, out, err) = import(&env, what, &path)?;
        assert_eq!(code, 0, "{what}: {err}");
        assert!(out.contains("unchanged 0"), "{out}");
        let (code, out, err) = import(&env, what, &path)?;
        assert!(
            code == 0 && out.contains("inserted 0"),
            "{what}: {out}{err}"
        );
    }
    Ok(())
}

/// Topic names of a fresh namespace nobody has created yet.
fn fresh_topics(env: &TestEnv, tag: &str) -> Vec<(String, String)> {
    let base = format!("{}.{tag}", env.cfg.kafka.usage_topic);
    [
        ("TALLY__KAFKA__USAGE_TOPIC", format!("{base}.usage")),
        ("TALLY__KAFKA__DLQ_TOPIC", format!("{base}.usage.dlq")),
        (
            "TALLY__KAFKA__VIOLATION_TOPIC",
            format!("{base}.violations"),
        ),
        ("TALLY__POLICY__TOPIC", format!("{base}.policy")),
        ("TALLY__POLICY__DLQ_TOPIC", format!("{base}.policy.dlq")),
        ("TALLY__AUDIT__TOPIC", format!("{base}.audit")),
        ("TALLY__AUDIT__DLQ_TOPIC", format!("{base}.audit.dlq")),
        (
            "TALLY__AUDIT__CHECKPOINT_TOPIC",
            format!("{base}.checkpoints"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn with(env: &TestEnv, over: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env
        .env
        .iter()
        .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
        .cloned()
        .collect();
    out.extend_from_slice(over);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_skip_topics_and_replication_factor() -> anyhow::Result<()> {
    let env = test_env("opstopics", 1, &[]).await?;
    let topics = fresh_topics(&env, "x");
    let names: Vec<String> = topics.iter().map(|(_, v)| v.clone()).collect();
    let menv = with(&env, &topics);
    let exist = |cfg: &tally::config::Config| {
        let cfg = cfg.clone();
        async move { tally::cli::topics::describe(&cfg).await }
    };
    let none_exists =
        |c: &tally::cli::topics::Cluster| names.iter().all(|n| !c.topics.contains_key(n));

    // --skip-topics: nothing created; the missing topics of the enabled streams
    // (usage only in tests) are named, the others noted as not needed.
    let (code, out, err) = tally(&menv, &["migrate", "--skip-topics"], &[])?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("postgres: up to date") && out.contains("clickhouse:"),
        "migrations ran first: {out}"
    );
    assert!(
        err.contains("3 topic(s) that tally needs do not exist"),
        "{err}"
    );
    for n in &names[..3] {
        assert!(err.contains(n.as_str()), "{n} not named: {err}");
    }
    assert!(!err.contains(names[3].as_str()), "policy is off: {err}");
    assert!(
        none_exists(&exist(&env.cfg).await?),
        "--skip-topics created a topic"
    );

    // A factor above the broker count: refused naming the key, nothing created.
    let (code, _, err) = tally(
        &menv,
        &["migrate"],
        &[("TALLY__KAFKA__REPLICATION_FACTOR", "3")],
    )?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("kafka.replication_factor = 3") && err.contains("1 broker"),
        "{err}"
    );
    assert!(
        none_exists(&exist(&env.cfg).await?),
        "a topic was created with a refused factor"
    );
    // min.insync.replicas above the factor is a configuration error (exit 2) naming the key.
    let (code, _, err) = tally(
        &menv,
        &["migrate"],
        &[(
            "TALLY__KAFKA__TOPIC_CONFIG",
            r#"{ "min.insync.replicas" = "2" }"#,
        )],
    )?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(r#"kafka.topic_config."min.insync.replicas""#),
        "{err}"
    );

    // Factor 1 with a topic config: every topic created, with one replica.
    let cfg_json = r#"{ "retention.ms" = "3600000", "min.insync.replicas" = 1 }"#;
    let (code, out, err) = tally(
        &menv,
        &["migrate"],
        &[
            ("TALLY__KAFKA__REPLICATION_FACTOR", "1"),
            ("TALLY__KAFKA__TOPIC_CONFIG", cfg_json),
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(replication factor 1)"), "{out}");
    let cluster = exist(&env.cfg).await?;
    for n in &names {
        assert_eq!(
            cluster.topics.get(n).map(|t| t.1),
            Some(1),
            "{n}: {:?}",
            cluster.topics.get(n)
        );
    }
    eprintln!(
        "retention.ms as the broker reports it: {:?}",
        retention_ms(&env, &names[0]).await
    );
    if let Some(ms) = retention_ms(&env, &names[0]).await {
        assert_eq!(
            ms, "3600000",
            "the broker reports topic configs, so this one must be applied"
        );
    }

    // Now --skip-topics passes, and says that it created nothing.
    let (code, out, err) = tally(&menv, &["migrate", "--skip-topics"], &[])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("kafka: topics exist (--skip-topics: none created)"),
        "{out}"
    );
    Ok(())
}

/// `retention.ms` of `topic` as DescribeConfigs reports it (None: the broker
/// reports no topic configs, as some test brokers do not).
async fn retention_ms(env: &TestEnv, topic: &str) -> Option<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .create()
        .ok()?;
    let res = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .ok()?;
    let resource = res.into_iter().next()?.ok()?;
    resource
        .entries
        .into_iter()
        .find(|e| e.name == "retention.ms")
        .and_then(|e| e.value)
}
