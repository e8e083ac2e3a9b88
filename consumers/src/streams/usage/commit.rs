//! The usage stream's Postgres effects, inside the batch's single commit:
//! daily spend, per-minute quotas, budgets and the per-event violations.
//!
//! Guarantee: rows are created (sorted, `ON CONFLICT DO NOTHING`) before they
//! are locked, so concurrent batches of one tenant serialise and every quota
//! and budget crossing is raised exactly once, whatever the batch split.

use crate::errors::{pg, StageError};
use crate::streams::usage::enrich::{Enriched, Reference};
use crate::streams::usage::rollup::spend_daily;
use crate::streams::usage::rules::{self, QuotaKind};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::collections::BTreeMap;
use tally_schemas::ComplianceViolation;

/// Violations about single events: unknown tenant, unpriced model, cost and
/// currency mismatches.
pub fn per_event_violations(
    events: &[Enriched],
    reference: &Reference,
    tolerance: Decimal,
    now: DateTime<Utc>,
) -> Vec<ComplianceViolation> {
    let mut violations = Vec::new();
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
    violations
}

/// Requests and tokens already counted for each (tenant, minute) of `keys`,
/// in their order, for flagging over-quota events before the final commit.
/// Informational only.
pub async fn quota_usage(
    pool: &PgPool,
    keys: &[(&str, DateTime<Utc>)],
) -> Result<Vec<(i64, i64)>, StageError> {
    let (tenants, minutes): (Vec<&str>, Vec<DateTime<Utc>>) = keys.iter().copied().unzip();
    let found: BTreeMap<(String, DateTime<Utc>), (i64, i64)> = sqlx::query(
        "SELECT q.tenant_id, q.minute, q.requests, q.tokens FROM tally.quota_usage q \
         JOIN UNNEST($1::text[], $2::timestamptz[]) AS u(t, m) ON q.tenant_id = u.t AND q.minute = u.m",
    )
    .bind(&tenants)
    .bind(&minutes)
    .fetch_all(pool)
    .await
    .map_err(pg("read quota usage"))?
    .into_iter()
    .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
    .collect();
    Ok(keys
        .iter()
        .map(|&(t, m)| found.get(&(t.to_string(), m)).copied().unwrap_or((0, 0)))
        .collect())
}

/// The minute bucket of an event (quotas are per tenant and minute).
fn minute_of(e: &Enriched) -> DateTime<Utc> {
    crate::streams::usage::rollup::bucket_start(
        e.event.occurred_at,
        crate::streams::usage::rollup::Granularity::Minute,
    )
}

/// Marks events past their tenant's per-minute quota. Informational: the
/// quota violation itself is decided exactly in the commit.
pub async fn flag_over_quota(
    pool: &PgPool,
    events: &mut [Enriched],
    reference: &Reference,
) -> Result<(), StageError> {
    let has_quota = |tenant: &str| {
        reference
            .tenants
            .get(tenant)
            .is_some_and(|t| t.requests_per_minute.is_some() || t.tokens_per_minute.is_some())
    };
    let keys: Vec<(&str, DateTime<Utc>)> = events
        .iter()
        .filter(|e| has_quota(&e.event.tenant_id))
        .map(|e| (e.event.tenant_id.as_str(), minute_of(e)))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    let mut counts = quota_usage(pool, &keys).await?;
    // Each event's (tenant, minute) slot, so the counts need not borrow the
    // events that are changed below.
    let slots: Vec<Option<usize>> = {
        let index: crate::fasthash::Map<(&str, DateTime<Utc>), usize> =
            keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        events
            .iter()
            .map(|e| {
                index
                    .get(&(e.event.tenant_id.as_str(), minute_of(e)))
                    .copied()
            })
            .collect()
    };
    for (e, slot) in events.iter_mut().zip(slots) {
        let (Some(i), Some(t)) = (slot, reference.tenants.get(&e.event.tenant_id)) else {
            continue;
        };
        let c = &mut counts[i];
        c.0 += 1;
        c.1 += e.tokens().total();
        e.over_quota = t.requests_per_minute.is_some_and(|l| c.0 > l)
            || t.tokens_per_minute.is_some_and(|l| c.1 > l);
    }
    Ok(())
}

pub async fn apply_spend(
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
        "../../../../sql/postgres/queries/upsert_spend_daily.sql"
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

pub async fn apply_quotas(
    tx: &mut sqlx::PgConnection,
    events: &[Enriched],
    reference: &Reference,
    now: DateTime<Utc>,
) -> Result<Vec<ComplianceViolation>, StageError> {
    // Events per (tenant, minute) in offset order, only for tenants with quotas.
    let mut groups: BTreeMap<(&str, DateTime<Utc>), Vec<&Enriched>> = BTreeMap::new();
    for e in events {
        let Some(t) = reference.tenants.get(&e.event.tenant_id) else {
            continue;
        };
        if t.requests_per_minute.is_none() && t.tokens_per_minute.is_none() {
            continue;
        }
        groups
            .entry((e.event.tenant_id.as_str(), minute_of(e)))
            .or_default()
            .push(e);
    }
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let (tenants, minutes): (Vec<&str>, Vec<DateTime<Utc>>) = groups.keys().copied().unzip();
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
        let info = &reference.tenants[*tenant];
        let (mut req, mut tok) = current
            .get(&(tenant.to_string(), *minute))
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

pub async fn apply_budgets(
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
            // One version of each budget is in force per period (effective dating).
            if reference.budget_in_force(i, start) {
                groups.entry((i, start)).or_default().push(e);
            }
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
