//! Event-time tumbling windows and once-per-window threshold crossings (pure).
//!
//! Guarantee: an event's window is a function of its `occurred_at` and the window
//! length only (windows are aligned to the Unix epoch), and a running count crosses a
//! threshold at exactly one step. So when each batch starts from the count the
//! earlier batches of that window left (read under a row lock in the commit), any
//! split of the same events into batches reports the crossing once, and never when
//! the final count stays below it.

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use std::collections::BTreeMap;
use tally_schemas::ComplianceViolation;

/// Longest accepted window: 31 days.
pub const MAX_WINDOW_SECS: u64 = 31 * 86_400;

/// Length of an epoch-aligned tumbling window, 1 s to [`MAX_WINDOW_SECS`].
///
/// Configured as a number of seconds (`window_secs = 300`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "u64")]
pub struct Window {
    secs: i64,
}

impl TryFrom<u64> for Window {
    type Error = String;
    fn try_from(secs: u64) -> Result<Self, String> {
        Window::seconds(secs)
            .ok_or_else(|| format!("window must be 1..={MAX_WINDOW_SECS} seconds, got {secs}"))
    }
}

impl Window {
    /// One minute.
    pub const MINUTE: Window = Window { secs: 60 };
    /// Five minutes.
    pub const FIVE_MINUTES: Window = Window { secs: 300 };

    /// A window of `secs` seconds, if within 1..=[`MAX_WINDOW_SECS`].
    pub fn seconds(secs: u64) -> Option<Window> {
        if (1..=MAX_WINDOW_SECS).contains(&secs) {
            i64::try_from(secs).ok().map(|secs| Window { secs })
        } else {
            None
        }
    }

    /// Length in seconds.
    pub fn secs(self) -> i64 {
        self.secs
    }

    /// Start of the window containing `ts` (whole seconds, epoch-aligned).
    pub fn start(self, ts: DateTime<Utc>) -> DateTime<Utc> {
        let s = ts.timestamp().div_euclid(self.secs) * self.secs;
        DateTime::from_timestamp(s, 0).unwrap_or(ts)
    }

    /// End (exclusive) of the window that starts at `start`.
    pub fn end(self, start: DateTime<Utc>) -> DateTime<Utc> {
        start + Duration::seconds(self.secs)
    }
}

/// What one batch does to one window's count.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStep {
    /// To add to the stored count.
    pub added: i64,
    /// The crossing, if this batch made it.
    pub violation: Option<ComplianceViolation>,
}

/// Where a running count that starts at `before` and grows by one per item first
/// reaches `at_least`: the item's index and the count after it. `None` when the count
/// had reached it before these items, or does not reach it with them.
pub fn crossing(before: i64, items: usize, at_least: i64) -> Option<(usize, i64)> {
    if before >= at_least {
        return None;
    }
    let needed = at_least.saturating_sub(before);
    let idx = usize::try_from(needed - 1).ok()?;
    (idx < items).then_some((idx, at_least))
}

/// Groups `items` by `key` (items without a key are left out), keeping each group in
/// the order of `items`. Groups come out sorted by key: a stable lock order for the
/// commit that reads and updates their counts.
pub fn group<'a, T, K: Ord>(
    items: &'a [T],
    key: impl Fn(&T) -> Option<K>,
) -> BTreeMap<K, Vec<&'a T>> {
    let mut out: BTreeMap<K, Vec<&'a T>> = BTreeMap::new();
    for it in items {
        if let Some(k) = key(it) {
            out.entry(k).or_default().push(it);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn windows_are_epoch_aligned() {
        let w = Window::seconds(300).unwrap();
        let ts = Utc.with_ymd_and_hms(2026, 3, 4, 5, 7, 59).unwrap();
        let s = w.start(ts);
        assert_eq!(s, Utc.with_ymd_and_hms(2026, 3, 4, 5, 5, 0).unwrap());
        assert_eq!(
            w.end(s),
            Utc.with_ymd_and_hms(2026, 3, 4, 5, 10, 0).unwrap()
        );
        let before_epoch = Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 59).unwrap();
        assert_eq!(
            w.start(before_epoch),
            Utc.with_ymd_and_hms(1969, 12, 31, 23, 55, 0).unwrap()
        );
        assert!(Window::seconds(0).is_none());
        assert!(Window::seconds(MAX_WINDOW_SECS + 1).is_none());
        assert!(serde_json::from_str::<Window>("0").is_err());
        assert_eq!(serde_json::from_str::<Window>("60").unwrap().secs(), 60);
    }

    #[test]
    fn crossing_points() {
        assert_eq!(crossing(0, 3, 3), Some((2, 3)));
        assert_eq!(crossing(0, 2, 3), None);
        assert_eq!(crossing(2, 1, 3), Some((0, 3)));
        assert_eq!(crossing(3, 5, 3), None);
        assert_eq!(crossing(0, 0, 0), None);
        assert_eq!(crossing(-5, 1, 1), None);
        assert_eq!(crossing(i64::MAX - 1, 5, i64::MAX), Some((0, i64::MAX)));
        assert_eq!(crossing(i64::MIN, 2, i64::MAX), None);
    }

    proptest! {
        /// However n items are split into steps, exactly one step crosses iff n reaches the threshold.
        #[test]
        fn crossed_once(steps in prop::collection::vec(0usize..20, 0..30), at_least in 0i64..200) {
            let mut count = 0i64;
            let mut hits = 0;
            for s in &steps {
                if let Some((i, c)) = crossing(count, *s, at_least) {
                    prop_assert!(i < *s);
                    prop_assert_eq!(c, count + i as i64 + 1);
                    hits += 1;
                }
                count += *s as i64;
            }
            prop_assert_eq!(hits, usize::from(at_least >= 1 && count >= at_least));
        }
    }
}
