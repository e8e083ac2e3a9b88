//! Reference data is cached and refreshed on an interval: a price added while
//! tally runs applies to events at or after its `effective_from`, while the
//! events counted before it stay as they were (unpriced, counted, flagged).

use chrono::{Duration as ChronoDuration, Utc};
use rust_decimal::Decimal;
use std::str::FromStr;
use std::time::Duration;
use tally_producers::{demo_world, GenKind, GenMessage};
use tally_schemas::{encode_json, sample_usage, UsageEvent};
use tally_tests::servers::free_port;
use tally_tests::*;
use uuid::Uuid;

fn event(at: chrono::DateTime<Utc>) -> UsageEvent {
    let mut e = sample_usage();
    e.event_id = Uuid::new_v4();
    e.occurred_at = at;
    e.tenant_id = "t-001".into();
    e.team_id = None;
    e.provider = "acme".into();
    e.model = "mystery-1".into();
    e.input_tokens = 1_000;
    e.cached_input_tokens = 0;
    e.cache_write_tokens = 0;
    e.output_tokens = 500;
    e.reasoning_tokens = 0;
    e.reported_cost = None;
    e.currency = "USD".into();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_added_while_running_applies_to_later_events() -> anyhow::Result<()> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let env = test_env(
        "refprice",
        2,
        &[
            ("TALLY__PIPELINE__REFERENCE_REFRESH_MS", "300"),
            ("TALLY__SERVER__LISTEN", listen.as_str()),
        ],
    )
    .await?;
    let now = Utc::now();
    env.seed(&demo_world(5, now - ChronoDuration::days(1)))
        .await?;
    let mut tally = env.spawn_tally("run")?;

    // Before the price exists: counted, unpriced.
    let before: Vec<UsageEvent> = (0..40)
        .map(|i| event(now - ChronoDuration::minutes(120 - i)))
        .collect();
    produce(&env, &messages(&before), None).await?;
    let first = env.wait_handled(40, Duration::from_secs(60)).await;
    // Nothing changed yet: the refreshes so far rebuilt and stored nothing.
    let refreshes = |outcome: &str| {
        metric(
            &listen,
            &format!("tally_reference_refreshes_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    let unchanged_before = refreshes("unchanged");
    assert!(
        unchanged_before >= 1.0,
        "unchanged refreshes: {unchanged_before}"
    );
    assert_eq!(refreshes("loaded"), 0.0);
    let stored = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tally.reference_snapshots")
            .fetch_one(&pool)
            .await
    };
    assert_eq!(
        stored(env.pool.clone()).await?,
        1,
        "only the start's snapshot"
    );

    // A price for the model, effective one hour ago, added while tally runs.
    sqlx::query(
        "INSERT INTO tally.prices (provider, model, effective_from, currency, input_per_m, cached_input_per_m, \
         cache_write_per_m, output_per_m, reasoning_per_m) VALUES ('acme', 'mystery-1', $1, 'USD', 2, 1, 3, 8, 8)",
    )
    .bind(now - ChronoDuration::hours(1))
    .execute(&env.pool)
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // > reference_refresh_ms

    let after: Vec<UsageEvent> = (0..30)
        .map(|i| event(now - ChronoDuration::minutes(30 - i)))
        .collect();
    produce(&env, &messages(&after), None).await?;
    let second = env.wait_handled(70, Duration::from_secs(60)).await;
    // The price change was loaded once; later refreshes found it unchanged.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (loaded, unchanged_after) = (refreshes("loaded"), refreshes("unchanged"));
    terminate(&mut tally, Duration::from_secs(30))?;
    assert_eq!(loaded, 1.0, "one changed snapshot loaded");
    assert!(
        unchanged_after > unchanged_before,
        "{unchanged_after} > {unchanged_before}"
    );
    assert_eq!(
        stored(env.pool.clone()).await?,
        2,
        "the start's and the changed one"
    );
    first?;
    second?;

    // 1000 input x 2/M + 500 output x 8/M = 0.006 per event
    let per_event = Decimal::from_str("0.006")?;
    let rows = ch_query(
        &env.cfg.clickhouse.url,
        &format!(
            "SELECT cost_status, count(), toString(sum(cost)) FROM {}.usage_events GROUP BY cost_status \
             ORDER BY cost_status FORMAT TabSeparated",
            env.cfg.clickhouse.database
        ),
    )
    .await?;
    let rows: Vec<Vec<String>> = rows
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0][0], "priced");
    assert_eq!(rows[0][1], "30");
    assert_eq!(
        Decimal::from_str(&rows[0][2])?.normalize(),
        (per_event * Decimal::from(30)).normalize()
    );
    assert_eq!(rows[1][0], "unpriced");
    assert_eq!(rows[1][1], "40");
    assert_eq!(Decimal::from_str(&rows[1][2])?, Decimal::ZERO);

    let (requests, unpriced, cost): (i64, i64, Decimal) = sqlx::query_as(
        "SELECT sum(requests)::bigint, sum(unpriced_requests)::bigint, sum(cost) FROM tally.spend_daily",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!((requests, unpriced), (70, 40));
    assert_eq!(
        cost.normalize(),
        (per_event * Decimal::from(30)).normalize()
    );
    let unpriced_violations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tally.violations WHERE rule = 'unpriced_model'")
            .fetch_one(&env.pool)
            .await?;
    assert!(
        unpriced_violations >= 1,
        "the unpriced usage raised a violation"
    );
    Ok(())
}
