//! Flow control of the pipeline: the gate that stops taking messages while
//! the buffers are full, pauses (per partition, for a held batch, an open
//! circuit or per-tenant pacing) and the offset copy to Kafka.
//!
//! Guarantee: memory is bounded (per partition two batches, across
//! partitions `pipeline.buffer_max_bytes` of buffered messages, plus
//! librdkafka's queue) while a batch runs whose end frees room; no decision
//! here changes what is counted, only when; the Kafka offset copy only ever
//! repeats the Postgres offsets of record.

use super::{PartState, Pipeline};
use crate::engine::stream::Stream;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

impl<S: Stream> Pipeline<S> {
    /// Whether partition `p` holds its share of the buffers while a batch
    /// runs (whose end frees room): two batches, or anything at all once
    /// every partition's buffered messages together weigh
    /// `pipeline.buffer_max_bytes`. With no batch running nothing is full:
    /// the next `process_ready` starts one.
    pub(super) fn full(&self, p: i32) -> bool {
        let over = self.buffered_bytes() >= self.cfg.pipeline.buffer_max_bytes;
        self.parts.get(&p).is_some_and(|s| self.is_full(s, over))
    }

    pub(super) fn is_full(&self, s: &PartState, over_budget: bool) -> bool {
        !self.in_flight.is_empty()
            && !s.paused
            && (s.buf.len() >= 2 * self.cfg.pipeline.batch_max_messages
                || (over_budget && !s.buf.is_empty()))
    }

    /// What every partition's buffered messages weigh together.
    pub(super) fn buffered_bytes(&self) -> usize {
        self.parts.values().map(|s| s.buf.bytes()).sum()
    }

    /// Bounds memory: while a partition is `full` (see there), no message is taken from
    /// the consumer; librdkafka keeps what it fetched and stops fetching once
    /// its queue is full. (Pausing the partition would make librdkafka drop
    /// what it fetched and fetch it all again on resume: with a broker that
    /// answers a fetch with the whole backlog, every batch would re-read the
    /// rest of the partition.) A partition still full after a while (a batch
    /// held up) is paused, so that the other partitions and the group's
    /// rebalances are served. Returns whether the consumer is gated.
    pub(super) fn gate_recv(&mut self) -> bool {
        let over = self.buffered_bytes() >= self.cfg.pipeline.buffer_max_bytes;
        let full: Vec<i32> = self
            .parts
            .iter()
            .filter(|(_, s)| self.is_full(s, over))
            .map(|(p, _)| *p)
            .collect();
        if full.is_empty() {
            self.gated_since = None;
            return false;
        }
        let pause_after = Duration::from_millis(
            u64::from(self.cfg.kafka.max_poll_interval_ms / 4).clamp(100, 10_000),
        );
        let since = *self.gated_since.get_or_insert_with(Instant::now);
        if since.elapsed() < pause_after {
            return true;
        }
        for p in full {
            tracing::info!(
                partition = p,
                waited_ms = since.elapsed().as_millis() as u64,
                "a partition stayed full while its batch ran: pausing it (the consumer serves the others)"
            );
            self.pause(p);
        }
        self.gated_since = None;
        false
    }

    /// Operational fairness: how long to wait before a tenant's share of this
    /// batch fits its pace. Changes timing only, never results.
    pub(super) fn fairness_wait(&self, p: i32, take: usize) -> Option<Duration> {
        let st = self.parts.get(&p)?;
        self.fairness.wait_for(
            st.buf.as_slice()[..take]
                .iter()
                .map(|m| m.key().unwrap_or_default()),
        )
    }

    pub(super) fn defer(&mut self, p: i32, wait: Duration) {
        self.sm.fairness_deferrals.increment(1);
        let Some(st) = self.parts.get_mut(&p) else {
            return;
        };
        st.not_before = Some(Instant::now() + wait);
        self.pause(p);
    }

    /// Circuit breaker gate (`breaker.rs`): while a sink's circuit is open or
    /// the lock connection is gone, no batch starts and every assigned
    /// partition is paused, so memory holds only what was already fetched; the
    /// running batches keep probing. Resumes when all is well. Returns whether
    /// consumption is on hold.
    pub(super) fn hold(&mut self) -> bool {
        let blocked = self.lock_conn_dead || self.metrics.sinks.any_open();
        if blocked {
            let running: Vec<i32> = self
                .parts
                .iter()
                .filter(|(_, s)| !s.paused)
                .map(|(p, _)| *p)
                .collect();
            for p in running {
                self.pause(p);
                if self.parts.get(&p).is_some_and(|s| s.paused) {
                    self.breaker_paused.insert(p);
                }
            }
        } else if !self.breaker_paused.is_empty() {
            tracing::info!(partitions = ?self.breaker_paused, "sinks answer again: resuming consumption");
            for p in std::mem::take(&mut self.breaker_paused) {
                self.resume_if_paused(p);
            }
        }
        blocked
    }

    /// Stops fetching partition `p` until `resume_if_paused`.
    pub(super) fn pause(&mut self, p: i32) {
        let Some(st) = self.parts.get_mut(&p) else {
            return;
        };
        if !st.paused {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.route.topic, p);
            if self.consumer.pause(&tpl).is_ok() {
                st.paused = true;
            }
        }
    }

    pub(super) fn resume_if_paused(&mut self, p: i32) {
        let Some(st) = self.parts.get_mut(&p) else {
            return;
        };
        st.not_before = None;
        if st.paused {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.route.topic, p);
            if self.consumer.resume(&tpl).is_ok() {
                st.paused = false;
            }
        }
    }

    /// Copies the offsets of record to Kafka for lag tooling (never read
    /// back), only when they moved since the last copy: a commit is a write
    /// for the broker (noida-db rewrites its whole data file on each).
    pub(super) fn commit_kafka_copy(&mut self) {
        let offsets: Vec<(i32, i64)> = self
            .parts
            .iter()
            .filter_map(|(p, st)| st.record_next.filter(|_| st.owned).map(|n| (*p, n)))
            .collect();
        if offsets.is_empty() || offsets == self.copied {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, n) in &offsets {
            let _ = tpl.add_partition_offset(&self.route.topic, *p, Offset::Offset(*n));
        }
        match self.consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) => self.copied = offsets,
            Err(e) => tracing::debug!(error = %e, "kafka offset copy failed (harmless)"),
        }
    }
}
