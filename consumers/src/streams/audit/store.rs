//! The audit log's I/O edge (thin): rows of ClickHouse `audit_events` and checkpoints
//! of Postgres `tally.audit_checkpoints` / `tally.audit_trees`.
//!
//! Guarantee: [`AuditRow`] is one `audit_events` row in the DDL's column order
//! (`sql/clickhouse/006_policy_audit.sql`), and `AuditRow::new(leaf, b).to_leaf()`
//! returns `leaf` unchanged, so what is written is exactly what the leaf hashes;
//! [`LeafStream`] yields a tenant's rows in `leaf_index` order (every row in the asked
//! index range, duplicates included) while holding one page cursor, never the log.
//! Nothing here decides whether a log is intact: `audit::verify` does.

use crate::audit::checkpoint::Checkpoint;
use crate::audit::leaf::AuditLeaf;
use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

/// The ClickHouse table of audit events (in the configured database).
pub const AUDIT_EVENTS: &str = "audit_events";

/// Index range read per ClickHouse query by [`LeafStream`] (about 40 MB of rows at
/// 600 bytes each; the rows are streamed, not held).
pub const PAGE_LEAVES: u64 = 65_536;

/// The columns of [`AuditRow`], in order (the DDL's order).
const COLUMNS: &str = "event_id, occurred_at, tenant_id, team_id, project_id, user_id, source, \
     actor_type, actor_id, action, resource_type, resource_id, outcome, ip, user_agent, details, \
     personal_data, leaf_index, occurred_at_us, pseudonym_key_version, batch_id";

/// Why reading or writing the audit log failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("clickhouse: {what}: {source}")]
    ClickHouse {
        what: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("postgres: {what}: {source}")]
    Postgres {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("postgres: {0}")]
    BadValue(String),
}

fn ch(what: &'static str) -> impl FnOnce(clickhouse::error::Error) -> StoreError {
    move |source| StoreError::ClickHouse { what, source }
}

fn pg(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Postgres { what, source }
}

/// Why a stored row is not a valid leaf (the leaf encoding cannot represent it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRow {
    #[error("personal_data is {0}, not 0 or 1")]
    PersonalData(u8),
    #[error("occurred_at ({stored}) is not the second of occurred_at_us ({us})")]
    OccurredAt { stored: u32, us: i64 },
}

/// One `audit_events` row, column for column in the DDL's order.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct AuditRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// `DateTime` (whole seconds): the partition and sort key; not hashed, but
    /// [`AuditRow::to_leaf`] checks it against `occurred_at_us`.
    pub occurred_at: u32,
    pub tenant_id: String,
    pub team_id: String,
    pub project_id: String,
    pub user_id: String,
    pub source: String,
    pub actor_type: String,
    pub actor_id: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub outcome: String,
    pub ip: String,
    pub user_agent: String,
    pub details: String,
    pub personal_data: u8,
    pub leaf_index: u64,
    pub occurred_at_us: i64,
    pub pseudonym_key_version: u32,
    /// The batch that wrote the row (not hashed).
    pub batch_id: u64,
}

/// The `DateTime` second of a microsecond timestamp (0 outside `DateTime`'s range).
fn second_of(us: i64) -> u32 {
    u32::try_from(us.div_euclid(1_000_000)).unwrap_or(0)
}

impl AuditRow {
    /// The row that stores `leaf`, written by batch `batch_id`.
    pub fn new(leaf: &AuditLeaf, batch_id: u64) -> Self {
        Self {
            event_id: leaf.event_id,
            occurred_at: second_of(leaf.occurred_at_us),
            tenant_id: leaf.tenant_id.clone(),
            team_id: leaf.team_id.clone(),
            project_id: leaf.project_id.clone(),
            user_id: leaf.user_id.clone(),
            source: leaf.source.clone(),
            actor_type: leaf.actor_type.clone(),
            actor_id: leaf.actor_id.clone(),
            action: leaf.action.clone(),
            resource_type: leaf.resource_type.clone(),
            resource_id: leaf.resource_id.clone(),
            outcome: leaf.outcome.clone(),
            ip: leaf.ip.clone(),
            user_agent: leaf.user_agent.clone(),
            details: leaf.details.clone(),
            personal_data: u8::from(leaf.personal_data),
            leaf_index: leaf.leaf_index,
            occurred_at_us: leaf.occurred_at_us,
            pseudonym_key_version: leaf.pseudonym_key_version,
            batch_id,
        }
    }

    /// The leaf this row stores; refuses a row the leaf encoding cannot represent
    /// (`personal_data` other than 0/1) or whose `occurred_at` was changed apart from
    /// `occurred_at_us`.
    pub fn to_leaf(&self) -> Result<AuditLeaf, InvalidRow> {
        self.clone().into_leaf()
    }

    /// [`AuditRow::to_leaf`] without copying the strings.
    pub fn into_leaf(self) -> Result<AuditLeaf, InvalidRow> {
        let personal_data = match self.personal_data {
            0 => false,
            1 => true,
            b => return Err(InvalidRow::PersonalData(b)),
        };
        if self.occurred_at != second_of(self.occurred_at_us) {
            return Err(InvalidRow::OccurredAt {
                stored: self.occurred_at,
                us: self.occurred_at_us,
            });
        }
        Ok(AuditLeaf {
            tenant_id: self.tenant_id,
            leaf_index: self.leaf_index,
            event_id: self.event_id,
            occurred_at_us: self.occurred_at_us,
            team_id: self.team_id,
            project_id: self.project_id,
            user_id: self.user_id,
            source: self.source,
            actor_type: self.actor_type,
            actor_id: self.actor_id,
            action: self.action,
            resource_type: self.resource_type,
            resource_id: self.resource_id,
            outcome: self.outcome,
            ip: self.ip,
            user_agent: self.user_agent,
            details: self.details,
            personal_data,
            pseudonym_key_version: self.pseudonym_key_version,
        })
    }
}

/// The rows that store `leaves`, all written by batch `batch_id`.
pub fn rows(leaves: &[AuditLeaf], batch_id: u64) -> Vec<AuditRow> {
    leaves.iter().map(|l| AuditRow::new(l, batch_id)).collect()
}

/// A ClickHouse client for the configured database (18.16: no row validation).
pub fn clickhouse_client(cfg: &crate::config::ClickHouseConfig) -> clickhouse::Client {
    crate::sinks::clickhouse::client(cfg)
}

/// Write `rows` into `audit_events` as one INSERT (plain: the stream engine adds its
/// own fencing and exactly-once checks around it).
pub async fn insert_rows(client: &clickhouse::Client, rows: &[AuditRow]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client
        .insert::<AuditRow>(AUDIT_EVENTS)
        .await
        .map_err(ch("insert audit_events"))?;
    for row in rows {
        insert.write(row).await.map_err(ch("insert audit_events"))?;
    }
    insert.end().await.map_err(ch("insert audit_events"))
}

/// A tenant present in `audit_events`: its row count and largest leaf index.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct TenantRows {
    pub tenant_id: String,
    pub rows: u64,
    pub max_leaf_index: u64,
}

/// Every tenant with rows in `audit_events` (the `DISTINCT tenant_id`, with counts).
pub async fn tenants(client: &clickhouse::Client) -> Result<Vec<TenantRows>, StoreError> {
    client
        .query(&format!(
            "SELECT tenant_id, count() AS rows, max(leaf_index) AS max_leaf_index \
             FROM {AUDIT_EVENTS} GROUP BY tenant_id ORDER BY tenant_id"
        ))
        .fetch_all()
        .await
        .map_err(ch("list tenants"))
}

/// One tenant's counts (`rows` 0 when it has none).
pub async fn tenant_rows(
    client: &clickhouse::Client,
    tenant: &str,
) -> Result<TenantRows, StoreError> {
    #[derive(Row, Deserialize)]
    struct Counts {
        rows: u64,
        max_leaf_index: u64,
    }
    let c: Counts = client
        .query(&format!(
            "SELECT count() AS rows, max(leaf_index) AS max_leaf_index FROM {AUDIT_EVENTS} \
             WHERE tenant_id = ?"
        ))
        .bind(tenant)
        .fetch_one()
        .await
        .map_err(ch("count tenant rows"))?;
    Ok(TenantRows {
        tenant_id: tenant.to_string(),
        rows: c.rows,
        max_leaf_index: c.max_leaf_index,
    })
}

/// A tenant's rows with `leaf_index` in `start..end`, in `leaf_index` order, one
/// page of [`PAGE_LEAVES`] indexes per query. Rows sharing an index are in the same
/// page (so a duplicate is never lost between pages); an empty page skips straight to
/// the next stored index, so a gap costs one query whatever its size.
pub struct LeafStream {
    client: clickhouse::Client,
    tenant: String,
    next_start: u64,
    end: u64,
    page: u64,
    cursor: Option<clickhouse::query::RowCursor<AuditRow>>,
    page_rows: u64,
}

impl LeafStream {
    pub fn new(client: &clickhouse::Client, tenant: &str, start: u64, end: u64) -> Self {
        Self::with_page(client, tenant, start, end, PAGE_LEAVES)
    }

    /// Like [`LeafStream::new`] with another page size (tests use small ones).
    pub fn with_page(
        client: &clickhouse::Client,
        tenant: &str,
        start: u64,
        end: u64,
        page: u64,
    ) -> Self {
        Self {
            client: client.clone(),
            tenant: tenant.to_string(),
            next_start: start,
            end,
            page: page.max(1),
            cursor: None,
            page_rows: 0,
        }
    }

    /// The next row, or `None` after the last one in the range.
    pub async fn next(&mut self) -> Result<Option<AuditRow>, StoreError> {
        loop {
            if let Some(cursor) = &mut self.cursor {
                if let Some(row) = cursor.next().await.map_err(ch("read audit rows"))? {
                    self.page_rows += 1;
                    return Ok(Some(row));
                }
                self.cursor = None;
                if self.page_rows == 0 && !self.skip_gap().await? {
                    return Ok(None);
                }
            }
            if self.next_start >= self.end {
                return Ok(None);
            }
            let (lo, hi) = (
                self.next_start,
                self.next_start.saturating_add(self.page).min(self.end),
            );
            let cursor = self
                .client
                .query(&format!(
                    "SELECT {COLUMNS} FROM {AUDIT_EVENTS} WHERE tenant_id = ? \
                     AND leaf_index >= ? AND leaf_index < ? ORDER BY leaf_index"
                ))
                .bind(&self.tenant)
                .bind(lo)
                .bind(hi)
                .fetch::<AuditRow>()
                .map_err(ch("read audit rows"))?;
            self.cursor = Some(cursor);
            self.page_rows = 0;
            self.next_start = hi;
        }
    }

    /// After an empty page: move to the smallest stored index in the rest of the
    /// range; false when there is none.
    async fn skip_gap(&mut self) -> Result<bool, StoreError> {
        if self.next_start >= self.end {
            return Ok(false);
        }
        #[derive(Row, Deserialize)]
        struct Next {
            n: u64,
            first: u64,
        }
        let next: Next = self
            .client
            .query(&format!(
                "SELECT count() AS n, min(leaf_index) AS first FROM {AUDIT_EVENTS} \
                 WHERE tenant_id = ? AND leaf_index >= ? AND leaf_index < ?"
            ))
            .bind(&self.tenant)
            .bind(self.next_start)
            .bind(self.end)
            .fetch_one()
            .await
            .map_err(ch("find the next audit row"))?;
        if next.n == 0 {
            return Ok(false);
        }
        self.next_start = next.first;
        Ok(true)
    }
}

/// The stored rows of one event (normally one; more means a forged or copied row),
/// optionally within one tenant.
pub async fn find_event(
    client: &clickhouse::Client,
    event_id: Uuid,
    tenant: Option<&str>,
) -> Result<Vec<AuditRow>, StoreError> {
    // A parsed UUID's text is safe to inline.
    let mut sql =
        format!("SELECT {COLUMNS} FROM {AUDIT_EVENTS} WHERE event_id = toUUID('{event_id}')");
    if tenant.is_some() {
        sql.push_str(" AND tenant_id = ?");
    }
    sql.push_str(" ORDER BY tenant_id, leaf_index");
    let mut q = client.query(&sql);
    if let Some(t) = tenant {
        q = q.bind(t);
    }
    q.fetch_all().await.map_err(ch("find event"))
}

/// One row of `tally.audit_checkpoints`: the columns as stored (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub checkpoint_id: i64,
    pub tenant_id: String,
    pub tree_size: i64,
    pub root: Vec<u8>,
    pub signed_note: String,
    pub signed_at: DateTime<Utc>,
}

type CheckpointTuple = (i64, String, i64, Vec<u8>, String, DateTime<Utc>);

fn stored(t: CheckpointTuple) -> StoredCheckpoint {
    StoredCheckpoint {
        checkpoint_id: t.0,
        tenant_id: t.1,
        tree_size: t.2,
        root: t.3,
        signed_note: t.4,
        signed_at: t.5,
    }
}

const CHECKPOINT_COLUMNS: &str =
    "checkpoint_id, tenant_id, tree_size, root, signed_note, signed_at";

/// Every checkpoint of `tenant`, oldest (smallest `checkpoint_id`) first.
pub async fn checkpoints(pool: &PgPool, tenant: &str) -> Result<Vec<StoredCheckpoint>, StoreError> {
    let rows: Vec<CheckpointTuple> = sqlx::query_as(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM tally.audit_checkpoints WHERE tenant_id = $1 \
         ORDER BY checkpoint_id"
    ))
    .bind(tenant)
    .fetch_all(pool)
    .await
    .map_err(pg("read audit_checkpoints"))?;
    Ok(rows.into_iter().map(stored).collect())
}

/// The latest (largest `checkpoint_id`) checkpoint of `tenant`.
pub async fn latest_checkpoint(
    pool: &PgPool,
    tenant: &str,
) -> Result<Option<StoredCheckpoint>, StoreError> {
    let row: Option<CheckpointTuple> = sqlx::query_as(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM tally.audit_checkpoints WHERE tenant_id = $1 \
         ORDER BY checkpoint_id DESC LIMIT 1"
    ))
    .bind(tenant)
    .fetch_optional(pool)
    .await
    .map_err(pg("read the latest audit checkpoint"))?;
    Ok(row.map(stored))
}

/// The latest checkpoint of every tenant that has one, by tenant.
pub async fn latest_checkpoints(pool: &PgPool) -> Result<Vec<StoredCheckpoint>, StoreError> {
    let rows: Vec<CheckpointTuple> = sqlx::query_as(&format!(
        "SELECT DISTINCT ON (tenant_id) {CHECKPOINT_COLUMNS} FROM tally.audit_checkpoints \
         ORDER BY tenant_id, checkpoint_id DESC"
    ))
    .fetch_all(pool)
    .await
    .map_err(pg("read the latest audit checkpoints"))?;
    Ok(rows.into_iter().map(stored).collect())
}

/// Record a signed checkpoint of `tenant` (in the caller's transaction, if any);
/// returns its `checkpoint_id`.
pub async fn insert_checkpoint<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    tenant: &str,
    checkpoint: &Checkpoint,
    signed_note: &str,
) -> Result<i64, StoreError> {
    let size = i64::try_from(checkpoint.size).map_err(|_| {
        StoreError::BadValue(format!("tree size {} exceeds bigint", checkpoint.size))
    })?;
    sqlx::query_scalar(
        "INSERT INTO tally.audit_checkpoints (tenant_id, tree_size, root, signed_note) \
         VALUES ($1, $2, $3, $4) RETURNING checkpoint_id",
    )
    .bind(tenant)
    .bind(size)
    .bind(checkpoint.root.as_slice())
    .bind(signed_note)
    .fetch_one(executor)
    .await
    .map_err(pg("insert audit checkpoint"))
}

/// The committed (merged) tree size of `tenant` in `tally.audit_trees`, if it has a
/// tree there. Rows at or past it may belong to batches still in flight.
pub async fn committed_size(pool: &PgPool, tenant: &str) -> Result<Option<u64>, StoreError> {
    let size: Option<i64> =
        sqlx::query_scalar("SELECT tree_size FROM tally.audit_trees WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_optional(pool)
            .await
            .map_err(pg("read audit_trees"))?;
    size.map(|s| {
        u64::try_from(s).map_err(|_| {
            StoreError::BadValue(format!("audit_trees.tree_size of {tenant:?} is {s}"))
        })
    })
    .transpose()
}

/// Tenants that have checkpoints (a tenant whose rows were all deleted still has them).
pub async fn checkpoint_tenants(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar("SELECT DISTINCT tenant_id FROM tally.audit_checkpoints ORDER BY 1")
        .fetch_all(pool)
        .await
        .map_err(pg("list checkpoint tenants"))
}

/// A row's key within its batch (completing a partly landed part on replay).
impl crate::sinks::clickhouse::PartKey for AuditRow {
    fn part_key(&self) -> String {
        self.event_id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::leaf::tests::{arb_leaf, example};
    use proptest::prelude::*;

    #[test]
    fn columns_are_the_ddl_order() {
        let ddl = include_str!("../../../../sql/clickhouse/006_policy_audit.sql");
        let table = ddl
            .split("CREATE TABLE IF NOT EXISTS tally.audit_events")
            .nth(1)
            .expect("audit_events DDL");
        let body = &table[table.find('(').unwrap() + 1..table.find("ENGINE").unwrap()];
        let ddl_cols: Vec<&str> = body
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("--") && l != &")")
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        let ours: Vec<&str> = COLUMNS.split(',').map(str::trim).collect();
        assert_eq!(ours, ddl_cols);
        assert_eq!(<AuditRow as Row>::COLUMN_NAMES, ddl_cols.as_slice());
    }

    #[test]
    fn invalid_rows_are_refused() {
        let mut row = AuditRow::new(&example(), 1);
        assert_eq!(row.occurred_at, 1_718_000_000);
        row.personal_data = 2;
        assert_eq!(row.to_leaf(), Err(InvalidRow::PersonalData(2)));
        let mut row = AuditRow::new(&example(), 1);
        row.occurred_at += 1;
        assert!(matches!(row.to_leaf(), Err(InvalidRow::OccurredAt { .. })));
        let before_1970 = AuditLeaf {
            occurred_at_us: -1,
            ..example()
        };
        assert_eq!(AuditRow::new(&before_1970, 1).occurred_at, 0);
    }

    proptest! {
        #[test]
        fn a_row_stores_exactly_its_leaf(leaf in arb_leaf(), batch in any::<u64>()) {
            let row = AuditRow::new(&leaf, batch);
            prop_assert_eq!(row.batch_id, batch);
            prop_assert_eq!(row.to_leaf(), Ok(leaf.clone()));
            prop_assert_eq!(rows(std::slice::from_ref(&leaf), batch), vec![row]);
        }
    }
}
