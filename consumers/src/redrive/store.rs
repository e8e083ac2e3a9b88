//! What `tally dlq redrive` records in Postgres (`dlq_redrive_runs`, `dlq_redrives`).
//!
//! Guarantee: a letter is recorded `sending` in one transaction before it is
//! produced and `sent` (with where it landed) in one transaction after the
//! broker acknowledged it; one run at a time per dead-letter topic (an advisory
//! lock held for the whole run), so a `sending` row seen by a run under the lock
//! belongs to a run that is gone and is reconciled from the topic.

use super::{Recorded, Source};
use crate::errors::{pg, StageError};
use sqlx::{PgConnection, PgPool};
use std::collections::BTreeMap;

/// Takes the redrive lock of `dlq_topic` on `conn` (a connection of its own, kept
/// for the run); Fatal if another run holds it.
pub async fn lock(conn: &mut PgConnection, dlq_topic: &str) -> Result<(), StageError> {
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(format!("tally.dlq_redrive:{dlq_topic}"))
        .fetch_one(conn)
        .await
        .map_err(pg("redrive lock"))?;
    if !got {
        return Err(StageError::Fatal(format!(
            "another `tally dlq redrive` of {dlq_topic} is running; wait for it to finish"
        )));
    }
    Ok(())
}

/// A letter recorded `sending` by a run that did not finish.
#[derive(Debug, Clone)]
pub struct Unsettled {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub target_topic: String,
    pub redrives: i32,
    /// Seconds until its run's sends can no longer land.
    pub settles_in: f64,
    /// Its run's target-topic end offsets before it produced (index = partition).
    pub target_start: Vec<i64>,
}

pub async fn unsettled(pool: &PgPool, dlq_topic: &str) -> Result<Vec<Unsettled>, StageError> {
    let rows: Vec<(i32, i64, String, i32, f64, Vec<i64>)> = sqlx::query_as(
        "SELECT r.dlq_partition, r.dlq_offset, r.target_topic, r.redrives, \
         greatest(0, extract(epoch FROM r.settle_after - now()))::float8, u.target_start \
         FROM tally.dlq_redrives r JOIN tally.dlq_redrive_runs u USING (run_id) \
         WHERE r.dlq_topic = $1 AND r.state = 'sending' ORDER BY 1, 2",
    )
    .bind(dlq_topic)
    .fetch_all(pool)
    .await
    .map_err(pg("read unsettled redrives"))?;
    Ok(rows
        .into_iter()
        .map(|(p, o, t, n, s, start)| Unsettled {
            dlq_partition: p,
            dlq_offset: o,
            target_topic: t,
            redrives: n,
            settles_in: s,
            target_start: start,
        })
        .collect())
}

/// Settles an unfinished letter: found at `target` on the topic, or never sent
/// (then it is as if that redrive never happened).
pub async fn settle(
    pool: &PgPool,
    dlq_topic: &str,
    u: &Unsettled,
    target: Option<(i32, i64)>,
) -> Result<(), StageError> {
    let key = |q: sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>| {
        q.bind(dlq_topic.to_string())
            .bind(u.dlq_partition)
            .bind(u.dlq_offset)
    };
    let q = match target {
        Some((p, o)) => key(sqlx::query(
            "UPDATE tally.dlq_redrives SET state = 'sent', target_partition = $4, target_offset = $5, \
             updated_at = now() WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3",
        ))
        .bind(p)
        .bind(o),
        None if u.redrives > 1 => key(sqlx::query(
            "UPDATE tally.dlq_redrives SET state = 'sent', redrives = redrives - 1, updated_at = now() \
             WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3",
        )),
        None => key(sqlx::query(
            "DELETE FROM tally.dlq_redrives WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3",
        )),
    };
    q.execute(pool).await.map_err(pg("settle redrive"))?;
    Ok(())
}

/// What earlier runs recorded about these letters (DLQ coordinates and sources).
pub async fn recorded(
    pool: &PgPool,
    dlq_topic: &str,
    target_topic: &str,
    letters: &[(i32, i64)],
    sources: &[Source],
) -> Result<Recorded, StageError> {
    let mut out = Recorded::default();
    let (ps, os): (Vec<i32>, Vec<i64>) = letters.iter().copied().unzip();
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT dlq_partition, dlq_offset FROM tally.dlq_redrives r \
         JOIN unnest($2::int[], $3::bigint[]) AS l(p, o) ON r.dlq_partition = l.p AND r.dlq_offset = l.o \
         WHERE r.dlq_topic = $1",
    )
    .bind(dlq_topic)
    .bind(&ps)
    .bind(&os)
    .fetch_all(pool)
    .await
    .map_err(pg("read recorded letters"))?;
    out.letters.extend(rows);
    let ts: Vec<&str> = sources.iter().map(|s| s.topic.as_str()).collect();
    let sp: Vec<i32> = sources.iter().map(|s| s.partition).collect();
    let so: Vec<i64> = sources.iter().map(|s| s.offset).collect();
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT source_topic, source_partition, source_offset FROM tally.dlq_redrives r \
         JOIN unnest($1::text[], $2::int[], $3::bigint[]) AS s(t, p, o) \
         ON r.source_topic = s.t AND r.source_partition = s.p AND r.source_offset = s.o",
    )
    .bind(&ts)
    .bind(&sp)
    .bind(&so)
    .fetch_all(pool)
    .await
    .map_err(pg("read recorded sources"))?;
    out.sources
        .extend(rows.into_iter().map(|(topic, partition, offset)| Source {
            topic,
            partition,
            offset,
        }));
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT target_partition, target_offset FROM tally.dlq_redrives r \
         JOIN unnest($2::int[], $3::bigint[]) AS s(p, o) ON r.target_partition = s.p AND r.target_offset = s.o \
         WHERE r.target_topic = $1",
    )
    .bind(target_topic)
    .bind(&sp)
    .bind(&so)
    .fetch_all(pool)
    .await
    .map_err(pg("read redriven targets"))?;
    out.targets.extend(rows);
    Ok(out)
}

/// Starts a run: its id. `target_start`: the input topic's end offsets now.
pub async fn start_run(
    pool: &PgPool,
    dlq_topic: &str,
    target_topic: &str,
    classes: &[String],
    again: bool,
    target_start: &BTreeMap<i32, i64>,
) -> Result<i64, StageError> {
    let size = target_start.keys().max().map_or(0, |p| *p as usize + 1);
    let mut start = vec![0i64; size];
    for (p, o) in target_start {
        start[*p as usize] = *o;
    }
    sqlx::query_scalar(
        "INSERT INTO tally.dlq_redrive_runs (dlq_topic, target_topic, classes, again, target_start) \
         VALUES ($1, $2, $3, $4, $5) RETURNING run_id",
    )
    .bind(dlq_topic)
    .bind(target_topic)
    .bind(classes)
    .bind(again)
    .bind(&start)
    .fetch_one(pool)
    .await
    .map_err(pg("start redrive run"))
}

pub async fn finish_run(pool: &PgPool, run_id: i64, produced: u64) -> Result<(), StageError> {
    sqlx::query(
        "UPDATE tally.dlq_redrive_runs SET finished_at = now(), produced = $2 WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(produced as i64)
    .execute(pool)
    .await
    .map_err(pg("finish redrive run"))?;
    Ok(())
}

/// One letter of a round, as recorded.
pub struct Row<'a> {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub class: &'a str,
    pub source: &'a Source,
}

/// Records a round's letters `sending` (one transaction), settling within
/// `settle_secs`. A letter redriven before (`--again`) keeps its earlier target
/// until the new one is known.
pub async fn record_sending(
    pool: &PgPool,
    dlq_topic: &str,
    target_topic: &str,
    run_id: i64,
    settle_secs: f64,
    rows: &[Row<'_>],
) -> Result<(), StageError> {
    let mut tx = pool.begin().await.map_err(pg("begin record sending"))?;
    for r in rows {
        sqlx::query(
            "INSERT INTO tally.dlq_redrives (dlq_topic, dlq_partition, dlq_offset, error_class, source_topic, \
             source_partition, source_offset, target_topic, run_id, state, settle_after) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'sending', now() + make_interval(secs => $10)) \
             ON CONFLICT (dlq_topic, dlq_partition, dlq_offset) DO UPDATE SET state = 'sending', \
             run_id = EXCLUDED.run_id, settle_after = EXCLUDED.settle_after, target_topic = EXCLUDED.target_topic, \
             redrives = tally.dlq_redrives.redrives + 1, \
             updated_at = now()",
        )
        .bind(dlq_topic)
        .bind(r.dlq_partition)
        .bind(r.dlq_offset)
        .bind(r.class)
        .bind(&r.source.topic)
        .bind(r.source.partition)
        .bind(r.source.offset)
        .bind(target_topic)
        .bind(run_id)
        .bind(settle_secs)
        .execute(&mut *tx)
        .await
        .map_err(pg("record sending"))?;
    }
    tx.commit().await.map_err(pg("commit record sending"))
}

/// A (partition, offset).
pub type At = (i32, i64);

/// Records where a round's acknowledged letters landed (one transaction):
/// (DLQ letter, input-topic message) pairs.
pub async fn record_sent(
    pool: &PgPool,
    dlq_topic: &str,
    sent: &[(At, At)],
) -> Result<(), StageError> {
    let mut tx = pool.begin().await.map_err(pg("begin record sent"))?;
    for ((dp, d_o), (tp, to)) in sent {
        sqlx::query(
            "UPDATE tally.dlq_redrives SET state = 'sent', target_partition = $4, target_offset = $5, \
             updated_at = now() WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3",
        )
        .bind(dlq_topic)
        .bind(dp)
        .bind(d_o)
        .bind(tp)
        .bind(to)
        .execute(&mut *tx)
        .await
        .map_err(pg("record sent"))?;
    }
    tx.commit().await.map_err(pg("commit record sent"))
}
