//! Partition ownership epochs and the fence every write checks.
//!
//! Guarantee: a stale owner cannot write. Taking a partition (after its
//! advisory lock) bumps the partition's epoch in `tally.partition_owners`. The
//! claim and the final commit check the epoch inside their transactions
//! (`FOR SHARE`, so a takeover waits for a running commit and then sees it).
//! ClickHouse has no transactions, so every ClickHouse insert is preceded by a
//! fence check no older than half the takeover grace, and a new owner that
//! replays another epoch's batch waits the whole grace before it looks for the
//! earlier attempt's rows. Assumption (documented): an insert request reaches
//! ClickHouse within half the grace of being sent.

use crate::errors::{pg, StageError};
use sqlx::postgres::PgPool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where a partition's ownership is recorded.
#[derive(Debug, Clone)]
pub struct PartitionKey {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

/// Bumps the epoch of a partition just locked by `owner`; returns the new epoch.
pub async fn take_epoch(pool: &PgPool, key: &PartitionKey, owner: &str) -> Result<i64, StageError> {
    sqlx::query_scalar(
        "INSERT INTO tally.partition_owners (group_id, topic, partition, epoch, owner) \
         VALUES ($1, $2, $3, 1, $4) \
         ON CONFLICT (group_id, topic, partition) DO UPDATE \
         SET epoch = partition_owners.epoch + 1, owner = EXCLUDED.owner, taken_at = now() \
         RETURNING epoch",
    )
    .bind(&key.group)
    .bind(&key.topic)
    .bind(key.partition)
    .bind(owner)
    .fetch_one(pool)
    .await
    .map_err(pg("take partition epoch"))
}

/// Inside a claim or commit transaction: the partition's epoch must still be
/// `epoch` (held with FOR SHARE until the transaction ends).
pub async fn check_epoch_in(
    tx: &mut sqlx::PgConnection,
    key: &PartitionKey,
    epoch: i64,
) -> Result<(), StageError> {
    let current: Option<i64> = sqlx::query_scalar(
        "SELECT epoch FROM tally.partition_owners WHERE group_id = $1 AND topic = $2 AND partition = $3 FOR SHARE",
    )
    .bind(&key.group)
    .bind(&key.topic)
    .bind(key.partition)
    .fetch_optional(&mut *tx)
    .await
    .map_err(pg("check partition epoch"))?;
    if current != Some(epoch) {
        return Err(StageError::LostOwnership(format!(
            "partition {}: epoch is {current:?}, this batch runs under {epoch}",
            key.partition
        )));
    }
    Ok(())
}

/// The ClickHouse-side fence of one batch: `check` before every insert.
pub struct Fence {
    pool: PgPool,
    key: PartitionKey,
    epoch: i64,
    max_age: Duration,
    verified_at: Mutex<Option<Instant>>,
}

impl Fence {
    /// `grace`: the takeover grace; a verification is reused for half of it.
    pub fn new(pool: PgPool, key: PartitionKey, epoch: i64, grace: Duration) -> Self {
        Self {
            pool,
            key,
            epoch,
            max_age: grace / 2,
            verified_at: Mutex::new(None),
        }
    }

    /// The epoch this batch runs under.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Ok if this batch's epoch was confirmed within half the grace; otherwise
    /// confirms it again. LostOwnership once another owner took the partition.
    pub async fn check(&self) -> Result<(), StageError> {
        let fresh = self
            .verified_at
            .lock()
            .map(|g| g.is_some_and(|t| t.elapsed() < self.max_age))
            .unwrap_or(false);
        if fresh {
            return Ok(());
        }
        let asked = Instant::now();
        let mut conn = self.pool.acquire().await.map_err(pg("fence acquire"))?;
        check_epoch_in(&mut conn, &self.key, self.epoch).await?;
        if let Ok(mut g) = self.verified_at.lock() {
            *g = Some(asked);
        }
        Ok(())
    }
}
