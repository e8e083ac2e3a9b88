//! ClickHouse sink: raw `usage_events` and the `usage_1m/1h/1d` rollups.
//!
//! Guarantee: exactly once per batch and table, without ClickHouse's insert
//! dedup (18.16 has none). Each table receives one INSERT per batch (a single
//! block, atomic on MergeTree) whose rows all carry `batch_id`. Whenever the
//! outcome of an earlier attempt is unknown (a replay after a crash, or a retry
//! after an error) the table is first asked for rows of that `batch_id` and is
//! skipped if it has them. Each INSERT runs under a query id derived from
//! (database, table, batch), and that check first waits until no query with
//! that id is still running: an INSERT whose client was killed can still
//! complete in the server, and must be seen before deciding to write again.
//! Every insert is preceded by the batch's ownership fence (`ownership.rs`).

use crate::config::ClickHouseConfig;
use crate::enrich::Enriched;
use crate::errors::{classify_ch, StageError};
use crate::rollup::{rollup, Granularity};
use chrono::{DateTime, Utc};
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Decimal(38, 12) in RowBinary: the value scaled by 10^12 as an i128.
pub fn decimal_38_12(d: Decimal) -> i128 {
    let mut d = d;
    d.rescale(12);
    d.mantissa()
}

fn epoch(ts: DateTime<Utc>) -> u32 {
    u32::try_from(ts.timestamp()).unwrap_or(0)
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[derive(Debug, Row, Serialize)]
pub struct UsageRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    pub occurred_at: u32,
    pub ingested_at: u32,
    pub tenant_id: String,
    pub tenant_known: u8,
    pub team_id: String,
    pub project_id: String,
    pub user_id: String,
    pub source: String,
    pub request_id: String,
    pub provider: String,
    pub model: String,
    pub status: &'static str,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub latency_ms: u64,
    pub cost: i128,
    pub cost_status: &'static str,
    pub price_effective_from: u32,
    pub reported_cost: Option<i128>,
    pub cost_mismatch: u8,
    pub over_quota: u8,
    pub currency: String,
    pub src_partition: u32,
    pub src_offset: u64,
    pub batch_id: u64,
}

impl UsageRow {
    pub fn new(e: &Enriched, batch_id: u64, ingested_at: DateTime<Utc>) -> Self {
        let ev = &e.event;
        UsageRow {
            event_id: ev.event_id,
            occurred_at: epoch(ev.occurred_at),
            ingested_at: epoch(ingested_at),
            tenant_id: ev.tenant_id.clone(),
            tenant_known: u8::from(e.tenant_known),
            team_id: ev.team_id.clone().unwrap_or_default(),
            project_id: ev.project_id.clone().unwrap_or_default(),
            user_id: ev.user_id.clone().unwrap_or_default(),
            source: ev.source.clone(),
            request_id: ev.request_id.clone(),
            provider: ev.provider.clone(),
            model: ev.model.clone(),
            status: ev.status.as_str(),
            input_tokens: non_negative(ev.input_tokens),
            cached_input_tokens: non_negative(ev.cached_input_tokens),
            cache_write_tokens: non_negative(ev.cache_write_tokens),
            output_tokens: non_negative(ev.output_tokens),
            reasoning_tokens: non_negative(ev.reasoning_tokens),
            latency_ms: non_negative(ev.latency_ms),
            cost: decimal_38_12(e.cost),
            cost_status: if e.priced { "priced" } else { "unpriced" },
            price_effective_from: e.price_effective_from.map(epoch).unwrap_or(0),
            reported_cost: ev.reported_cost.map(decimal_38_12),
            cost_mismatch: u8::from(e.cost_mismatch),
            over_quota: u8::from(e.over_quota),
            currency: ev.currency.clone(),
            src_partition: u32::try_from(e.partition).unwrap_or(0),
            src_offset: non_negative(e.offset),
            batch_id,
        }
    }
}

#[derive(Debug, Row, Serialize)]
pub struct RollupRow {
    pub bucket: u32,
    pub tenant_id: String,
    pub team_id: String,
    pub project_id: String,
    pub provider: String,
    pub model: String,
    pub status: &'static str,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost: i128,
    pub unpriced_requests: u64,
    pub batch_id: u64,
}

pub fn rollup_rows(events: &[Enriched], g: Granularity, batch_id: u64) -> Vec<RollupRow> {
    rollup(events, g)
        .into_iter()
        .map(|(k, t)| RollupRow {
            bucket: epoch(k.bucket),
            tenant_id: k.tenant_id.to_string(),
            team_id: k.team_id.to_string(),
            project_id: k.project_id.to_string(),
            provider: k.provider.to_string(),
            model: k.model.to_string(),
            status: k.status,
            requests: non_negative(t.requests),
            input_tokens: non_negative(t.tokens.input),
            cached_input_tokens: non_negative(t.tokens.cached_input),
            cache_write_tokens: non_negative(t.tokens.cache_write),
            output_tokens: non_negative(t.tokens.output),
            reasoning_tokens: non_negative(t.tokens.reasoning),
            cost: decimal_38_12(t.cost),
            unpriced_requests: non_negative(t.unpriced_requests),
            batch_id,
        })
        .collect()
}

#[derive(Debug, Row, Deserialize)]
struct CountRow {
    n: u64,
}

#[derive(Clone)]
pub struct ClickHouseSink {
    client: clickhouse::Client,
    database: String,
}

/// Tables a usage batch writes, in order.
pub const USAGE_TABLES: [&str; 4] = ["usage_events", "usage_1m", "usage_1h", "usage_1d"];

impl ClickHouseSink {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        let client = clickhouse::Client::default()
            .with_url(&cfg.url)
            .with_user(&cfg.user)
            .with_password(&cfg.password)
            .with_database(&cfg.database)
            // 18.16 lacks RowBinaryWithNamesAndTypes.
            .with_validation(false);
        Self {
            client,
            database: cfg.database.clone(),
        }
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Runs one statement (DDL, maintenance).
    pub async fn execute(&self, sql: &str) -> Result<(), StageError> {
        self.client
            .query(sql)
            .execute()
            .await
            .map_err(|e| classify_ch("clickhouse statement", e))
    }

    /// Rows of `table` written by `batch_id`.
    pub async fn batch_rows(&self, table: &str, batch_id: u64) -> Result<u64, StageError> {
        let sql = format!(
            "SELECT count() AS n FROM {}.{} WHERE batch_id = ?",
            self.database, table
        );
        let row: CountRow = self
            .client
            .query(&sql)
            .bind(batch_id)
            .fetch_one()
            .await
            .map_err(|e| classify_ch("clickhouse batch check", e))?;
        Ok(row.n)
    }

    /// Writes a batch's raw rows and rollups. `verify_first`: the outcome of an
    /// earlier attempt is unknown, so check each table for the batch first.
    /// `fence`: checked right before every insert, so a stale owner never writes.
    pub async fn write_usage_batch(
        &self,
        batch_id: u64,
        events: &[Enriched],
        verify_first: bool,
        fence: &crate::ownership::Fence,
    ) -> Result<WriteOutcome, StageError> {
        let mut outcome = WriteOutcome::default();
        if events.is_empty() {
            return Ok(outcome);
        }
        let now = Utc::now();
        // The four inserts are independent (each is checked on its own), so
        // they run concurrently.
        let write = |table: &'static str| async move {
            let query_id = self.query_id(table, batch_id);
            if verify_first {
                // An earlier attempt's INSERT may still be running in the server
                // (its client died or timed out): wait for it to end, then count.
                self.wait_until_not_running(&query_id).await?;
                if self.batch_rows(table, batch_id).await? > 0 {
                    return Ok::<_, StageError>(None);
                }
            }
            crate::failpoint::hit("before_clickhouse_insert").await?;
            fence.check().await?;
            let rows = match table {
                "usage_events" => {
                    let rows: Vec<UsageRow> = events
                        .iter()
                        .map(|e| UsageRow::new(e, batch_id, now))
                        .collect();
                    self.insert(table, &query_id, &rows).await?;
                    rows.len()
                }
                _ => {
                    let g = match table {
                        "usage_1m" => Granularity::Minute,
                        "usage_1h" => Granularity::Hour,
                        _ => Granularity::Day,
                    };
                    let rows = rollup_rows(events, g, batch_id);
                    self.insert(table, &query_id, &rows).await?;
                    rows.len()
                }
            };
            crate::failpoint::hit("after_clickhouse_table").await?;
            Ok(Some(rows))
        };
        let results = futures::future::join_all(USAGE_TABLES.map(write)).await;
        for r in results {
            match r? {
                Some(rows) => {
                    outcome.rows_written += rows as u64;
                    outcome.tables_written += 1;
                }
                None => outcome.tables_skipped += 1,
            }
        }
        Ok(outcome)
    }

    /// The INSERT of `table` for `batch_id` always runs under this query id,
    /// so the server refuses a second copy while the first still runs, and a
    /// replay can see whether an earlier attempt is still in progress.
    fn query_id(&self, table: &str, batch_id: u64) -> String {
        format!("tally-{}-{table}-{batch_id}", self.database)
    }

    /// Waits until no query with `query_id` runs on the server.
    async fn wait_until_not_running(&self, query_id: &str) -> Result<(), StageError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let row: CountRow = self
                .client
                .query("SELECT count() AS n FROM system.processes WHERE query_id = ?")
                .bind(query_id)
                .fetch_one()
                .await
                .map_err(|e| classify_ch("clickhouse running-insert check", e))?;
            if row.n == 0 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(StageError::Retryable(format!(
                    "insert {query_id} is still running"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    async fn insert<T>(&self, table: &str, query_id: &str, rows: &[T]) -> Result<(), StageError>
    where
        T: clickhouse::RowWrite + for<'a> Row<Value<'a> = T>,
    {
        let mut insert = self
            .client
            .insert::<T>(table)
            .await
            .map_err(|e| classify_ch("clickhouse insert", e))?
            .with_setting("query_id", query_id);
        for row in rows {
            insert
                .write(row)
                .await
                .map_err(|e| classify_ch("clickhouse insert", e))?;
        }
        insert
            .end()
            .await
            .map_err(|e| classify_ch("clickhouse insert", e))
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    pub tables_written: u32,
    pub tables_skipped: u32,
    pub rows_written: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn decimal_scaling_is_exact() {
        assert_eq!(
            decimal_38_12(Decimal::from_str("1.5").unwrap()),
            1_500_000_000_000
        );
        assert_eq!(
            decimal_38_12(Decimal::from_str("0.000000000001").unwrap()),
            1
        );
        assert_eq!(decimal_38_12(Decimal::ZERO), 0);
    }
}
