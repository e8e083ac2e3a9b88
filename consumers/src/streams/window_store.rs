//! Event-time window counts of the once-per-window rules, in Postgres
//! (`tally.rule_windows`), read and updated inside a batch's commit.
//!
//! Guarantee: rows are created (sorted, `ON CONFLICT DO NOTHING`) before they are
//! locked in key order, so two batches counting one window serialise and each
//! starts from the count the other left: a crossing is raised exactly once.

use crate::errors::{pg, StageError};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::collections::BTreeMap;

/// One window of one rule: (tenant, subject, window start).
pub type WindowKey = (String, String, DateTime<Utc>);

/// Creates the windows of `keys` if missing, locks them and returns their counts.
pub async fn lock_counts(
    tx: &mut sqlx::PgConnection,
    rule: &str,
    window_secs: i64,
    keys: &[WindowKey],
) -> Result<BTreeMap<WindowKey, i64>, StageError> {
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut sorted: Vec<&WindowKey> = keys.iter().collect();
    sorted.sort();
    sorted.dedup();
    let tenants: Vec<&str> = sorted.iter().map(|k| k.0.as_str()).collect();
    let subjects: Vec<&str> = sorted.iter().map(|k| k.1.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = sorted.iter().map(|k| k.2).collect();
    let secs = i32::try_from(window_secs).unwrap_or(i32::MAX);
    sqlx::query(
        "INSERT INTO tally.rule_windows (rule, tenant_id, subject, window_start, window_secs, events) \
         SELECT $1, u.t, u.s, u.w, $5, 0 FROM UNNEST($2::text[], $3::text[], $4::timestamptz[]) AS u(t, s, w) \
         ORDER BY u.t, u.s, u.w ON CONFLICT DO NOTHING",
    )
    .bind(rule)
    .bind(&tenants)
    .bind(&subjects)
    .bind(&starts)
    .bind(secs)
    .execute(&mut *tx)
    .await
    .map_err(pg("commit create rule windows"))?;
    let rows = sqlx::query(
        "SELECT r.tenant_id, r.subject, r.window_start, r.events FROM tally.rule_windows r \
         JOIN UNNEST($2::text[], $3::text[], $4::timestamptz[]) AS u(t, s, w) \
           ON r.tenant_id = u.t AND r.subject = u.s AND r.window_start = u.w \
         WHERE r.rule = $1 AND r.window_secs = $5 \
         ORDER BY r.tenant_id, r.subject, r.window_start FOR UPDATE OF r",
    )
    .bind(rule)
    .bind(&tenants)
    .bind(&subjects)
    .bind(&starts)
    .bind(secs)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("commit lock rule windows"))?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
        .collect())
}

/// Adds `added` events to each window (locked by `lock_counts` in this transaction).
pub async fn add_counts(
    tx: &mut sqlx::PgConnection,
    rule: &str,
    window_secs: i64,
    added: &[(WindowKey, i64)],
) -> Result<(), StageError> {
    if added.is_empty() {
        return Ok(());
    }
    let tenants: Vec<&str> = added.iter().map(|(k, _)| k.0.as_str()).collect();
    let subjects: Vec<&str> = added.iter().map(|(k, _)| k.1.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = added.iter().map(|(k, _)| k.2).collect();
    let counts: Vec<i64> = added.iter().map(|(_, n)| *n).collect();
    sqlx::query(
        "UPDATE tally.rule_windows r SET events = r.events + u.n \
         FROM UNNEST($2::text[], $3::text[], $4::timestamptz[], $6::bigint[]) AS u(t, s, w, n) \
         WHERE r.rule = $1 AND r.window_secs = $5 AND r.tenant_id = u.t AND r.subject = u.s \
           AND r.window_start = u.w",
    )
    .bind(rule)
    .bind(&tenants)
    .bind(&subjects)
    .bind(&starts)
    .bind(i32::try_from(window_secs).unwrap_or(i32::MAX))
    .bind(&counts)
    .execute(&mut *tx)
    .await
    .map_err(pg("commit rule window counts"))?;
    Ok(())
}
