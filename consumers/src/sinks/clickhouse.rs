//! ClickHouse sink: every stream's raw table and rollups (the stream makes the
//! rows, this writes them: `write_table`).
//!
//! Guarantee: exactly once per batch, table and month, without ClickHouse's
//! insert dedup (18.16 has none). The tables are partitioned by month
//! (`toYYYYMM` of the event time) and one INSERT spanning two months writes one
//! part per month, each committed on its own; so a batch's rows are cut per
//! (table, month) and each cut is one INSERT of one block (at most
//! `MAX_INSERT_BLOCK_ROWS` rows), i.e. one part, atomic on MergeTree. Every row
//! carries `batch_id`. Whenever the outcome of an earlier attempt is unknown (a
//! replay after a crash, or a retry after an error) each (table, month) is
//! first counted: exactly the expected rows, skip it; none, write it; any other
//! count is impossible with one-part inserts and stops the pipeline (Fatal)
//! rather than being accepted. Each INSERT runs under a query id derived from
//! (database, table, batch, month), and that check first waits until no query
//! with that id is still running: an INSERT whose client was killed can still
//! complete in the server, and must be seen before deciding to write again.
//! Every insert is preceded by the batch's ownership fence (`ownership.rs`).

use crate::config::ClickHouseConfig;
use crate::errors::{classify_ch, StageError};
use chrono::{DateTime, Datelike, Utc};
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;

/// Decimal(38, 12) in RowBinary: the value scaled by 10^12 as an i128.
pub fn decimal_38_12(d: Decimal) -> i128 {
    let mut d = d;
    d.rescale(12);
    d.mantissa()
}

/// Seconds since the epoch, as a `DateTime('UTC')` column holds them.
pub fn epoch(ts: DateTime<Utc>) -> u32 {
    u32::try_from(ts.timestamp()).unwrap_or(0)
}

pub fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[derive(Debug, Row, Deserialize)]
struct CountRow {
    n: u64,
}

/// A client for the configured server and database: TLS verified against
/// `clickhouse.ca_file` for an https:// URL (validated at load, so the
/// connector cannot fail here; if it did, the client would use the system's
/// CAs and still verify), no row validation (18.16 lacks
/// RowBinaryWithNamesAndTypes).
pub fn client(cfg: &ClickHouseConfig) -> clickhouse::Client {
    let base = match crate::sinks::https::connector(&cfg.ca_file, "clickhouse.ca_file") {
        Ok(connector) => clickhouse::Client::with_http_client(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(std::time::Duration::from_secs(2))
                .build(connector),
        ),
        Err(e) => {
            tracing::error!(error = %e, "clickhouse TLS setup failed; using the system CAs");
            clickhouse::Client::default()
        }
    };
    base.with_url(&cfg.url)
        .with_user(&cfg.user)
        .with_password(&cfg.password)
        .with_database(&cfg.database)
        .with_validation(false)
        .with_compression(match cfg.compression {
            crate::config::ChCompression::Lz4 => clickhouse::Compression::Lz4,
            crate::config::ChCompression::None => clickhouse::Compression::None,
        })
}

#[derive(Clone)]
pub struct ClickHouseSink {
    client: clickhouse::Client,
    database: String,
}

impl ClickHouseSink {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        let client = client(cfg);
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

    /// Rows of `table` written by `batch_id` in month `yyyymm` (one partition).
    pub async fn part_rows(
        &self,
        table: &str,
        batch_id: u64,
        yyyymm: u32,
    ) -> Result<u64, StageError> {
        let sql = format!(
            "SELECT count() AS n FROM {}.{} WHERE batch_id = ? AND toYYYYMM({}) = ?",
            self.database,
            table,
            time_column(table)
        );
        let row: CountRow = self
            .client
            .query(&sql)
            .bind(batch_id)
            .bind(yyyymm)
            .fetch_one()
            .await
            .map_err(|e| classify_ch("clickhouse batch check", e))?;
        Ok(row.n)
    }

    /// Writes one table's parts (one INSERT per month), checking each first
    /// when `verify_first`. A part found incomplete is repaired: ClickHouse
    /// commits what it received of an INSERT whose client died mid-request
    /// (measured on 18.16: a truncated body lands as the rows it holds), so
    /// the rows already there are read back by key and only the missing
    /// ones are written.
    ///
    /// `R` names the row type (`UsageRow<'static>` for one that borrows); the
    /// rows are its values at the borrow's lifetime, so none is copied.
    pub async fn write_table<'r, R>(
        &self,
        table: &'static str,
        batch_id: u64,
        parts: Vec<(u32, Vec<R::Value<'r>>)>,
        verify_first: bool,
        fence: &crate::engine::ownership::Fence,
    ) -> Result<TableOutcome, StageError>
    where
        R: clickhouse::RowWrite,
        R::Value<'r>: PartKey + Send + Sync,
    {
        let mut out = TableOutcome::default();
        for (i, (yyyymm, rows)) in parts.iter().enumerate() {
            if i > 0 {
                crate::engine::failpoint::hit("between_insert_parts").await?;
            }
            let query_id = self.query_id(table, batch_id, *yyyymm);
            let expected = rows.len() as u64;
            if verify_first {
                // An earlier attempt's INSERT may still be running in the server
                // (its client died or timed out): wait for it to end, then count.
                self.wait_until_not_running(&query_id).await?;
                let found = self.part_rows(table, batch_id, *yyyymm).await?;
                if found == expected {
                    out.parts_skipped += 1;
                    continue;
                }
                if found != 0 {
                    let missing = self
                        .missing_rows(table, batch_id, *yyyymm, rows, found)
                        .await?;
                    tracing::warn!(
                        batch_id,
                        table,
                        partition = yyyymm,
                        found,
                        expected,
                        writing = missing.len(),
                        "partly landed insert: writing only the missing rows"
                    );
                    fence.check().await?;
                    self.insert::<R>(table, &query_id, missing.iter().copied())
                        .await?;
                    out.parts_written += 1;
                    out.rows_written += missing.len() as u64;
                    continue;
                }
            }
            if out.parts_written == 0 {
                crate::engine::failpoint::hit("before_clickhouse_insert").await?;
            }
            fence.check().await?;
            self.insert::<R>(table, &query_id, rows.iter()).await?;
            out.parts_written += 1;
            out.rows_written += expected;
        }
        if out.parts_written > 0 {
            crate::engine::failpoint::hit("after_clickhouse_table").await?;
        }
        Ok(out)
    }

    /// The rows of `rows` not yet stored for (`table`, `batch_id`, month),
    /// given that `found` are. Anything else than a subset of the batch's own
    /// rows stored once each is Fatal (it cannot come from tally's inserts).
    async fn missing_rows<'r, T: PartKey>(
        &self,
        table: &str,
        batch_id: u64,
        yyyymm: u32,
        rows: &'r [T],
        found: u64,
    ) -> Result<Vec<&'r T>, StageError> {
        #[derive(Debug, Row, Deserialize)]
        struct KeyRow {
            k: String,
        }
        let sql = format!(
            "SELECT {} AS k FROM {}.{} WHERE batch_id = ? AND toYYYYMM({}) = ?",
            part_key_sql(table),
            self.database,
            table,
            time_column(table)
        );
        let present: Vec<KeyRow> = self
            .client
            .query(&sql)
            .bind(batch_id)
            .bind(yyyymm)
            .fetch_all()
            .await
            .map_err(|e| classify_ch("clickhouse batch keys", e))?;
        let present: std::collections::HashSet<String> = present.into_iter().map(|r| r.k).collect();
        let missing: Vec<&T> = rows
            .iter()
            .filter(|r| !present.contains(&r.part_key()))
            .collect();
        let expected = rows.len() as u64;
        if present.len() as u64 != found || found + missing.len() as u64 != expected {
            return Err(StageError::Fatal(format!(
                "batch {batch_id}: {}.{table} partition {yyyymm} holds {found} rows ({} distinct keys) \
                 that are not a subset of the batch's {expected}: not written by tally; inspect \
                 SELECT * FROM {}.{table} WHERE batch_id = {batch_id}",
                self.database,
                present.len(),
                self.database
            )));
        }
        Ok(missing)
    }

    /// The INSERT of `table` for `batch_id` and month `yyyymm` always runs
    /// under this query id, so the server refuses a second copy while the
    /// first still runs, and a replay can see whether an earlier attempt is
    /// still in progress.
    fn query_id(&self, table: &str, batch_id: u64, yyyymm: u32) -> String {
        format!("tally-{}-{table}-{batch_id}-{yyyymm}", self.database)
    }

    /// Deletes every row of `batch_ids` from the usage tables (an abandoned
    /// pending batch: `tally reset-offsets`, `tally migrate`). Waits first
    /// until no INSERT of those batches still runs in the server, then runs
    /// one `ALTER TABLE ... DELETE` mutation per table holding such rows and
    /// waits until the table has no unfinished mutation. Rare and slow by
    /// design (a mutation rewrites the parts it touches). Returns the rows
    /// deleted per table.
    pub async fn delete_batches(
        &self,
        batch_ids: &[u64],
    ) -> Result<Vec<(&'static str, u64)>, StageError> {
        let mut out = Vec::new();
        if batch_ids.is_empty() {
            return Ok(out);
        }
        self.wait_until_batches_not_inserting(batch_ids).await?;
        let list = batch_ids
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        for table in BATCH_TABLES.iter().map(|t| t.name) {
            let count = |sql: String| async move {
                let row: CountRow = self
                    .client
                    .query(&sql)
                    .fetch_one()
                    .await
                    .map_err(|e| classify_ch("clickhouse batch rows", e))?;
                Ok::<_, StageError>(row.n)
            };
            let select = format!(
                "SELECT count() AS n FROM {}.{table} WHERE batch_id IN ({list})",
                self.database
            );
            let n = count(select.clone()).await?;
            if n > 0 {
                self.execute(&format!(
                    "ALTER TABLE {}.{table} DELETE WHERE batch_id IN ({list})",
                    self.database
                ))
                .await?;
                self.wait_for_mutations(table).await?;
                let left = count(select).await?;
                if left > 0 {
                    return Err(StageError::Fatal(format!(
                        "{}.{table}: {left} rows of batches {list} left after their deletion",
                        self.database
                    )));
                }
            }
            out.push((table, n));
        }
        Ok(out)
    }

    /// Waits until no INSERT of any of `batch_ids` (query ids
    /// `tally-<db>-<table>-<batch>[-<month>]`) runs on the server.
    async fn wait_until_batches_not_inserting(&self, batch_ids: &[u64]) -> Result<(), StageError> {
        #[derive(Debug, Row, Deserialize)]
        struct Running {
            query_id: String,
        }
        let prefix = format!("tally-{}-", self.database);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let rows: Vec<Running> = self
                .client
                .query("SELECT query_id FROM system.processes WHERE query_id LIKE 'tally-%'")
                .fetch_all()
                .await
                .map_err(|e| classify_ch("clickhouse running-insert check", e))?;
            let running = rows.iter().any(|r| {
                r.query_id
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split('-').nth(1))
                    .and_then(|b| b.parse::<u64>().ok())
                    .is_some_and(|b| batch_ids.contains(&b))
            });
            if !running {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(StageError::Retryable(format!(
                    "an insert of batches {batch_ids:?} is still running"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Waits until `table` has no unfinished mutation (18.16 reports no
    /// failure reason: a mutation that cannot finish times out here).
    async fn wait_for_mutations(&self, table: &str) -> Result<(), StageError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let row: CountRow = self
                .client
                .query(
                    "SELECT count() AS n FROM system.mutations WHERE database = ? AND table = ? AND is_done = 0",
                )
                .bind(&self.database)
                .bind(table)
                .fetch_one()
                .await
                .map_err(|e| classify_ch("clickhouse mutation check", e))?;
            if row.n == 0 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(StageError::Fatal(format!(
                    "{}.{table}: a mutation is still unfinished after 300 s (see system.mutations)",
                    self.database
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
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

    async fn insert<'r, 'v: 'r, R>(
        &self,
        table: &str,
        query_id: &str,
        rows: impl ExactSizeIterator<Item = &'r R::Value<'v>>,
    ) -> Result<(), StageError>
    where
        R: clickhouse::RowWrite + 'r,
        R::Value<'v>: Sync + 'r,
    {
        if rows.len() > MAX_INSERT_BLOCK_ROWS {
            // pipeline.batch_max_messages (at most 1,000,000) keeps every part below it.
            return Err(StageError::Fatal(format!(
                "insert {query_id}: {} rows exceed one block ({MAX_INSERT_BLOCK_ROWS})",
                rows.len()
            )));
        }
        let mut insert = self
            .client
            .insert::<R>(table)
            .await
            .map_err(|e| classify_ch("clickhouse insert", e))?
            .with_setting("query_id", query_id)
            // One block per INSERT whatever the server profile says, so one part.
            .with_setting("max_insert_block_size", MAX_INSERT_BLOCK_ROWS.to_string());
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
    /// Tables that received at least one part.
    pub tables_written: u32,
    /// Tables whose every part was already there.
    pub tables_skipped: u32,
    pub parts_written: u32,
    pub parts_skipped: u32,
    pub rows_written: u64,
}

/// What one table's write did.
#[derive(Debug, Default, Clone, Copy)]
pub struct TableOutcome {
    pub parts_written: u32,
    pub parts_skipped: u32,
    pub rows_written: u64,
}

impl WriteOutcome {
    /// Adds one table's outcome.
    pub fn add(&mut self, t: TableOutcome) {
        self.rows_written += t.rows_written;
        self.parts_written += t.parts_written;
        self.parts_skipped += t.parts_skipped;
        if t.parts_written > 0 {
            self.tables_written += 1;
        } else {
            self.tables_skipped += 1;
        }
    }
}

/// Rows per INSERT block (ClickHouse's default `max_insert_block_size`, set
/// explicitly on every insert): an INSERT of at most this many rows into one
/// partition is one block, hence one part.
pub const MAX_INSERT_BLOCK_ROWS: usize = 1_048_576;

/// The column each usage table is partitioned on (`PARTITION BY toYYYYMM(col)`
/// in sql/clickhouse/).
/// A row's identity within one batch and table: the event id for raw rows,
/// the bucket and dimensions for rollups (a batch writes one row per key).
pub trait PartKey {
    fn part_key(&self) -> String;
}

/// Length-prefixed, so no two different keys print alike.
pub fn join_key(bucket: u32, parts: &[&str]) -> String {
    let mut k = bucket.to_string();
    for p in parts {
        k.push('|');
        k.push_str(&p.len().to_string());
        k.push(':');
        k.push_str(p);
    }
    k
}

/// A table batches write: its name, the column it is partitioned on
/// (`PARTITION BY toYYYYMM(col)` in sql/clickhouse/) and the dimensions that
/// identify a rollup row within a batch (none: a raw table, keyed by event id).
pub struct TableSpec {
    pub name: &'static str,
    pub time_column: &'static str,
    pub dims: &'static [&'static str],
}

const USAGE_DIMS: &[&str] = &[
    "tenant_id",
    "team_id",
    "project_id",
    "provider",
    "model",
    "status",
];
const POLICY_DIMS: &[&str] = &["tenant_id", "policy_id", "decision", "enforcement"];

const fn raw(name: &'static str) -> TableSpec {
    TableSpec {
        name,
        time_column: "occurred_at",
        dims: &[],
    }
}

const fn rollup(name: &'static str, dims: &'static [&'static str]) -> TableSpec {
    TableSpec {
        name,
        time_column: "bucket",
        dims,
    }
}

/// Every table any stream's batches write (`delete_batches` clears them all).
pub const BATCH_TABLES: [TableSpec; 9] = [
    raw("usage_events"),
    rollup("usage_1m", USAGE_DIMS),
    rollup("usage_1h", USAGE_DIMS),
    rollup("usage_1d", USAGE_DIMS),
    raw("policy_decisions"),
    rollup("policy_decisions_1m", POLICY_DIMS),
    rollup("policy_decisions_1h", POLICY_DIMS),
    rollup("policy_decisions_1d", POLICY_DIMS),
    raw("audit_events"),
];

fn spec(table: &str) -> &'static TableSpec {
    BATCH_TABLES
        .iter()
        .find(|t| t.name == table)
        .unwrap_or(&BATCH_TABLES[0])
}

/// The row key (`PartKey`) computed by ClickHouse from the stored columns.
fn part_key_sql(table: &str) -> String {
    let t = spec(table);
    if t.dims.is_empty() {
        return "toString(event_id)".into();
    }
    let mut sql = "concat(toString(toUInt32(bucket))".to_string();
    for c in t.dims {
        sql.push_str(&format!(", '|', toString(length({c})), ':', {c}"));
    }
    sql.push(')');
    sql
}

pub fn time_column(table: &str) -> &'static str {
    spec(table).time_column
}

/// `toYYYYMM` of a `DateTime('UTC')` stored as seconds since the epoch.
pub fn yyyymm(epoch_secs: u32) -> u32 {
    let t = DateTime::<Utc>::from_timestamp(i64::from(epoch_secs), 0).unwrap_or_default();
    u32::try_from(t.year()).unwrap_or(0) * 100 + t.month()
}

/// Cuts rows into one group per month of `ts` (the partition key), in month
/// order, keeping the rows' order within a month.
pub fn split_by_month<T>(rows: Vec<T>, ts: impl Fn(&T) -> u32) -> Vec<(u32, Vec<T>)> {
    // Nearly always one month: keep the rows where they are.
    let Some(first) = rows.first().map(|r| yyyymm(ts(r))) else {
        return Vec::new();
    };
    if rows.iter().all(|r| yyyymm(ts(r)) == first) {
        return vec![(first, rows)];
    }
    let mut by_month: std::collections::BTreeMap<u32, Vec<T>> = std::collections::BTreeMap::new();
    for r in rows {
        by_month.entry(yyyymm(ts(&r))).or_default().push(r);
    }
    by_month.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::usage::enrich::Enriched;
    use crate::streams::usage::rollup::Granularity;
    use crate::streams::usage::rows::{rollup_rows, UsageRow};
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

    fn secs(rfc3339: &str) -> u32 {
        u32::try_from(DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp()).unwrap()
    }

    #[test]
    fn rows_are_cut_into_one_insert_per_month_partition() {
        let rows = vec![
            (secs("2024-02-01T00:00:00Z"), 'a'),
            (secs("2024-01-31T23:59:59Z"), 'b'),
            (secs("2024-02-29T23:59:59Z"), 'c'),
            (secs("2023-12-31T23:00:00Z"), 'd'),
            (secs("2024-01-01T00:00:00Z"), 'e'),
            (secs("2024-01-15T12:00:00Z"), 'f'),
        ];
        let parts = split_by_month(rows, |r| r.0);
        let got: Vec<(u32, String)> = parts
            .iter()
            .map(|(m, rs)| (*m, rs.iter().map(|r| r.1).collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                (202312, "d".to_string()),
                (202401, "bef".to_string()),
                (202402, "ac".to_string()),
            ]
        );
        assert!(split_by_month(Vec::<(u32, char)>::new(), |r| r.0).is_empty());
        assert_eq!(yyyymm(0), 197001);
        assert_eq!(time_column("usage_events"), "occurred_at");
        assert_eq!(time_column("usage_1d"), "bucket");
    }

    /// A batch of late events around a month boundary: every table is cut
    /// into one part per month, and the parts hold all the table's rows.
    #[test]
    fn a_month_spanning_batch_is_cut_into_two_parts_per_table() {
        use crate::streams::usage::enrich::tests::enriched;
        // -7200 s .. +7200 s around 2026-01-01T00:00:00Z, one event a minute.
        let events: Vec<Enriched> = (-120i64..120)
            .map(|m| enriched("t1", "m1", m * 60 + 7, 100, 10, Decimal::ONE))
            .collect();
        let now = Utc::now();
        let raw: Vec<UsageRow> = events.iter().map(|e| UsageRow::new(e, 9, now)).collect();
        let parts = split_by_month(raw, |r| r.occurred_at);
        let sizes: Vec<(u32, usize)> = parts.iter().map(|(m, r)| (*m, r.len())).collect();
        assert_eq!(sizes, vec![(202512, 120), (202601, 120)]);
        for (g, rows_per_month) in [
            (Granularity::Minute, 120),
            (Granularity::Hour, 2),
            (Granularity::Day, 1),
        ] {
            let rows = rollup_rows(crate::streams::usage::rollup::rollup(&events, g), 9);
            let n = rows.len();
            let parts = split_by_month(rows, |r| r.bucket);
            let sizes: Vec<(u32, usize)> = parts.iter().map(|(m, r)| (*m, r.len())).collect();
            assert_eq!(
                sizes,
                vec![(202512, rows_per_month), (202601, rows_per_month)],
                "{g:?}"
            );
            assert_eq!(n, 2 * rows_per_month);
        }
    }

    proptest::proptest! {
        /// Every row lands in exactly one group, the group of its own month
        /// (as ClickHouse's `toYYYYMM` on a UTC DateTime computes it), and the
        /// groups are distinct and ordered.
        #[test]
        fn split_keeps_every_row_in_its_own_month(ts in proptest::collection::vec(0u32..=u32::MAX, 0..300)) {
            let rows: Vec<(usize, u32)> = ts.iter().copied().enumerate().collect();
            let parts = split_by_month(rows.clone(), |r| r.1);
            let total: usize = parts.iter().map(|(_, rs)| rs.len()).sum();
            proptest::prop_assert_eq!(total, rows.len());
            for w in parts.windows(2) {
                proptest::prop_assert!(w[0].0 < w[1].0);
            }
            for (m, rs) in &parts {
                proptest::prop_assert!(!rs.is_empty());
                for r in rs {
                    let t = DateTime::<Utc>::from_timestamp(i64::from(r.1), 0).unwrap();
                    proptest::prop_assert_eq!(*m, t.format("%Y%m").to_string().parse::<u32>().unwrap());
                }
                // order within a month is kept
                proptest::prop_assert!(rs.windows(2).all(|w| w[0].0 < w[1].0));
            }
        }
    }
}
