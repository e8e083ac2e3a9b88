//! The usage stream's ClickHouse rows: raw `usage_events` and the
//! `usage_1m/1h/1d` rollups.
//!
//! Guarantee: the rows are a pure function of the batch's enriched events and
//! its batch id; each row has a key (`PartKey`) unique within its batch and
//! table, so a partly landed part is completed by key on replay.

use crate::errors::StageError;
use crate::sinks::clickhouse::{
    decimal_38_12, epoch, join_key, non_negative, split_by_month, ClickHouseSink, PartKey,
    WriteOutcome,
};
use crate::streams::usage::enrich::Enriched;
use crate::streams::usage::rollup::{rollup_all, RollupKey, Totals};
use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::Serialize;
use uuid::Uuid;

/// Tables a usage batch writes.
pub const USAGE_TABLES: [&str; 4] = ["usage_events", "usage_1m", "usage_1h", "usage_1d"];

/// A raw row; borrows the event's strings (no copy per row).
#[derive(Debug, Row, Serialize)]
pub struct UsageRow<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    pub occurred_at: u32,
    pub ingested_at: u32,
    pub tenant_id: &'a str,
    pub tenant_known: u8,
    pub team_id: &'a str,
    pub project_id: &'a str,
    pub user_id: &'a str,
    pub source: &'a str,
    pub request_id: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
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
    pub currency: &'a str,
    pub src_partition: u32,
    pub src_offset: u64,
    pub batch_id: u64,
}

impl<'a> UsageRow<'a> {
    pub fn new(e: &'a Enriched, batch_id: u64, ingested_at: DateTime<Utc>) -> Self {
        let ev = &e.event;
        UsageRow {
            event_id: ev.event_id,
            occurred_at: epoch(ev.occurred_at),
            ingested_at: epoch(ingested_at),
            tenant_id: &ev.tenant_id,
            tenant_known: u8::from(e.tenant_known),
            team_id: ev.team_id.as_deref().unwrap_or_default(),
            project_id: ev.project_id.as_deref().unwrap_or_default(),
            user_id: ev.user_id.as_deref().unwrap_or_default(),
            source: &ev.source,
            request_id: &ev.request_id,
            provider: &ev.provider,
            model: &ev.model,
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
            currency: &ev.currency,
            src_partition: u32::try_from(e.partition).unwrap_or(0),
            src_offset: non_negative(e.offset),
            batch_id,
        }
    }
}

/// A rollup row; borrows the key's strings from the events.
#[derive(Debug, Row, Serialize)]
pub struct RollupRow<'a> {
    pub bucket: u32,
    pub tenant_id: &'a str,
    pub team_id: &'a str,
    pub project_id: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
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

pub fn rollup_rows(rollup: Vec<(RollupKey<'_>, Totals)>, batch_id: u64) -> Vec<RollupRow<'_>> {
    rollup
        .into_iter()
        .map(|(k, t)| RollupRow {
            bucket: epoch(k.bucket),
            tenant_id: k.tenant_id,
            team_id: k.team_id,
            project_id: k.project_id,
            provider: k.provider,
            model: k.model,
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

impl PartKey for UsageRow<'_> {
    fn part_key(&self) -> String {
        self.event_id.to_string()
    }
}

impl PartKey for RollupRow<'_> {
    fn part_key(&self) -> String {
        join_key(
            self.bucket,
            &[
                self.tenant_id,
                self.team_id,
                self.project_id,
                self.provider,
                self.model,
                self.status,
            ],
        )
    }
}

/// Writes a batch's raw rows and rollups. `verify_first`: the outcome of an
/// earlier attempt is unknown, so check each (table, month) first.
/// `fence`: checked right before every insert, so a stale owner never writes.
pub async fn write_usage_batch(
    ch: &ClickHouseSink,
    batch_id: u64,
    events: &[Enriched],
    verify_first: bool,
    fence: &crate::engine::ownership::Fence,
) -> Result<WriteOutcome, StageError> {
    let mut outcome = WriteOutcome::default();
    if events.is_empty() {
        return Ok(outcome);
    }
    let now = Utc::now();
    // The four tables are independent (each part is checked on its own),
    // so they are written concurrently; a table's parts one after the other.
    let raw = async {
        let rows: Vec<UsageRow> = events
            .iter()
            .map(|e| UsageRow::new(e, batch_id, now))
            .collect();
        let parts = split_by_month(rows, |r| r.occurred_at);
        ch.write_table::<UsageRow<'static>>(USAGE_TABLES[0], batch_id, parts, verify_first, fence)
            .await
    };
    let [minute, hour, day] =
        rollup_all(events).map(|r| split_by_month(rollup_rows(r, batch_id), |r| r.bucket));
    let (raw, minute, hour, day) = futures::join!(
        raw,
        ch.write_table::<RollupRow<'static>>(
            USAGE_TABLES[1],
            batch_id,
            minute,
            verify_first,
            fence
        ),
        ch.write_table::<RollupRow<'static>>(USAGE_TABLES[2], batch_id, hour, verify_first, fence),
        ch.write_table::<RollupRow<'static>>(USAGE_TABLES[3], batch_id, day, verify_first, fence),
    );
    let results = [raw, minute, hour, day];
    for r in results {
        let t = r?;
        outcome.rows_written += t.rows_written;
        outcome.parts_written += t.parts_written;
        outcome.parts_skipped += t.parts_skipped;
        if t.parts_written > 0 {
            outcome.tables_written += 1;
        } else {
            outcome.tables_skipped += 1;
        }
    }
    Ok(outcome)
}
