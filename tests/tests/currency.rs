//! Two currencies against the real services: tally keeps one book currency per
//! deployment. A price row in another currency is rejected by Postgres, naming
//! the row; events that report their cost in another currency are priced from
//! the book like any other, not compared against their reported cost, and
//! flagged (`currency_mismatch`); every total (spend_daily, ClickHouse rollups,
//! budgets) holds book-currency money only.

use chrono::{DurationRound, Utc};
use rust_decimal::Decimal;
use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;
use tally_producers::{demo_world, GenKind, GenMessage};
use tally_schemas::{encode_json, sample_usage, UsageEvent};
use tally_tests::*;
use uuid::Uuid;

fn event(tenant: &str, at: chrono::DateTime<Utc>, currency: &str, reported: &str) -> UsageEvent {
    let mut e = sample_usage();
    e.event_id = Uuid::new_v4();
    e.occurred_at = at;
    e.tenant_id = tenant.into();
    e.team_id = None;
    e.provider = "acme".into();
    e.model = "mystery-1".into();
    e.input_tokens = 1_000;
    e.cached_input_tokens = 0;
    e.cache_write_tokens = 0;
    e.output_tokens = 500;
    e.reasoning_tokens = 0;
    e.reported_cost = Some(Decimal::from_str(reported).unwrap_or_default());
    e.currency = currency.into();
    e
}

fn messages(events: &[UsageEvent]) -> Vec<GenMessage> {
    events
        .iter()
        .map(|e| GenMessage {
            key: Some(e.tenant_id.clone().into_bytes()),
            payload: encode_json(e),
            kind: GenKind::Good,
            event: Some(e.clone()),
        })
        .collect()
}

const INSERT_PRICE: &str =
    "INSERT INTO tally.prices (provider, model, effective_from, currency, input_per_m, \
     cached_input_per_m, cache_write_per_m, output_per_m, reasoning_per_m) \
     VALUES ('acme', 'mystery-1', $1, $2, $3, 0, 0, $4, 0)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_currencies_never_add_up() -> anyhow::Result<()> {
    let env = test_env("currency", 2, &[]).await?;
    let now = Utc::now();
    env.seed(&demo_world(5, now - chrono::Duration::days(1)))
        .await?;
    // The book is in USD: 1000 input x 2/M + 500 output x 8/M = 0.006 USD per event.
    sqlx::query(INSERT_PRICE)
        .bind(now - chrono::Duration::days(1))
        .bind("USD")
        .bind(Decimal::from(2))
        .bind(Decimal::from(8))
        .execute(&env.pool)
        .await?;
    // A newer price for the same model in EUR: must be refused, not picked as
    // "the newest version" for every event.
    let eur_price = sqlx::query(INSERT_PRICE)
        .bind(now - chrono::Duration::hours(3))
        .bind("EUR")
        .bind(Decimal::from(3))
        .bind(Decimal::from(9))
        .execute(&env.pool)
        .await;
    let budget_amount = Decimal::from_str("0.1")?;
    sqlx::query(
        "INSERT INTO tally.budgets (budget_id, scope, tenant_id, period, amount) VALUES ('b-cur', 'tenant', 't-004', 'day', $1)",
    )
    .bind(budget_amount)
    .execute(&env.pool)
    .await?;
    let mut tally = env.spawn_tally("run")?;

    // One hour's start, so every event falls on one day.
    let at = (now - chrono::Duration::minutes(30)).duration_trunc(chrono::Duration::hours(1))?;
    let mut events = Vec::new();
    for i in 0..10 {
        let t = at + chrono::Duration::seconds(i);
        // Reported in USD and right: compared, no mismatch.
        events.push(event("t-004", t, "USD", "0.006"));
        // Reported in EUR (a different number): priced from the book in USD,
        // not compared, flagged.
        events.push(event("t-004", t, "EUR", "0.0055"));
        events.push(event("t-005", t, "EUR", "0.0055"));
    }
    produce(&env, &messages(&events), None).await?;
    let handled = env.wait_handled(30, Duration::from_secs(90)).await;
    terminate(&mut tally, Duration::from_secs(30))?;
    handled?;

    let per_event = Decimal::from_str("0.006")?;
    let expect = |n: i64| (per_event * Decimal::from(n)).normalize();
    // Postgres spend: every event priced, in USD.
    let rows: Vec<(String, i64, i64, Decimal)> = sqlx::query_as(
        "SELECT tenant_id, sum(requests)::bigint, sum(unpriced_requests)::bigint, sum(cost) \
         FROM tally.spend_daily GROUP BY tenant_id ORDER BY tenant_id",
    )
    .fetch_all(&env.pool)
    .await?;
    let rows: Vec<(String, i64, i64, Decimal)> = rows
        .into_iter()
        .map(|(t, r, u, c)| (t, r, u, c.normalize()))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("t-004".to_string(), 20, 0, expect(20)),
            ("t-005".to_string(), 10, 0, expect(10)),
        ],
        "spend_daily (tenant, requests, unpriced, cost)"
    );
    // ClickHouse: raw events and every rollup hold the same USD money.
    for table in ["usage_events", "usage_1m", "usage_1h", "usage_1d"] {
        let requests = if table == "usage_events" {
            "count()"
        } else {
            "sum(requests)"
        };
        let text = ch_query(
            &env.cfg.clickhouse.url,
            &format!(
                "SELECT toString({requests}), toString(sum(cost)) FROM {}.{table} FORMAT TabSeparated",
                env.cfg.clickhouse.database
            ),
        )
        .await?;
        let f: Vec<&str> = text.trim().split('\t').collect();
        assert_eq!(f.len(), 2, "{table}: {text}");
        assert_eq!(
            (f[0].to_string(), Decimal::from_str(f[1])?.normalize()),
            ("30".to_string(), expect(30)),
            "{table} (requests, cost)"
        );
    }
    // The budget counts USD only: 20 x 0.006 = 0.12 of 0.1, all thresholds crossed once.
    let spent: Decimal = sqlx::query_scalar(
        "SELECT coalesce(sum(spent), 0) FROM tally.budget_spend WHERE budget_id = 'b-cur'",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(spent.normalize(), expect(20), "budget b-cur spent");
    let crossings: BTreeSet<Decimal> = actual_budget_crossings(&env.pool)
        .await?
        .into_iter()
        .filter(|(id, _, _)| id == "b-cur")
        .map(|(_, _, pct)| pct)
        .collect();
    assert_eq!(
        crossings,
        [50, 80, 100].into_iter().map(Decimal::from).collect(),
        "b-cur crossings"
    );
    // Flags: one currency_mismatch per (tenant, currency, day), no cost
    // mismatch for a cost in another currency, nothing unpriced.
    let flags: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT rule, tenant_id, count(*) FROM tally.violations \
         WHERE rule IN ('currency_mismatch', 'cost_mismatch', 'unpriced_model') \
         GROUP BY rule, tenant_id ORDER BY rule, tenant_id",
    )
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(
        flags,
        vec![
            ("currency_mismatch".to_string(), "t-004".to_string(), 1),
            ("currency_mismatch".to_string(), "t-005".to_string(), 1),
        ],
        "violations (rule, tenant, count)"
    );
    let message: String = sqlx::query_scalar(
        "SELECT message FROM tally.violations WHERE rule = 'currency_mismatch' AND tenant_id = 't-005'",
    )
    .fetch_one(&env.pool)
    .await?;
    assert!(
        message.contains("reports costs in EUR but the price book is in USD"),
        "{message}"
    );

    // The EUR price row was refused with an error naming it.
    let err = match eur_price {
        Ok(_) => anyhow::bail!("a EUR price row was accepted into a USD price book"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("price row (provider acme, model mystery-1, effective_from")
            && err.contains("is in EUR but the price book's currency is USD"),
        "{err}"
    );
    // The book currency cannot change under existing prices.
    let change = sqlx::query("UPDATE tally.price_book SET currency = 'EUR'")
        .execute(&env.pool)
        .await;
    assert!(
        change.is_err_and(|e| e
            .to_string()
            .contains("stays USD while tally.prices has rows")),
        "changing the book currency under existing prices"
    );
    Ok(())
}
