//! `tally migrate`: Postgres migrations (sqlx), ClickHouse DDL and analyst
//! views, and Kafka topics (`cli::topics`; `--skip-topics` only checks them).
//!
//! Idempotent: re-running applies nothing new and says so (the views, which
//! hold no data, are re-created so that a changed definition reaches them).

use crate::config::Config;
use crate::errors::StageError;
use crate::sinks::clickhouse::ClickHouseSink;
use sqlx::postgres::PgPool;
use std::time::Duration;

/// The flags of `tally migrate`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MigrateArgs {
    /// Create no Kafka topic (for clusters where applications may not): check
    /// that the topics of the enabled streams exist; a missing one is an error
    /// naming it (after the Postgres and ClickHouse migrations ran).
    #[arg(long)]
    pub skip_topics: bool,
}

/// ClickHouse DDL files, in order; each may hold several `;`-separated statements.
pub const CLICKHOUSE_DDL: [(&str, &str); 8] = [
    (
        "001_database.sql",
        include_str!("../../../sql/clickhouse/001_database.sql"),
    ),
    (
        "002_usage_events.sql",
        include_str!("../../../sql/clickhouse/002_usage_events.sql"),
    ),
    (
        "003_usage_1m.sql",
        include_str!("../../../sql/clickhouse/003_usage_1m.sql"),
    ),
    (
        "004_usage_1h.sql",
        include_str!("../../../sql/clickhouse/004_usage_1h.sql"),
    ),
    (
        "005_usage_1d.sql",
        include_str!("../../../sql/clickhouse/005_usage_1d.sql"),
    ),
    (
        "006_policy_audit.sql",
        include_str!("../../../sql/clickhouse/006_policy_audit.sql"),
    ),
    (
        "007_policy_rollups.sql",
        include_str!("../../../sql/clickhouse/007_policy_rollups.sql"),
    ),
    (
        "008_analyst_views.sql",
        include_str!("../../../sql/clickhouse/008_analyst_views.sql"),
    ),
];

/// The view a `CREATE VIEW IF NOT EXISTS <db>.<name>` statement creates.
fn view_name(stmt: &str) -> Option<&str> {
    let rest = stmt.strip_prefix("CREATE VIEW IF NOT EXISTS ")?;
    let qualified = rest.split_whitespace().next()?;
    qualified.rsplit('.').next()
}

/// Splits a DDL file into statements (ClickHouse's HTTP interface takes one per request).
pub fn statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

pub async fn postgres(pool: &PgPool) -> Result<Vec<String>, StageError> {
    let migrator = sqlx::migrate!("../sql/postgres/migrations");
    let before: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    migrator
        .run(pool)
        .await
        .map_err(|e| StageError::Fatal(format!("postgres migration: {e}")))?;
    Ok(migrator
        .iter()
        .filter(|m| !before.contains(&m.version))
        .map(|m| format!("{:04}_{}", m.version, m.description))
        .collect())
}

pub async fn clickhouse(cfg: &Config) -> Result<usize, StageError> {
    // The database may not exist yet: run the DDL without selecting one.
    let mut ch_cfg = cfg.clickhouse.clone();
    ch_cfg.database = "default".into();
    let sink = ClickHouseSink::new(&ch_cfg);
    let mut n = 0;
    upgrade_audit_events(&sink, &cfg.clickhouse.database).await?;
    for (name, sql) in CLICKHOUSE_DDL {
        for stmt in statements(sql) {
            let stmt = stmt
                .replace("tally.", &format!("{}.", cfg.clickhouse.database))
                .replace(
                    "DATABASE IF NOT EXISTS tally",
                    &format!("DATABASE IF NOT EXISTS {}", cfg.clickhouse.database),
                );
            if let Some(view) = view_name(&stmt) {
                drop_view(&sink, &cfg.clickhouse.database, view).await?;
            }
            sink.execute(&stmt)
                .await
                .map_err(|e| StageError::Fatal(format!("clickhouse DDL {name}: {e}")))?;
            n += 1;
        }
    }
    Ok(n)
}

/// `audit_events` as created before the audit stream existed (no `leaf_index`)
/// was never written by tally: an empty one is dropped so the DDL creates it
/// anew; one holding rows stops the migration, naming the table.
async fn upgrade_audit_events(sink: &ClickHouseSink, db: &str) -> Result<(), StageError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct N {
        n: u64,
    }
    let count = |sql: String| async move {
        sink.client()
            .query(&sql)
            .fetch_one::<N>()
            .await
            .map(|r| r.n)
            .map_err(|e| StageError::Fatal(format!("clickhouse: {e}")))
    };
    let old = count(format!(
        "SELECT count() AS n FROM system.tables WHERE database = '{db}' AND name = 'audit_events'"
    ))
    .await?
        > 0
        && count(format!(
            "SELECT count() AS n FROM system.columns WHERE database = '{db}' AND table = 'audit_events' AND name = 'leaf_index'"
        ))
        .await?
            == 0;
    if !old {
        return Ok(());
    }
    let rows = count(format!("SELECT count() AS n FROM {db}.audit_events")).await?;
    if rows > 0 {
        return Err(StageError::Fatal(format!(
            "clickhouse table {db}.audit_events has the old layout (no leaf_index) and holds {rows} rows \
             tally did not write; move them away (RENAME TABLE {db}.audit_events TO {db}.audit_events_old) and migrate again"
        )));
    }
    sink.execute(&format!("DROP TABLE {db}.audit_events")).await
}

/// Drops the view `db.name` so the DDL creates it anew; anything else of
/// that name (a table holding data) stops the migration, naming it.
async fn drop_view(sink: &ClickHouseSink, db: &str, name: &str) -> Result<(), StageError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct E {
        engine: String,
    }
    let found: Vec<E> = sink
        .client()
        .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
        .bind(db)
        .bind(name)
        .fetch_all()
        .await
        .map_err(|e| StageError::Fatal(format!("clickhouse: {e}")))?;
    match found.first().map(|e| e.engine.as_str()) {
        None => Ok(()),
        Some("View") => sink.execute(&format!("DROP TABLE IF EXISTS {db}.{name}")).await,
        Some(engine) => Err(StageError::Fatal(format!(
            "clickhouse {db}.{name} is a {engine} table, not the analyst view tally installs under that name; \
             rename it (RENAME TABLE {db}.{name} TO {db}.{name}_old) and migrate again"
        ))),
    }
}

/// Creates the missing topics (see `cli::topics::create`).
pub async fn topics(cfg: &Config) -> Result<Vec<String>, StageError> {
    crate::cli::topics::create(cfg).await
}

/// A topic that `topics` just created has no history: offsets of record and
/// pending batches stored for an earlier topic of the same name (deleted, or a
/// broker that lost its data) point past its end and would skip its messages.
/// They are forgotten like `tally reset-offsets` does: the pending batches'
/// ClickHouse rows and claimed event ids go too, and the topic's epoch moves on
/// (see `offsets_reset`). Returns the number of offsets of record forgotten.
pub async fn forget_offsets_of_new_topics(
    pool: &PgPool,
    cfg: &Config,
    created: &[String],
) -> Result<u64, StageError> {
    if created.is_empty() {
        return Ok(0);
    }
    let ch = ClickHouseSink::new(&cfg.clickhouse);
    let grace = std::time::Duration::from_millis(cfg.pipeline.takeover_grace_ms);
    crate::engine::offsets_reset::forget_topics(pool, &ch, created, grace).await
}

/// `tally migrate`: Postgres, ClickHouse, then the topics (created, or
/// checked with `--skip-topics`); prints what it did.
pub async fn run(cfg: &Config, args: &MigrateArgs) -> anyhow::Result<()> {
    let pool = crate::sinks::postgres::connect_pg(cfg).await?;
    let applied = postgres(&pool).await?;
    println!(
        "postgres: {}",
        if applied.is_empty() {
            "up to date".to_string()
        } else {
            format!("applied {}", applied.join(", "))
        }
    );
    let n = clickhouse(cfg).await?;
    println!(
        "clickhouse: {n} DDL statements applied (tables IF NOT EXISTS, analyst views re-created) to database {}",
        cfg.clickhouse.database
    );
    let mut attempts = 0;
    loop {
        let step = if args.skip_topics {
            crate::cli::topics::check(cfg)
                .await
                .map(|notes| (Vec::new(), notes))
        } else {
            match topics(cfg).await {
                Ok(created) => crate::cli::topics::describe(cfg)
                    .await
                    .map(|c| (created, crate::cli::topics::differences(cfg, &c))),
                Err(e) => Err(e),
            }
        };
        match step {
            Ok((created, notes)) => {
                let what = if args.skip_topics {
                    "topics exist (--skip-topics: none created)".to_string()
                } else if created.is_empty() {
                    "topics exist".to_string()
                } else {
                    format!(
                        "created {} (replication factor {})",
                        created.join(", "),
                        cfg.kafka.replication_factor
                    )
                };
                println!("kafka: {what}");
                for n in notes {
                    println!("kafka: note: {n}");
                }
                let forgotten = forget_offsets_of_new_topics(&pool, cfg, &created).await?;
                if forgotten > 0 {
                    println!(
                        "postgres: forgot {forgotten} offsets of record kept for an earlier topic of the same name \
                         (the topic was just created, so they pointed past its end)"
                    );
                }
                return Ok(());
            }
            Err(StageError::Retryable(m)) if attempts < 10 => {
                attempts += 1;
                tracing::warn!(error = %m, "kafka not ready; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_splits_into_statements() {
        let total: usize = CLICKHOUSE_DDL
            .iter()
            .map(|(_, s)| statements(s).len())
            .sum();
        assert_eq!(total, 14);
        let views: Vec<String> = CLICKHOUSE_DDL
            .iter()
            .flat_map(|(_, s)| statements(s))
            .filter_map(|s| view_name(&s).map(str::to_string))
            .collect();
        assert_eq!(
            views,
            [
                "spend_hourly",
                "unpriced_usage_hourly",
                "policy_decisions_hourly",
                "audit_events_hourly"
            ]
        );
        for (_, sql) in CLICKHOUSE_DDL {
            for s in statements(sql) {
                assert!(s.starts_with("CREATE"), "{s}");
                assert!(!s.contains("DateTime64") && !s.contains("Map(") && !s.contains(" TTL "));
            }
        }
    }
}
