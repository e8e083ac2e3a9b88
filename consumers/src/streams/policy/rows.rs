//! The policy stream's ClickHouse rows: raw `policy_decisions` and the
//! `policy_decisions_1m/1h/1d` rollups.
//!
//! Guarantee: the rows are a pure function of the batch's decisions and its
//! batch id, each with a key unique within its batch and table (the event id;
//! bucket and dimensions for rollups), so a partly landed part is completed by
//! key on replay.

use crate::engine::ownership::Fence;
use crate::errors::StageError;
use crate::sinks::clickhouse::{
    epoch, join_key, non_negative, split_by_month, ClickHouseSink, PartKey, WriteOutcome,
};
use crate::streams::policy::rollup::{rollup, table};
use crate::streams::usage::rollup::Granularity;
use clickhouse::Row;
use serde::Serialize;
use tally_schemas::PolicyDecision;
use uuid::Uuid;

#[derive(Debug, Row, Serialize)]
pub struct DecisionRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    pub occurred_at: u32,
    pub tenant_id: String,
    pub team_id: String,
    pub project_id: String,
    pub user_id: String,
    pub source: String,
    pub decision_id: String,
    pub request_id: String,
    pub policy_id: String,
    pub policy_version: String,
    pub decision: &'static str,
    pub enforcement: &'static str,
    pub severity: &'static str,
    pub rule_ids: Vec<String>,
    pub reason: String,
    pub evaluation_ms: u64,
    pub batch_id: u64,
}

impl DecisionRow {
    pub fn new(d: &PolicyDecision, batch_id: u64) -> Self {
        Self {
            event_id: d.event_id,
            occurred_at: epoch(d.occurred_at),
            tenant_id: d.tenant_id.clone(),
            team_id: d.team_id.clone().unwrap_or_default(),
            project_id: d.project_id.clone().unwrap_or_default(),
            user_id: d.user_id.clone().unwrap_or_default(),
            source: d.source.clone(),
            decision_id: d.decision_id.clone(),
            request_id: d.request_id.clone(),
            policy_id: d.policy_id.clone(),
            policy_version: d.policy_version.clone(),
            decision: d.decision.as_str(),
            enforcement: d.enforcement.as_str(),
            severity: d.severity.as_str(),
            rule_ids: d.rule_ids.clone(),
            reason: d.reason.clone(),
            evaluation_ms: non_negative(d.evaluation_ms),
            batch_id,
        }
    }
}

impl PartKey for DecisionRow {
    fn part_key(&self) -> String {
        self.event_id.to_string()
    }
}

#[derive(Debug, Row, Serialize)]
pub struct DecisionRollupRow {
    pub bucket: u32,
    pub tenant_id: String,
    pub policy_id: String,
    pub decision: &'static str,
    pub enforcement: &'static str,
    pub decisions: u64,
    pub evaluation_ms: u64,
    pub batch_id: u64,
}

impl PartKey for DecisionRollupRow {
    fn part_key(&self) -> String {
        join_key(
            self.bucket,
            &[
                &self.tenant_id,
                &self.policy_id,
                self.decision,
                self.enforcement,
            ],
        )
    }
}

pub fn rollup_rows(
    batch: &[PolicyDecision],
    g: Granularity,
    batch_id: u64,
) -> Vec<DecisionRollupRow> {
    rollup(batch, g)
        .into_iter()
        .map(|(k, t)| DecisionRollupRow {
            bucket: epoch(k.bucket),
            tenant_id: k.tenant_id.to_string(),
            policy_id: k.policy_id.to_string(),
            decision: k.decision.as_str(),
            enforcement: k.enforcement.as_str(),
            decisions: non_negative(t.decisions),
            evaluation_ms: non_negative(t.evaluation_ms),
            batch_id,
        })
        .collect()
}

/// Writes a batch's decisions and rollups (see `ClickHouseSink::write_table`).
pub async fn write_policy_batch(
    ch: &ClickHouseSink,
    batch_id: u64,
    batch: &[PolicyDecision],
    verify_first: bool,
    fence: &Fence,
) -> Result<WriteOutcome, StageError> {
    let mut outcome = WriteOutcome::default();
    if batch.is_empty() {
        return Ok(outcome);
    }
    let raw = async {
        let rows: Vec<DecisionRow> = batch
            .iter()
            .map(|d| DecisionRow::new(d, batch_id))
            .collect();
        let parts = split_by_month(rows, |r| r.occurred_at);
        ch.write_table::<DecisionRow>("policy_decisions", batch_id, parts, verify_first, fence)
            .await
    };
    let rolled = |g: Granularity| async move {
        let parts = split_by_month(rollup_rows(batch, g, batch_id), |r| r.bucket);
        ch.write_table::<DecisionRollupRow>(table(g), batch_id, parts, verify_first, fence)
            .await
    };
    let (a, b, c, d) = futures::join!(
        raw,
        rolled(Granularity::Minute),
        rolled(Granularity::Hour),
        rolled(Granularity::Day)
    );
    for t in [a, b, c, d] {
        outcome.add(t?);
    }
    Ok(outcome)
}
