//! A topic deleted and created again while tally has an offset of record on
//! it: tally must stop with a clear message instead of skipping the new
//! topic's messages as already counted; `tally reset-offsets` then lets it
//! consume them, abandoning the pending batch of the old topic (ClickHouse rows
//! and claimed ids included); dead letters of both incarnations are kept.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::process::Command;
use std::time::{Duration, Instant};
use tally_producers::{demo_world, Encoding, GenConfig, GenMessage, World};
use tally_tests::*;

fn gen(world: &World, count: u64, seed: u64) -> Vec<GenMessage> {
    let change = Utc::now()
        .duration_trunc(ChronoDuration::hours(1))
        .expect("hour")
        - ChronoDuration::hours(1);
    let mut g = GenConfig::new(world.clone(), count, seed);
    g.encoding = Encoding::Mixed;
    g.malformed = 0.02;
    g.start = change - ChronoDuration::hours(1);
    g.span = ChronoDuration::hours(2);
    generate(g)
}

fn tally(env: &TestEnv, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let mut cmd = Command::new(tally_binary()?);
    cmd.args(args);
    for (k, v) in &env.env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Whether the broker lists `topic` (with partitions).
fn topic_exists(brokers: &str, topic: &str) -> anyhow::Result<bool> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    Ok(md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
}

/// Deletes `topic` and creates it again with `partitions` partitions.
async fn recreate_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    for r in admin.delete_topics(&[topic], &opts).await? {
        if let Err((t, e)) = r {
            anyhow::bail!("delete topic {t}: {e} (the broker may not support DeleteTopics)");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while topic_exists(brokers, topic)? {
        if Instant::now() > deadline {
            anyhow::bail!("topic {topic} still listed 30 s after its deletion");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        let r = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &opts,
            )
            .await?;
        match r.into_iter().next() {
            Some(Ok(_)) => return Ok(()),
            Some(Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => anyhow::bail!("create topic {topic}: {other:?}"),
        }
    }
}

async fn scalar(env: &TestEnv, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&env.pool)
        .await?)
}

async fn ch_count(env: &TestEnv, table: &str, batch_id: i64) -> anyhow::Result<i64> {
    let text = ch_query(
        &env.cfg.clickhouse.url,
        &format!(
            "SELECT count() FROM {}.{table} WHERE batch_id = {batch_id}",
            env.cfg.clickhouse.database
        ),
    )
    .await?;
    Ok(text.trim().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreated_topic_stops_tally_until_reset_offsets_then_counts_exactly() -> anyhow::Result<()>
{
    let env = test_env(
        "recreate",
        1,
        &[
            ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "1000"),
            // static membership: noida-db never expires a member killed by abort
            ("TALLY__KAFKA__INSTANCE_ID", "recreate-instance"),
        ],
    )
    .await?;
    let topic = env.cfg.kafka.usage_topic.clone();
    let brokers = env.cfg.kafka.brokers.clone();
    let change = Utc::now()
        .duration_trunc(ChronoDuration::hours(1))
        .expect("hour")
        - ChronoDuration::hours(1);
    let world = demo_world(12, change);
    env.seed(&world).await?;

    // Old incarnation: 3000 messages counted, then a batch left pending with
    // its rows in ClickHouse (killed after the ClickHouse step).
    let a = gen(&world, 3_000, 41);
    produce(&env, &a, None).await?;
    let mut child = env.spawn_tally("first")?;
    let caught_up = env.wait_handled(3_000, Duration::from_secs(120)).await;
    terminate(&mut child, Duration::from_secs(30))?;
    caught_up?;
    let a2 = gen(&world, 300, 42);
    produce(&env, &a2, None).await?;
    let mut armed_env = env.env.clone();
    armed_env.push(("TALLY_FAILPOINTS".into(), "after_clickhouse=abort@1".into()));
    let armed = TestEnv {
        name: env.name.clone(),
        cfg: env.cfg.clone(),
        env: armed_env,
        pool: env.pool.clone(),
    };
    let mut child = armed.spawn_tally("pending")?;
    let status = wait_exit_or_kill(&mut child, Duration::from_secs(120))?;
    assert!(!status.success());
    assert!(log_plain(&env, "pending").contains("failpoint after_clickhouse fired"));
    let (pending_id, pending_first): (i64, i64) =
        sqlx::query_as("SELECT batch_id, first_offset FROM tally.batches WHERE state = 'pending'")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(pending_first, 3_000);
    assert!(ch_count(&env, "usage_events", pending_id).await? > 0);
    let claimed_sql =
        format!("SELECT count(*) FROM tally.seen_events WHERE batch_id = {pending_id}");
    assert!(scalar(&env, &claimed_sql).await? > 0);

    // The topic is deleted and created again; its first 1000 messages are a
    // copy of the old topic's first 1000 (so poison lands at the same offsets).
    recreate_topic(&brokers, &topic, 1).await?;
    let b1 = a[..1_000].to_vec();
    produce(&env, &b1, None).await?;

    // tally refuses: exit 1, naming partition, offsets and the command.
    let mut child = env.spawn_tally("refused")?;
    let status = wait_exit_or_kill(&mut child, Duration::from_secs(60));
    let log = log_plain(&env, "refused");
    let status = status.map_err(|e| anyhow::anyhow!("{e}\n{log}"))?;
    assert_eq!(status.code(), Some(1), "{log}");
    for needle in [
        format!("topic {topic} partition 0"),
        "offset of record is 3000".to_string(),
        format!("pending batch {pending_id} covers offsets 3000..="),
        "ends at offset 1000".to_string(),
        format!("tally reset-offsets --topic {topic} --partition 0 --to earliest --yes"),
    ] {
        assert!(log.contains(&needle), "`{needle}` not in:\n{log}");
    }
    let offsets_sql = "SELECT next_offset FROM tally.consumer_offsets";
    assert_eq!(scalar(&env, offsets_sql).await?, 3_000, "nothing moved");

    // A dry run changes nothing.
    let (code, out, err) = tally(
        &env,
        &["reset-offsets", "--topic", &topic, "--to", "earliest"],
    )?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("dry run") && out.contains(&format!("pending batch {pending_id}")),
        "{out}"
    );
    assert_eq!(scalar(&env, offsets_sql).await?, 3_000);

    let (code, out, err) = tally(
        &env,
        &[
            "reset-offsets",
            "--topic",
            &topic,
            "--to",
            "earliest",
            "--yes",
        ],
    )?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    eprintln!("reset-offsets:\n{out}");
    assert!(out.contains("partition 0: 3000 -> 0"), "{out}");
    assert!(
        out.contains("done: 1 offsets of record set, 1 pending batches abandoned"),
        "{out}"
    );
    assert_eq!(scalar(&env, offsets_sql).await?, 0);
    assert_eq!(
        scalar(
            &env,
            "SELECT count(*) FROM tally.batches WHERE state = 'pending'"
        )
        .await?,
        0
    );
    assert_eq!(scalar(&env, &claimed_sql).await?, 0, "claimed ids released");
    for table in ["usage_events", "usage_1m", "usage_1h", "usage_1d"] {
        assert_eq!(
            ch_count(&env, table, pending_id).await?,
            0,
            "{table} rows deleted"
        );
    }
    assert_eq!(
        scalar(&env, "SELECT epoch::bigint FROM tally.topic_epochs").await?,
        1
    );

    // The producers go on: the abandoned batch's messages are sent again
    // (they were never counted), then new ones.
    let c = gen(&world, 500, 43);
    let mut b2 = a2.clone();
    b2.extend(c.iter().cloned());
    produce(&env, &b2, None).await?;
    let mut child = env.spawn_tally("after")?;
    let caught_up = env
        .wait_handled((b1.len() + b2.len()) as i64, Duration::from_secs(120))
        .await;
    terminate(&mut child, Duration::from_secs(30))?;
    caught_up?;

    let mut all = a.clone();
    all.extend(b1.iter().cloned());
    all.extend(b2.iter().cloned());
    let exp = expected(&all, &world);
    let problems = check_totals(&env, &exp).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    let malformed = |m: &[GenMessage]| {
        m.iter()
            .filter(|m| matches!(m.kind, tally_producers::GenKind::Malformed { .. }))
            .count() as i64
    };
    let by_epoch =
        |e: i32| format!("SELECT count(*) FROM tally.dead_letters WHERE topic_epoch = {e}");
    assert_eq!(scalar(&env, &by_epoch(0)).await?, malformed(&a));
    assert_eq!(
        scalar(&env, &by_epoch(1)).await?,
        malformed(&b1) + malformed(&b2)
    );
    let shared = scalar(
        &env,
        "SELECT count(*) FROM tally.dead_letters o JOIN tally.dead_letters n \
         ON o.topic = n.topic AND o.partition = n.partition AND o.\"offset\" = n.\"offset\" \
         WHERE o.topic_epoch = 0 AND n.topic_epoch = 1",
    )
    .await?;
    assert!(
        shared > 0,
        "test setup: no dead letter offsets shared by the two incarnations"
    );
    Ok(())
}

/// The same with tally running while the topic is deleted and created again:
/// it must notice (the partition is taken again, or its stream jumps back)
/// and stop, not drop the new messages below its old offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_recreated_under_a_running_tally_stops_it() -> anyhow::Result<()> {
    let env = test_env(
        "recreaterun",
        1,
        &[("TALLY__KAFKA__INSTANCE_ID", "recreaterun-instance")],
    )
    .await?;
    let topic = env.cfg.kafka.usage_topic.clone();
    let change = Utc::now()
        .duration_trunc(ChronoDuration::hours(1))
        .expect("hour")
        - ChronoDuration::hours(1);
    let world = demo_world(12, change);
    env.seed(&world).await?;
    let a = gen(&world, 2_000, 51);
    produce(&env, &a, None).await?;
    let mut child = env.spawn_tally("running")?;
    if let Err(e) = env.wait_handled(2_000, Duration::from_secs(120)).await {
        kill9(&mut child);
        return Err(e);
    }
    recreate_topic(&env.cfg.kafka.brokers, &topic, 1).await?;
    let b = gen(&world, 600, 52);
    produce(&env, &b, None).await?;
    let status = wait_exit_or_kill(&mut child, Duration::from_secs(90));
    let log = log_plain(&env, "running");
    let status = status.map_err(|e| anyhow::anyhow!("{e}\n{log}"))?;
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "topic {topic} partition 0: the offset of record is 2000"
        )) && log.contains("tally reset-offsets --topic"),
        "{log}"
    );
    assert_eq!(
        scalar(&env, "SELECT next_offset FROM tally.consumer_offsets").await?,
        2_000,
        "nothing of the new topic was taken for counted"
    );

    let (code, out, err) = tally(
        &env,
        &[
            "reset-offsets",
            "--topic",
            &topic,
            "--partition",
            "0",
            "--to",
            "earliest",
            "--yes",
        ],
    )?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let mut child = env.spawn_tally("after")?;
    let caught_up = env.wait_handled(600, Duration::from_secs(120)).await;
    terminate(&mut child, Duration::from_secs(30))?;
    caught_up?;
    let mut all = a.clone();
    all.extend(b.iter().cloned());
    let problems = check_totals(&env, &expected(&all, &world)).await?;
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}
