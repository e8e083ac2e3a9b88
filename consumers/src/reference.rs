//! Reference data from Postgres (tenants, prices, budgets), cached in memory and
//! refreshed on an interval by swapping an immutable snapshot.
//!
//! Guarantee: a batch is enriched against one snapshot. Prices are versioned by
//! `effective_from`, so a price added later applies to events at or after it;
//! add prices ahead of their effective time so replays price identically. All
//! prices are in the book currency (`tally.price_book`; Postgres rejects a price
//! row in another currency, and a snapshot holding one is refused, naming it).

use crate::cost::{PriceBook, PriceVersion};
use crate::enrich::{Budget, BudgetPeriod, Reference, TenantInfo};
use crate::errors::{pg, StageError};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub async fn load(pool: &PgPool) -> Result<Reference, StageError> {
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
    .collect::<HashMap<_, _>>();
    let book_currency: String = sqlx::query_scalar("SELECT currency FROM tally.price_book")
        .fetch_one(pool)
        .await
        .map_err(pg("load price book currency"))?;
    let prices = sqlx::query(
        "SELECT provider, model, effective_from, currency, input_per_m, cached_input_per_m, cache_write_per_m, \
         output_per_m, reasoning_per_m FROM tally.prices",
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
    });
    let budgets = sqlx::query(
        "SELECT budget_id, tenant_id, team_id, period, amount, thresholds_pct FROM tally.budgets ORDER BY budget_id",
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
        }
    })
    .collect();
    let prices = PriceBook::new(book_currency.trim(), prices)
        .map_err(|e| StageError::Fatal(format!("price book: {e}")))?;
    Ok(Reference::new(tenants, prices, budgets))
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
