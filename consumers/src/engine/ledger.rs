//! Postgres ledger: offsets of record, batch claims, event-id dedup, and the
//! final commit of spend, budgets, quotas, violations and dead letters.
//!
//! Guarantee: the batch's Postgres effects and its new offset commit in ONE
//! transaction, fenced by the batch's `pending` row, so they happen exactly
//! once. The claim (phase 1) records the batch range and which event ids this
//! batch owns, so a replay after a crash rebuilds the very same batch.

use crate::errors::{pg, StageError};
use crate::streams::usage::enrich::{Enriched, Reference};
use crate::streams::usage::rollup::spend_daily;
use crate::streams::usage::rules::{self, QuotaKind};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::collections::{BTreeMap, HashSet};
use tally_schemas::ComplianceViolation;

pub use crate::engine::claim::{ClaimInput, Claimed, PartitionState, PendingBatch};

/// A message that goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub class: String,
    pub message: String,
}

/// Everything the final commit of a batch applies.
#[derive(Clone, Copy)]
pub struct CommitInput<'a> {
    pub events: &'a [Enriched],
    pub reference: &'a Reference,
    pub dead: &'a [DeadLetter],
    /// Newest message timestamp of the batch (informational).
    pub newest_message_at: Option<DateTime<Utc>>,
    pub tolerance: Decimal,
    /// Ownership epoch the batch runs under.
    pub epoch: i64,
    /// The dedup cutoff the batch applied (the partition's never moves back).
    pub dedup_cutoff: DateTime<Utc>,
}

#[derive(Debug, Clone, Default)]
pub struct CommitOutcome {
    pub violations_new: usize,
    pub events: usize,
}

#[derive(Clone)]
pub struct Ledger {
    pub(crate) pool: PgPool,
    pub(crate) group: String,
    pub(crate) topic: String,
}

impl Ledger {
    pub fn new(pool: PgPool, group: &str, topic: &str) -> Self {
        Self {
            pool,
            group: group.into(),
            topic: topic.into(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Requests and tokens already counted per (tenant, minute), for flagging
    /// over-quota events before the final commit. Informational only.
    pub async fn quota_usage(
        &self,
        keys: &[(String, DateTime<Utc>)],
    ) -> Result<BTreeMap<(String, DateTime<Utc>), (i64, i64)>, StageError> {
        let (tenants, minutes): (Vec<String>, Vec<DateTime<Utc>>) = keys.iter().cloned().unzip();
        let rows = sqlx::query(
            "SELECT q.tenant_id, q.minute, q.requests, q.tokens FROM tally.quota_usage q \
             JOIN UNNEST($1::text[], $2::timestamptz[]) AS u(t, m) ON q.tenant_id = u.t AND q.minute = u.m",
        )
        .bind(&tenants)
        .bind(&minutes)
        .fetch_all(&self.pool)
        .await
        .map_err(pg("read quota usage"))?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
            .collect())
    }

    /// Marks events past their tenant's per-minute quota. Informational: the
    /// quota violation itself is decided exactly in the commit.
    pub async fn flag_over_quota(
        &self,
        events: &mut [Enriched],
        reference: &crate::streams::usage::enrich::Reference,
    ) -> Result<(), StageError> {
        let keys: Vec<(String, DateTime<Utc>)> = events
            .iter()
            .filter(|e| {
                reference.tenants.get(&e.event.tenant_id).is_some_and(|t| {
                    t.requests_per_minute.is_some() || t.tokens_per_minute.is_some()
                })
            })
            .map(|e| {
                (
                    e.event.tenant_id.clone(),
                    crate::streams::usage::rollup::bucket_start(
                        e.event.occurred_at,
                        crate::streams::usage::rollup::Granularity::Minute,
                    ),
                )
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut counts = self.quota_usage(&keys).await?;
        for e in events.iter_mut() {
            let Some(t) = reference.tenants.get(&e.event.tenant_id) else {
                continue;
            };
            let key = (
                e.event.tenant_id.clone(),
                crate::streams::usage::rollup::bucket_start(
                    e.event.occurred_at,
                    crate::streams::usage::rollup::Granularity::Minute,
                ),
            );
            let c = counts.entry(key).or_insert((0, 0));
            c.0 += 1;
            c.1 += e.tokens().total();
            e.over_quota = t.requests_per_minute.is_some_and(|l| c.0 > l)
                || t.tokens_per_minute.is_some_and(|l| c.1 > l);
        }
        Ok(())
    }

    /// Phase 3: spend, quotas, budgets, violations, dead letters and the new
    /// offset, in one transaction fenced by the pending batch.
    pub async fn commit(
        &self,
        partition: i32,
        batch: PendingBatch,
        input: &CommitInput<'_>,
    ) -> Result<CommitOutcome, StageError> {
        let CommitInput {
            events,
            reference,
            dead,
            newest_message_at,
            tolerance,
            epoch,
            dedup_cutoff,
        } = *input;
        let now = Utc::now();
        let mut violations: Vec<ComplianceViolation> = Vec::new();
        for e in events {
            if !e.tenant_known {
                violations.push(rules::unknown_tenant_violation(e, now));
            }
            if !e.priced {
                violations.push(rules::unpriced_model_violation(e, now));
            }
            if e.cost_mismatch {
                violations.push(rules::cost_mismatch_violation(e, tolerance, now));
            }
            if e.currency_mismatch {
                violations.push(rules::currency_mismatch_violation(
                    e,
                    reference.prices.currency(),
                    now,
                ));
            }
        }
        let mut tx = self.pool.begin().await.map_err(pg("commit begin"))?;

        // Fence: the partition's epoch must still be ours, the batch still pending.
        crate::engine::ownership::check_epoch_in(&mut tx, &self.partition_key(partition), epoch)
            .await?;
        let done = sqlx::query(
            "UPDATE tally.batches SET state = 'done', done_at = now(), events = $2 \
             WHERE batch_id = $1 AND state = 'pending'",
        )
        .bind(batch.batch_id)
        .bind(i32::try_from(events.len()).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .map_err(pg("commit fence"))?;
        if done.rows_affected() != 1 {
            return Err(StageError::LostOwnership(format!(
                "batch {} is no longer pending",
                batch.batch_id
            )));
        }

        self.apply_spend(&mut tx, events).await?;
        violations.extend(self.apply_quotas(&mut tx, events, reference, now).await?);
        violations.extend(self.apply_budgets(&mut tx, events, reference, now).await?);
        let violations_new = insert_violations(&mut tx, &violations).await?;

        if !dead.is_empty() {
            let parts: Vec<i32> = dead.iter().map(|d| d.partition).collect();
            let offsets: Vec<i64> = dead.iter().map(|d| d.offset).collect();
            let classes: Vec<String> = dead.iter().map(|d| d.class.clone()).collect();
            let messages: Vec<String> = dead.iter().map(|d| d.message.clone()).collect();
            sqlx::query(
                // topic_epoch: the topic's incarnation (0004_topic_epochs.sql).
                "INSERT INTO tally.dead_letters (topic, topic_epoch, partition, \"offset\", error_class, error_message) \
                 SELECT $1, coalesce((SELECT epoch FROM tally.topic_epochs WHERE topic = $1), 0), u.p, u.o, u.c, u.m \
                 FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[]) AS u(p, o, c, m) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&self.topic)
            .bind(&parts)
            .bind(&offsets)
            .bind(&classes)
            .bind(&messages)
            .execute(&mut *tx)
            .await
            .map_err(pg("commit dead letters"))?;
        }

        let moved = sqlx::query(
            "UPDATE tally.consumer_offsets SET next_offset = $4, updated_at = now(), \
             last_message_at = GREATEST(last_message_at, $5), \
             dedup_cutoff = GREATEST(coalesce(dedup_cutoff, $7), $7) \
             WHERE group_id = $1 AND topic = $2 AND partition = $3 AND next_offset <= $6",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(partition)
        .bind(batch.last + 1)
        .bind(newest_message_at)
        .bind(batch.first)
        .bind(dedup_cutoff)
        .execute(&mut *tx)
        .await
        .map_err(pg("commit offset"))?;
        if moved.rows_affected() != 1 {
            return Err(StageError::LostOwnership(format!(
                "partition {partition}: offset moved past {}",
                batch.first
            )));
        }
        tx.commit().await.map_err(pg("commit"))?;
        Ok(CommitOutcome {
            violations_new,
            events: events.len(),
        })
    }

    /// Whether a batch is done (used when a commit's outcome is unknown).
    pub async fn batch_done(&self, batch_id: i64) -> Result<bool, StageError> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM tally.batches WHERE batch_id = $1")
                .bind(batch_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(pg("read batch state"))?;
        Ok(state.as_deref() == Some("done"))
    }

    async fn apply_spend(
        &self,
        tx: &mut sqlx::PgConnection,
        events: &[Enriched],
    ) -> Result<(), StageError> {
        let rows = spend_daily(events);
        if rows.is_empty() {
            return Ok(());
        }
        let mut c = SpendColumns::default();
        for (k, t) in rows {
            c.day.push(k.day);
            c.tenant.push(k.tenant_id.to_string());
            c.team.push(k.team_id.to_string());
            c.provider.push(k.provider.to_string());
            c.model.push(k.model.to_string());
            c.requests.push(t.requests);
            c.input.push(t.tokens.input);
            c.cached.push(t.tokens.cached_input);
            c.write.push(t.tokens.cache_write);
            c.output.push(t.tokens.output);
            c.reasoning.push(t.tokens.reasoning);
            c.cost.push(t.cost);
            c.unpriced.push(t.unpriced_requests);
        }
        sqlx::query(include_str!(
            "../../../sql/postgres/queries/upsert_spend_daily.sql"
        ))
        .bind(&c.day)
        .bind(&c.tenant)
        .bind(&c.team)
        .bind(&c.provider)
        .bind(&c.model)
        .bind(&c.requests)
        .bind(&c.input)
        .bind(&c.cached)
        .bind(&c.write)
        .bind(&c.output)
        .bind(&c.reasoning)
        .bind(&c.cost)
        .bind(&c.unpriced)
        .execute(&mut *tx)
        .await
        .map_err(pg("commit spend_daily"))?;
        Ok(())
    }

    async fn apply_quotas(
        &self,
        tx: &mut sqlx::PgConnection,
        events: &[Enriched],
        reference: &Reference,
        now: DateTime<Utc>,
    ) -> Result<Vec<ComplianceViolation>, StageError> {
        // Events per (tenant, minute) in offset order, only for tenants with quotas.
        let mut groups: BTreeMap<(String, DateTime<Utc>), Vec<&Enriched>> = BTreeMap::new();
        for e in events {
            let Some(t) = reference.tenants.get(&e.event.tenant_id) else {
                continue;
            };
            if t.requests_per_minute.is_none() && t.tokens_per_minute.is_none() {
                continue;
            }
            let minute = crate::streams::usage::rollup::bucket_start(
                e.event.occurred_at,
                crate::streams::usage::rollup::Granularity::Minute,
            );
            groups
                .entry((e.event.tenant_id.clone(), minute))
                .or_default()
                .push(e);
        }
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let (tenants, minutes): (Vec<String>, Vec<DateTime<Utc>>) = groups.keys().cloned().unzip();
        // Create missing rows first (sorted), so the lock below always has a
        // row to hold: two batches of one tenant serialise here, and the second
        // sees the first one's requests (a crossing is never missed).
        sqlx::query(
            "INSERT INTO tally.quota_usage (tenant_id, minute, requests, tokens) \
             SELECT u.t, u.m, 0, 0 FROM UNNEST($1::text[], $2::timestamptz[]) AS u(t, m) \
             ORDER BY u.t, u.m ON CONFLICT DO NOTHING",
        )
        .bind(&tenants)
        .bind(&minutes)
        .execute(&mut *tx)
        .await
        .map_err(pg("commit create quota rows"))?;
        let current: BTreeMap<(String, DateTime<Utc>), (i64, i64)> = sqlx::query(
            "SELECT q.tenant_id, q.minute, q.requests, q.tokens FROM tally.quota_usage q \
             JOIN UNNEST($1::text[], $2::timestamptz[]) AS u(t, m) ON q.tenant_id = u.t AND q.minute = u.m \
             ORDER BY q.tenant_id, q.minute FOR UPDATE OF q",
        )
        .bind(&tenants)
        .bind(&minutes)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg("commit lock quota usage"))?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
        let mut out = Vec::new();
        let (mut d_req, mut d_tok) = (Vec::new(), Vec::new());
        for ((tenant, minute), evs) in &groups {
            let info = &reference.tenants[tenant];
            let (mut req, mut tok) = current
                .get(&(tenant.clone(), *minute))
                .copied()
                .unwrap_or((0, 0));
            let (req0, tok0) = (req, tok);
            for e in evs {
                let (r1, t1) = (req + 1, tok + e.tokens().total());
                if let Some(limit) = info.requests_per_minute {
                    if rules::quota_exceeded(req, r1, limit) {
                        out.push(rules::quota_violation(
                            tenant,
                            *minute,
                            QuotaKind::Requests,
                            r1,
                            limit,
                            e,
                            now,
                        ));
                    }
                }
                if let Some(limit) = info.tokens_per_minute {
                    if rules::quota_exceeded(tok, t1, limit) {
                        out.push(rules::quota_violation(
                            tenant,
                            *minute,
                            QuotaKind::Tokens,
                            t1,
                            limit,
                            e,
                            now,
                        ));
                    }
                }
                (req, tok) = (r1, t1);
            }
            d_req.push(req - req0);
            d_tok.push(tok - tok0);
        }
        sqlx::query(
            "INSERT INTO tally.quota_usage (tenant_id, minute, requests, tokens) \
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[]) \
             ON CONFLICT (tenant_id, minute) DO UPDATE SET requests = quota_usage.requests + EXCLUDED.requests, \
             tokens = quota_usage.tokens + EXCLUDED.tokens",
        )
        .bind(&tenants)
        .bind(&minutes)
        .bind(&d_req)
        .bind(&d_tok)
        .execute(&mut *tx)
        .await
        .map_err(pg("commit quota usage"))?;
        Ok(out)
    }

    async fn apply_budgets(
        &self,
        tx: &mut sqlx::PgConnection,
        events: &[Enriched],
        reference: &Reference,
        now: DateTime<Utc>,
    ) -> Result<Vec<ComplianceViolation>, StageError> {
        // Events per (budget index, period start), in offset order.
        let mut groups: BTreeMap<(usize, NaiveDate), Vec<&Enriched>> = BTreeMap::new();
        for e in events.iter().filter(|e| e.cost > Decimal::ZERO) {
            let day = e.event.occurred_at.date_naive();
            for i in reference.budgets_for(&e.event.tenant_id, e.event.team_id.as_deref()) {
                let (start, _) = rules::period_bounds(day, reference.budgets[i].period);
                groups.entry((i, start)).or_default().push(e);
            }
        }
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = groups
            .keys()
            .map(|(i, _)| reference.budgets[*i].budget_id.clone())
            .collect();
        let starts: Vec<NaiveDate> = groups.keys().map(|(_, s)| *s).collect();
        // As for quotas: rows exist before they are locked, so concurrent
        // batches of one budget serialise and every crossing is raised once.
        sqlx::query(
            "INSERT INTO tally.budget_spend (budget_id, period_start, spent) \
             SELECT u.b, u.p, 0 FROM UNNEST($1::text[], $2::date[]) AS u(b, p) \
             ORDER BY u.b, u.p ON CONFLICT DO NOTHING",
        )
        .bind(&ids)
        .bind(&starts)
        .execute(&mut *tx)
        .await
        .map_err(pg("commit create budget rows"))?;
        let current: BTreeMap<(String, NaiveDate), Decimal> = sqlx::query(
            "SELECT s.budget_id, s.period_start, s.spent FROM tally.budget_spend s \
             JOIN UNNEST($1::text[], $2::date[]) AS u(b, p) ON s.budget_id = u.b AND s.period_start = u.p \
             ORDER BY s.budget_id, s.period_start FOR UPDATE OF s",
        )
        .bind(&ids)
        .bind(&starts)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg("commit lock budget spend"))?
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
        crate::engine::failpoint::hit("commit_after_budget_read").await?;
        let mut out = Vec::new();
        let mut deltas = Vec::new();
        for ((i, start), evs) in &groups {
            let b = &reference.budgets[*i];
            let before0 = current
                .get(&(b.budget_id.clone(), *start))
                .copied()
                .unwrap_or(Decimal::ZERO);
            let mut spent = before0;
            for e in evs {
                let after = spent + e.cost;
                for pct in rules::budget_crossings(spent, after, b) {
                    out.push(rules::budget_violation(b, *start, pct, after, e, now));
                }
                spent = after;
            }
            deltas.push(spent - before0);
        }
        sqlx::query(
            "INSERT INTO tally.budget_spend (budget_id, period_start, spent) \
             SELECT * FROM UNNEST($1::text[], $2::date[], $3::numeric[]) \
             ON CONFLICT (budget_id, period_start) DO UPDATE SET spent = budget_spend.spent + EXCLUDED.spent",
        )
        .bind(&ids)
        .bind(&starts)
        .bind(&deltas)
        .execute(&mut *tx)
        .await
        .map_err(pg("commit budget spend"))?;
        Ok(out)
    }
}

#[derive(Default)]
struct SpendColumns {
    day: Vec<NaiveDate>,
    tenant: Vec<String>,
    team: Vec<String>,
    provider: Vec<String>,
    model: Vec<String>,
    requests: Vec<i64>,
    input: Vec<i64>,
    cached: Vec<i64>,
    write: Vec<i64>,
    output: Vec<i64>,
    reasoning: Vec<i64>,
    cost: Vec<Decimal>,
    unpriced: Vec<i64>,
}

/// Inserts violations into the outbox; an id seen before is ignored.
async fn insert_violations(
    tx: &mut sqlx::PgConnection,
    vs: &[ComplianceViolation],
) -> Result<usize, StageError> {
    if vs.is_empty() {
        return Ok(0);
    }
    // Within one batch the same id can be derived twice (e.g. two unpriced events).
    let mut seen = HashSet::new();
    let vs: Vec<&ComplianceViolation> = vs.iter().filter(|v| seen.insert(v.violation_id)).collect();
    let r = sqlx::query(include_str!(
        "../../../sql/postgres/queries/insert_violations.sql"
    ))
    .bind(vs.iter().map(|v| v.violation_id).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.rule.clone()).collect::<Vec<_>>())
    .bind(
        vs.iter()
            .map(|v| v.severity.as_str().to_string())
            .collect::<Vec<_>>(),
    )
    .bind(vs.iter().map(|v| v.tenant_id.clone()).collect::<Vec<_>>())
    .bind(
        vs.iter()
            .map(|v| v.subject_type.clone())
            .collect::<Vec<_>>(),
    )
    .bind(vs.iter().map(|v| v.subject_id.clone()).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.window_start).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.window_end).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.observed).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.threshold).collect::<Vec<_>>())
    .bind(
        vs.iter()
            .map(|v| v.evidence_event_ids.join(","))
            .collect::<Vec<_>>(),
    )
    .bind(vs.iter().map(|v| v.detected_at).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.message.clone()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .map_err(pg("commit violations"))?;
    Ok(usize::try_from(r.rows_affected()).unwrap_or(0))
}
