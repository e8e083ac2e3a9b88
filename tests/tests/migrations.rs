//! Migrations on the real Postgres and ClickHouse: idempotent re-runs (library
//! and `tally migrate` binary), the expected tables, the 6-decimal price CHECK,
//! and the analyst queries in `sql/clickhouse/queries/` against the schema and
//! its analyst views.

use anyhow::{bail, Context};
use sqlx::postgres::PgPool;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;
use tally_tests::*;

const PG_TABLES: [&str; 18] = [
    "tenants",
    "teams",
    "projects",
    "prices",
    "budgets",
    "budget_versions",
    "budget_spend",
    "spend_daily",
    "quota_usage",
    "violations",
    "consumer_offsets",
    "batches",
    "seen_events",
    "dead_letters",
    "relay_attempts",
    "topic_epochs",
    "dlq_redrive_runs",
    "dlq_redrives",
];

const CH_TABLES: [&str; 10] = [
    "usage_events",
    "usage_1m",
    "usage_1h",
    "usage_1d",
    "policy_decisions",
    "audit_events",
    "spend_hourly",
    "unpriced_usage_hourly",
    "policy_decisions_hourly",
    "audit_events_hourly",
];

async fn pg_tables(pool: &PgPool) -> anyhow::Result<BTreeSet<String>> {
    Ok(sqlx::query_scalar::<_, String>(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'tally'",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect())
}

async fn ch_tables(url: &str, db: &str) -> anyhow::Result<BTreeSet<String>> {
    let text = ch_query(
        url,
        &format!("SELECT name FROM system.tables WHERE database = '{db}' FORMAT TabSeparated"),
    )
    .await?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_reapply_as_no_ops_and_create_every_table() -> anyhow::Result<()> {
    let env = test_env("migrate", 1, &[]).await?; // migrated once already
    let again = tally::cli::migrate::postgres(&env.pool)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(
        again.is_empty(),
        "second postgres migration applied {again:?}"
    );
    let n = tally::cli::migrate::clickhouse(&env.cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let expected_stmts: usize = tally::cli::migrate::CLICKHOUSE_DDL
        .iter()
        .map(|(_, sql)| tally::cli::migrate::statements(sql).len())
        .sum();
    assert_eq!(n, expected_stmts);

    let pg = pg_tables(&env.pool).await?;
    let missing: Vec<_> = PG_TABLES.iter().filter(|t| !pg.contains(**t)).collect();
    assert!(
        missing.is_empty(),
        "postgres schema tally lacks {missing:?} (has {pg:?})"
    );

    let db = &env.cfg.clickhouse.database;
    let ch = ch_tables(&env.cfg.clickhouse.url, db).await?;
    let missing: Vec<_> = CH_TABLES.iter().filter(|t| !ch.contains(**t)).collect();
    assert!(
        missing.is_empty(),
        "clickhouse database {db} lacks {missing:?} (has {ch:?})"
    );

    // A third ClickHouse run changes nothing either.
    tally::cli::migrate::clickhouse(&env.cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(ch_tables(&env.cfg.clickhouse.url, db).await?, ch);
    assert_eq!(pg_tables(&env.pool).await?, pg);
    Ok(())
}

async fn insert_price(pool: &PgPool, model: &str, input_per_m: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO tally.prices (provider, model, effective_from, input_per_m, cached_input_per_m, \
         cache_write_per_m, output_per_m, reasoning_per_m) \
         VALUES ('openai', $1, '2025-01-01T00:00:00Z', $2::numeric, 0, 0, 1.5, 0)",
    )
    .bind(model)
    .bind(input_per_m)
    .execute(pool)
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_with_more_than_six_decimals_are_rejected() -> anyhow::Result<()> {
    let env = test_env("prices", 1, &[]).await?;
    insert_price(&env.pool, "six", "0.123456")
        .await
        .context("6 decimals must be accepted")?;
    insert_price(&env.pool, "trailing-zero", "0.1234560")
        .await
        .context("a 7th decimal that is 0 is exact")?;
    match insert_price(&env.pool, "seven", "0.1234567").await {
        Err(sqlx::Error::Database(e)) => {
            assert_eq!(
                e.code().as_deref(),
                Some("23514"),
                "not a check violation: {e}"
            );
        }
        Err(e) => bail!("unexpected error for a 7-decimal price: {e}"),
        Ok(()) => bail!("a price with 7 decimals was accepted"),
    }
    let negative = insert_price(&env.pool, "negative", "-1").await;
    assert!(negative.is_err(), "a negative price was accepted");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.prices")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(n, 2);
    Ok(())
}

fn run_migrate(env: &[(String, String)]) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Command::new(tally_binary()?);
    cmd.arg("migrate").current_dir(repo_root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `tally migrate` on empty databases applies everything; a second run exits 0 and says "up to date".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_binary_twice_is_idempotent() -> anyhow::Result<()> {
    let base = test_env("migbin", 1, &[]).await?;
    // Fresh, unmigrated Postgres and ClickHouse databases and new topic names.
    let db = format!("{}_fresh", base.cfg.clickhouse.database);
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&base.pool)
        .await?;
    let pg_url = base
        .env
        .iter()
        .find(|(k, _)| k == "TALLY__POSTGRES__URL")
        .map(|(_, v)| v.clone())
        .context("pg url")?;
    let (head, _) = pg_url.rsplit_once('/').context("pg url")?;
    let fresh_url = format!("{head}/{db}");
    let topic = format!("{}.fresh", base.cfg.kafka.usage_topic);
    let mut env = base.env.clone();
    for (k, v) in [
        ("TALLY__POSTGRES__URL", fresh_url.clone()),
        ("TALLY__CLICKHOUSE__DATABASE", db.clone()),
        ("TALLY__KAFKA__USAGE_TOPIC", topic.clone()),
        ("TALLY__KAFKA__DLQ_TOPIC", format!("{topic}.dlq")),
        (
            "TALLY__KAFKA__VIOLATION_TOPIC",
            format!("{topic}.violations"),
        ),
    ] {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v));
    }

    let t = Instant::now();
    let (ok, out1, err1) = run_migrate(&env)?;
    assert!(ok, "first tally migrate failed:\n{out1}\n{err1}");
    assert!(
        out1.contains("postgres: applied"),
        "first run output:\n{out1}"
    );
    let (ok, out2, err2) = run_migrate(&env)?;
    assert!(ok, "second tally migrate failed:\n{out2}\n{err2}");
    assert!(
        out2.contains("postgres: up to date"),
        "second run output:\n{out2}"
    );
    assert!(
        out2.contains("kafka: topics exist"),
        "second run output:\n{out2}"
    );
    eprintln!(
        "tally migrate twice: {:?}\n--- first\n{out1}--- second\n{out2}",
        t.elapsed()
    );

    let pool = PgPool::connect(&fresh_url).await?;
    let pg = pg_tables(&pool).await?;
    pool.close().await;
    assert!(
        PG_TABLES.iter().all(|t| pg.contains(*t)),
        "fresh postgres has {pg:?}"
    );
    let ch = ch_tables(&base.cfg.clickhouse.url, &db).await?;
    assert!(
        CH_TABLES.iter().all(|t| ch.contains(*t)),
        "fresh clickhouse has {ch:?}"
    );
    Ok(())
}

/// Every analyst query in sql/clickhouse/queries/ runs against the migrated schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyst_queries_run_against_the_schema() -> anyhow::Result<()> {
    let env = test_env("queries", 1, &[]).await?;
    let db = &env.cfg.clickhouse.database;
    let dir = repo_root().join("sql/clickhouse/queries");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no queries in {}", dir.display());
    let mut failures = Vec::new();
    // The queries name no database: they run in clickhouse.database, where
    // `tally migrate` installs the analyst views they read.
    let url = format!(
        "{}/?database={db}",
        env.cfg.clickhouse.url.trim_end_matches('/')
    );
    for f in &files {
        let sql = std::fs::read_to_string(f)?;
        assert!(!sql.contains("tally."), "{} names a database", f.display());
        if let Err(e) = ch_query(&url, &sql).await {
            failures.push(format!("{}: {e}", f.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "failing queries:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// Offsets of record kept for an earlier topic of the same name (a deleted
/// topic, or a broker that lost its data) would make tally skip the new
/// topic's messages: `migrate` forgets them when it creates the topic, and
/// abandons the pending batch the way `tally reset-offsets` does: its
/// ClickHouse rows and claimed event ids go, and the topic's epoch moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_topic_forgets_stale_offsets_of_record() -> anyhow::Result<()> {
    let env = tally_tests::test_env("staleoffsets", 2, &[]).await?;
    let mut cfg = env.cfg.clone();
    let fresh = format!("{}.again", env.cfg.kafka.usage_topic);
    cfg.kafka.usage_topic = fresh.clone();
    for p in 0..2 {
        sqlx::query(
            "INSERT INTO tally.consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, 5000)",
        )
        .bind(&cfg.kafka.group_id)
        .bind(&fresh)
        .bind(p)
        .execute(&env.pool)
        .await?;
    }
    // A pending batch of the old topic, with rows in ClickHouse and claimed
    // ids; and a done batch of another topic that must stay.
    let mut ids = Vec::new();
    for (topic, state) in [(fresh.as_str(), "pending"), ("other", "done")] {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO tally.batches (group_id, topic, partition, first_offset, last_offset, state) \
             VALUES ($1, $2, 1, 5000, 5009, $3) RETURNING batch_id",
        )
        .bind(&cfg.kafka.group_id)
        .bind(topic)
        .bind(state)
        .fetch_one(&env.pool)
        .await?;
        sqlx::query(
            "INSERT INTO tally.seen_events (event_id, occurred_at, batch_id) \
             SELECT gen_random_uuid(), now(), $1 FROM generate_series(1, 3)",
        )
        .bind(id)
        .execute(&env.pool)
        .await?;
        ch_query(
            &cfg.clickhouse.url,
            &format!(
                "INSERT INTO {}.usage_1h (bucket, tenant_id, requests, cost, batch_id) VALUES (now(), 't', 1, 1, {id})",
                cfg.clickhouse.database
            ),
        )
        .await?;
        ids.push(id);
    }
    sqlx::query(
        "INSERT INTO tally.dead_letters (topic, partition, \"offset\", error_class, error_message) VALUES ($1, 0, 7, 'c', 'm')",
    )
    .bind(&fresh)
    .execute(&env.pool)
    .await?;

    let created = tally::cli::migrate::topics(&cfg).await?;
    assert!(created.contains(&fresh), "{created:?}");
    assert_eq!(
        tally::cli::migrate::forget_offsets_of_new_topics(&env.pool, &cfg, &created).await?,
        2
    );
    let count = |sql: String| {
        let pool = env.pool.clone();
        async move { sqlx::query_scalar::<_, i64>(&sql).fetch_one(&pool).await }
    };
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM tally.consumer_offsets WHERE topic = '{fresh}'"
        ))
        .await?,
        0
    );
    let (gone, kept) = (ids[0], ids[1]);
    for (id, n) in [(gone, 0), (kept, 1)] {
        assert_eq!(
            count(format!(
                "SELECT count(*) FROM tally.batches WHERE batch_id = {id}"
            ))
            .await?,
            n
        );
        assert_eq!(
            count(format!(
                "SELECT count(*) FROM tally.seen_events WHERE batch_id = {id}"
            ))
            .await?,
            3 * n
        );
        let ch = ch_query(
            &cfg.clickhouse.url,
            &format!(
                "SELECT count() FROM {}.usage_1h WHERE batch_id = {id}",
                cfg.clickhouse.database
            ),
        )
        .await?;
        assert_eq!(ch.trim(), n.to_string(), "clickhouse rows of batch {id}");
    }
    assert_eq!(
        count(format!(
            "SELECT epoch::bigint FROM tally.topic_epochs WHERE topic = '{fresh}'"
        ))
        .await?,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM tally.dead_letters".into()).await?,
        1,
        "dead letters of the old incarnation are kept"
    );
    // a second migrate creates nothing and forgets nothing
    let again = tally::cli::migrate::topics(&cfg).await?;
    assert!(again.is_empty());
    assert_eq!(
        tally::cli::migrate::forget_offsets_of_new_topics(&env.pool, &cfg, &again).await?,
        0
    );
    Ok(())
}
