//! Reference data from Postgres (tenants, prices, budgets), cached in memory and
//! refreshed on an interval by swapping an immutable snapshot.
//!
//! Guarantee: a batch is enriched against one snapshot, and a replayed batch
//! against the very snapshot its first attempt used. Every snapshot has a
//! content hash (`version`); the claim records the version and the snapshot is
//! stored in `tally.reference_snapshots`, so a price, tenant or budget that
//! changes between an attempt and its replay cannot make the stores disagree.
//! Prices are versioned by `effective_from`: a price added later applies to
//! events at or after it; add prices ahead of their effective time. Budgets
//! are versioned by the first day of a period (`Reference::budget_in_force`). All
//! prices are in the book currency (`tally.price_book`; Postgres rejects a price
//! row in another currency, and a snapshot holding one is refused, naming it).

use crate::errors::{pg, StageError};
use crate::streams::usage::cost::{PriceBook, PriceVersion};
use crate::streams::usage::enrich::{Budget, BudgetPeriod, Reference, TenantInfo};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::sync::{Arc, RwLock};

/// The rows of one snapshot in a canonical order: what is hashed and stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReferenceRows {
    /// The book currency (`tally.price_book`).
    pub currency: String,
    pub tenants: Vec<(String, TenantInfo)>,
    pub prices: Vec<(String, String, PriceVersion)>,
    pub budgets: Vec<Budget>,
}

/// Namespace of the snapshot content hash (UUID v5).
const SNAPSHOT_NS: uuid::Uuid = uuid::Uuid::from_u128(0x7a11_7e5f_0000_4000_8000_0000_0000_0001);

impl ReferenceRows {
    /// The serialized body and its content hash.
    pub fn body_and_version(&self) -> (Vec<u8>, String) {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let version = uuid::Uuid::new_v5(&SNAPSHOT_NS, &body).simple().to_string();
        (body, version)
    }

    pub fn into_reference(self) -> Result<Reference, StageError> {
        let (_, version) = self.body_and_version();
        self.into_reference_of(version)
    }

    /// Builds the snapshot whose content hash is `version` (refusing a book in
    /// mixed currencies, naming the row).
    fn into_reference_of(self, version: String) -> Result<Reference, StageError> {
        let prices = PriceBook::new(&self.currency, self.prices)
            .map_err(|e| StageError::Fatal(format!("price book: {e}")))?;
        let mut r = Reference::new(self.tenants.into_iter().collect(), prices, self.budgets);
        r.version = version;
        Ok(r)
    }
}

pub async fn load(pool: &PgPool) -> Result<Reference, StageError> {
    load_rows(pool).await?.into_reference()
}

/// Loads the current snapshot and stores it (idempotent) before anything can
/// enrich with it, so every version a claim records can be loaded again.
pub async fn load_and_store(pool: &PgPool) -> Result<Reference, StageError> {
    let r = refresh(pool, None).await?;
    r.ok_or_else(|| StageError::Fatal("reference snapshot: nothing loaded".into()))
}

/// Like [`load_and_store`], but None when the snapshot's version is
/// `current`: an unchanged snapshot costs one serialization and hash, not a
/// rebuild and a store (with 100k tenants the body is tens of MB, and
/// Postgres would parse it as `jsonb` again at every refresh).
pub async fn refresh(
    pool: &PgPool,
    current: Option<&str>,
) -> Result<Option<Reference>, StageError> {
    let rows = load_rows(pool).await?;
    let (body, version) = rows.body_and_version();
    if current == Some(version.as_str()) {
        return Ok(None);
    }
    let r = rows.into_reference_of(version.clone())?;
    store_body(pool, &version, body).await?;
    Ok(Some(r))
}

/// Stores a serialized body (text cast to `jsonb` by Postgres: no JSON tree here).
async fn store_body(pool: &PgPool, version: &str, body: Vec<u8>) -> Result<(), StageError> {
    let body = String::from_utf8(body)
        .map_err(|e| StageError::Fatal(format!("reference snapshot {version}: {e}")))?;
    sqlx::query(
        "INSERT INTO tally.reference_snapshots (version, body) VALUES ($1, $2::text::jsonb) \
         ON CONFLICT DO NOTHING",
    )
    .bind(version)
    .bind(body)
    .execute(pool)
    .await
    .map_err(pg("store reference snapshot"))?;
    Ok(())
}

/// Loads the snapshot a batch's first attempt used.
pub async fn load_snapshot(pool: &PgPool, version: &str) -> Result<Reference, StageError> {
    let body: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT body FROM tally.reference_snapshots WHERE version = $1")
            .bind(version)
            .fetch_optional(pool)
            .await
            .map_err(pg("load reference snapshot"))?;
    let body =
        body.ok_or_else(|| StageError::Fatal(format!("reference snapshot {version} is missing")))?;
    let rows: ReferenceRows = serde_json::from_value(body)
        .map_err(|e| StageError::Fatal(format!("reference snapshot {version}: {e}")))?;
    let r = rows.into_reference()?;
    if r.version != version {
        return Err(StageError::Fatal(format!(
            "reference snapshot {version} hashes to {}",
            r.version
        )));
    }
    Ok(r)
}

pub async fn load_rows(pool: &PgPool) -> Result<ReferenceRows, StageError> {
    let tenants = sqlx::query(
        "SELECT tenant_id, name, requests_per_minute, tokens_per_minute FROM tally.tenants",
    )
    .fetch_all(pool)
    .await
    .map_err(pg("load tenants"))?
    .into_iter()
    .map(|r| {
        (
            r.get::<String, _>(0),
            TenantInfo {
                name: r.get(1),
                requests_per_minute: r.get(2),
                tokens_per_minute: r.get(3),
            },
        )
    })
    .collect::<Vec<_>>();
    let mut tenants = tenants;
    tenants.sort_by(|a, b| a.0.cmp(&b.0));
    let book_currency: String = sqlx::query_scalar("SELECT currency FROM tally.price_book")
        .fetch_one(pool)
        .await
        .map_err(pg("load price book currency"))?;
    let prices = sqlx::query(
        "SELECT provider, model, effective_from, currency, input_per_m, cached_input_per_m, cache_write_per_m, \
         output_per_m, reasoning_per_m FROM tally.prices ORDER BY provider, model, effective_from",
    )
    .fetch_all(pool)
    .await
    .map_err(pg("load prices"))?
    .into_iter()
    .map(|r| {
        (
            r.get::<String, _>(0),
            r.get::<String, _>(1),
            PriceVersion {
                effective_from: r.get::<DateTime<Utc>, _>(2),
                currency: r.get::<String, _>(3).trim().to_string(),
                input_per_m: r.get::<Decimal, _>(4),
                cached_input_per_m: r.get::<Decimal, _>(5),
                cache_write_per_m: r.get::<Decimal, _>(6),
                output_per_m: r.get::<Decimal, _>(7),
                reasoning_per_m: r.get::<Decimal, _>(8),
            },
        )
    })
    .collect();
    // Every version of every budget: the budgets row (its first version) and
    // the later ones (`tally budgets import`, migration 0007).
    let budgets = sqlx::query(
        "SELECT budget_id, tenant_id, team_id, period, amount, thresholds_pct, effective_from FROM tally.budgets \
         UNION ALL \
         SELECT v.budget_id, b.tenant_id, b.team_id, b.period, v.amount, v.thresholds_pct, v.effective_from \
         FROM tally.budget_versions v JOIN tally.budgets b USING (budget_id) \
         ORDER BY budget_id, effective_from NULLS FIRST",
    )
    .fetch_all(pool)
    .await
    .map_err(pg("load budgets"))?
    .into_iter()
    .map(|r| {
        let period: String = r.get(3);
        let mut thresholds: Vec<Decimal> = r.get(5);
        thresholds.sort();
        Budget {
            budget_id: r.get(0),
            tenant_id: r.get(1),
            team_id: r.get(2),
            period: if period == "month" { BudgetPeriod::Month } else { BudgetPeriod::Day },
            amount: r.get(4),
            thresholds_pct: thresholds,
            effective_from: r.get(6),
        }
    })
    .collect();
    let rows = ReferenceRows {
        currency: book_currency.trim().to_string(),
        tenants,
        prices,
        budgets,
    };
    // Every caller builds the Reference (which refuses a book in mixed
    // currencies, naming the row) before storing anything.
    Ok(rows)
}

/// The current snapshot, shared between the pipeline and the refresher.
#[derive(Clone, Default)]
pub struct SharedReference(Arc<RwLock<Arc<Reference>>>);

impl SharedReference {
    pub fn new(r: Reference) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(r))))
    }

    pub fn get(&self) -> Arc<Reference> {
        self.0.read().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set(&self, r: Reference) {
        if let Ok(mut g) = self.0.write() {
            *g = Arc::new(r);
        }
    }
}
