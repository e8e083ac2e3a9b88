//! Offsets of record that no longer match their topic: detection (the offset
//! of record is past a partition's end: the topic was deleted and created
//! again, or the broker lost its data) and the explicit reset that follows.
//!
//! Guarantee: tally never consumes a partition whose offset of record is past
//! its end (it would skip the new data as already counted); only an explicit
//! reset moves such an offset, and a reset leaves nothing of an abandoned
//! pending batch behind. Its ClickHouse rows are deleted first (a mutation,
//! awaited), then ONE Postgres transaction removes its claimed event ids and
//! the batch, writes the new offsets of record and bumps the topic's epoch (so
//! the dead letters of the new incarnation never collide with the old one's).
//! A crash in between leaves the batch pending and the reset can simply be run
//! again. `tally migrate` uses the same code when it creates a topic that had
//! offsets of record.

use crate::errors::{pg, StageError};
use crate::sinks::clickhouse::ClickHouseSink;
use rdkafka::consumer::{Consumer, ConsumerContext};
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::time::Duration;

/// The advisory lock a partition's owner holds (see `pipeline.rs`).
pub fn partition_lock_key(group: &str, topic: &str, partition: i32) -> String {
    format!("tally:{group}:{topic}:{partition}")
}

/// Reads of the high watermark before an offset is declared past the end:
/// Tansu can report a high watermark that is too low, so the highest of a few
/// reads counts.
pub const END_READS: u32 = 5;

/// The end (high watermark) of `topic`/`partition` if it is below `need` on
/// every one of `END_READS` reads; `None` if any read reaches `need` (or no
/// read succeeded: nothing is known). Blocking: call it from a blocking context.
pub fn confirmed_end_below<C, X>(
    consumer: &C,
    topic: &str,
    partition: i32,
    need: i64,
) -> Option<i64>
where
    C: Consumer<X>,
    X: ConsumerContext,
{
    let mut highest: Option<i64> = None;
    for i in 0..END_READS {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(2)) {
            Ok((_, high)) if high >= need => return None,
            Ok((_, high)) => highest = Some(highest.map_or(high, |h| h.max(high))),
            Err(e) => {
                tracing::warn!(topic, partition, error = %e, "reading the partition's end failed")
            }
        }
    }
    highest
}

/// The Fatal message of a partition whose offset of record is past its end:
/// what was found and the command that resolves it.
pub fn past_end_message(
    group: &str,
    topic: &str,
    partition: i32,
    next_offset: Option<i64>,
    pending: Option<(i64, i64, i64)>,
    end: i64,
) -> String {
    let need = next_offset
        .into_iter()
        .chain(pending.map(|(_, _, last)| last + 1))
        .max()
        .unwrap_or(0);
    let pending = pending.map_or_else(String::new, |(id, first, last)| {
        format!(", pending batch {id} covers offsets {first}..={last}")
    });
    format!(
        "topic {topic} partition {partition}: the offset of record is {}{pending}, but the partition ends at \
         offset {end} (highest of {END_READS} reads): the topic was deleted and created again, or the broker \
         lost its data. tally refuses to consume this partition: it would take the new data below offset {need} \
         for data already counted, and skip it. Stop every tally instance of group {group}, then run \
         `tally reset-offsets --topic {topic} --partition {partition} --to earliest --yes` \
         (docs/architecture.md, \"Operations: topic recreated\") and start tally again",
        next_offset.map_or_else(|| "none".to_string(), |n| n.to_string())
    )
}

/// A pending batch found by [`pending_batches`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    pub batch_id: i64,
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

/// Pending batches of `topics` (of one group, and of some partitions, if given).
pub async fn pending_batches(
    pool: &PgPool,
    group: Option<&str>,
    topics: &[String],
    partitions: Option<&[i32]>,
) -> Result<Vec<PendingRow>, StageError> {
    let rows = sqlx::query(
        "SELECT batch_id, group_id, topic, partition, first_offset, last_offset FROM tally.batches \
         WHERE state = 'pending' AND topic = ANY($1) AND ($2::text IS NULL OR group_id = $2) \
         AND ($3::int[] IS NULL OR partition = ANY($3)) ORDER BY batch_id",
    )
    .bind(topics)
    .bind(group)
    .bind(partitions)
    .fetch_all(pool)
    .await
    .map_err(pg("read pending batches"))?;
    Ok(rows
        .into_iter()
        .map(|r| PendingRow {
            batch_id: r.get(0),
            group: r.get(1),
            topic: r.get(2),
            partition: r.get(3),
            first: r.get(4),
            last: r.get(5),
        })
        .collect())
}

/// Step 0 of abandoning batches: bump the ownership epoch of their partitions
/// (so an owner still running can no longer insert: its fence fails) and wait
/// the takeover grace, so an insert it sent before the bump has landed and is
/// deleted with the rest.
pub async fn fence_out(
    pool: &PgPool,
    batches: &[PendingRow],
    grace: std::time::Duration,
) -> Result<(), StageError> {
    if batches.is_empty() {
        return Ok(());
    }
    for b in batches {
        let key = crate::engine::ownership::PartitionKey {
            group: b.group.clone(),
            topic: b.topic.clone(),
            partition: b.partition,
        };
        crate::engine::ownership::take_epoch(pool, &key, "tally reset-offsets").await?;
    }
    tokio::time::sleep(grace).await;
    Ok(())
}

/// Step 1 of abandoning batches: their rows leave ClickHouse (awaited).
pub async fn delete_clickhouse_rows(
    ch: &ClickHouseSink,
    batches: &[PendingRow],
) -> Result<Vec<(&'static str, u64)>, StageError> {
    let ids: Vec<u64> = batches
        .iter()
        .filter_map(|b| u64::try_from(b.batch_id).ok())
        .collect();
    ch.delete_batches(&ids).await
}

/// Step 2, inside the caller's transaction: the batches' claimed event ids
/// and the batches themselves go. Returns the number of ids removed.
pub async fn forget_batches(
    tx: &mut sqlx::PgConnection,
    batches: &[PendingRow],
) -> Result<u64, StageError> {
    if batches.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = batches.iter().map(|b| b.batch_id).collect();
    // seen_events has no batch_id index (0002): a scan, fine for a rare reset.
    let claimed = sqlx::query("DELETE FROM tally.seen_events WHERE batch_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(pg("forget claimed ids"))?
        .rows_affected();
    release_audit_leaves(tx, &ids).await?;
    sqlx::query("DELETE FROM tally.batches WHERE batch_id = ANY($1) AND state = 'pending'")
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(pg("forget pending batches"))?;
    Ok(claimed)
}

/// The audit leaf indexes the abandoned batches reserved go back to their
/// tenants' logs, which is only possible when they are the logs' tail: a
/// Merkle log cannot have a hole. Otherwise nothing changes and the error says
/// why (the batch can still be replayed instead).
async fn release_audit_leaves(tx: &mut sqlx::PgConnection, ids: &[i64]) -> Result<(), StageError> {
    let gone: Vec<(String, i64, i64)> = sqlx::query_as(
        "WITH gone AS (DELETE FROM tally.audit_leaves WHERE batch_id = ANY($1) RETURNING tenant_id, leaf_index) \
         SELECT tenant_id, min(leaf_index), count(*) FROM gone GROUP BY tenant_id ORDER BY tenant_id",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("release audit leaves"))?;
    for (tenant, first, n) in gone {
        let next: i64 = sqlx::query_scalar(
            "SELECT next_index FROM tally.audit_trees WHERE tenant_id = $1 FOR UPDATE",
        )
        .bind(&tenant)
        .fetch_one(&mut *tx)
        .await
        .map_err(pg("lock audit tree"))?;
        let later: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tally.audit_leaves WHERE tenant_id = $1 AND leaf_index >= $2",
        )
        .bind(&tenant)
        .bind(first)
        .fetch_one(&mut *tx)
        .await
        .map_err(pg("read later audit leaves"))?;
        if next != first + n || later != 0 {
            return Err(StageError::Fatal(format!(
                "tenant {tenant}: abandoning these batches would leave a hole at audit leaf \
                 indexes {first}..{} of its log (leaves up to {next} are reserved after them); \
                 nothing was changed. Let tally replay the pending batches instead of resetting \
                 past them.",
                first + n
            )));
        }
        sqlx::query(
            "UPDATE tally.audit_trees SET next_index = $2, updated_at = now() WHERE tenant_id = $1",
        )
        .bind(&tenant)
        .bind(first)
        .execute(&mut *tx)
        .await
        .map_err(pg("release audit leaf indexes"))?;
    }
    Ok(())
}

/// Bumps `topic`'s epoch (0 for a topic never reset: the first bump gives 1).
pub async fn bump_epoch(
    tx: &mut sqlx::PgConnection,
    topic: &str,
    reason: &str,
) -> Result<i32, StageError> {
    sqlx::query_scalar(
        "INSERT INTO tally.topic_epochs (topic, epoch, reason) VALUES ($1, 1, $2) \
         ON CONFLICT (topic) DO UPDATE SET epoch = topic_epochs.epoch + 1, changed_at = now(), \
         reason = EXCLUDED.reason RETURNING epoch",
    )
    .bind(topic)
    .bind(reason)
    .fetch_one(&mut *tx)
    .await
    .map_err(pg("bump topic epoch"))
}

/// What [`reset_offsets`] did.
#[derive(Debug, Clone, Default)]
pub struct ResetDone {
    pub abandoned: Vec<PendingRow>,
    pub clickhouse_rows: Vec<(&'static str, u64)>,
    pub claimed_ids: u64,
    pub epoch: i32,
}

/// Sets the offsets of record of `group`/`topic` to `targets` (partition,
/// next offset), abandoning the partitions' pending batches. The caller
/// holds the partitions' advisory locks, so no instance works on them.
pub async fn reset_offsets(
    pool: &PgPool,
    ch: &ClickHouseSink,
    group: &str,
    topic: &str,
    targets: &[(i32, i64)],
    reason: &str,
    grace: std::time::Duration,
) -> Result<ResetDone, StageError> {
    let partitions: Vec<i32> = targets.iter().map(|(p, _)| *p).collect();
    let abandoned =
        pending_batches(pool, Some(group), &[topic.to_string()], Some(&partitions)).await?;
    fence_out(pool, &abandoned, grace).await?;
    let clickhouse_rows = delete_clickhouse_rows(ch, &abandoned).await?;
    let mut tx = pool.begin().await.map_err(pg("reset begin"))?;
    let claimed_ids = forget_batches(&mut tx, &abandoned).await?;
    let offsets: Vec<i64> = targets.iter().map(|(_, o)| *o).collect();
    sqlx::query(
        "INSERT INTO tally.consumer_offsets (group_id, topic, partition, next_offset) \
         SELECT $1, $2, u.p, u.o FROM UNNEST($3::int[], $4::bigint[]) AS u(p, o) \
         ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, \
         updated_at = now()",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .execute(&mut *tx)
    .await
    .map_err(pg("reset offsets"))?;
    let epoch = bump_epoch(&mut tx, topic, reason).await?;
    tx.commit().await.map_err(pg("reset commit"))?;
    Ok(ResetDone {
        abandoned,
        clickhouse_rows,
        claimed_ids,
        epoch,
    })
}

/// `tally migrate` created `created` topics: offsets of record and pending
/// batches kept for earlier topics of the same names (any group) point past
/// their end. Forgets them the way a reset does (ClickHouse rows and claimed
/// ids of the pending batches included) and bumps the epoch of each topic
/// that had any. Returns the number of offsets of record forgotten.
pub async fn forget_topics(
    pool: &PgPool,
    ch: &ClickHouseSink,
    created: &[String],
    grace: std::time::Duration,
) -> Result<u64, StageError> {
    if created.is_empty() {
        return Ok(0);
    }
    let abandoned = pending_batches(pool, None, created, None).await?;
    fence_out(pool, &abandoned, grace).await?;
    let deleted = delete_clickhouse_rows(ch, &abandoned).await?;
    let mut tx = pool.begin().await.map_err(pg("forget offsets begin"))?;
    let claimed = forget_batches(&mut tx, &abandoned).await?;
    let forgotten: Vec<String> = sqlx::query_scalar(
        "DELETE FROM tally.consumer_offsets WHERE topic = ANY($1) RETURNING topic",
    )
    .bind(created)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("forget offsets"))?;
    let mut topics: Vec<&str> = forgotten
        .iter()
        .map(String::as_str)
        .chain(abandoned.iter().map(|b| b.topic.as_str()))
        .collect();
    topics.sort_unstable();
    topics.dedup();
    for t in &topics {
        let epoch = bump_epoch(&mut tx, t, "tally migrate created the topic").await?;
        tracing::info!(topic = t, epoch, "topic epoch bumped");
    }
    tx.commit().await.map_err(pg("forget offsets commit"))?;
    for b in &abandoned {
        tracing::info!(
            batch_id = b.batch_id,
            group = %b.group,
            topic = %b.topic,
            partition = b.partition,
            first = b.first,
            last = b.last,
            "abandoned the pending batch of a topic created anew"
        );
    }
    if !abandoned.is_empty() {
        tracing::info!(clickhouse_rows = ?deleted, claimed_ids = claimed, "removed the abandoned batches' rows and claimed ids");
    }
    Ok(forgotten.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_past_end_message_names_partition_offsets_and_command() {
        let m = past_end_message("g", "usage", 3, Some(5000), Some((42, 5000, 5099)), 120);
        for part in [
            "topic usage partition 3",
            "offset of record is 5000",
            "pending batch 42 covers offsets 5000..=5099",
            "ends at offset 120",
            "tally reset-offsets --topic usage --partition 3 --to earliest --yes",
            "group g",
        ] {
            assert!(m.contains(part), "{part} not in {m}");
        }
        assert_eq!(partition_lock_key("g", "t", 2), "tally:g:t:2");
    }
}
