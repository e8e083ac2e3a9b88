//! Upstream producers compress: usage events produced with zstd, lz4, gzip and
//! snappy batches (librdkafka built with zstd) are all counted exactly, checked
//! against the generator's oracle in Postgres and every ClickHouse table.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::time::Duration;
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_upstream_batches_are_counted_exactly() -> anyhow::Result<()> {
    let env = test_env("compressed", 2, &[]).await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(5, change);
    env.seed(&world).await?;
    let mut all = Vec::new();
    for (i, codec) in ["zstd", "lz4", "gzip", "snappy"].into_iter().enumerate() {
        let mut gen = GenConfig::new(world.clone(), 800, 70 + i as u64);
        gen.encoding = Encoding::Mixed;
        gen.duplicates = 0.02;
        gen.malformed = 0.01;
        gen.start = change - ChronoDuration::hours(1);
        gen.span = ChronoDuration::hours(2);
        let msgs = generate(gen);
        let mut connection = tally_producers::connection(&env.cfg.kafka.brokers);
        connection.set("compression.type", codec);
        let report = tally_producers::produce(
            &connection,
            &env.cfg.kafka.usage_topic,
            msgs.iter().cloned(),
            None,
            false,
        )
        .await?;
        assert_eq!(report.sent as usize, msgs.len(), "{codec}");
        all.extend(msgs);
    }
    let exp = expected(&all, &world);
    let mut child = env.spawn_tally("compressed")?;
    let waited = env
        .wait_handled(all.len() as i64, Duration::from_secs(120))
        .await;
    let _ = terminate(&mut child, Duration::from_secs(30));
    waited?;
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}

/// `clickhouse.compression = "none"`: inserts travel uncompressed and every
/// row still lands exactly (raw table, rollups and Postgres against the oracle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncompressed_clickhouse_inserts_are_counted_exactly() -> anyhow::Result<()> {
    let env = test_env("chplain", 2, &[("TALLY__CLICKHOUSE__COMPRESSION", "none")]).await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(5, change);
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 1500, 77);
    gen.start = change - ChronoDuration::hours(1);
    gen.span = ChronoDuration::hours(2);
    let msgs = generate(gen);
    produce(&env, &msgs, None).await?;
    let exp = expected(&msgs, &world);
    let mut child = env.spawn_tally("run")?;
    let waited = env
        .wait_handled(msgs.len() as i64, Duration::from_secs(120))
        .await;
    let _ = terminate(&mut child, Duration::from_secs(30));
    waited?;
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}
