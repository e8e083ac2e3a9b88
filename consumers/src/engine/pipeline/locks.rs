//! Partition ownership as the pipeline holds it: the advisory lock per
//! partition on one dedicated Postgres connection, the ownership epoch and
//! offset of record loaded with it, and recovery when that connection dies.
//!
//! Guarantee: a partition is `owned` only while this instance's lock
//! connection holds its advisory lock and its state (offset of record, epoch,
//! pending batch) was read after the lock was taken; a lost connection
//! releases every partition's ownership before anything is consumed again.

use super::{PartState, Pipeline};
use crate::config::Config;
use crate::engine::breaker::{Sink, Step};
use crate::engine::ledger::PendingBatch;
use crate::engine::offsets_reset;
use crate::engine::stream::Stream;
use crate::errors::StageError;
use rdkafka::consumer::Consumer;
use sqlx::Connection;
use std::time::{Duration, Instant};

impl<S: Stream> Pipeline<S> {
    pub(super) fn lock_key(&self, partition: i32) -> String {
        offsets_reset::partition_lock_key(&self.route.group, &self.route.topic, partition)
    }

    /// Releases partition `p`'s lock. If the lock connection is gone, so is the
    /// lock (Postgres released it); `locks_alive` reconnects before the next batch.
    pub(super) async fn unlock(&mut self, p: i32) -> Result<(), StageError> {
        if !self.held.remove(&p) {
            return Ok(());
        }
        let key = self.lock_key(p);
        // Held exactly once (`held`), so one unlock frees it.
        match sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(&key)
            .fetch_one(&mut self.lock_conn)
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(partition = p, "advisory lock was not held at unlock"),
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "advisory unlock failed; the lock connection is gone and the lock with it");
            }
        }
        Ok(())
    }

    /// Whether the connection holding the partition locks still answers; if
    /// not, every lock died with it and `recover_locks` runs before more work.
    pub(super) async fn locks_alive(&mut self) -> bool {
        if !self.lock_conn_dead
            && sqlx::query("SELECT 1")
                .execute(&mut self.lock_conn)
                .await
                .is_err()
        {
            self.lock_conn_dead = true;
        }
        !self.lock_conn_dead
    }

    /// After the lock connection died (a Postgres restart): let running batches
    /// finish (their fences keep them safe), reconnect, forget all ownership and
    /// buffered work, and take every assigned partition again at its offset of record.
    pub(super) async fn recover_locks(&mut self) -> Result<(), StageError> {
        if self.lock_retry.is_none() {
            tracing::warn!("advisory lock connection lost; reconnecting and re-taking partitions");
        }
        while let Some(done) = self.in_flight.join_next().await {
            self.on_batch_done(done).await?;
        }
        // One attempt per turn of the main loop, so polling (and the group
        // membership) goes on during a Postgres outage; never gives up.
        if self
            .lock_retry
            .as_ref()
            .is_some_and(|(at, _)| Instant::now() < *at)
        {
            return Ok(());
        }
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::PgConnection::connect_with(&lock_options(&self.cfg)?),
        )
        .await;
        match attempt {
            Ok(Ok(c)) => {
                self.lock_conn = c;
                self.lock_conn_dead = false;
                self.lock_retry = None;
                self.held.clear();
                crate::engine::breaker::answered(&self.sm, Sink::Postgres, Step::LockReconnect);
            }
            failed => {
                let e = match failed {
                    Ok(Err(e)) => crate::errors::classify_pg("advisory lock reconnect", e),
                    _ => StageError::Retryable("advisory lock reconnect timed out".into()),
                };
                if !e.is_retryable() {
                    return Err(e);
                }
                let policy = self.runner.breaker;
                crate::engine::breaker::failed(
                    &self.sm,
                    &policy,
                    Sink::Postgres,
                    Step::LockReconnect,
                    started,
                    &e,
                );
                let mut delays = match self.lock_retry.take() {
                    Some((_, d)) => d,
                    None => Box::new(crate::engine::breaker::probe_backoff(policy.max_backoff)),
                };
                let d = delays.next().unwrap_or(policy.max_backoff);
                tracing::warn!(error = %e, delay_ms = d.as_millis() as u64, "advisory lock reconnect: retrying");
                self.lock_retry = Some((Instant::now() + d, delays));
                return Ok(());
            }
        }
        let parts: Vec<i32> = self.parts.keys().copied().collect();
        for p in parts {
            self.retake(p).await?;
        }
        Ok(())
    }

    /// Forgets partition `p`'s buffered work and ownership, then takes it again
    /// at once and seeks to its offset of record, or to its start when it has
    /// none yet (messages that were buffered are read again even if nothing
    /// new arrives).
    pub(super) async fn retake(&mut self, p: i32) -> Result<(), StageError> {
        self.resume_if_paused(p);
        self.parts.insert(p, PartState::default());
        if self.take_ownership(p).await? {
            if let Some(at) = self.parts.get(&p).and_then(|s| s.expected) {
                let seeked = self.seek(p, at);
                if let Some(st) = self.parts.get_mut(&p) {
                    st.seeked = seeked;
                }
            }
        }
        Ok(())
    }

    /// Takes ownership of a partition: advisory lock, then offset of record.
    pub(super) async fn take_ownership(&mut self, p: i32) -> Result<bool, StageError> {
        let key = self.lock_key(p);
        let got: bool = if self.held.contains(&p) {
            true // already ours: never take the re-entrant lock twice
        } else {
            match sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
                .bind(&key)
                .fetch_one(&mut self.lock_conn)
                .await
            {
                Ok(g) => g,
                Err(e) => {
                    // The lock connection died (Postgres restart): every lock is gone;
                    // the main loop recovers before anything else happens.
                    tracing::warn!(error = %e, "advisory lock connection lost");
                    self.lock_conn_dead = true;
                    return Ok(false);
                }
            }
        };
        if !got {
            return Ok(false);
        }
        self.held.insert(p);
        crate::engine::failpoint::hit("take_ownership_after_lock").await?;
        let ledger = &self.runner.ledger;
        let epoch = crate::engine::ownership::take_epoch(
            ledger.pool(),
            &ledger.partition_key(p),
            &self.owner,
        )
        .await?;
        let state = self.runner.ledger.partition_state(p).await?;
        let need = state
            .next_offset
            .into_iter()
            .chain(state.pending.map(|b| b.last + 1))
            .max()
            .unwrap_or(0);
        self.refuse_if_past_end(p, state.next_offset, state.pending, need)?;
        // Where this partition's counting resumes. Never the consumer's own
        // position: after a revoke and re-assignment, or a lost ownership,
        // librdkafka may go on past messages this instance buffered and
        // dropped, and accepting them from there would skip the rest.
        let start = match state.pending.map(|b| b.first).or(state.next_offset) {
            Some(at) => at,
            None => self.partition_start(p)?,
        };
        let st = self.parts.entry(p).or_default();
        st.owned = true;
        st.epoch = epoch;
        st.cutoff_floor = state.dedup_cutoff;
        st.record_next = state.next_offset;
        st.replay = state.pending;
        st.expected = Some(start);
        st.seeked = false;
        st.streaming = false;
        st.buf.clear();
        st.buf_since = None;
        if let Some(b) = state.pending {
            tracing::info!(
                partition = p,
                batch_id = b.batch_id,
                first = b.first,
                last = b.last,
                "replaying pending batch"
            );
        }
        Ok(true)
    }

    /// The first offset partition `p` still holds (its low watermark): where
    /// a partition with no offset of record starts, as `auto.offset.reset =
    /// earliest` would.
    pub(super) fn partition_start(&self, p: i32) -> Result<i64, StageError> {
        let topic = &self.route.topic;
        tokio::task::block_in_place(|| {
            self.consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
        })
        .map(|(low, _)| low.max(0))
        .map_err(|e| {
            StageError::Retryable(format!(
                "reading the start of partition {p} of {topic}: {e}"
            ))
        })
    }

    /// A hard stop when the offset of record (or the pending batch) lies past
    /// the partition's end: the topic was recreated or lost its data, and
    /// consuming would skip the new messages as already counted. Only
    /// `tally reset-offsets` resolves it (see `offsets_reset`).
    pub(super) fn refuse_if_past_end(
        &self,
        p: i32,
        next_offset: Option<i64>,
        pending: Option<PendingBatch>,
        need: i64,
    ) -> Result<(), StageError> {
        if need <= 0 {
            return Ok(());
        }
        let topic = &self.route.topic;
        let end = tokio::task::block_in_place(|| {
            offsets_reset::confirmed_end_below(&self.consumer, topic, p, need)
        });
        match end {
            None => Ok(()),
            Some(end) => {
                let msg = offsets_reset::past_end_message(
                    &self.route.group,
                    topic,
                    p,
                    next_offset,
                    pending.map(|b| (b.batch_id, b.first, b.last)),
                    end,
                );
                tracing::error!("{msg}");
                Err(StageError::Fatal(msg))
            }
        }
    }
}

/// Options of the connection that holds the partition locks; named so that
/// operators (and tests) can find it in `pg_stat_activity`.
pub(super) fn lock_options(cfg: &Config) -> Result<sqlx::postgres::PgConnectOptions, StageError> {
    Ok(crate::sinks::postgres::pg_options(cfg)?.application_name("tally-locks"))
}
