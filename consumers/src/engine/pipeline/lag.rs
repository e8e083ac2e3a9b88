//! The pipeline's watermark check: whether owned partitions lag (for
//! `/readyz`) and how much (for the lag and owned-partitions gauges).
//!
//! Guarantee: a partition counts as lagging exactly when its high watermark
//! is past its offset of record, unless it was read to its end with nothing
//! buffered, running or to replay (transaction markers are not lag); a
//! partition this instance no longer owns reports 0, so a gauge never shows
//! the lag of a partition another instance now works on.

use super::Pipeline;
use crate::engine::stream::Stream;
use rdkafka::consumer::Consumer;
use std::collections::BTreeSet;
use std::time::Duration;

impl<S: Stream> Pipeline<S> {
    /// Whether an owned partition has messages beyond its offset of record
    /// (a short watermark request per owned partition, every few seconds). It
    /// feeds `/readyz`: lag that makes no progress is a stall, even when nothing
    /// arrives any more (e.g. a partition left paused). A partition read to its
    /// end with nothing buffered or running is not lagging, whatever the
    /// watermark says (it counts transaction markers, which are never delivered).
    /// Sets the lag gauges (high watermark - offset of record; 0 for a partition
    /// read to its end or no longer owned) and the owned-partitions gauge.
    pub(super) fn check_lag(&mut self) -> bool {
        let (topic, consumer) = (&self.route.topic, &self.consumer);
        let lags: Vec<(i32, Option<i64>)> = tokio::task::block_in_place(|| {
            self.parts
                .iter()
                .filter(|(_, st)| st.owned)
                .map(|(p, st)| {
                    let drained = st.eof
                        && st.buf.is_empty()
                        && !st.in_flight
                        && !st.paused
                        && st.replay.is_none();
                    let lag = if drained {
                        Some(0)
                    } else {
                        consumer
                            .fetch_watermarks(topic, *p, Duration::from_millis(500))
                            .ok()
                            .map(|(_, high)| high - st.record_next.unwrap_or(0))
                    };
                    (*p, lag)
                })
                .collect()
        });
        let owned: BTreeSet<i32> = lags.iter().map(|(p, _)| *p).collect();
        for p in self.lag_reported.difference(&owned) {
            self.sm.set_lag(*p, 0);
        }
        for (p, lag) in &lags {
            if let Some(lag) = lag {
                self.sm.set_lag(*p, *lag);
            }
        }
        self.sm
            .owned_partitions
            .set(u32::try_from(owned.len()).unwrap_or(u32::MAX));
        self.lag_reported = owned;
        lags.iter().any(|(_, lag)| lag.is_some_and(|l| l > 0))
    }
}
