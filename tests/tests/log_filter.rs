//! tally's own log lines survive the default `TALLY_LOG` filter
//! (`info,sqlx=warn,librdkafka=warn`). With the filter set on the log layer
//! alone, each librdkafka log record it dropped swallowed the next event on
//! that thread (tokio-rs/tracing#2519): `consuming ...` at start and the
//! `tally run stopped` line with the run's counters were lost.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::time::Duration;
use tally_producers::{demo_world, GenConfig};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_log_filter_keeps_tallys_own_lines() -> anyhow::Result<()> {
    let env = test_env("log_filter", 2, &[]).await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(3, change);
    env.seed(&world).await?;
    let msgs = generate(GenConfig::new(world.clone(), 300, 91));
    produce(&env, &msgs, None).await?;
    let mut child =
        env.spawn_tally_with("run", &[("TALLY_LOG", "info,sqlx=warn,librdkafka=warn")])?;
    let waited = env
        .wait_handled(msgs.len() as i64, Duration::from_secs(90))
        .await;
    terminate(&mut child, Duration::from_secs(30))?;
    waited?;
    let log = log_plain(&env, "run");
    for line in [
        "consuming",
        "tally run stopped",
        "tally_messages_consumed_total",
    ] {
        assert!(
            log.contains(line),
            "`{line}` is missing from the log:\n{log}"
        );
    }
    Ok(())
}
