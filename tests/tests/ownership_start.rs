//! Where counting starts when a partition is taken: at the offset of record,
//! or at the partition's low watermark when it has none yet, never at the
//! consumer's own position. After a lost ownership (or a revoke and
//! re-assignment) librdkafka goes on from past the messages this instance had
//! buffered and dropped; a partition whose first batch had not committed then
//! stalled until new traffic came, and lost everything before it (seen in the rebalance test with two batches in flight:
//! offsets 0..1999 of one partition were never counted).
//!
//! Reached deterministically: a failpoint holds the first batch before its
//! claim while more messages are buffered, and the test takes the partition's
//! ownership epoch away (as a takeover would), so the claim fails with
//! LostOwnership and the pipeline takes the partition again. Checked against
//! the generator's oracle in Postgres and every ClickHouse table.

use std::time::Duration;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_without_offset_of_record_is_retaken_at_its_start() -> anyhow::Result<()> {
    // One partition, batches of 100: the held first batch is 0..99 and the
    // pipeline buffers (and librdkafka delivers) well past it meanwhile.
    let env = test_env(
        "ownstart",
        1,
        &[("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "100")],
    )
    .await?;
    let (world, mut gen) = seeded_demo(&env, 4, 2000, 57, 0.02).await?;
    let mut msgs = generate(gen.clone());
    produce(&env, &msgs, None).await?;

    let mut child =
        env.spawn_tally_with("run", &[("TALLY_FAILPOINTS", "before_claim=sleep(3000)@1")])?;
    let fired = "failpoint before_claim fired";
    wait_log_line(&env, "run", fired, Duration::from_secs(60)).await?;
    // A takeover: the partition's epoch moves on while the first batch waits.
    let moved = sqlx::query(
        "UPDATE tally.partition_owners SET epoch = epoch + 1 \
         WHERE group_id = $1 AND topic = $2 AND partition = 0",
    )
    .bind(&env.cfg.kafka.group_id)
    .bind(&env.cfg.kafka.usage_topic)
    .execute(&env.pool)
    .await?;
    assert_eq!(moved.rows_affected(), 1, "no epoch row to move");
    // Traffic after the takeover: taken from the consumer's position, these
    // would be counted and everything before them skipped.
    gen.seed = 58;
    gen.count = 500;
    let more = generate(gen);
    produce(&env, &more, None).await?;
    msgs.extend(more);
    let exp = expected(&msgs, &world);

    let waited = env
        .wait_handled(msgs.len() as i64, Duration::from_secs(120))
        .await;
    terminate(&mut child, Duration::from_secs(30))?;
    waited?;
    let log = log_plain(&env, "run");
    assert!(
        log.contains("lost ownership; re-reading partition state"),
        "the claim did not lose ownership:\n{log}"
    );
    let first: Option<i64> = sqlx::query_scalar(
        "SELECT min(first_offset) FROM tally.batches WHERE group_id = $1 AND topic = $2",
    )
    .bind(&env.cfg.kafka.group_id)
    .bind(&env.cfg.kafka.usage_topic)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(
        first,
        Some(0),
        "counting did not start at the partition's start"
    );
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}
