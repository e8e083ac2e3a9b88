//! The audit-event stream as the engine runs it (`engine::stream::Stream`).
//!
//! Guarantee: personal identifiers (`user_id`, the `actor_id` of users, `ip`)
//! are replaced by keyed pseudonyms before anything is stored or evaluated;
//! every counted event becomes exactly one leaf of its tenant's Merkle log at
//! an index decided once (`log::reserve`), and the tree, its checkpoints and
//! the rules' window counts commit in the batch's single transaction.

use crate::audit::leaf::{AuditLeaf, FieldLimits};
use crate::audit::note::NoteSigner;
use crate::audit::pseudonym::PseudonymKey;
use crate::config::{Config, ConfigError};
use crate::engine::ownership::Fence;
use crate::engine::stream::{
    fingerprint, key_space, scoped_key, BatchCtx, Identity, Owned, Stream,
};
use crate::errors::{pg, StageError};
use crate::sinks::clickhouse::{split_by_month, ClickHouseSink, WriteOutcome};
use crate::streams::audit::log;
use crate::streams::audit::rules::{self, burst_groups, AuditRules, Grants};
use crate::streams::audit::store::AuditRow;
use crate::streams::window_store;
use chrono::{DateTime, Utc};
use sqlx::Row;
use tally_schemas::{ActorType, AuditEvent, ComplianceViolation};
use uuid::Uuid;

pub struct AuditStream {
    pub signer: NoteSigner,
    pub pseudonyms: PseudonymKey,
    pub limits: FieldLimits,
    pub rules: AuditRules,
}

impl AuditStream {
    pub fn new(cfg: &Config) -> Result<Self, ConfigError> {
        Ok(Self {
            signer: cfg.audit.signer()?,
            pseudonyms: cfg.audit.pseudonym_key()?,
            limits: cfg.audit.limits(),
            rules: cfg.audit.rules.clone(),
        })
    }

    /// The event as it is stored and evaluated: personal identifiers pseudonymised.
    fn pseudonymised(&self, e: &AuditEvent) -> AuditEvent {
        let p = |v: &str| self.pseudonyms.pseudonym(v);
        let mut out = e.clone();
        out.user_id = e.user_id.as_deref().map(p);
        out.ip = e.ip.as_deref().map(p);
        if e.actor_type == ActorType::User {
            out.actor_id = p(&e.actor_id);
        }
        out
    }

    /// Grants of the batch's tenants, with user actor ids pseudonymised like
    /// the events' (read in the commit transaction).
    async fn grants(
        &self,
        tx: &mut sqlx::PgConnection,
        records: &[AuditRecord],
    ) -> Result<Grants, StageError> {
        let mut tenants: Vec<&str> = records.iter().map(|r| r.event.tenant_id.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let rows = sqlx::query(
            "SELECT tenant_id, actor_id, resource_type FROM tally.audit_grants WHERE tenant_id = ANY($1)",
        )
        .bind(&tenants)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg("read audit grants"))?;
        let mut g = Grants::default();
        for r in rows {
            let (t, a, res): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            // A grant names a person or a service: both forms are allowed.
            g.insert(&t, &self.pseudonyms.pseudonym(&a), &res);
            g.insert(&t, &a, &res);
        }
        Ok(g)
    }
}

/// An audit event ready to store: pseudonymised, with its leaf (index set by `prepare`).
pub struct AuditRecord {
    pub event: AuditEvent,
    pub key: Uuid,
    pub leaf: AuditLeaf,
}

/// `rule_windows.rule` of the failure-burst counts.
const FAILED_BURST: &str = "failed_action_burst";

impl Stream for AuditStream {
    type Event = AuditEvent;
    type Record = AuditRecord;
    const NAME: &'static str = "audit";
    const RULES: &'static [&'static str] = &super::rules::RULES;

    fn occurred_at(&self, e: &AuditEvent) -> DateTime<Utc> {
        e.occurred_at
    }

    fn identity(&self, e: &AuditEvent) -> Identity {
        Identity {
            key: scoped_key(&key_space::AUDIT, &e.tenant_id, e.event_id.as_bytes()),
            occurred_at: e.occurred_at,
            fingerprint: fingerprint(e),
        }
    }

    fn conflict_message(&self, e: &AuditEvent, in_batch: bool) -> String {
        format!(
            "audit event {} of tenant {} was {} with different content; the first one is logged",
            e.event_id,
            crate::streams::clip(&e.tenant_id, 256),
            if in_batch {
                "sent earlier in this batch"
            } else {
                "logged before"
            }
        )
    }

    fn enrich(&self, _ctx: &BatchCtx<'_>, events: Vec<Owned<AuditEvent>>) -> Vec<AuditRecord> {
        events
            .into_iter()
            .map(|o| {
                // The leaf is made from the event as sent (it pseudonymises);
                // the rules see the pseudonymised event.
                let leaf = AuditLeaf::from_event(&o.event, 0, &self.pseudonyms, self.limits);
                AuditRecord {
                    event: self.pseudonymised(&o.event),
                    key: o.key,
                    leaf,
                }
            })
            .collect()
    }

    async fn prepare(
        &self,
        ctx: &BatchCtx<'_>,
        records: &mut [AuditRecord],
    ) -> Result<(), StageError> {
        let events: Vec<(&str, Uuid)> = records
            .iter()
            .map(|r| (r.event.tenant_id.as_str(), r.key))
            .collect();
        let indexes = log::reserve(ctx, &events).await?;
        for (r, i) in records.iter_mut().zip(indexes) {
            r.leaf.leaf_index = i;
        }
        Ok(())
    }

    async fn write_clickhouse(
        &self,
        ch: &ClickHouseSink,
        batch_id: u64,
        records: &[AuditRecord],
        verify_first: bool,
        fence: &Fence,
    ) -> Result<WriteOutcome, StageError> {
        let mut outcome = WriteOutcome::default();
        if records.is_empty() {
            return Ok(outcome);
        }
        let rows: Vec<AuditRow> = records
            .iter()
            .map(|r| AuditRow::new(&r.leaf, batch_id))
            .collect();
        let parts = split_by_month(rows, |r| r.occurred_at);
        outcome.add(
            ch.write_table::<AuditRow>("audit_events", batch_id, parts, verify_first, fence)
                .await?,
        );
        Ok(outcome)
    }

    async fn commit(
        &self,
        tx: &mut sqlx::PgConnection,
        ctx: &BatchCtx<'_>,
        records: &[AuditRecord],
    ) -> Result<Vec<ComplianceViolation>, StageError> {
        let leaves: Vec<(&str, u64, crate::audit::merkle::Hash)> = records
            .iter()
            .map(|r| {
                (
                    r.leaf.tenant_id.as_str(),
                    r.leaf.leaf_index,
                    r.leaf.leaf_hash(),
                )
            })
            .collect();
        log::commit_leaves(tx, &self.signer, &leaves, ctx.now).await?;

        let events: Vec<AuditEvent> = records.iter().map(|r| r.event.clone()).collect();
        let grants = self.grants(tx, records).await?;
        let rule = &self.rules.failed_action_burst;
        let secs = rule.window_secs.secs();
        let subject = |k: &rules::BurstKey| format!("{}:{}", k.actor_type.as_str(), k.actor_id);
        let keys: Vec<window_store::WindowKey> = burst_groups(&events, rule)
            .into_keys()
            .map(|k| (k.tenant_id.clone(), subject(&k), k.window_start))
            .collect();
        let before = window_store::lock_counts(tx, FAILED_BURST, secs, &keys).await?;
        let (violations, counts) = rules::evaluate(
            &events,
            &self.rules,
            &grants,
            |k| {
                let key = (k.tenant_id.clone(), subject(k), k.window_start);
                before.get(&key).copied().unwrap_or(0)
            },
            ctx.now,
        );
        let added: Vec<(window_store::WindowKey, i64)> = counts
            .into_iter()
            .map(|(k, n)| ((k.tenant_id.clone(), subject(&k), k.window_start), n))
            .collect();
        window_store::add_counts(tx, FAILED_BURST, secs, &added).await?;
        Ok(violations)
    }
}
