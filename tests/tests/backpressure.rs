//! The consumer's backpressure (`Pipeline::gate_recv`): while a partition has a
//! batch running and two more buffered, no message is taken from the consumer;
//! a partition still full after `kafka.max_poll_interval_ms / 4` is paused, and
//! resumed when its batch ends (librdkafka then fetches again from where the
//! pipeline stopped taking messages). Reached with a failpoint that holds the
//! first batch before its commit, asserted from the log, and checked against the
//! generator's oracle in Postgres and every ClickHouse table. The offset of
//! record reaches Kafka too (the copy for lag tooling, sent when it moved and
//! at shutdown), read back by a client outside the group.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::time::Duration;
use tally_producers::{demo_world, GenConfig};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_batch_gates_then_pauses_its_partition_and_nothing_is_lost() -> anyhow::Result<()> {
    // One partition, batches of 100: full at 200 buffered behind the held batch.
    // The test environment's max_poll_interval_ms (10 s) pauses after 2.5 s.
    let env = test_env(
        "backpressure",
        1,
        &[("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "100")],
    )
    .await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(4, change);
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 3000, 93);
    gen.duplicates = 0.02;
    gen.start = change - ChronoDuration::hours(1);
    gen.span = ChronoDuration::hours(2);
    let msgs = generate(gen);
    produce(&env, &msgs, None).await?;
    let exp = expected(&msgs, &world);
    let mut child = env.spawn_tally_with(
        "run",
        &[("TALLY_FAILPOINTS", "before_commit=sleep(5000)@1")],
    )?;
    let waited = env
        .wait_handled(msgs.len() as i64, Duration::from_secs(120))
        .await;
    terminate(&mut child, Duration::from_secs(30))?;
    waited?;
    let log = log_plain(&env, "run");
    for line in [
        "failpoint before_commit fired",
        "a partition stayed full while its batch ran: pausing it",
    ] {
        assert!(
            log.contains(line),
            "`{line}` is missing from the log:\n{log}"
        );
    }
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");

    let record: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM tally.consumer_offsets WHERE group_id = $1 AND topic = $2 AND partition = 0",
    )
    .bind(&env.cfg.kafka.group_id)
    .bind(&env.cfg.kafka.usage_topic)
    .fetch_one(&env.pool)
    .await?;
    let (brokers, group, topic) = (
        env.cfg.kafka.brokers.clone(),
        env.cfg.kafka.group_id.clone(),
        env.cfg.kafka.usage_topic.clone(),
    );
    let copied = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let probe: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut ask = rdkafka::TopicPartitionList::new();
        ask.add_partition(&topic, 0);
        let back = probe.committed_offsets(ask, Duration::from_secs(10))?;
        Ok(back.find_partition(&topic, 0).map(|e| e.offset()))
    })
    .await??;
    assert_eq!(copied, Some(rdkafka::Offset::Offset(record)));
    Ok(())
}
