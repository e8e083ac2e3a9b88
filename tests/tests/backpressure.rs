//! The consumer's backpressure (`Pipeline::gate_recv`): while a partition has a
//! batch running and two more buffered, no message is taken from the consumer;
//! a partition still full after `kafka.max_poll_interval_ms / 4` is paused, and
//! resumed when its batch ends (librdkafka then fetches again from where the
//! pipeline stopped taking messages). Reached with a failpoint that holds the
//! first batch before its commit, asserted from the log, and checked against the
//! generator's oracle in Postgres and every ClickHouse table. The offset of
//! record reaches Kafka too (the copy for lag tooling, sent when it moved and
//! at shutdown), read back by a client outside the group.
//!
//! `pipeline.max_batches_in_flight` bounds the batches running at once across
//! partitions: with 1, a held batch stops every other partition's progress, and
//! the rest still arrives exactly once after it. `pipeline.buffer_max_bytes`
//! gates the consumer by the buffered messages' weight, below the two-batch
//! bound.

use std::time::Duration;
use tally_tests::*;

/// Seeds a world of `tenants` and produces `n` generated messages (`dups`
/// of them re-sends) of `seed` to the env's topic; returns them and the oracle.
async fn seeded_and_produced(
    env: &TestEnv,
    tenants: usize,
    n: u64,
    seed: u64,
    dups: f64,
) -> anyhow::Result<(Vec<tally_producers::GenMessage>, Expected)> {
    let (world, gen) = seeded_demo(env, tenants, n, seed, dups).await?;
    let msgs = generate(gen);
    produce(env, &msgs, None).await?;
    let exp = expected(&msgs, &world);
    Ok((msgs, exp))
}

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
    let (msgs, exp) = seeded_and_produced(&env, 4, 3000, 93, 0.02).await?;
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

/// Sum of the offsets of record of every partition of the env's topic.
async fn committed(env: &TestEnv) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM tally.consumer_offsets \
         WHERE group_id = $1 AND topic = $2",
    )
    .bind(&env.cfg.kafka.group_id)
    .bind(&env.cfg.kafka.usage_topic)
    .fetch_one(&env.pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_in_flight_holds_every_partition_while_it_runs() -> anyhow::Result<()> {
    // Four partitions with batches of 100, but one batch at a time: while the
    // first batch is held before its commit, no partition may commit anything.
    // (With 4 allowed, the other partitions commit 1,500 messages meanwhile.)
    let env = test_env(
        "inflight",
        4,
        &[
            ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "100"),
            ("TALLY__PIPELINE__MAX_BATCHES_IN_FLIGHT", "1"),
        ],
    )
    .await?;
    let (msgs, exp) = seeded_and_produced(&env, 8, 2000, 94, 0.02).await?;
    let mut child = env.spawn_tally_with(
        "run",
        &[("TALLY_FAILPOINTS", "before_commit=sleep(4000)@1")],
    )?;
    let fired = "failpoint before_commit fired";
    wait_log_line(&env, "run", fired, Duration::from_secs(60)).await?;
    // The held batch is the first; nothing is committed while it sleeps.
    let mut seen = Vec::new();
    for _ in 0..25 {
        seen.push(committed(&env).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = env
        .wait_handled(msgs.len() as i64, Duration::from_secs(120))
        .await;
    terminate(&mut child, Duration::from_secs(30))?;
    waited?;
    assert!(
        seen.iter().all(|&c| c == 0),
        "offsets of record moved while the only batch allowed was held: {seen:?}"
    );
    assert_eq!(committed(&env).await?, msgs.len() as i64);
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_gates_below_two_batches() -> anyhow::Result<()> {
    // Batches of 2,000, and about 3,000 messages left behind the held first
    // batch: fewer than the two batches (4,000) that fill a partition, but more
    // than the 1 MiB budget holds (a JSON message weighs about 700 bytes). Only
    // the budget can gate the consumer, and so pause the partition.
    let env = test_env(
        "bytebudget",
        1,
        &[
            ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "2000"),
            ("TALLY__PIPELINE__BUFFER_MAX_BYTES", "1048576"),
        ],
    )
    .await?;
    let (msgs, exp) = seeded_and_produced(&env, 4, 5000, 95, 0.02).await?;
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
    assert_eq!(committed(&env).await?, msgs.len() as i64);
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}
