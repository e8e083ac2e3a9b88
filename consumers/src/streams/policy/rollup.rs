//! Rollups of policy decisions per (bucket, tenant, policy, decision, enforcement),
//! per minute, hour and day (pure).
//!
//! Guarantee: a batch's rollup rows are a pure function of its decisions, bucketed by
//! each decision's `occurred_at` (the usage rollups' [`bucket_start`]); summing the
//! rows of any granularity gives exactly the batch's count and evaluation time.

use crate::streams::usage::rollup::{bucket_start, Granularity};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use tally_schemas::{Decision, Enforcement, PolicyDecision};

/// The ClickHouse table of a granularity's decision rollup.
pub fn table(g: Granularity) -> &'static str {
    match g {
        Granularity::Minute => "policy_decisions_1m",
        Granularity::Hour => "policy_decisions_1h",
        Granularity::Day => "policy_decisions_1d",
    }
}

/// Key of a rollup row; borrows from the decisions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DecisionKey<'a> {
    pub bucket: DateTime<Utc>,
    pub tenant_id: &'a str,
    pub policy_id: &'a str,
    pub decision: Decision,
    pub enforcement: Enforcement,
}

/// Summable measures of a set of decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecisionTotals {
    pub decisions: i64,
    /// Sum of `evaluation_ms` (average = this / `decisions`).
    pub evaluation_ms: i64,
}

impl DecisionTotals {
    pub fn add(&mut self, d: &PolicyDecision) {
        self.decisions += 1;
        self.evaluation_ms = self.evaluation_ms.saturating_add(d.evaluation_ms);
    }
}

/// Rollup rows of one granularity for a batch of decisions, sorted by key.
pub fn rollup(batch: &[PolicyDecision], g: Granularity) -> Vec<(DecisionKey<'_>, DecisionTotals)> {
    let mut out: BTreeMap<DecisionKey<'_>, DecisionTotals> = BTreeMap::new();
    for d in batch {
        let key = DecisionKey {
            bucket: bucket_start(d.occurred_at, g),
            tenant_id: &d.tenant_id,
            policy_id: &d.policy_id,
            decision: d.decision,
            enforcement: d.enforcement,
        };
        out.entry(key).or_default().add(d);
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;

    fn decision(
        tenant: u8,
        policy: u8,
        secs: i64,
        dec: usize,
        monitor: bool,
        ms: i64,
    ) -> PolicyDecision {
        let mut d = tally_schemas::sample_policy_decision();
        d.tenant_id = format!("t{tenant}");
        d.policy_id = format!("p{policy}");
        d.occurred_at =
            Utc.with_ymd_and_hms(2026, 12, 1, 23, 58, 0).unwrap() + Duration::seconds(secs);
        d.decision = Decision::ALL[dec];
        d.enforcement = if monitor {
            Enforcement::Monitor
        } else {
            Enforcement::Enforce
        };
        d.evaluation_ms = ms;
        d
    }

    #[test]
    fn buckets_by_key() {
        let batch = vec![
            decision(0, 0, 0, 1, false, 3),
            decision(0, 0, 30, 1, false, 4),
            decision(0, 0, 30, 1, true, 5),
            decision(0, 0, 200, 1, false, 6),
        ];
        let m = rollup(&batch, Granularity::Minute);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0].1,
            DecisionTotals {
                decisions: 2,
                evaluation_ms: 7
            }
        );
        assert_eq!(m[0].0.decision, Decision::Deny);
        let d = rollup(&batch, Granularity::Day);
        assert_eq!(d.len(), 3, "the 200 s event is on the next day");
        assert_eq!(table(Granularity::Hour), "policy_decisions_1h");
    }

    proptest! {
        #[test]
        fn rollups_preserve_totals(specs in prop::collection::vec(
            (0u8..3, 0u8..3, 0i64..200_000, 0usize..5, any::<bool>(), 0i64..1000), 1..60)
        ) {
            let batch: Vec<_> = specs
                .iter()
                .map(|(t, p, s, dec, mon, ms)| decision(*t, *p, *s, *dec, *mon, *ms))
                .collect();
            let mut expected = DecisionTotals::default();
            batch.iter().for_each(|d| expected.add(d));
            for g in Granularity::ALL {
                let rows = rollup(&batch, g);
                let mut sum = DecisionTotals::default();
                for (k, t) in &rows {
                    prop_assert_eq!(bucket_start(k.bucket, g), k.bucket);
                    sum.decisions += t.decisions;
                    sum.evaluation_ms += t.evaluation_ms;
                }
                prop_assert_eq!(sum, expected);
                for d in &batch {
                    let key = DecisionKey {
                        bucket: bucket_start(d.occurred_at, g),
                        tenant_id: &d.tenant_id,
                        policy_id: &d.policy_id,
                        decision: d.decision,
                        enforcement: d.enforcement,
                    };
                    prop_assert!(rows.iter().any(|(k, _)| *k == key));
                }
            }
        }
    }
}
