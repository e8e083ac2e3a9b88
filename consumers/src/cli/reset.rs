//! `tally reset-offsets`: the explicit, logged way to move offsets of record,
//! e.g. after a topic was deleted and created again (tally refuses to consume a
//! partition whose offset of record is past its end).
//!
//! Guarantee: it only acts on partitions whose advisory locks it holds (no tally
//! instance works on them meanwhile), changes nothing without `--yes` (it
//! prints the plan), and abandons the partitions' pending batches completely
//! (ClickHouse rows, claimed ids, the batch; see `offsets_reset`).

use crate::config::Config;
use crate::engine::offsets_reset::{self, partition_lock_key, PendingRow};
use crate::errors::{pg, StageError};
use crate::sinks::clickhouse::ClickHouseSink;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::Connection;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

/// Where `--to` puts the offsets of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The partition's first available offset (low watermark).
    Earliest,
    /// The partition's end (high watermark): skips everything already there.
    Latest,
    Offset(i64),
}

impl FromStr for ResetTo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "earliest" => Ok(ResetTo::Earliest),
            "latest" => Ok(ResetTo::Latest),
            n => match n.parse::<i64>() {
                Ok(o) if o >= 0 => Ok(ResetTo::Offset(o)),
                _ => Err(format!(
                    "`{s}`: expected earliest, latest or an offset >= 0"
                )),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct ResetArgs {
    pub topic: String,
    pub partition: Option<i32>,
    pub to: ResetTo,
    pub yes: bool,
}

/// One partition's planned change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedReset {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
    pub current: Option<i64>,
    pub target: i64,
}

/// The new offset of record of one partition with watermarks `low`..`high`.
pub fn target_offset(to: ResetTo, low: i64, high: i64) -> Result<i64, String> {
    match to {
        ResetTo::Earliest => Ok(low),
        ResetTo::Latest => Ok(high),
        ResetTo::Offset(o) if o > high => Err(format!(
            "offset {o} is past the partition's end ({high}): tally would refuse it again"
        )),
        ResetTo::Offset(o) => Ok(o),
    }
}

/// Runs the command; returns what it printed (the plan, and what was done).
pub async fn run(cfg: &Config, args: &ResetArgs) -> Result<String, StageError> {
    let group = cfg.group_for(cfg.stream_of_topic(&args.topic).unwrap_or("usage"));
    let consumer: BaseConsumer = crate::sinks::kafka_client::KafkaClient::new(&cfg.kafka)
        .config()
        .set("group.id", format!("{group}-reset-offsets"))
        .create()
        .map_err(|e| StageError::Fatal(format!("kafka client: {e}")))?;
    let (topic, partitions) = (args.topic.clone(), args.partition);
    let watermarks = tokio::task::spawn_blocking(move || watermarks(&consumer, &topic, partitions))
        .await
        .map_err(|e| StageError::Fatal(format!("reading watermarks: {e}")))??;

    let pool = crate::sinks::postgres::connect_pg(cfg).await?;
    // Hold every partition's lock for the whole reset: no instance consumes them.
    let mut locks = sqlx::PgConnection::connect_with(&crate::sinks::postgres::pg_options(cfg)?)
        .await
        .map_err(pg("advisory lock connection"))?;
    for p in watermarks.keys() {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(partition_lock_key(&group, &args.topic, *p))
            .fetch_one(&mut locks)
            .await
            .map_err(pg("advisory lock"))?;
        if !got {
            return Err(StageError::Fatal(format!(
                "topic {} partition {p} is owned by a running tally instance of group {group}: stop every \
                 instance of the group first",
                args.topic
            )));
        }
    }
    let current: BTreeMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
        "SELECT partition, next_offset FROM tally.consumer_offsets WHERE group_id = $1 AND topic = $2",
    )
    .bind(&group)
    .bind(&args.topic)
    .fetch_all(&pool)
    .await
    .map_err(pg("read offsets of record"))?
    .into_iter()
    .collect();
    let mut plan = Vec::new();
    for (p, (low, high)) in &watermarks {
        let target = target_offset(args.to, *low, *high)
            .map_err(|e| StageError::Fatal(format!("partition {p}: {e}")))?;
        plan.push(PlannedReset {
            partition: *p,
            low: *low,
            high: *high,
            current: current.get(p).copied(),
            target,
        });
    }
    let partitions: Vec<i32> = plan.iter().map(|r| r.partition).collect();
    let pending = offsets_reset::pending_batches(
        &pool,
        Some(&group),
        std::slice::from_ref(&args.topic),
        Some(&partitions),
    )
    .await?;

    let mut out = describe_plan(&group, &args.topic, &plan, &pending);
    for p in current.keys().filter(|p| !watermarks.contains_key(p)) {
        if args.partition.is_none() {
            let _ = writeln!(
                out,
                "  partition {p}: has an offset of record but the topic has no such partition now; left as is"
            );
        }
    }
    if !args.yes {
        out.push_str("dry run: nothing changed; run again with --yes to apply\n");
        return Ok(out);
    }
    let targets: Vec<(i32, i64)> = plan.iter().map(|r| (r.partition, r.target)).collect();
    let reason = format!("tally reset-offsets --to {:?}", args.to);
    let done = offsets_reset::reset_offsets(
        &pool,
        &ClickHouseSink::new(&cfg.clickhouse),
        &group,
        &args.topic,
        &targets,
        &reason,
        std::time::Duration::from_millis(cfg.pipeline.takeover_grace_ms),
    )
    .await?;
    for r in &plan {
        tracing::info!(
            group = %group,
            topic = %args.topic,
            partition = r.partition,
            from = ?r.current,
            to = r.target,
            "offset of record reset"
        );
    }
    for b in &done.abandoned {
        tracing::info!(
            batch_id = b.batch_id,
            partition = b.partition,
            first = b.first,
            last = b.last,
            "pending batch abandoned"
        );
    }
    tracing::info!(clickhouse_rows = ?done.clickhouse_rows, claimed_ids = done.claimed_ids, epoch = done.epoch, "reset done");
    let ch_rows: u64 = done.clickhouse_rows.iter().map(|(_, n)| n).sum();
    let _ = writeln!(
        out,
        "done: {} offsets of record set, {} pending batches abandoned ({ch_rows} ClickHouse rows deleted, {} claimed event ids released), topic {} is now epoch {}",
        plan.len(),
        done.abandoned.len(),
        done.claimed_ids,
        args.topic,
        done.epoch
    );
    locks.close().await.ok();
    Ok(out)
}

/// (low, high) per partition of `topic` (only `only`, if given). The high
/// watermark is the highest of a few reads (Tansu can report it too low).
fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    only: Option<i32>,
) -> Result<BTreeMap<i32, (i64, i64)>, StageError> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| StageError::Fatal(format!("kafka metadata of {topic}: {e}")))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| {
            StageError::Fatal(format!(
                "topic {topic} does not exist on the broker: create it first (`tally migrate`)"
            ))
        })?;
    let mut out = BTreeMap::new();
    for p in t.partitions().iter().map(|p| p.id()) {
        if only.is_some_and(|o| o != p) {
            continue;
        }
        let mut best: Option<(i64, i64)> = None;
        for _ in 0..offsets_reset::END_READS {
            if let Ok((low, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                best = Some(best.map_or((low, high), |(l, h)| (l.min(low), h.max(high))));
            }
        }
        let w = best.ok_or_else(|| {
            StageError::Fatal(format!("could not read the watermarks of {topic}/{p}"))
        })?;
        out.insert(p, w);
    }
    if let Some(p) = only.filter(|p| !out.contains_key(p)) {
        return Err(StageError::Fatal(format!(
            "topic {topic} has no partition {p}"
        )));
    }
    Ok(out)
}

fn describe_plan(
    group: &str,
    topic: &str,
    plan: &[PlannedReset],
    pending: &[PendingRow],
) -> String {
    let mut out = format!("reset offsets of record of group {group}, topic {topic}:\n");
    for r in plan {
        let _ = writeln!(
            out,
            "  partition {}: {} -> {} (partition holds offsets {}..{})",
            r.partition,
            r.current
                .map_or_else(|| "none".to_string(), |c| c.to_string()),
            r.target,
            r.low,
            r.high
        );
    }
    for b in pending {
        let _ = writeln!(
            out,
            "  partition {}: pending batch {} (offsets {}..={}) is abandoned: its ClickHouse rows are deleted and its claimed event ids released",
            b.partition, b.batch_id, b.first, b.last
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets_and_refuses_past_the_end() {
        assert_eq!("earliest".parse::<ResetTo>(), Ok(ResetTo::Earliest));
        assert_eq!("latest".parse::<ResetTo>(), Ok(ResetTo::Latest));
        assert_eq!("120".parse::<ResetTo>(), Ok(ResetTo::Offset(120)));
        assert!("-1".parse::<ResetTo>().is_err());
        assert!("first".parse::<ResetTo>().is_err());
        assert_eq!(target_offset(ResetTo::Earliest, 5, 90), Ok(5));
        assert_eq!(target_offset(ResetTo::Latest, 5, 90), Ok(90));
        assert_eq!(target_offset(ResetTo::Offset(90), 5, 90), Ok(90));
        assert!(target_offset(ResetTo::Offset(91), 5, 90).is_err());
    }
}
