//! The policy-decision stream as the engine runs it (`engine::stream::Stream`).
//!
//! Guarantee: a decision counts once per (tenant, decision id), whatever
//! encoding it arrives in (schema codecs or an Open Policy Agent decision-log
//! event, mapped by `opa.rs`); its rows and rules are pure functions of the
//! decisions and the window counts earlier batches committed.

use crate::config::Config;
use crate::engine::ownership::Fence;
use crate::engine::stream::{
    fingerprint, key_space, scoped_key, BatchCtx, Identity, Owned, Rejection, Stream,
};
use crate::errors::StageError;
use crate::sinks::clickhouse::{ClickHouseSink, WriteOutcome};
use crate::streams::policy::opa::{self, OpaMapping};
use crate::streams::policy::rows::write_policy_batch;
use crate::streams::policy::rules::{self, deny_rate_groups, PolicyRules};
use crate::streams::window_store;
use chrono::{DateTime, Utc};
use tally_schemas::{ComplianceViolation, Decoder, PolicyDecision};

pub struct PolicyStream {
    pub opa: OpaMapping,
    pub rules: PolicyRules,
}

impl PolicyStream {
    pub fn new(cfg: &Config) -> Self {
        Self {
            opa: cfg.opa.clone(),
            rules: cfg.policy.rules.clone(),
        }
    }
}

/// `rule_windows.rule` of the deny-rate counts.
const DENY_RATE: &str = "deny_rate";

impl Stream for PolicyStream {
    type Event = PolicyDecision;
    type Record = PolicyDecision;
    const NAME: &'static str = "policy";
    const RULES: &'static [&'static str] = &super::rules::RULES;
    const PARSE_CLASSES: &'static [&'static str] = &crate::streams::policy::opa::OpaError::CLASSES;

    fn parse(&self, decoder: &Decoder, payload: &[u8]) -> Result<PolicyDecision, Rejection> {
        match opa::recognise(payload) {
            Some(v) => opa::map_event(&v, &self.opa).map_err(|e| (e.class(), e.to_string())),
            None => decoder
                .decode::<PolicyDecision>(payload)
                .map_err(|e| (e.class(), e.to_string())),
        }
    }

    fn occurred_at(&self, d: &PolicyDecision) -> DateTime<Utc> {
        d.occurred_at
    }

    fn identity(&self, d: &PolicyDecision) -> Identity {
        Identity {
            key: scoped_key(
                &key_space::POLICY,
                &d.tenant_id,
                crate::streams::policy::dedup_key(d).as_bytes(),
            ),
            occurred_at: d.occurred_at,
            fingerprint: fingerprint(d),
        }
    }

    fn conflict_message(&self, d: &PolicyDecision, in_batch: bool) -> String {
        format!(
            "decision {} of tenant {} was {} with different content; the first one counts",
            crate::streams::clip(&d.decision_id, 256),
            crate::streams::clip(&d.tenant_id, 256),
            if in_batch {
                "sent earlier in this batch"
            } else {
                "counted before"
            }
        )
    }

    fn enrich(
        &self,
        _ctx: &BatchCtx<'_>,
        events: Vec<Owned<PolicyDecision>>,
    ) -> Vec<PolicyDecision> {
        events.into_iter().map(|o| o.event).collect()
    }

    async fn write_clickhouse(
        &self,
        ch: &ClickHouseSink,
        batch_id: u64,
        records: &[PolicyDecision],
        verify_first: bool,
        fence: &Fence,
    ) -> Result<WriteOutcome, StageError> {
        write_policy_batch(ch, batch_id, records, verify_first, fence).await
    }

    async fn commit(
        &self,
        tx: &mut sqlx::PgConnection,
        ctx: &BatchCtx<'_>,
        records: &[PolicyDecision],
    ) -> Result<Vec<ComplianceViolation>, StageError> {
        let rule = &self.rules.deny_rate;
        let secs = rule.window_secs.secs();
        let keys: Vec<window_store::WindowKey> = deny_rate_groups(records, rule)
            .into_keys()
            .map(|k| (k.tenant_id, k.policy_id, k.window_start))
            .collect();
        let before = window_store::lock_counts(tx, DENY_RATE, secs, &keys).await?;
        let (violations, counts) = rules::evaluate(
            records,
            &self.rules,
            |k| {
                let key = (k.tenant_id.clone(), k.policy_id.clone(), k.window_start);
                before.get(&key).copied().unwrap_or(0)
            },
            ctx.now,
        );
        let added: Vec<(window_store::WindowKey, i64)> = counts
            .into_iter()
            .map(|(k, n)| ((k.tenant_id, k.policy_id, k.window_start), n))
            .collect();
        window_store::add_counts(tx, DENY_RATE, secs, &added).await?;
        Ok(violations)
    }
}
