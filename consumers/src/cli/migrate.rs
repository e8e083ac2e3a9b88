//! `tally migrate`: Postgres migrations (sqlx), ClickHouse DDL and Kafka topics.
//!
//! Idempotent: re-running applies nothing new and says so.

use crate::config::Config;
use crate::errors::StageError;
use crate::sinks::clickhouse::ClickHouseSink;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use sqlx::postgres::PgPool;
use std::time::Duration;

/// ClickHouse DDL files, in order; each may hold several `;`-separated statements.
pub const CLICKHOUSE_DDL: [(&str, &str); 7] = [
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
];

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

/// Creates the topics with their partition counts; "already exists" is success.
pub async fn topics(cfg: &Config) -> Result<Vec<String>, StageError> {
    let admin: AdminClient<DefaultClientContext> =
        crate::sinks::kafka_client::KafkaClient::new(&cfg.kafka)
            .config()
            .create()
            .map_err(|e| StageError::Fatal(format!("kafka admin: {e}")))?;
    let k = &cfg.kafka;
    let wanted = [
        (k.usage_topic.as_str(), k.usage_partitions),
        (k.dlq_topic.as_str(), k.usage_partitions),
        (k.violation_topic.as_str(), k.violation_partitions),
        (cfg.policy.topic.as_str(), cfg.policy.partitions),
        (cfg.policy.dlq_topic.as_str(), cfg.policy.partitions),
        (cfg.audit.topic.as_str(), cfg.audit.partitions),
        (cfg.audit.dlq_topic.as_str(), cfg.audit.partitions),
        (cfg.audit.checkpoint_topic.as_str(), cfg.audit.partitions),
    ];
    let new: Vec<NewTopic<'_>> = wanted
        .iter()
        .map(|(t, n)| NewTopic::new(t, *n, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(|e| StageError::Retryable(format!("create topics: {e}")))?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(t) => created.push(t),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(StageError::Fatal(format!("create topic {t}: {e}"))),
        }
    }
    Ok(created)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_splits_into_statements() {
        let total: usize = CLICKHOUSE_DDL
            .iter()
            .map(|(_, s)| statements(s).len())
            .sum();
        assert_eq!(total, 10);
        for (_, sql) in CLICKHOUSE_DDL {
            for s in statements(sql) {
                assert!(s.starts_with("CREATE"), "{s}");
                assert!(!s.contains("DateTime64") && !s.contains("Map(") && !s.contains(" TTL "));
            }
        }
    }
}
