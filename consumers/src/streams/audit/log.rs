//! The per-tenant Merkle log in Postgres: leaf indexes reserved once per batch,
//! merged into each tenant's tree in index order when their batches commit, and
//! a signed checkpoint whenever a tree grows.
//!
//! Guarantee: a leaf index is decided once (the reservation is keyed by batch id
//! and a replay reads it back), so a crash never forks or renumbers a tree; a
//! tree only grows by appending committed leaves in index order (a batch that
//! committed ahead of an earlier reservation waits in `audit_leaves`), so every
//! checkpoint tally signs is consistent with every earlier one.

use crate::audit::checkpoint::{origin_for, Checkpoint};
use crate::audit::merkle::{CompactRange, Hash};
use crate::audit::note::NoteSigner;
use crate::engine::ownership::check_epoch_in;
use crate::engine::stream::BatchCtx;
use crate::errors::{pg, StageError};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// Reserves the leaf indexes of a batch's events, or reads back the ones an
/// earlier attempt of this batch reserved. `events` are (tenant, dedup key) in
/// offset order; returns the index of each, in the same order.
pub async fn reserve(ctx: &BatchCtx<'_>, events: &[(&str, Uuid)]) -> Result<Vec<u64>, StageError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = ctx
        .ledger
        .pool()
        .begin()
        .await
        .map_err(pg("reserve begin"))?;
    check_epoch_in(&mut tx, &ctx.ledger.partition_key(ctx.partition), ctx.epoch).await?;
    let earlier: HashMap<Uuid, i64> =
        sqlx::query("SELECT event_key, leaf_index FROM tally.audit_leaves WHERE batch_id = $1")
            .bind(ctx.batch_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(pg("read reserved leaves"))?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    if !earlier.is_empty() {
        let found: Option<Vec<u64>> = events
            .iter()
            .map(|(_, k)| earlier.get(k).and_then(|i| u64::try_from(*i).ok()))
            .collect();
        return found.ok_or_else(|| {
            StageError::Fatal(format!(
                "batch {}: its reserved audit leaves ({}) do not match its events ({})",
                ctx.batch_id,
                earlier.len(),
                events.len()
            ))
        });
    }
    let mut per_tenant: BTreeMap<&str, i64> = BTreeMap::new();
    for (t, _) in events {
        *per_tenant.entry(t).or_default() += 1;
    }
    let tenants: Vec<&str> = per_tenant.keys().copied().collect();
    let counts: Vec<i64> = per_tenant.values().copied().collect();
    sqlx::query(
        "INSERT INTO tally.audit_trees (tenant_id) SELECT t FROM UNNEST($1::text[]) AS u(t) \
         ORDER BY t ON CONFLICT DO NOTHING",
    )
    .bind(&tenants)
    .execute(&mut *tx)
    .await
    .map_err(pg("create audit trees"))?;
    // Locked in tenant order and advanced by this batch's count: the first
    // index of each tenant's run is the value before the update.
    sqlx::query(
        "SELECT 1 FROM tally.audit_trees WHERE tenant_id = ANY($1) ORDER BY tenant_id FOR UPDATE",
    )
    .bind(&tenants)
    .execute(&mut *tx)
    .await
    .map_err(pg("lock audit trees"))?;
    let firsts: HashMap<String, i64> = sqlx::query(
        "UPDATE tally.audit_trees a SET next_index = a.next_index + u.n, updated_at = now() \
         FROM UNNEST($1::text[], $2::bigint[]) AS u(t, n) \
         WHERE a.tenant_id = u.t \
         RETURNING a.tenant_id, a.next_index - u.n",
    )
    .bind(&tenants)
    .bind(&counts)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("reserve leaf indexes"))?
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let mut next: HashMap<&str, i64> = HashMap::new();
    let mut out = Vec::with_capacity(events.len());
    let (mut t_col, mut i_col, mut k_col) = (Vec::new(), Vec::new(), Vec::new());
    for (t, k) in events {
        let first = firsts.get(*t).copied().ok_or_else(|| {
            StageError::Fatal(format!(
                "audit tree of tenant {t} vanished during reservation"
            ))
        })?;
        let n = next.entry(t).or_insert(first);
        out.push(u64::try_from(*n).unwrap_or(0));
        t_col.push(t.to_string());
        i_col.push(*n);
        k_col.push(*k);
        *n += 1;
    }
    sqlx::query(
        "INSERT INTO tally.audit_leaves (tenant_id, leaf_index, batch_id, event_key) \
         SELECT u.t, u.i, $4, u.k FROM UNNEST($1::text[], $2::bigint[], $3::uuid[]) AS u(t, i, k)",
    )
    .bind(&t_col)
    .bind(&i_col)
    .bind(&k_col)
    .bind(ctx.batch_id)
    .execute(&mut *tx)
    .await
    .map_err(pg("record reserved leaves"))?;
    tx.commit().await.map_err(pg("reserve commit"))?;
    Ok(out)
}

/// A checkpoint signed by a commit or by the idle re-signer.
#[derive(Debug, Clone)]
pub struct Signed {
    pub tenant_id: String,
    pub checkpoint: Checkpoint,
    pub note: String,
}

/// Signs the checkpoint of `tenant`'s tree (`compact`) at `at`.
pub fn sign(
    signer: &NoteSigner,
    tenant: &str,
    compact: &CompactRange,
    at: DateTime<Utc>,
) -> Result<Signed, StageError> {
    let mut c = Checkpoint::new(
        &origin_for(signer.name(), tenant),
        compact.size(),
        compact.root(),
    )
    .map_err(|e| StageError::Fatal(format!("checkpoint of tenant {tenant}: {e}")))?;
    // When it was signed: an idle log's checkpoints stay fresh without changing.
    c.extensions.push(format!("timestamp {}", at.timestamp()));
    let note = c
        .sign(signer)
        .map_err(|e| StageError::Fatal(format!("sign checkpoint of tenant {tenant}: {e}")))?;
    Ok(Signed {
        tenant_id: tenant.to_string(),
        checkpoint: c,
        note,
    })
}

/// Inside the batch's commit: records the leaf hashes of its events, merges
/// every tenant's committed leaves that now follow its tree in index order,
/// and signs a checkpoint for each tree that grew. `leaves` are (tenant,
/// index, leaf hash).
pub async fn commit_leaves(
    tx: &mut sqlx::PgConnection,
    signer: &NoteSigner,
    leaves: &[(&str, u64, Hash)],
    now: DateTime<Utc>,
) -> Result<Vec<Signed>, StageError> {
    if leaves.is_empty() {
        return Ok(Vec::new());
    }
    let tenants: Vec<&str> = leaves.iter().map(|l| l.0).collect();
    let idx: Vec<i64> = leaves
        .iter()
        .map(|l| i64::try_from(l.1).unwrap_or(i64::MAX))
        .collect();
    let hashes: Vec<Vec<u8>> = leaves.iter().map(|l| l.2.to_vec()).collect();
    let set = sqlx::query(
        "UPDATE tally.audit_leaves a SET leaf_hash = u.h \
         FROM UNNEST($1::text[], $2::bigint[], $3::bytea[]) AS u(t, i, h) \
         WHERE a.tenant_id = u.t AND a.leaf_index = u.i",
    )
    .bind(&tenants)
    .bind(&idx)
    .bind(&hashes)
    .execute(&mut *tx)
    .await
    .map_err(pg("commit leaf hashes"))?;
    if set.rows_affected() != leaves.len() as u64 {
        return Err(StageError::Fatal(format!(
            "{} of {} reserved audit leaves found at commit",
            set.rows_affected(),
            leaves.len()
        )));
    }
    let mut unique: Vec<&str> = tenants.clone();
    unique.sort_unstable();
    unique.dedup();
    let trees = sqlx::query(
        "SELECT tenant_id, tree_size, compact FROM tally.audit_trees WHERE tenant_id = ANY($1) \
         ORDER BY tenant_id FOR UPDATE",
    )
    .bind(&unique)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("lock audit trees"))?;
    let mut signed = Vec::new();
    for row in trees {
        let (tenant, size, compact): (String, i64, Vec<u8>) = (row.get(0), row.get(1), row.get(2));
        let size = u64::try_from(size).unwrap_or(0);
        let mut tree = CompactRange::from_bytes(size, &compact)
            .map_err(|e| StageError::Fatal(format!("stored audit tree of tenant {tenant}: {e}")))?;
        let ready: Vec<(i64, Vec<u8>)> = sqlx::query(
            "SELECT leaf_index, leaf_hash FROM tally.audit_leaves \
             WHERE tenant_id = $1 AND leaf_index >= $2 AND leaf_hash IS NOT NULL ORDER BY leaf_index",
        )
        .bind(&tenant)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(pg("read committed leaves"))?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        for (i, h) in &ready {
            if u64::try_from(*i).ok() != Some(tree.size()) {
                break; // an earlier reservation has not committed yet
            }
            let h: Hash = h.as_slice().try_into().map_err(|_| {
                StageError::Fatal(format!("leaf {i} of tenant {tenant}: hash is not 32 bytes"))
            })?;
            tree.push_leaf_hash(h);
        }
        if tree.size() == size {
            continue;
        }
        sqlx::query("DELETE FROM tally.audit_leaves WHERE tenant_id = $1 AND leaf_index < $2")
            .bind(&tenant)
            .bind(i64::try_from(tree.size()).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await
            .map_err(pg("merge committed leaves"))?;
        sqlx::query(
            "UPDATE tally.audit_trees SET tree_size = $2, compact = $3, updated_at = now() WHERE tenant_id = $1",
        )
        .bind(&tenant)
        .bind(i64::try_from(tree.size()).unwrap_or(i64::MAX))
        .bind(tree.to_bytes())
        .execute(&mut *tx)
        .await
        .map_err(pg("advance audit tree"))?;
        let s = sign(signer, &tenant, &tree, now)?;
        insert_checkpoint(&mut *tx, &s).await?;
        signed.push(s);
    }
    Ok(signed)
}

/// Stores a signed checkpoint in the caller's transaction (`store::insert_checkpoint`,
/// its errors classified as the engine's).
pub async fn insert_checkpoint(
    conn: &mut sqlx::PgConnection,
    s: &Signed,
) -> Result<(), StageError> {
    crate::streams::audit::store::insert_checkpoint(
        &mut *conn,
        &s.tenant_id,
        &s.checkpoint,
        &s.note,
    )
    .await
    .map(|_| ())
    .map_err(|e| match e {
        crate::streams::audit::store::StoreError::Postgres { what, source } => {
            crate::errors::classify_pg(what, source)
        }
        other => StageError::Fatal(other.to_string()),
    })
}
