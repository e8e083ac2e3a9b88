//! Claim stage (Postgres): a batch's offset range becomes `pending` and its
//! events' dedup keys are claimed, in one transaction under the partition's
//! ownership epoch.
//!
//! Guarantee: a replay rebuilds the very same batch. The claim records what the
//! first attempt decided (its reference snapshot, dedup clock and cutoff), the
//! keys it claimed stay its own, and a re-send is recognised per tenant: the
//! dedup key is (tenant, event id), and a key already claimed with another
//! payload fingerprint is a conflict (dead-lettered), never silently dropped.

use crate::engine::ledger::Ledger;
use crate::engine::ownership::{check_epoch_in, PartitionKey};
use crate::errors::{classify_pg, pg, StageError};
use crate::fasthash::{Map, Set};
use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

/// A batch between its claim and its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingBatch {
    pub batch_id: i64,
    pub first: i64,
    pub last: i64,
    /// Epoch of the latest attempt (None: written before epochs existed).
    pub owner_epoch: Option<i64>,
    /// Reference snapshot of the first attempt.
    pub reference_version: Option<Uuid>,
    /// Dedup clock and cutoff the first attempt applied.
    pub clock_at: Option<DateTime<Utc>>,
    pub dedup_cutoff: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionState {
    pub next_offset: Option<i64>,
    pub pending: Option<PendingBatch>,
    /// The dedup cutoff this partition has applied so far (never moves back).
    pub dedup_cutoff: Option<DateTime<Utc>>,
}

/// One event's claim: dedup key, event time, payload fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyClaim {
    pub key: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub fingerprint: i64,
}

pub struct ClaimInput<'a> {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
    pub expected_next: Option<i64>,
    pub replay_of: Option<i64>,
    pub epoch: i64,
    pub reference_version: &'a str,
    pub clock_at: DateTime<Utc>,
    pub dedup_cutoff: DateTime<Utc>,
    pub keys: &'a [KeyClaim],
}

pub struct Claimed {
    pub batch: PendingBatch,
    /// Keys this batch counts (claimed now, or by its own earlier attempt).
    pub owned: Set<Uuid>,
    /// Keys claimed earlier with another fingerprint, with the one stored:
    /// conflicts (dead-lettered), unless the stored one is the event's v1
    /// fingerprint (claimed before the current layout: a re-send).
    pub conflicts: Map<Uuid, i64>,
    /// How the keys were claimed.
    pub path: ClaimPath,
}

/// How a claim wrote its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimPath {
    /// One binary COPY: no key had been claimed before.
    Copy,
    /// The COPY met a key claimed before and was rolled back; then as `Insert`.
    CopyThenInsert,
    /// `INSERT ... ON CONFLICT DO NOTHING` (a replay, or soon after a fallback).
    Insert,
}

/// The usage stream's dedup key (see `engine::stream::scoped_key`).
pub fn dedup_key(tenant_id: &str, event_id: Uuid) -> Uuid {
    crate::engine::stream::scoped_key(
        &crate::engine::stream::key_space::USAGE,
        tenant_id,
        event_id.as_bytes(),
    )
}

fn parse_version(v: Option<String>) -> Option<Uuid> {
    v.and_then(|s| Uuid::parse_str(&s).ok())
}

impl Ledger {
    pub fn partition_key(&self, partition: i32) -> PartitionKey {
        PartitionKey {
            group: self.group.clone(),
            topic: self.topic.clone(),
            partition,
        }
    }

    pub async fn partition_state(&self, partition: i32) -> Result<PartitionState, StageError> {
        let row = sqlx::query(
            "SELECT next_offset, dedup_cutoff FROM tally.consumer_offsets \
             WHERE group_id = $1 AND topic = $2 AND partition = $3",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(partition)
        .fetch_optional(&self.pool)
        .await
        .map_err(pg("read offset"))?;
        let (next_offset, dedup_cutoff) = match row {
            Some(r) => (Some(r.get::<i64, _>(0)), r.get(1)),
            None => (None, None),
        };
        let pending = sqlx::query(
            "SELECT batch_id, first_offset, last_offset, owner_epoch, reference_version, clock_at, dedup_cutoff \
             FROM tally.batches WHERE group_id = $1 AND topic = $2 AND partition = $3 AND state = 'pending'",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(partition)
        .fetch_optional(&self.pool)
        .await
        .map_err(pg("read pending batch"))?
        .map(|r| PendingBatch {
            batch_id: r.get(0),
            first: r.get(1),
            last: r.get(2),
            owner_epoch: r.get(3),
            reference_version: parse_version(r.get(4)),
            clock_at: r.get(5),
            dedup_cutoff: r.get(6),
        });
        Ok(PartitionState {
            next_offset,
            pending,
            dedup_cutoff,
        })
    }

    /// Records the batch as pending (or re-opens the pending one being
    /// replayed, counting the attempt) and claims its dedup keys.
    pub async fn claim(&self, c: &ClaimInput<'_>) -> Result<Claimed, StageError> {
        let mut tx = self.pool.begin().await.map_err(pg("claim begin"))?;
        check_epoch_in(&mut tx, &self.partition_key(c.partition), c.epoch).await?;
        let batch = match c.replay_of {
            Some(id) => {
                let row = sqlx::query(
                    "UPDATE tally.batches SET attempts = attempts + 1, owner_epoch = $2 \
                     WHERE batch_id = $1 AND state = 'pending' \
                     RETURNING first_offset, last_offset, reference_version, clock_at, dedup_cutoff",
                )
                .bind(id)
                .bind(c.epoch)
                .fetch_optional(&mut *tx)
                .await
                .map_err(pg("claim replay"))?
                .ok_or_else(|| {
                    StageError::LostOwnership(format!("batch {id} is no longer pending"))
                })?;
                PendingBatch {
                    batch_id: id,
                    first: row.get(0),
                    last: row.get(1),
                    owner_epoch: Some(c.epoch),
                    reference_version: parse_version(row.get(2)),
                    clock_at: row.get(3),
                    dedup_cutoff: row.get(4),
                }
            }
            None => self.open_batch(&mut tx, c).await?,
        };
        // Sorted by key: the primary key's B-tree is then filled page by page.
        let mut sorted: Vec<KeyClaim> = c.keys.to_vec();
        sorted.sort_unstable_by_key(|k| k.key);
        let keys: Vec<Uuid> = sorted.iter().map(|k| k.key).collect();
        let fast = c.replay_of.is_none() && self.claims.try_fast();
        let (mut owned, path): (Set<Uuid>, ClaimPath) =
            if fast && copy_claims(&mut tx, batch.batch_id, &sorted).await? {
                (keys.iter().copied().collect(), ClaimPath::Copy)
            } else {
                let path = if fast {
                    self.claims.fell_back();
                    ClaimPath::CopyThenInsert
                } else {
                    ClaimPath::Insert
                };
                (insert_claims(&mut tx, batch.batch_id, &sorted).await?, path)
            };
        let mut conflicts = Map::default();
        if owned.len() < keys.len() {
            let others: Vec<Uuid> = keys
                .iter()
                .filter(|k| !owned.contains(k))
                .copied()
                .collect();
            let mine: Map<Uuid, i64> = sorted.iter().map(|k| (k.key, k.fingerprint)).collect();
            let rows = sqlx::query(
                "SELECT event_id, batch_id, fingerprint FROM tally.seen_events WHERE event_id = ANY($1)",
            )
            .bind(&others)
            .fetch_all(&mut *tx)
            .await
            .map_err(pg("claim read claimed ids"))?;
            for r in rows {
                let (key, by, print): (Uuid, i64, Option<i64>) = (r.get(0), r.get(1), r.get(2));
                if by == batch.batch_id {
                    owned.insert(key); // this very batch claimed it before a crash
                } else if let Some(p) = print.filter(|p| Some(p) != mine.get(&key)) {
                    conflicts.insert(key, p);
                }
            }
        }
        tx.commit().await.map_err(pg("claim commit"))?;
        Ok(Claimed {
            batch,
            owned,
            conflicts,
            path,
        })
    }

    async fn open_batch(
        &self,
        tx: &mut sqlx::PgConnection,
        c: &ClaimInput<'_>,
    ) -> Result<PendingBatch, StageError> {
        sqlx::query(
            "INSERT INTO tally.consumer_offsets (group_id, topic, partition, next_offset) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(c.partition)
        .bind(c.first)
        .execute(&mut *tx)
        .await
        .map_err(pg("claim offset row"))?;
        let current: i64 = sqlx::query_scalar(
            "SELECT next_offset FROM tally.consumer_offsets \
             WHERE group_id = $1 AND topic = $2 AND partition = $3 FOR UPDATE",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(c.partition)
        .fetch_one(&mut *tx)
        .await
        .map_err(pg("claim offset"))?;
        let fits = match c.expected_next {
            Some(n) => current == n && c.first >= n,
            None => current == c.first,
        };
        if !fits {
            return Err(StageError::LostOwnership(format!(
                "partition {}: offset of record is {current}, batch starts at {}",
                c.partition, c.first
            )));
        }
        let inserted = sqlx::query_scalar::<_, i64>(
            "INSERT INTO tally.batches (group_id, topic, partition, first_offset, last_offset, state, \
             owner_epoch, reference_version, clock_at, dedup_cutoff) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9) RETURNING batch_id",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .bind(c.partition)
        .bind(c.first)
        .bind(c.last)
        .bind(c.epoch)
        .bind(c.reference_version)
        .bind(c.clock_at)
        .bind(c.dedup_cutoff)
        .fetch_one(&mut *tx)
        .await;
        let batch_id = match inserted {
            Ok(id) => id,
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
                return Err(StageError::LostOwnership(format!(
                    "partition {} already has a pending batch",
                    c.partition
                )))
            }
            Err(e) => return Err(classify_pg("claim insert batch", e)),
        };
        Ok(PendingBatch {
            batch_id,
            first: c.first,
            last: c.last,
            owner_epoch: Some(c.epoch),
            reference_version: Uuid::parse_str(c.reference_version).ok(),
            clock_at: Some(c.clock_at),
            dedup_cutoff: Some(c.dedup_cutoff),
        })
    }

    /// Deletes this stream's claimed keys older than every one of its
    /// partitions' applied dedup cutoffs (nothing while any partition has not
    /// applied one yet). Events older than a partition's cutoff are
    /// dead-lettered, never checked against `seen_events`, so what is deleted
    /// is never needed again. Keys of other streams (their own cutoffs) stay.
    pub async fn prune_seen(&self) -> Result<u64, StageError> {
        let r = sqlx::query(
            "DELETE FROM tally.seen_events s USING tally.batches b \
             WHERE s.batch_id = b.batch_id AND b.group_id = $1 AND b.topic = $2 AND s.occurred_at < \
             (SELECT min(dedup_cutoff) FROM tally.consumer_offsets WHERE group_id = $1 AND topic = $2 \
              HAVING bool_and(dedup_cutoff IS NOT NULL))",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .execute(&self.pool)
        .await
        .map_err(pg("prune seen events"))?;
        Ok(r.rows_affected())
    }
}

/// Claims every key with one binary COPY, under a savepoint: the common case,
/// in which no key was claimed before, at about a third of the server CPU of
/// `INSERT ... ON CONFLICT`. Returns false (nothing written, the transaction
/// usable) when a key is already claimed; the caller then claims key by key.
async fn copy_claims(
    tx: &mut sqlx::PgConnection,
    batch_id: i64,
    keys: &[KeyClaim],
) -> Result<bool, StageError> {
    if keys.is_empty() {
        return Ok(true);
    }
    sqlx::query("SAVEPOINT claim_copy")
        .execute(&mut *tx)
        .await
        .map_err(pg("claim savepoint"))?;
    let mut copy = tx
        .copy_in_raw(
            "COPY tally.seen_events (event_id, occurred_at, batch_id, fingerprint) \
             FROM STDIN (FORMAT binary)",
        )
        .await
        .map_err(pg("claim copy"))?;
    copy.send(copy_rows(batch_id, keys))
        .await
        .map_err(pg("claim copy send"))?;
    match copy.finish().await {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => {
            sqlx::query("ROLLBACK TO SAVEPOINT claim_copy")
                .execute(&mut *tx)
                .await
                .map_err(pg("claim rollback to savepoint"))?;
            Ok(false)
        }
        Err(e) => Err(crate::errors::classify_pg("claim copy", e)),
    }
}

/// Postgres' binary COPY encoding of claim rows (uuid, timestamptz, bigint, bigint).
pub(crate) fn copy_rows(batch_id: i64, keys: &[KeyClaim]) -> Vec<u8> {
    /// 2000-01-01T00:00:00Z, Postgres' timestamp epoch, in Unix microseconds.
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
    let mut out = Vec::with_capacity(21 + keys.len() * 58);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for k in keys {
        out.extend_from_slice(&4i16.to_be_bytes());
        out.extend_from_slice(&16i32.to_be_bytes());
        out.extend_from_slice(k.key.as_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&(k.occurred_at.timestamp_micros() - PG_EPOCH_MICROS).to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&batch_id.to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&k.fingerprint.to_be_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// Claims the keys not claimed yet; returns the ones this statement claimed.
async fn insert_claims(
    tx: &mut sqlx::PgConnection,
    batch_id: i64,
    keys: &[KeyClaim],
) -> Result<Set<Uuid>, StageError> {
    let ids: Vec<Uuid> = keys.iter().map(|k| k.key).collect();
    let times: Vec<DateTime<Utc>> = keys.iter().map(|k| k.occurred_at).collect();
    let prints: Vec<i64> = keys.iter().map(|k| k.fingerprint).collect();
    Ok(sqlx::query_scalar::<_, Uuid>(
        "INSERT INTO tally.seen_events (event_id, occurred_at, batch_id, fingerprint) \
         SELECT u.id, u.ts, $3, u.fp FROM UNNEST($1::uuid[], $2::timestamptz[], $4::bigint[]) AS u(id, ts, fp) \
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
    )
    .bind(&ids)
    .bind(&times)
    .bind(batch_id)
    .bind(&prints)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("claim event ids"))?
    .into_iter()
    .collect())
}

/// When a claim tries the COPY first: always, except for a few claims after
/// one that met an earlier claim (re-sends come in runs; a failed COPY is
/// wasted work).
#[derive(Debug, Default)]
pub struct ClaimMode {
    skip_copy: std::sync::atomic::AtomicU32,
}

impl ClaimMode {
    const SKIP_AFTER_FALLBACK: u32 = 8;

    fn try_fast(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.skip_copy
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    fn fell_back(&self) {
        self.skip_copy.store(
            Self::SKIP_AFTER_FALLBACK,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keys_are_per_tenant() {
        let id = Uuid::new_v4();
        assert_ne!(dedup_key("a", id), dedup_key("b", id));
        assert_eq!(dedup_key("a", id), dedup_key("a", id));
        // Length-prefixed: ("ab", id) and ("a", "b"...) cannot collide by concatenation.
        assert_ne!(dedup_key("ab", id), dedup_key("a", id));
    }

    #[test]
    fn fingerprint_sees_every_field() {
        let e = tally_schemas::sample_usage();
        let mut f = e.clone();
        assert_eq!(
            crate::engine::stream::fingerprint(&e),
            crate::engine::stream::fingerprint(&f)
        );
        f.output_tokens += 1;
        assert_ne!(
            crate::engine::stream::fingerprint(&e),
            crate::engine::stream::fingerprint(&f)
        );
        let mut g = e.clone();
        g.tags.insert("k".into(), "v".into());
        assert_ne!(
            crate::engine::stream::fingerprint(&e),
            crate::engine::stream::fingerprint(&g)
        );
    }
}
