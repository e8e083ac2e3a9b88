//! The usage stream as the engine runs it (`engine::stream::Stream`).
//!
//! Guarantee: enrichment prices every event from the batch's reference snapshot
//! (a replay reuses the first attempt's), so ClickHouse rows and Postgres spend
//! always agree; over-quota flags are informational and every quota or budget
//! crossing is decided once, in the commit, under row locks.

use crate::config::Config;
use crate::engine::claim::dedup_key;
use crate::engine::ownership::Fence;
use crate::engine::stream::{fingerprint, BatchCtx, Identity, Owned, Stream};
use crate::errors::StageError;
use crate::sinks::clickhouse::{ClickHouseSink, WriteOutcome};
use crate::streams::usage::commit;
use crate::streams::usage::enrich::{enrich, Enriched};
use crate::streams::usage::rows::write_usage_batch;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tally_schemas::{ComplianceViolation, UsageEvent};

pub struct UsageStream {
    pub tolerance: Decimal,
}

impl UsageStream {
    pub fn new(cfg: &Config) -> Self {
        Self {
            tolerance: cfg.cost_mismatch_tolerance(),
        }
    }
}

impl Stream for UsageStream {
    type Event = UsageEvent;
    type Record = Enriched;
    const NAME: &'static str = "usage";
    const RULES: &'static [&'static str] = &super::rules::RULES;

    fn occurred_at(&self, e: &UsageEvent) -> DateTime<Utc> {
        e.occurred_at
    }

    fn identity(&self, e: &UsageEvent) -> Identity {
        Identity {
            key: dedup_key(&e.tenant_id, e.event_id),
            occurred_at: e.occurred_at,
            fingerprint: fingerprint(e),
        }
    }

    fn conflict_message(&self, e: &UsageEvent, in_batch: bool) -> String {
        format!(
            "event {} of tenant {} was {} with different content; the first one counts",
            e.event_id,
            e.tenant_id,
            if in_batch {
                "sent earlier in this batch"
            } else {
                "counted before"
            }
        )
    }

    fn enrich(&self, ctx: &BatchCtx<'_>, events: Vec<Owned<UsageEvent>>) -> Vec<Enriched> {
        events
            .into_iter()
            .map(|o| {
                enrich(
                    o.event,
                    ctx.reference,
                    self.tolerance,
                    ctx.partition,
                    o.offset,
                )
            })
            .collect()
    }

    async fn prepare(
        &self,
        ctx: &BatchCtx<'_>,
        records: &mut [Enriched],
    ) -> Result<(), StageError> {
        commit::flag_over_quota(ctx.ledger.pool(), records, ctx.reference).await
    }

    async fn write_clickhouse(
        &self,
        ch: &ClickHouseSink,
        batch_id: u64,
        records: &[Enriched],
        verify_first: bool,
        fence: &Fence,
    ) -> Result<WriteOutcome, StageError> {
        write_usage_batch(ch, batch_id, records, verify_first, fence).await
    }

    async fn commit(
        &self,
        tx: &mut sqlx::PgConnection,
        ctx: &BatchCtx<'_>,
        records: &[Enriched],
    ) -> Result<Vec<ComplianceViolation>, StageError> {
        let mut violations =
            commit::per_event_violations(records, ctx.reference, self.tolerance, ctx.now);
        commit::apply_spend(tx, records).await?;
        violations.extend(commit::apply_quotas(tx, records, ctx.reference, ctx.now).await?);
        violations.extend(commit::apply_budgets(tx, records, ctx.reference, ctx.now).await?);
        Ok(violations)
    }
}
