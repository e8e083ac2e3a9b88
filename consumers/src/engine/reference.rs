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
use futures::TryStreamExt;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
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
    /// The serialized body (what `tally.reference_snapshots` stores).
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The content hash: the UUID v5 of the body in [`SNAPSHOT_NS`], computed
    /// as the body is serialized, so an unchanged refresh never holds the body
    /// (tens of MB with 100k tenants) in memory.
    pub fn version(&self) -> String {
        let mut h = Sha1Writer(Sha1::new());
        h.0.update(SNAPSHOT_NS.as_bytes());
        // Writing into a hasher cannot fail; a serialization error would have
        // failed `serde_json::to_vec` the same way (an empty body).
        if serde_json::to_writer(&mut h, self).is_err() {
            return uuid::Uuid::new_v5(&SNAPSHOT_NS, b"").simple().to_string();
        }
        let digest = h.0.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        uuid::Builder::from_sha1_bytes(first)
            .into_uuid()
            .simple()
            .to_string()
    }

    pub fn into_reference(self) -> Result<Reference, StageError> {
        let version = self.version();
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
/// `current`: an unchanged snapshot costs reading the rows and hashing them as
/// they are serialized, not a body in memory, a rebuild and a store (with 100k
/// tenants the body is tens of MB, and Postgres would parse it as `jsonb`
/// again at every refresh).
pub async fn refresh(
    pool: &PgPool,
    current: Option<&str>,
) -> Result<Option<Reference>, StageError> {
    let rows = load_rows(pool).await?;
    let version = rows.version();
    if current == Some(version.as_str()) {
        return Ok(None);
    }
    let body = rows.body();
    let r = rows.into_reference_of(version.clone())?;
    store_body(pool, &version, body).await?;
    Ok(Some(r))
}

/// An `io::Write` that feeds SHA-1.
struct Sha1Writer(Sha1);

impl std::io::Write for Sha1Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
    // As text, parsed straight into the rows (a `serde_json::Value` tree of a
    // 100k-tenant body would be several times its size).
    let body: Option<String> =
        sqlx::query_scalar("SELECT body::text FROM tally.reference_snapshots WHERE version = $1")
            .bind(version)
            .fetch_optional(pool)
            .await
            .map_err(pg("load reference snapshot"))?;
    let body =
        body.ok_or_else(|| StageError::Fatal(format!("reference snapshot {version} is missing")))?;
    let rows: ReferenceRows = serde_json::from_str(&body)
        .map_err(|e| StageError::Fatal(format!("reference snapshot {version}: {e}")))?;
    drop(body);
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
    .fetch(pool)
    .map_ok(|r| {
        (
            r.get::<String, _>(0),
            TenantInfo {
                name: r.get(1),
                requests_per_minute: r.get(2),
                tokens_per_minute: r.get(3),
            },
        )
    })
    .try_collect::<Vec<_>>()
    .await
    .map_err(pg("load tenants"))?;
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
    .fetch(pool)
    .map_ok(|r| {
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
    .try_collect()
    .await
    .map_err(pg("load prices"))?;
    // Every version of every budget: the budgets row (its first version) and
    // the later ones (`tally budgets import`, migration 0007).
    let budgets = sqlx::query(
        "SELECT budget_id, tenant_id, team_id, period, amount, thresholds_pct, effective_from FROM tally.budgets \
         UNION ALL \
         SELECT v.budget_id, b.tenant_id, b.team_id, b.period, v.amount, v.thresholds_pct, v.effective_from \
         FROM tally.budget_versions v JOIN tally.budgets b USING (budget_id) \
         ORDER BY budget_id, effective_from NULLS FIRST",
    )
    .fetch(pool)
    .map_ok(|r| {
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
    .try_collect()
    .await
    .map_err(pg("load budgets"))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn rows(tenants: usize) -> ReferenceRows {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        ReferenceRows {
            currency: "USD".into(),
            tenants: (0..tenants)
                .map(|i| {
                    (
                        format!("t-{i:06}"),
                        TenantInfo {
                            name: format!("Tenant \"{i}\" é"),
                            requests_per_minute: (i % 2 == 0).then_some(600),
                            tokens_per_minute: None,
                        },
                    )
                })
                .collect(),
            prices: vec![(
                "openai".into(),
                "gpt-4o".into(),
                PriceVersion {
                    effective_from: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                    currency: "USD".into(),
                    input_per_m: d("2.50"),
                    cached_input_per_m: d("1.25"),
                    cache_write_per_m: d("3.125"),
                    output_per_m: d("10"),
                    reasoning_per_m: d("10.000000000001"),
                },
            )],
            budgets: vec![Budget {
                budget_id: "b-1".into(),
                tenant_id: "t-000001".into(),
                team_id: None,
                period: BudgetPeriod::Month,
                amount: d("1000.00"),
                thresholds_pct: vec![d("50"), d("80"), d("100")],
                effective_from: None,
            }],
        }
    }

    /// The streamed hash is the UUID v5 of the stored body: versions recorded
    /// by earlier releases (which hashed the body in memory) still match.
    #[test]
    fn streamed_version_is_the_v5_of_the_body() {
        for n in [0, 1, 3, 5_000] {
            let r = rows(n);
            let v5 = uuid::Uuid::new_v5(&SNAPSHOT_NS, &r.body());
            assert_eq!(r.version(), v5.simple().to_string(), "{n} tenants");
        }
    }

    /// A body read back as text parses into the same rows, hence the same version.
    #[test]
    fn body_round_trips_to_the_same_version() {
        let r = rows(10);
        let back: ReferenceRows =
            serde_json::from_slice(&r.body()).expect("body parses back into rows");
        assert_eq!(back.version(), r.version());
        assert_ne!(rows(11).version(), r.version());
    }
}
