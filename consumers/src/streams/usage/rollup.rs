//! Rollup keys and totals (pure, no I/O).
//!
//! Guarantee: a batch's rollup rows are a pure function of its enriched events,
//! bucketed by the event's `occurred_at` (so a late event lands in its own
//! bucket); summing rollup rows over any key gives exactly the raw totals.

use crate::fasthash::Map;
use crate::streams::usage::cost::Tokens;
use crate::streams::usage::enrich::Enriched;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    /// The ClickHouse table holding this rollup.
    pub fn table(self) -> &'static str {
        match self {
            Granularity::Minute => "usage_1m",
            Granularity::Hour => "usage_1h",
            Granularity::Day => "usage_1d",
        }
    }
}

/// Start of the bucket containing `ts`.
pub fn bucket_start(ts: DateTime<Utc>, g: Granularity) -> DateTime<Utc> {
    // UTC has no leap seconds here: every minute, hour and day is a whole
    // number of Unix seconds from the epoch.
    let width: i64 = match g {
        Granularity::Minute => 60,
        Granularity::Hour => 3_600,
        Granularity::Day => 86_400,
    };
    let secs = ts.timestamp();
    DateTime::from_timestamp(secs - secs.rem_euclid(width), 0).unwrap_or(ts)
}

/// Key of a rollup row; borrows from the events (empty string = none).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey<'a> {
    pub bucket: DateTime<Utc>,
    pub tenant_id: &'a str,
    pub team_id: &'a str,
    pub project_id: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    pub status: &'static str,
}

/// Summable measures of a set of usage events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: i64,
    pub tokens: Tokens,
    pub cost: Decimal,
    pub unpriced_requests: i64,
}

impl Totals {
    /// Adds another set's totals (exact: integers and decimals).
    pub fn merge(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.tokens.input += o.tokens.input;
        self.tokens.cached_input += o.tokens.cached_input;
        self.tokens.cache_write += o.tokens.cache_write;
        self.tokens.output += o.tokens.output;
        self.tokens.reasoning += o.tokens.reasoning;
        self.cost += o.cost;
        self.unpriced_requests += o.unpriced_requests;
    }

    pub fn add(&mut self, e: &Enriched) {
        let t = e.tokens();
        self.requests += 1;
        self.tokens.input += t.input;
        self.tokens.cached_input += t.cached_input;
        self.tokens.cache_write += t.cache_write;
        self.tokens.output += t.output;
        self.tokens.reasoning += t.reasoning;
        self.cost += e.cost;
        if !e.priced {
            self.unpriced_requests += 1;
        }
    }
}

/// Rollup rows of one granularity for a batch of events, sorted by key.
pub fn rollup(events: &[Enriched], g: Granularity) -> Vec<(RollupKey<'_>, Totals)> {
    let mut out: Map<RollupKey<'_>, Totals> = Map::default();
    for e in events {
        let ev = &e.event;
        let key = RollupKey {
            bucket: bucket_start(ev.occurred_at, g),
            tenant_id: &ev.tenant_id,
            team_id: ev.team_id.as_deref().unwrap_or_default(),
            project_id: ev.project_id.as_deref().unwrap_or_default(),
            provider: &ev.provider,
            model: &ev.model,
            status: ev.status.as_str(),
        };
        out.entry(key).or_default().add(e);
    }
    let mut rows: Vec<(RollupKey<'_>, Totals)> = out.into_iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Rollup rows of every granularity (minute, hour, day), each sorted by key:
/// the minute rollup from the events, each coarser one from the finer one
/// (sums of sums are exact), so the events are grouped once.
pub fn rollup_all(events: &[Enriched]) -> [Vec<(RollupKey<'_>, Totals)>; 3] {
    let minute = rollup(events, Granularity::Minute);
    let hour = coarsen(&minute, Granularity::Hour);
    let day = coarsen(&hour, Granularity::Day);
    [minute, hour, day]
}

/// Regroups finer rollup rows into the coarser buckets of `g`.
fn coarsen<'a>(rows: &[(RollupKey<'a>, Totals)], g: Granularity) -> Vec<(RollupKey<'a>, Totals)> {
    let mut out: Map<RollupKey<'a>, Totals> = Map::default();
    for (k, t) in rows {
        let key = RollupKey {
            bucket: bucket_start(k.bucket, g),
            ..k.clone()
        };
        out.entry(key).or_default().merge(t);
    }
    let mut rows: Vec<(RollupKey<'a>, Totals)> = out.into_iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Key of Postgres `spend_daily`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpendKey<'a> {
    pub day: NaiveDate,
    pub tenant_id: &'a str,
    pub team_id: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
}

/// Daily spend rows for a batch of events, sorted by key (a stable lock order).
pub fn spend_daily(events: &[Enriched]) -> Vec<(SpendKey<'_>, Totals)> {
    let mut out: Map<SpendKey<'_>, Totals> = Map::default();
    for e in events {
        let ev = &e.event;
        let key = SpendKey {
            day: ev.occurred_at.date_naive(),
            tenant_id: &ev.tenant_id,
            team_id: ev.team_id.as_deref().unwrap_or_default(),
            provider: &ev.provider,
            model: &ev.model,
        };
        out.entry(key).or_default().add(e);
    }
    let mut rows: Vec<(SpendKey<'_>, Totals)> = out.into_iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::usage::enrich::tests::enriched;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn buckets() {
        let ts = Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 7).unwrap();
        assert_eq!(
            bucket_start(ts, Granularity::Minute),
            Utc.with_ymd_and_hms(2026, 3, 4, 5, 6, 0).unwrap()
        );
        assert_eq!(
            bucket_start(ts, Granularity::Hour),
            Utc.with_ymd_and_hms(2026, 3, 4, 5, 0, 0).unwrap()
        );
        assert_eq!(
            bucket_start(ts, Granularity::Day),
            Utc.with_ymd_and_hms(2026, 3, 4, 0, 0, 0).unwrap()
        );
    }

    proptest! {
        #[test]
        fn rollups_preserve_totals(specs in prop::collection::vec((0u8..4, 0u8..3, 0i64..200_000, 0i64..10_000, 0i64..5_000, 0u32..3), 1..60)) {
            let events: Vec<Enriched> = specs
                .iter()
                .map(|(tenant, model, secs, input, output, cost_millis)| {
                    enriched(&format!("t{tenant}"), &format!("m{model}"), *secs, *input, *output, Decimal::new(i64::from(*cost_millis), 3))
                })
                .collect();
            let mut expected = Totals::default();
            for e in &events { expected.add(e); }
            for g in Granularity::ALL {
                let rows = rollup(&events, g);
                let mut sum = Totals::default();
                for (key, t) in &rows {
                    prop_assert_eq!(bucket_start(key.bucket, g), key.bucket);
                    sum.requests += t.requests;
                    sum.tokens.input += t.tokens.input;
                    sum.tokens.output += t.tokens.output;
                    sum.cost += t.cost;
                    sum.unpriced_requests += t.unpriced_requests;
                }
                prop_assert_eq!(sum.requests, expected.requests);
                prop_assert_eq!(sum.tokens.input, expected.tokens.input);
                prop_assert_eq!(sum.tokens.output, expected.tokens.output);
                prop_assert_eq!(sum.cost, expected.cost);
                // every event's bucket contains its timestamp
                for e in &events {
                    let b = bucket_start(e.event.occurred_at, g);
                    prop_assert!(b <= e.event.occurred_at);
                }
            }
            // Coarsened from the finer rollup: the very rows of a direct one.
            let all = rollup_all(&events);
            for (i, g) in Granularity::ALL.into_iter().enumerate() {
                prop_assert_eq!(&all[i], &rollup(&events, g));
            }
            let daily = spend_daily(&events);
            let total: i64 = daily.iter().map(|(_, t)| t.requests).sum();
            prop_assert_eq!(total, expected.requests);
        }
    }
}
