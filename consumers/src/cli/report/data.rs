//! The report's data: each section read with the same filters, ClickHouse
//! through the analyst views (sql/clickhouse/008_analyst_views.sql) in
//! `clickhouse.database`, Postgres through sql/postgres/queries/report_*.sql.
//!
//! Guarantee: money is read and returned exactly (ClickHouse `toString` of the
//! Decimal sums, Postgres NUMERIC), never through a float; every section
//! applies `--from`/`--to`/`--tenant` as docs/operations.md describes, or is
//! `None` with a note saying why it cannot.

use crate::config::Config;
use crate::errors::{classify_ch, pg, StageError};
use crate::sinks::clickhouse::ClickHouseSink;
use chrono::{DateTime, NaiveDate, Timelike, Utc};
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;
use sqlx::postgres::PgPool;
use sqlx::Row as _;
use std::str::FromStr;

/// `--from` (inclusive), `--to` (exclusive), `--tenant`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub tenant: Option<String>,
}

impl Filters {
    /// Whether both bounds (those given) fall on midnight UTC.
    pub fn whole_days(&self) -> bool {
        [self.from, self.to]
            .iter()
            .flatten()
            .all(|t| t.num_seconds_from_midnight() == 0 && t.nanosecond() == 0)
    }

    /// ClickHouse conditions on `bucket` and `tenant_id` (bound with `?`).
    fn ch_where(&self) -> (String, Vec<String>) {
        let mut conds = vec!["1".to_string()];
        let mut binds = Vec::new();
        let fmt = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
        if let Some(f) = self.from {
            conds.push("bucket >= toDateTime(?, 'UTC')".into());
            binds.push(fmt(f));
        }
        if let Some(t) = self.to {
            conds.push("bucket < toDateTime(?, 'UTC')".into());
            binds.push(fmt(t));
        }
        if let Some(t) = &self.tenant {
            conds.push("tenant_id = ?".into());
            binds.push(t.clone());
        }
        (conds.join(" AND "), binds)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRow {
    pub tenant_id: String,
    pub provider: String,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost: Decimal,
    pub unpriced_requests: u64,
}

/// Totals of the spend section, and Postgres `spend_daily` over the same
/// range (only when the range is whole days: it is kept per day).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendTotals {
    pub requests: u64,
    pub cost: Decimal,
    pub unpriced_requests: u64,
    pub postgres: Option<(i64, Decimal, i64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRow {
    pub budget_id: String,
    pub scope: String,
    pub tenant_id: String,
    pub team_id: Option<String>,
    pub period: String,
    pub period_start: NaiveDate,
    pub period_end: NaiveDate,
    pub spent: Decimal,
    /// The amount of the version in force for the period.
    pub amount: Option<Decimal>,
    /// spent / amount in percent, rounded to 2 decimals.
    pub used_pct: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRow {
    pub policy_id: String,
    pub decision: String,
    pub enforcement: String,
    pub decisions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub tenant_id: String,
    /// Audit events in the range (ClickHouse).
    pub events: u64,
    /// The log now (Postgres): leaves, and the size the latest checkpoint signs.
    pub tree_size: i64,
    pub checkpoint_tree_size: Option<i64>,
    pub checkpoints_published: i64,
    /// Leaves reserved by batches that have not committed yet.
    pub pending_leaves: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViolationRow {
    pub rule: String,
    pub raised: i64,
    pub published: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqRow {
    pub topic: String,
    pub error_class: String,
    pub messages: i64,
}

/// The report's sections; `None`: not asked for (`--section`) or not
/// applicable (then `notes` says why).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub filters: Filters,
    pub currency: String,
    pub spend: Option<Vec<SpendRow>>,
    pub spend_totals: Option<SpendTotals>,
    pub budgets: Option<Vec<BudgetRow>>,
    pub decisions: Option<Vec<DecisionRow>>,
    pub audit: Option<Vec<AuditRow>>,
    pub violations: Option<Vec<ViolationRow>>,
    pub dlq: Option<Vec<DlqRow>>,
    pub notes: Vec<String>,
}

fn dec(s: &str, what: &str) -> Result<Decimal, StageError> {
    Decimal::from_str(s.trim())
        .map(|d| d.normalize())
        .map_err(|e| StageError::Fatal(format!("report {what}: {s:?} is not a decimal: {e}")))
}

#[derive(Row, Deserialize)]
struct ChSpend {
    tenant_id: String,
    provider: String,
    model: String,
    requests: u64,
    tokens: u64,
    cost: String,
    unpriced_requests: u64,
}

pub async fn spend(
    cfg: &Config,
    ch: &ClickHouseSink,
    f: &Filters,
) -> Result<Vec<SpendRow>, StageError> {
    let (cond, binds) = f.ch_where();
    let sql = format!(
        "SELECT tenant_id, provider, model, sum(requests) AS requests, sum(tokens) AS tokens, \
         toString(sum(cost)) AS cost_text, sum(unpriced_requests) AS unpriced_requests \
         FROM {}.spend_hourly WHERE {cond} GROUP BY tenant_id, provider, model \
         ORDER BY sum(cost) DESC, tenant_id, provider, model",
        cfg.clickhouse.database
    );
    let mut q = ch.client().query(&sql);
    for b in &binds {
        q = q.bind(b.as_str());
    }
    let rows: Vec<ChSpend> = q
        .fetch_all()
        .await
        .map_err(|e| classify_ch("report spend", e))?;
    rows.into_iter()
        .map(|r| {
            Ok(SpendRow {
                cost: dec(&r.cost, "spend cost")?,
                tenant_id: r.tenant_id,
                provider: r.provider,
                model: r.model,
                requests: r.requests,
                tokens: r.tokens,
                unpriced_requests: r.unpriced_requests,
            })
        })
        .collect()
}

/// Totals of `rows`, and Postgres `spend_daily` over whole days.
pub async fn spend_totals(
    pool: &PgPool,
    f: &Filters,
    rows: &[SpendRow],
) -> Result<SpendTotals, StageError> {
    let postgres = if f.whole_days() {
        let r = sqlx::query(include_str!(
            "../../../../sql/postgres/queries/report_spend_totals.sql"
        ))
        .bind(f.from.map(|t| t.date_naive()))
        .bind(f.to.map(|t| t.date_naive()))
        .bind(&f.tenant)
        .fetch_one(pool)
        .await
        .map_err(pg("report spend totals"))?;
        Some((
            r.get::<i64, _>(0),
            r.get::<Decimal, _>(1).normalize(),
            r.get::<i64, _>(2),
        ))
    } else {
        None
    };
    Ok(SpendTotals {
        requests: rows.iter().map(|r| r.requests).sum(),
        cost: rows.iter().map(|r| r.cost).sum::<Decimal>().normalize(),
        unpriced_requests: rows.iter().map(|r| r.unpriced_requests).sum(),
        postgres,
    })
}

pub async fn budgets(pool: &PgPool, f: &Filters) -> Result<Vec<BudgetRow>, StageError> {
    let rows = sqlx::query(include_str!(
        "../../../../sql/postgres/queries/report_budgets.sql"
    ))
    .bind(f.from)
    .bind(f.to)
    .bind(&f.tenant)
    .fetch_all(pool)
    .await
    .map_err(pg("report budgets"))?;
    Ok(rows
        .into_iter()
        .map(|r| BudgetRow {
            budget_id: r.get(0),
            scope: r.get(1),
            tenant_id: r.get(2),
            team_id: r.get(3),
            period: r.get(4),
            period_start: r.get(5),
            period_end: r.get(6),
            spent: r.get::<Decimal, _>(7).normalize(),
            amount: r.get::<Option<Decimal>, _>(8).map(|d| d.normalize()),
            used_pct: r.get::<Option<Decimal>, _>(9).map(|d| d.normalize()),
        })
        .collect())
}

#[derive(Row, Deserialize)]
struct ChDecision {
    policy_id: String,
    decision: String,
    enforcement: String,
    decisions: u64,
}

pub async fn decisions(
    cfg: &Config,
    ch: &ClickHouseSink,
    f: &Filters,
) -> Result<Vec<DecisionRow>, StageError> {
    let (cond, binds) = f.ch_where();
    let sql = format!(
        "SELECT policy_id, decision, enforcement, sum(decisions) AS decisions \
         FROM {}.policy_decisions_hourly WHERE {cond} GROUP BY policy_id, decision, enforcement \
         ORDER BY policy_id, decision, enforcement",
        cfg.clickhouse.database
    );
    let mut q = ch.client().query(&sql);
    for b in &binds {
        q = q.bind(b.as_str());
    }
    let rows: Vec<ChDecision> = q
        .fetch_all()
        .await
        .map_err(|e| classify_ch("report decisions", e))?;
    Ok(rows
        .into_iter()
        .map(|r| DecisionRow {
            policy_id: r.policy_id,
            decision: r.decision,
            enforcement: r.enforcement,
            decisions: r.decisions,
        })
        .collect())
}

#[derive(Row, Deserialize)]
struct ChAudit {
    tenant_id: String,
    events: u64,
}

/// Per tenant with a log: events in the range (ClickHouse) and the log now
/// (Postgres). With a time range, tenants without events in it are left out.
pub async fn audit(
    cfg: &Config,
    ch: &ClickHouseSink,
    pool: &PgPool,
    f: &Filters,
) -> Result<Vec<AuditRow>, StageError> {
    let (cond, binds) = f.ch_where();
    let sql = format!(
        "SELECT tenant_id, sum(events) AS events FROM {}.audit_events_hourly WHERE {cond} \
         GROUP BY tenant_id ORDER BY tenant_id",
        cfg.clickhouse.database
    );
    let mut q = ch.client().query(&sql);
    for b in &binds {
        q = q.bind(b.as_str());
    }
    let events: std::collections::BTreeMap<String, u64> = q
        .fetch_all::<ChAudit>()
        .await
        .map_err(|e| classify_ch("report audit events", e))?
        .into_iter()
        .map(|r| (r.tenant_id, r.events))
        .collect();
    let logs = sqlx::query(include_str!(
        "../../../../sql/postgres/queries/report_audit_logs.sql"
    ))
    .bind(&f.tenant)
    .fetch_all(pool)
    .await
    .map_err(pg("report audit logs"))?;
    let ranged = f.from.is_some() || f.to.is_some();
    Ok(logs
        .into_iter()
        .map(|l| {
            let tenant_id: String = l.get(0);
            AuditRow {
                events: events.get(&tenant_id).copied().unwrap_or(0),
                tenant_id,
                tree_size: l.get(1),
                checkpoint_tree_size: l.get(2),
                checkpoints_published: l.get(3),
                pending_leaves: l.get(4),
            }
        })
        .filter(|r| !ranged || r.events > 0)
        .collect())
}

pub async fn violations(pool: &PgPool, f: &Filters) -> Result<Vec<ViolationRow>, StageError> {
    let rows = sqlx::query(include_str!(
        "../../../../sql/postgres/queries/report_violations.sql"
    ))
    .bind(f.from)
    .bind(f.to)
    .bind(&f.tenant)
    .fetch_all(pool)
    .await
    .map_err(pg("report violations"))?;
    Ok(rows
        .into_iter()
        .map(|r| ViolationRow {
            rule: r.get(0),
            raised: r.get(1),
            published: r.get(2),
        })
        .collect())
}

pub async fn dlq(pool: &PgPool, f: &Filters) -> Result<Vec<DlqRow>, StageError> {
    let rows = sqlx::query(include_str!(
        "../../../../sql/postgres/queries/report_dead_letters.sql"
    ))
    .bind(f.from)
    .bind(f.to)
    .fetch_all(pool)
    .await
    .map_err(pg("report dead letters"))?;
    Ok(rows
        .into_iter()
        .map(|r| DlqRow {
            topic: r.get(0),
            error_class: r.get(1),
            messages: r.get(2),
        })
        .collect())
}

/// The price book's currency (every money field is in it).
pub async fn currency(pool: &PgPool) -> Result<String, StageError> {
    let c: String = sqlx::query_scalar("SELECT currency FROM tally.price_book")
        .fetch_one(pool)
        .await
        .map_err(pg("report currency"))?;
    Ok(c.trim().to_string())
}
