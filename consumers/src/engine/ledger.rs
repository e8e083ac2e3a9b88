//! Postgres ledger: offsets of record, batch claims, event-id dedup, and the
//! final commit of a batch: the stream's effects, violations, dead letters, offset.
//!
//! Guarantee: the batch's Postgres effects and its new offset commit in ONE
//! transaction, fenced by the batch's `pending` row, so they happen exactly
//! once. The claim (phase 1) records the batch range and which event ids this
//! batch owns, so a replay after a crash rebuilds the very same batch.

use crate::engine::stream::{BatchCtx, Stream};
use crate::errors::{pg, StageError};
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use std::collections::HashSet;
use tally_schemas::ComplianceViolation;

pub use crate::engine::claim::{ClaimInput, Claimed, PartitionState, PendingBatch};

/// A message that goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub class: String,
    pub message: String,
}

/// Everything the final commit of a batch applies.
pub struct CommitInput<'a, S: Stream> {
    /// The batch (partition, epoch, reference snapshot, detection time).
    pub ctx: &'a BatchCtx<'a>,
    pub stream: &'a S,
    pub records: &'a [S::Record],
    pub dead: &'a [DeadLetter],
    /// Newest message timestamp of the batch (informational).
    pub newest_message_at: Option<DateTime<Utc>>,
    /// The dedup cutoff the batch applied (the partition's never moves back).
    pub dedup_cutoff: DateTime<Utc>,
    /// Trace contexts of the owned events, stored with the violations they cause.
    pub carry: &'a crate::engine::trace::Carry<'a>,
}

impl<S: Stream> Clone for CommitInput<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S: Stream> Copy for CommitInput<'_, S> {}

#[derive(Debug, Clone, Default)]
pub struct CommitOutcome {
    /// The rule of each violation this commit added to the outbox.
    pub violations_new: Vec<String>,
    pub events: usize,
}

#[derive(Clone)]
pub struct Ledger {
    pub(crate) pool: PgPool,
    pub(crate) group: String,
    pub(crate) topic: String,
    /// Whether claims try the binary COPY first (see `claim::ClaimMode`).
    pub(crate) claims: std::sync::Arc<crate::engine::claim::ClaimMode>,
}

impl Ledger {
    pub fn new(pool: PgPool, group: &str, topic: &str) -> Self {
        Self {
            pool,
            group: group.into(),
            topic: topic.into(),
            claims: Default::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Phase 3: the stream's effects, violations, dead letters and the new
    /// offset, in one transaction fenced by the pending batch.
    pub async fn commit<S: Stream>(
        &self,
        partition: i32,
        batch: PendingBatch,
        input: &CommitInput<'_, S>,
    ) -> Result<CommitOutcome, StageError> {
        let CommitInput {
            ctx,
            stream,
            records,
            dead,
            newest_message_at,
            dedup_cutoff,
            carry,
        } = *input;
        let epoch = ctx.epoch;
        let mut tx = self.pool.begin().await.map_err(pg("commit begin"))?;

        // Fence: the partition's epoch must still be ours, the batch still pending.
        crate::engine::ownership::check_epoch_in(&mut tx, &self.partition_key(partition), epoch)
            .await?;
        let done = sqlx::query(
            "UPDATE tally.batches SET state = 'done', done_at = now(), events = $2 \
             WHERE batch_id = $1 AND state = 'pending'",
        )
        .bind(batch.batch_id)
        .bind(i32::try_from(records.len()).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .map_err(pg("commit fence"))?;
        if done.rows_affected() != 1 {
            return Err(StageError::LostOwnership(format!(
                "batch {} is no longer pending",
                batch.batch_id
            )));
        }

        let violations = stream.commit(&mut tx, ctx, records).await?;
        let violations_new = insert_violations(&mut tx, &violations, carry).await?;

        if !dead.is_empty() {
            let parts: Vec<i32> = dead.iter().map(|d| d.partition).collect();
            let offsets: Vec<i64> = dead.iter().map(|d| d.offset).collect();
            let classes: Vec<String> = dead.iter().map(|d| d.class.clone()).collect();
            let messages: Vec<String> = dead.iter().map(|d| d.message.clone()).collect();
            sqlx::query(
                // topic_epoch: the topic's incarnation (0004_topic_epochs.sql).
                "INSERT INTO tally.dead_letters (topic, topic_epoch, partition, \"offset\", error_class, error_message) \
                 SELECT $1, coalesce((SELECT epoch FROM tally.topic_epochs WHERE topic = $1), 0), u.p, u.o, u.c, u.m \
                 FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[]) AS u(p, o, c, m) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&self.topic)
            .bind(&parts)
            .bind(&offsets)
            .bind(&classes)
            .bind(&messages)
            .execute(&mut *tx)
            .await
            .map_err(pg("commit dead letters"))?;
        }

        let moved = sqlx::query(
            "UPDATE tally.consumer_offsets SET next_offset = $4, updated_at = now(), \
             last_message_at = GREATEST(last_message_at, $5), \
             dedup_cutoff = GREATEST(coalesce(dedup_cutoff, $7), $7) \
             WHERE group_id = $1 AND topic = $2 AND partition = $3 AND next_offset <= $6",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(partition)
        .bind(batch.last + 1)
        .bind(newest_message_at)
        .bind(batch.first)
        .bind(dedup_cutoff)
        .execute(&mut *tx)
        .await
        .map_err(pg("commit offset"))?;
        if moved.rows_affected() != 1 {
            return Err(StageError::LostOwnership(format!(
                "partition {partition}: offset moved past {}",
                batch.first
            )));
        }
        tx.commit().await.map_err(pg("commit"))?;
        Ok(CommitOutcome {
            violations_new,
            events: records.len(),
        })
    }

    /// Whether a batch is done (used when a commit's outcome is unknown).
    pub async fn batch_done(&self, batch_id: i64) -> Result<bool, StageError> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM tally.batches WHERE batch_id = $1")
                .bind(batch_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(pg("read batch state"))?;
        Ok(state.as_deref() == Some("done"))
    }
}

/// Inserts violations into the outbox, each with the trace context of the
/// event it names as evidence (if that message carried one); an id seen
/// before is ignored. Returns the rules of those inserted.
async fn insert_violations(
    tx: &mut sqlx::PgConnection,
    vs: &[ComplianceViolation],
    carry: &crate::engine::trace::Carry<'_>,
) -> Result<Vec<String>, StageError> {
    if vs.is_empty() {
        return Ok(Vec::new());
    }
    // Within one batch the same id can be derived twice (e.g. two unpriced events).
    let mut seen = HashSet::new();
    let vs: Vec<&ComplianceViolation> = vs.iter().filter(|v| seen.insert(v.violation_id)).collect();
    let traces: Vec<_> = vs.iter().map(|v| carry.for_violation(v)).collect();
    sqlx::query_scalar(include_str!(
        "../../../sql/postgres/queries/insert_violations.sql"
    ))
    .bind(vs.iter().map(|v| v.violation_id).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.rule.clone()).collect::<Vec<_>>())
    .bind(
        vs.iter()
            .map(|v| v.severity.as_str().to_string())
            .collect::<Vec<_>>(),
    )
    .bind(vs.iter().map(|v| v.tenant_id.clone()).collect::<Vec<_>>())
    .bind(
        vs.iter()
            .map(|v| v.subject_type.clone())
            .collect::<Vec<_>>(),
    )
    .bind(vs.iter().map(|v| v.subject_id.clone()).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.window_start).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.window_end).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.observed).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.threshold).collect::<Vec<_>>())
    .bind(
        vs.iter()
            .map(|v| v.evidence_event_ids.join(","))
            .collect::<Vec<_>>(),
    )
    .bind(vs.iter().map(|v| v.detected_at).collect::<Vec<_>>())
    .bind(vs.iter().map(|v| v.message.clone()).collect::<Vec<_>>())
    .bind(
        traces
            .iter()
            .map(|t| t.as_ref().map(|t| t.traceparent.clone()))
            .collect::<Vec<_>>(),
    )
    .bind(
        traces
            .iter()
            .map(|t| t.as_ref().and_then(|t| t.tracestate.clone()))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("commit violations"))
}
