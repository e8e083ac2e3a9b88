//! Violation rules (pure): budget thresholds, per-minute quotas, unknown tenants,
//! unpriced models, reported-cost mismatches and costs reported in a currency
//! other than the price book's.
//!
//! Guarantee: a violation's id is derived only from what it is about (rule,
//! subject, window, threshold), never from time or randomness, so replaying any
//! batch can only ever re-derive the same id; storage dedups on it.

use crate::streams::usage::enrich::{Budget, BudgetPeriod, Enriched};
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use tally_schemas::{ComplianceViolation, Severity};
use uuid::Uuid;

/// Every rule this stream raises (the `rule` of its violations).
pub const RULES: [&str; 6] = [
    "budget_threshold",
    "rate_limit_exceeded",
    "unknown_tenant",
    "unpriced_model",
    "currency_mismatch",
    "cost_mismatch",
];

/// Namespace of tally's deterministic (v5) violation ids.
const VIOLATION_NS: Uuid = Uuid::from_u128(0x7a11_7c0e_5eed_4a4c_9d1f_6b2e_0c0f_fee1);

/// Amounts in a violation are evidence for people and alerting, carried at the
/// schema's scale of 9 decimals; the exact money stays in spend tables.
fn evidence_amount(d: Decimal) -> Decimal {
    d.round_dp(9).normalize()
}

pub fn violation_id(rule: &str, parts: &[&str]) -> Uuid {
    let mut name = String::from(rule);
    for p in parts {
        name.push('\u{1f}');
        name.push_str(p);
    }
    Uuid::new_v5(&VIOLATION_NS, name.as_bytes())
}

/// First day of the budget period containing `day`, and the first day after it.
pub fn period_bounds(day: NaiveDate, period: BudgetPeriod) -> (NaiveDate, NaiveDate) {
    match period {
        BudgetPeriod::Day => (day, day + Duration::days(1)),
        BudgetPeriod::Month => {
            let start = NaiveDate::from_ymd_opt(day.year(), day.month(), 1).unwrap_or(day);
            let (y, m) = if day.month() == 12 {
                (day.year() + 1, 1)
            } else {
                (day.year(), day.month() + 1)
            };
            (start, NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(day))
        }
    }
}

/// Thresholds (in percent) whose amount lies in (before, after]: crossed by this step.
pub fn budget_crossings(before: Decimal, after: Decimal, budget: &Budget) -> Vec<Decimal> {
    budget
        .thresholds_pct
        .iter()
        .copied()
        .filter(|pct| {
            let level = threshold_amount(budget.amount, *pct);
            before < level && level <= after
        })
        .collect()
}

pub fn threshold_amount(amount: Decimal, pct: Decimal) -> Decimal {
    (amount * pct / Decimal::ONE_HUNDRED).normalize()
}

/// True when a count steps from within `limit` to over it.
pub fn quota_exceeded(before: i64, after: i64, limit: i64) -> bool {
    before <= limit && after > limit
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
}

fn severity_for_pct(pct: Decimal) -> Severity {
    if pct >= Decimal::ONE_HUNDRED {
        Severity::High
    } else if pct >= Decimal::from(80) {
        Severity::Medium
    } else {
        Severity::Low
    }
}

pub fn budget_violation(
    budget: &Budget,
    period_start: NaiveDate,
    pct: Decimal,
    observed: Decimal,
    evidence: &Enriched,
    detected_at: DateTime<Utc>,
) -> ComplianceViolation {
    let (start, end) = period_bounds(period_start, budget.period);
    let pct_s = pct.normalize().to_string();
    let (subject_type, subject_id) = match &budget.team_id {
        Some(team) => ("team", format!("{}/{}", budget.tenant_id, team)),
        None => ("tenant", budget.tenant_id.clone()),
    };
    ComplianceViolation {
        violation_id: violation_id(
            "budget_threshold",
            &[&budget.budget_id, &start.to_string(), &pct_s],
        ),
        rule: "budget_threshold".into(),
        severity: severity_for_pct(pct),
        tenant_id: budget.tenant_id.clone(),
        subject_type: subject_type.into(),
        subject_id,
        window_start: midnight(start),
        window_end: midnight(end),
        observed: evidence_amount(observed),
        threshold: evidence_amount(threshold_amount(budget.amount, pct)),
        evidence_event_ids: vec![evidence.event.event_id.to_string()],
        detected_at,
        message: format!(
            "budget {} reached {}% of {} for the period starting {}",
            budget.budget_id,
            pct_s,
            budget.amount.normalize(),
            start
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    Requests,
    Tokens,
}

impl QuotaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Requests => "requests_per_minute",
            QuotaKind::Tokens => "tokens_per_minute",
        }
    }
}

pub fn quota_violation(
    tenant_id: &str,
    minute: DateTime<Utc>,
    kind: QuotaKind,
    observed: i64,
    limit: i64,
    evidence: &Enriched,
    detected_at: DateTime<Utc>,
) -> ComplianceViolation {
    ComplianceViolation {
        violation_id: violation_id(
            "rate_limit_exceeded",
            &[tenant_id, &minute.to_rfc3339(), kind.as_str()],
        ),
        rule: "rate_limit_exceeded".into(),
        severity: Severity::Medium,
        tenant_id: tenant_id.into(),
        subject_type: "tenant".into(),
        subject_id: tenant_id.into(),
        window_start: minute,
        window_end: minute + Duration::minutes(1),
        observed: Decimal::from(observed),
        threshold: Decimal::from(limit),
        evidence_event_ids: vec![evidence.event.event_id.to_string()],
        detected_at,
        message: format!(
            "tenant {tenant_id} exceeded {} ({observed} > {limit}) in minute {minute}",
            kind.as_str()
        ),
    }
}

/// Once per (tenant, day): events from a tenant tally has no record of.
pub fn unknown_tenant_violation(e: &Enriched, detected_at: DateTime<Utc>) -> ComplianceViolation {
    let day = e.event.occurred_at.date_naive();
    let tenant = &e.event.tenant_id;
    ComplianceViolation {
        violation_id: violation_id("unknown_tenant", &[tenant, &day.to_string()]),
        rule: "unknown_tenant".into(),
        severity: Severity::Medium,
        tenant_id: tenant.clone(),
        subject_type: "tenant".into(),
        subject_id: tenant.clone(),
        window_start: midnight(day),
        window_end: midnight(day + Duration::days(1)),
        observed: Decimal::ONE,
        threshold: Decimal::ZERO,
        evidence_event_ids: vec![e.event.event_id.to_string()],
        detected_at,
        message: format!("usage from unknown tenant {tenant} on {day}; counted, not dropped"),
    }
}

/// Once per (tenant, provider, model, day): usage with no price in force.
pub fn unpriced_model_violation(e: &Enriched, detected_at: DateTime<Utc>) -> ComplianceViolation {
    let day = e.event.occurred_at.date_naive();
    let ev = &e.event;
    let subject = format!("{}/{}", ev.provider, ev.model);
    ComplianceViolation {
        violation_id: violation_id(
            "unpriced_model",
            &[&ev.tenant_id, &subject, &day.to_string()],
        ),
        rule: "unpriced_model".into(),
        severity: Severity::Low,
        tenant_id: ev.tenant_id.clone(),
        subject_type: "model".into(),
        subject_id: subject.clone(),
        window_start: midnight(day),
        window_end: midnight(day + Duration::days(1)),
        observed: Decimal::ONE,
        threshold: Decimal::ZERO,
        evidence_event_ids: vec![ev.event_id.to_string()],
        detected_at,
        message: format!("no price in force for {subject} on {day}; tokens counted, cost 0"),
    }
}

/// Once per (tenant, reported currency, day): costs reported in a currency other
/// than the price book's. Those events are priced from the book as usual; their
/// reported cost is not compared (no conversion, no mixed sums).
pub fn currency_mismatch_violation(
    e: &Enriched,
    book_currency: &str,
    detected_at: DateTime<Utc>,
) -> ComplianceViolation {
    let day = e.event.occurred_at.date_naive();
    let ev = &e.event;
    ComplianceViolation {
        violation_id: violation_id(
            "currency_mismatch",
            &[&ev.tenant_id, &ev.currency, &day.to_string()],
        ),
        rule: "currency_mismatch".into(),
        severity: Severity::Medium,
        tenant_id: ev.tenant_id.clone(),
        subject_type: "tenant".into(),
        subject_id: ev.tenant_id.clone(),
        window_start: midnight(day),
        window_end: midnight(day + Duration::days(1)),
        observed: Decimal::ONE,
        threshold: Decimal::ZERO,
        evidence_event_ids: vec![ev.event_id.to_string()],
        detected_at,
        message: format!(
            "tenant {} reports costs in {} but the price book is in {book_currency} on {day}; \
             costs computed in {book_currency}, reported costs not compared",
            ev.tenant_id, ev.currency
        ),
    }
}

/// Once per event: the emitter's reported cost differs from tally's beyond the tolerance.
pub fn cost_mismatch_violation(
    e: &Enriched,
    tolerance: Decimal,
    detected_at: DateTime<Utc>,
) -> ComplianceViolation {
    let ev = &e.event;
    let reported = ev.reported_cost.unwrap_or_default();
    ComplianceViolation {
        violation_id: violation_id("cost_mismatch", &[&ev.event_id.to_string()]),
        rule: "cost_mismatch".into(),
        severity: Severity::Low,
        tenant_id: ev.tenant_id.clone(),
        subject_type: "event".into(),
        subject_id: ev.event_id.to_string(),
        window_start: ev.occurred_at,
        window_end: ev.occurred_at,
        observed: evidence_amount(reported),
        threshold: evidence_amount(e.cost),
        evidence_event_ids: vec![ev.event_id.to_string()],
        detected_at,
        message: format!(
            "reported cost {} differs from computed {} by more than {}",
            reported.normalize(),
            e.cost.normalize(),
            tolerance.normalize()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn budget(amount: i64) -> Budget {
        Budget {
            budget_id: "b1".into(),
            tenant_id: "t1".into(),
            team_id: None,
            period: BudgetPeriod::Day,
            amount: Decimal::from(amount),
            thresholds_pct: vec![Decimal::from(50), Decimal::from(80), Decimal::from(100)],
            effective_from: None,
        }
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(
            violation_id("r", &["a", "b"]),
            violation_id("r", &["a", "b"])
        );
        assert_ne!(violation_id("r", &["a", "b"]), violation_id("r", &["ab"]));
        assert_ne!(violation_id("r", &["a"]), violation_id("s", &["a"]));
    }

    #[test]
    fn month_bounds() {
        let d = NaiveDate::from_ymd_opt(2026, 12, 15).unwrap();
        assert_eq!(
            period_bounds(d, BudgetPeriod::Month),
            (
                NaiveDate::from_ymd_opt(2026, 12, 1).unwrap(),
                NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()
            )
        );
    }

    #[test]
    fn crossing_exactly_at_the_threshold_counts_once() {
        let b = budget(100);
        assert_eq!(
            budget_crossings(Decimal::ZERO, Decimal::from(50), &b),
            vec![Decimal::from(50)]
        );
        assert!(budget_crossings(Decimal::from(50), Decimal::from(60), &b).is_empty());
        assert_eq!(
            budget_crossings(Decimal::from(10), Decimal::from(500), &b).len(),
            3
        );
    }

    proptest! {
        /// However spend is split into steps, each threshold is crossed exactly once
        /// if the final spend reaches it, and never otherwise.
        #[test]
        fn each_threshold_crossed_exactly_once(steps in prop::collection::vec(0i64..40, 1..50), amount in 1i64..500) {
            let b = budget(amount);
            let mut spent = Decimal::ZERO;
            let mut crossed: Vec<Decimal> = Vec::new();
            for s in &steps {
                let after = spent + Decimal::new(*s, 1);
                crossed.extend(budget_crossings(spent, after, &b));
                spent = after;
            }
            for pct in &b.thresholds_pct {
                let n = crossed.iter().filter(|c| *c == pct).count();
                let expected = usize::from(threshold_amount(b.amount, *pct) <= spent);
                prop_assert_eq!(n, expected);
            }
        }

        #[test]
        fn quota_exceeded_once_per_window(steps in prop::collection::vec(0i64..20, 1..50), limit in 0i64..300) {
            let mut count = 0i64;
            let mut n = 0;
            for s in &steps {
                if quota_exceeded(count, count + s, limit) { n += 1; }
                count += s;
            }
            prop_assert_eq!(n, usize::from(count > limit));
        }
    }
}
