//! The peer: ClickHouse's own Kafka table engine on the same topic, set up
//! from `sql/bench/kafka_engine.sql` (a Kafka table, a view into a raw
//! MergeTree with usage_events' columns, views into 1m/1h/1d rollups).
//!
//! Guarantee: the measured time runs from the DDL until every event of the
//! topic is in the raw table (counted, not inferred from offsets), and the
//! Kafka table is dropped afterwards so the engine stops reading.

use anyhow::{bail, Context};
use std::time::{Duration, Instant};
use tally::config::Config;

const SQL: &str = include_str!("../../sql/bench/kafka_engine.sql");

/// The engine's own database in ClickHouse.
pub const DB: &str = "tally_bench_engine";

/// What the engine run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineRun {
    pub elapsed: Duration,
    pub first: Option<Duration>,
    pub raw_rows: u64,
    /// Rows in the 1m rollup (blocks summed per view insert, before merges).
    pub rollup_1m_rows: u64,
}

/// The DDL with its placeholders filled in.
pub fn statements(brokers: &str, topic: &str, group: &str) -> Vec<String> {
    tally::cli::migrate::statements(SQL)
        .into_iter()
        .map(|s| {
            s.replace("{db}", DB)
                .replace("{brokers}", brokers)
                .replace("{topic}", topic)
                .replace("{group}", group)
        })
        .collect()
}

async fn count(ch: &clickhouse::Client, table: &str) -> anyhow::Result<u64> {
    ch.query(&format!("SELECT count() FROM {DB}.{table}"))
        .fetch_one::<u64>()
        .await
        .with_context(|| format!("counting {DB}.{table}"))
}

/// Creates the engine's tables on `topic` and waits until `n` rows are in the raw table.
pub async fn run(cfg: &Config, topic: &str, group: &str, n: u64) -> anyhow::Result<EngineRun> {
    let admin = crate::setup::clickhouse_admin(cfg);
    admin
        .execute(&format!("DROP DATABASE IF EXISTS {DB}"))
        .await?;
    let started = Instant::now();
    for s in statements(&cfg.kafka.brokers, topic, group) {
        admin
            .execute(&s)
            .await
            .with_context(|| format!("engine DDL: {}", &s[..s.len().min(80)]))?;
    }
    let ch = admin.client().clone();
    let timeout = crate::setup::deadline(n);
    let mut out = EngineRun::default();
    let mut last_note = Instant::now();
    loop {
        let rows = count(&ch, "usage_events").await?;
        if rows > 0 {
            out.first.get_or_insert_with(|| started.elapsed());
        }
        if rows >= n {
            out.elapsed = started.elapsed();
            out.raw_rows = rows;
            break;
        }
        if started.elapsed() > timeout {
            bail!(
                "the Kafka engine wrote {rows} of {n} rows within {} s (see the ClickHouse error log: a view that throws stops)",
                timeout.as_secs()
            );
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            last_note = Instant::now();
            eprintln!(
                "bench: engine: {rows}/{n} rows after {:.0?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stop consuming; the tables stay for inspection until the next run.
    admin
        .execute(&format!("DROP TABLE IF EXISTS {DB}.usage_queue"))
        .await?;
    out.rollup_1m_rows = count(&ch, "usage_1m").await.unwrap_or(0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_placeholder_is_filled() {
        let s = super::statements("b:1", "t", "g");
        assert!(s.len() >= 9);
        assert!(s.iter().all(|x| !x.contains('{')));
        assert!(s.iter().any(|x| x.contains("kafka_topic_list = 't'")));
    }
}
