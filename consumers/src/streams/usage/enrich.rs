//! Enrichment (pure): reference data snapshot and per-event cost.
//!
//! Guarantee: `enrich` is a pure function of the event and a reference snapshot.
//! An unknown tenant or unpriced model is never dropped: the event is kept and
//! counted, marked (`tenant_known = false`, `priced = false`), and raises a
//! violation downstream. Cost is always in the price book's one currency; an
//! event that reports its cost in another currency is still priced from the
//! book, its reported cost is not compared (`currency_mismatch`, a violation
//! downstream), and nothing is ever added across currencies.

use crate::fasthash::Map;
use crate::streams::usage::cost::{cost_of, is_mismatch, PriceBook, Tokens};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tally_schemas::UsageEvent;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    pub name: String,
    pub requests_per_minute: Option<i64>,
    pub tokens_per_minute: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BudgetPeriod {
    Day,
    Month,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub budget_id: String,
    pub tenant_id: String,
    /// `None` for a tenant-scope budget.
    pub team_id: Option<String>,
    pub period: BudgetPeriod,
    pub amount: Decimal,
    pub thresholds_pct: Vec<Decimal>,
    /// This version's first day (`tally budgets import`); `None`: in force for
    /// every period before the next version (what `tally seed` writes). Left out
    /// of the snapshot body when `None`, so older snapshots hash the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_from: Option<NaiveDate>,
}

/// One immutable snapshot of the reference data (refreshed by swapping).
#[derive(Debug, Clone, Default)]
pub struct Reference {
    pub tenants: Map<String, TenantInfo>,
    pub prices: PriceBook,
    pub budgets: Vec<Budget>,
    /// Indexes into `budgets` by tenant id.
    budgets_by_tenant: Map<String, Vec<usize>>,
    /// Per entry of `budgets`: the first day of the same budget's next version
    /// (`None`: none follows), so each period has one version in force.
    budget_until: Vec<Option<NaiveDate>>,
    /// Content hash of the snapshot (see `reference::ReferenceRows`); empty
    /// for a snapshot built in memory by a test.
    pub version: String,
}

impl Reference {
    pub fn new(
        tenants: HashMap<String, TenantInfo>,
        prices: PriceBook,
        budgets: Vec<Budget>,
    ) -> Self {
        let mut budgets_by_tenant: Map<String, Vec<usize>> = Map::default();
        for (i, b) in budgets.iter().enumerate() {
            budgets_by_tenant
                .entry(b.tenant_id.clone())
                .or_default()
                .push(i);
        }
        // Versions of each budget in effective order; each ends where the next begins.
        let mut versions: Map<&str, Vec<(Option<NaiveDate>, usize)>> = Map::default();
        for (i, b) in budgets.iter().enumerate() {
            versions
                .entry(b.budget_id.as_str())
                .or_default()
                .push((b.effective_from, i));
        }
        let mut budget_until = vec![None; budgets.len()];
        for list in versions.values_mut() {
            list.sort();
            for pair in list.windows(2) {
                budget_until[pair[0].1] = pair[1].0;
            }
        }
        Self {
            tenants: tenants.into_iter().collect(),
            prices,
            budgets,
            budgets_by_tenant,
            budget_until,
            version: String::new(),
        }
    }

    /// Whether entry `i` of `budgets` is its budget's version in force for the
    /// period starting `period_start`: the version with the greatest
    /// `effective_from` on or before that day (`None` counts as the earliest).
    pub fn budget_in_force(&self, i: usize, period_start: NaiveDate) -> bool {
        let Some(b) = self.budgets.get(i) else {
            return false;
        };
        b.effective_from.is_none_or(|from| from <= period_start)
            && self
                .budget_until
                .get(i)
                .copied()
                .flatten()
                .is_none_or(|until| period_start < until)
    }

    /// Indexes (into `budgets`) of the budgets an event of `tenant_id`/`team_id` counts towards.
    pub fn budgets_for<'a>(
        &'a self,
        tenant_id: &str,
        team_id: Option<&'a str>,
    ) -> impl Iterator<Item = usize> + 'a {
        self.budgets_by_tenant
            .get(tenant_id)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(move |i| {
                let b = &self.budgets[*i];
                b.team_id.is_none() || b.team_id.as_deref() == team_id
            })
    }
}

/// A decoded usage event with everything tally derives from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Enriched {
    pub event: UsageEvent,
    pub cost: Decimal,
    pub priced: bool,
    pub price_effective_from: Option<DateTime<Utc>>,
    pub tenant_known: bool,
    pub cost_mismatch: bool,
    /// The event reports a cost in a currency other than the price book's.
    pub currency_mismatch: bool,
    pub over_quota: bool,
    pub partition: i32,
    pub offset: i64,
}

impl Enriched {
    pub fn tokens(&self) -> Tokens {
        tokens_of(&self.event)
    }
}

pub fn tokens_of(e: &UsageEvent) -> Tokens {
    Tokens {
        input: e.input_tokens,
        cached_input: e.cached_input_tokens,
        cache_write: e.cache_write_tokens,
        output: e.output_tokens,
        reasoning: e.reasoning_tokens,
    }
}

/// Price and classify one event against a reference snapshot.
pub fn enrich(
    event: UsageEvent,
    reference: &Reference,
    tolerance: Decimal,
    partition: i32,
    offset: i64,
) -> Enriched {
    let tenant_known = reference.tenants.contains_key(&event.tenant_id);
    // Every version in the book is in the book's currency: the version in force
    // is the price, whatever currency the emitter reports in.
    let price = reference
        .prices
        .price_at(&event.provider, &event.model, event.occurred_at);
    let (cost, priced, from) = match price {
        Some(p) => (cost_of(&tokens_of(&event), p), true, Some(p.effective_from)),
        None => (Decimal::ZERO, false, None),
    };
    let currency_mismatch =
        event.reported_cost.is_some() && event.currency != reference.prices.currency();
    let cost_mismatch =
        priced && !currency_mismatch && is_mismatch(event.reported_cost, cost, tolerance);
    Enriched {
        event,
        cost,
        priced,
        price_effective_from: from,
        tenant_known,
        cost_mismatch,
        currency_mismatch,
        over_quota: false,
        partition,
        offset,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::streams::usage::cost::PriceVersion;
    use chrono::TimeZone;
    use std::str::FromStr;

    /// A test event `secs` seconds after 2026-01-01.
    pub(crate) fn enriched(
        tenant: &str,
        model: &str,
        secs: i64,
        input: i64,
        output: i64,
        cost: Decimal,
    ) -> Enriched {
        let mut event = tally_schemas::sample_usage();
        event.tenant_id = tenant.into();
        event.model = model.into();
        event.occurred_at =
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(secs);
        event.input_tokens = input;
        event.output_tokens = output;
        event.cached_input_tokens = 0;
        event.cache_write_tokens = 0;
        event.reasoning_tokens = 0;
        Enriched {
            event,
            cost,
            priced: true,
            price_effective_from: None,
            tenant_known: true,
            cost_mismatch: false,
            currency_mismatch: false,
            over_quota: false,
            partition: 0,
            offset: 0,
        }
    }

    fn reference() -> Reference {
        let v = |from: DateTime<Utc>, input: &str| PriceVersion {
            effective_from: from,
            currency: "USD".into(),
            input_per_m: Decimal::from_str(input).unwrap(),
            cached_input_per_m: Decimal::ZERO,
            cache_write_per_m: Decimal::ZERO,
            output_per_m: Decimal::ZERO,
            reasoning_per_m: Decimal::ZERO,
        };
        let mut tenants = HashMap::new();
        tenants.insert(
            "t1".to_string(),
            TenantInfo {
                name: "T1".into(),
                requests_per_minute: Some(10),
                tokens_per_minute: None,
            },
        );
        Reference::new(
            tenants,
            PriceBook::new(
                "USD",
                [
                    (
                        "openai".into(),
                        "gpt".into(),
                        v(Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap(), "1"),
                    ),
                    (
                        "openai".into(),
                        "gpt".into(),
                        v(Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap(), "2"),
                    ),
                ],
            )
            .unwrap(),
            vec![],
        )
    }

    #[test]
    fn price_in_force_at_occurred_at() {
        let r = reference();
        let mut e = tally_schemas::sample_usage();
        e.tenant_id = "t1".into();
        e.provider = "openai".into();
        e.model = "gpt".into();
        e.currency = "USD".into();
        e.input_tokens = 1_000_000;
        e.cached_input_tokens = 0;
        e.cache_write_tokens = 0;
        e.output_tokens = 0;
        e.reasoning_tokens = 0;
        e.reported_cost = None;
        e.occurred_at = Utc.with_ymd_and_hms(2026, 1, 1, 11, 59, 59).unwrap();
        let before = enrich(e.clone(), &r, Decimal::ZERO, 0, 0);
        assert_eq!(before.cost, Decimal::ONE);
        e.occurred_at = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let after = enrich(e.clone(), &r, Decimal::ZERO, 0, 0);
        assert_eq!(after.cost, Decimal::TWO);
        assert!(after.priced && after.tenant_known);
        e.model = "unknown".into();
        e.tenant_id = "nobody".into();
        let unpriced = enrich(e, &r, Decimal::ZERO, 0, 0);
        assert!(!unpriced.priced && !unpriced.tenant_known);
        assert_eq!(unpriced.cost, Decimal::ZERO);
    }

    fn priced_event(currency: &str, reported: Option<Decimal>) -> UsageEvent {
        let mut e = tally_schemas::sample_usage();
        e.tenant_id = "t1".into();
        e.provider = "openai".into();
        e.model = "gpt".into();
        e.currency = currency.into();
        e.input_tokens = 1_000_000;
        e.cached_input_tokens = 0;
        e.cache_write_tokens = 0;
        e.output_tokens = 0;
        e.reasoning_tokens = 0;
        e.reported_cost = reported;
        e.occurred_at = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
        e
    }

    #[test]
    fn a_cost_reported_in_another_currency_is_flagged_not_compared() {
        let r = reference();
        // 1M input tokens at 2 USD per 1M: 2 USD, whatever the emitter reports.
        let eur = enrich(
            priced_event("EUR", Some(Decimal::from(9))),
            &r,
            Decimal::ZERO,
            0,
            0,
        );
        assert_eq!((eur.cost, eur.priced), (Decimal::TWO, true));
        assert!(eur.currency_mismatch && !eur.cost_mismatch);
        let usd = enrich(
            priced_event("USD", Some(Decimal::from(9))),
            &r,
            Decimal::ZERO,
            0,
            0,
        );
        assert_eq!(usd.cost, Decimal::TWO);
        assert!(!usd.currency_mismatch && usd.cost_mismatch);
        // Nothing reported: nothing to compare, nothing to flag.
        let none = enrich(priced_event("EUR", None), &r, Decimal::ZERO, 0, 0);
        assert_eq!(none.cost, Decimal::TWO);
        assert!(!none.currency_mismatch && !none.cost_mismatch);
    }

    proptest::proptest! {
        /// The reported currency never changes the computed cost, a reported
        /// cost is compared only when it is in the book's currency, and a
        /// foreign one is always flagged.
        #[test]
        fn reported_currency_never_changes_the_cost(
            currency in proptest::sample::select(vec!["USD", "EUR", "GBP"]),
            reported in proptest::option::of(0i64..10_000_000),
            tokens in 0i64..10_000_000,
        ) {
            let r = reference();
            let mut e = priced_event(currency, reported.map(|c| Decimal::new(c, 6)));
            e.input_tokens = tokens;
            let out = enrich(e.clone(), &r, Decimal::ZERO, 0, 0);
            let mut as_usd = e.clone();
            as_usd.currency = "USD".into();
            let base = enrich(as_usd, &r, Decimal::ZERO, 0, 0);
            proptest::prop_assert_eq!(out.cost, base.cost);
            proptest::prop_assert_eq!(out.cost, Decimal::from(tokens) * Decimal::TWO / Decimal::from(1_000_000));
            proptest::prop_assert_eq!(out.currency_mismatch, reported.is_some() && currency != "USD");
            proptest::prop_assert!(!(out.cost_mismatch && out.currency_mismatch));
            if currency == "USD" {
                proptest::prop_assert_eq!(out.cost_mismatch, base.cost_mismatch);
            }
        }
    }

    #[test]
    fn one_budget_version_is_in_force_per_period() {
        let d = |m, day| NaiveDate::from_ymd_opt(2026, m, day).unwrap();
        let v = |from: Option<NaiveDate>, amount: i64| Budget {
            budget_id: "b".into(),
            tenant_id: "t".into(),
            team_id: None,
            period: BudgetPeriod::Month,
            amount: Decimal::from(amount),
            thresholds_pct: vec![Decimal::ONE_HUNDRED],
            effective_from: from,
        };
        let other = Budget {
            budget_id: "c".into(),
            tenant_id: "u".into(),
            ..v(Some(d(5, 1)), 7)
        };
        // Versions in any order: the base (None), March and June.
        let r = Reference::new(
            HashMap::new(),
            PriceBook::default(),
            vec![
                v(Some(d(6, 1)), 30),
                other,
                v(None, 10),
                v(Some(d(3, 1)), 20),
            ],
        );
        let in_force = |start: NaiveDate| -> Vec<i64> {
            r.budgets_for("t", None)
                .filter(|i| r.budget_in_force(*i, start))
                .map(|i| i64::try_from(r.budgets[i].amount.mantissa()).unwrap())
                .collect()
        };
        assert_eq!(in_force(d(1, 1)), [10]);
        assert_eq!(in_force(d(3, 1)), [20]);
        assert_eq!(in_force(d(5, 1)), [20]);
        assert_eq!(in_force(d(6, 1)), [30]);
        assert_eq!(in_force(d(12, 1)), [30]);
        // A budget whose first version starts later counts nothing before it.
        assert!(!r.budget_in_force(1, d(4, 1)));
        assert!(r.budget_in_force(1, d(5, 1)));
    }
}
