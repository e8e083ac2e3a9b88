//! Keeps every tenant's checkpoint fresh and outside the databases: re-signs the
//! checkpoint of a tenant whose latest one is older than
//! `audit.checkpoint_interval_ms` (an idle log), and publishes every stored
//! checkpoint to `audit.checkpoint_topic`.
//!
//! Guarantee: a re-signed checkpoint is made from the tree as committed (read
//! under a share lock), so it never contradicts another; each stored checkpoint
//! is published at least once (identical copies at worst: a crash between the
//! broker's ack and the mark), and two instances never publish the same row at
//! once (`FOR UPDATE SKIP LOCKED`). Each round also reports the age of the
//! stalest tenant's newest checkpoint (`tally_audit_checkpoint_age_seconds`).

use crate::audit::merkle::CompactRange;
use crate::audit::note::NoteSigner;
use crate::errors::{pg, StageError};
use crate::streams::audit::log;
use chrono::Utc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::time::Duration;
use tokio::sync::watch;

pub struct Checkpointer {
    pub pool: PgPool,
    pub signer: NoteSigner,
    pub producer: FutureProducer,
    pub topic: String,
    pub interval: Duration,
    /// Seconds since the newest checkpoint of the tenant whose newest is oldest.
    pub age: metrics::Gauge,
}

impl Checkpointer {
    /// Runs until `shutdown` flips; errors are logged and retried next round.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let every = (self.interval / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        loop {
            if let Err(e) = self.resign_idle().await {
                tracing::warn!(error = %e, "re-signing idle audit checkpoints failed");
            }
            match self.publish().await {
                Ok(n) if n > 0 => tracing::debug!(published = n, "audit checkpoints published"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "publishing audit checkpoints failed"),
            }
            match self.stalest_age().await {
                Ok(secs) => self.age.set(secs),
                Err(e) => tracing::debug!(error = %e, "reading the audit checkpoint age failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Signs a checkpoint for every tenant whose latest is older than the interval.
    pub async fn resign_idle(&self) -> Result<usize, StageError> {
        let mut tx = self.pool.begin().await.map_err(pg("re-sign begin"))?;
        let secs = self.interval.as_secs_f64();
        let stale = sqlx::query(
            "SELECT t.tenant_id, t.tree_size, t.compact FROM tally.audit_trees t \
             WHERE t.tree_size > 0 AND NOT EXISTS (SELECT 1 FROM tally.audit_checkpoints c \
               WHERE c.tenant_id = t.tenant_id AND c.signed_at > now() - make_interval(secs => $1)) \
             ORDER BY t.tenant_id FOR SHARE",
        )
        .bind(secs)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg("read idle audit trees"))?;
        let now = Utc::now();
        for r in &stale {
            let (tenant, size, compact): (String, i64, Vec<u8>) = (r.get(0), r.get(1), r.get(2));
            let tree = CompactRange::from_bytes(u64::try_from(size).unwrap_or(0), &compact)
                .map_err(|e| {
                    StageError::Fatal(format!("stored audit tree of tenant {tenant}: {e}"))
                })?;
            let s = log::sign(&self.signer, &tenant, &tree, now)?;
            log::insert_checkpoint(&mut tx, &s).await?;
        }
        tx.commit().await.map_err(pg("re-sign commit"))?;
        Ok(stale.len())
    }

    /// Seconds since the newest checkpoint of the tenant whose newest one is
    /// the oldest, over tenants with a non-empty log (0 when there is none).
    /// It stays below the interval plus a round while re-signing works.
    pub async fn stalest_age(&self) -> Result<f64, StageError> {
        sqlx::query_scalar(
            "SELECT coalesce(extract(epoch FROM now() - min(coalesce(c.signed_at, t.updated_at))), 0)::float8 \
             FROM tally.audit_trees t LEFT JOIN LATERAL (SELECT signed_at FROM tally.audit_checkpoints c \
               WHERE c.tenant_id = t.tenant_id ORDER BY checkpoint_id DESC LIMIT 1) c ON true \
             WHERE t.tree_size > 0",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(pg("read audit checkpoint age"))
    }

    /// Publishes unpublished checkpoints, oldest first; returns how many.
    pub async fn publish(&self) -> Result<usize, StageError> {
        let mut tx = self.pool.begin().await.map_err(pg("publish begin"))?;
        let rows = sqlx::query(
            "SELECT checkpoint_id, tenant_id, signed_note FROM tally.audit_checkpoints \
             WHERE published_at IS NULL ORDER BY checkpoint_id LIMIT 500 FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(pg("read unpublished checkpoints"))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let sends = rows.iter().map(|r| {
            let (tenant, note): (String, String) = (r.get(1), r.get(2));
            let producer = self.producer.clone();
            let topic = self.topic.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&tenant).payload(&note),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| StageError::Retryable(format!("publish checkpoint: {e}")))
            }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        sqlx::query(
            "UPDATE tally.audit_checkpoints SET published_at = now() WHERE checkpoint_id = ANY($1)",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .map_err(pg("mark checkpoints published"))?;
        tx.commit().await.map_err(pg("publish commit"))?;
        Ok(ids.len())
    }
}
