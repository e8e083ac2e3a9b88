//! The audit stream's ClickHouse row: one `audit_events` row per leaf, column
//! for column what `audit::leaf::AuditLeaf` encodes (plus `occurred_at` at
//! second precision for partitioning, and `batch_id`).
//!
//! Guarantee: a row holds exactly the leaf's fields, so the leaf (and its hash)
//! can be recomputed from the stored row alone; its key within a batch is the
//! event id, so a partly landed part is completed by key on replay.

use crate::audit::leaf::AuditLeaf;
use crate::sinks::clickhouse::PartKey;
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `audit_events` in DDL column order (sql/clickhouse/006_policy_audit.sql).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct AuditRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    pub occurred_at: u32,
    pub tenant_id: String,
    pub team_id: String,
    pub project_id: String,
    pub user_id: String,
    pub source: String,
    pub actor_type: String,
    pub actor_id: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub outcome: String,
    pub ip: String,
    pub user_agent: String,
    pub details: String,
    pub personal_data: u8,
    pub leaf_index: u64,
    pub occurred_at_us: i64,
    pub pseudonym_key_version: u32,
    pub batch_id: u64,
}

impl AuditRow {
    pub fn new(l: &AuditLeaf, batch_id: u64) -> Self {
        Self {
            event_id: l.event_id,
            occurred_at: u32::try_from(l.occurred_at_us.div_euclid(1_000_000)).unwrap_or(0),
            tenant_id: l.tenant_id.clone(),
            team_id: l.team_id.clone(),
            project_id: l.project_id.clone(),
            user_id: l.user_id.clone(),
            source: l.source.clone(),
            actor_type: l.actor_type.clone(),
            actor_id: l.actor_id.clone(),
            action: l.action.clone(),
            resource_type: l.resource_type.clone(),
            resource_id: l.resource_id.clone(),
            outcome: l.outcome.clone(),
            ip: l.ip.clone(),
            user_agent: l.user_agent.clone(),
            details: l.details.clone(),
            personal_data: u8::from(l.personal_data),
            leaf_index: l.leaf_index,
            occurred_at_us: l.occurred_at_us,
            pseudonym_key_version: l.pseudonym_key_version,
            batch_id,
        }
    }

    /// The leaf this stored row encodes.
    pub fn leaf(&self) -> AuditLeaf {
        AuditLeaf {
            tenant_id: self.tenant_id.clone(),
            leaf_index: self.leaf_index,
            event_id: self.event_id,
            occurred_at_us: self.occurred_at_us,
            team_id: self.team_id.clone(),
            project_id: self.project_id.clone(),
            user_id: self.user_id.clone(),
            source: self.source.clone(),
            actor_type: self.actor_type.clone(),
            actor_id: self.actor_id.clone(),
            action: self.action.clone(),
            resource_type: self.resource_type.clone(),
            resource_id: self.resource_id.clone(),
            outcome: self.outcome.clone(),
            ip: self.ip.clone(),
            user_agent: self.user_agent.clone(),
            details: self.details.clone(),
            personal_data: self.personal_data != 0,
            pseudonym_key_version: self.pseudonym_key_version,
        }
    }
}

impl PartKey for AuditRow {
    fn part_key(&self) -> String {
        self.event_id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::leaf::FieldLimits;
    use crate::audit::pseudonym::PseudonymKey;

    #[test]
    fn a_row_gives_back_its_leaf() {
        let key = PseudonymKey::new(3, &[7u8; 32]).unwrap();
        let leaf = AuditLeaf::from_event(
            &tally_schemas::sample_audit_event(),
            41,
            &key,
            FieldLimits::default(),
        );
        let row = AuditRow::new(&leaf, 9);
        assert_eq!(row.leaf(), leaf);
        assert_eq!(row.leaf().leaf_hash(), leaf.leaf_hash());
    }
}
