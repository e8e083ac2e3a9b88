//! `tally gen --encoding confluent` registers the bundled schema of each stream it
//! sends under the topic's subject (`<topic>-value`, Confluent's TopicNameStrategy)
//! with the registry of `registry.url` (basic auth), and every message it sends
//! carries the id the registry returned, not an assumed 1; `tally run`, reading the
//! same registry, counts every event with no dead letter. Without a registry the
//! command warns and uses id 1.

use anyhow::{bail, Context};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;
use tally_schemas::{current_schema_text, CONFLUENT_MAGIC};
use tally_tests::registry::registering_registry;
use tally_tests::streams::wait_idle;
use tally_tests::*;

const USER: &str = "gen-user";
const PASSWORD: &str = "gen-secret-3f9a";

/// Runs `tally gen` in the test's namespace plus `extra`; returns (stdout, stderr).
fn tally_gen(
    env: &TestEnv,
    extra: &[(&str, &str)],
    args: &[&str],
) -> anyhow::Result<(String, String)> {
    let mut cmd = Command::new(tally_binary()?);
    cmd.arg("gen").args(args);
    for (k, v) in &env.env {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().context("run tally gen")?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    if !out.status.success() {
        bail!("tally gen {args:?} failed ({}): {stderr}", out.status);
    }
    Ok((stdout, stderr))
}

/// The schema id of every Confluent-framed message on `topic` (count per id), and
/// how many messages were not Confluent-framed.
fn ids_on(
    env: &TestEnv,
    topic: &str,
    at_least: usize,
) -> anyhow::Result<(BTreeMap<u32, usize>, usize)> {
    let mut ids = BTreeMap::new();
    let mut other = 0;
    for m in read_topic(
        &env.cfg.kafka.brokers,
        topic,
        at_least,
        Duration::from_secs(30),
    )? {
        match m.payload.split_first() {
            Some((&CONFLUENT_MAGIC, rest)) if rest.len() >= 4 => {
                let id = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                *ids.entry(id).or_default() += 1;
            }
            _ => other += 1,
        }
    }
    Ok((ids, other))
}

#[tokio::test(flavor = "multi_thread")]
async fn gen_confluent_registers_its_schemas_and_tally_decodes_them() -> anyhow::Result<()> {
    let env = test_env(
        "gen_confluent",
        2,
        &[
            ("TALLY__STREAMS__POLICY", "true"),
            ("TALLY__STREAMS__AUDIT", "true"),
        ],
    )
    .await?;
    let registry = registering_registry(101, Some((USER, PASSWORD))).await?;
    let with_registry = [
        ("TALLY__REGISTRY__URL", registry.url.as_str()),
        ("TALLY__REGISTRY__USERNAME", USER),
        ("TALLY__REGISTRY__PASSWORD", PASSWORD),
    ];
    let count = 40;
    let (stdout, stderr) = tally_gen(
        &env,
        &with_registry,
        &[
            "--stream",
            "all",
            "--encoding",
            "confluent",
            "--count",
            "40",
            "--seed",
            "7",
            "--duplicates",
            "0",
            "--late",
            "0",
            "--malformed",
            "0",
            "--opa-share",
            "0",
        ],
    )?;
    eprintln!("{stdout}{stderr}");
    assert!(
        !stderr.contains(PASSWORD),
        "the password reached the output"
    );

    // One registration per stream, under <topic>-value, of the bundled schema.
    let c = &env.cfg;
    let streams = [
        (&c.kafka.usage_topic, "llm.usage.v1"),
        (&c.policy.topic, "policy.decision.v1"),
        (&c.audit.topic, "audit.event.v1"),
    ];
    let registered = registry.registrations();
    assert_eq!(registered.len(), 3, "{registered:?}");
    let mut assigned = BTreeSet::new();
    for (topic, subject) in streams {
        let r = registered
            .iter()
            .find(|r| r.subject == format!("{topic}-value"))
            .with_context(|| format!("no registration for {topic}-value: {registered:?}"))?;
        assert_eq!(Some(r.schema.as_str()), current_schema_text(subject));
        assert!(r.id >= 101, "an id the registry assigned: {r:?}");
        assigned.insert(r.id);
        // Every message of the stream carries that id.
        let (ids, other) = ids_on(&env, topic, count)?;
        assert_eq!(
            (ids, other),
            (BTreeMap::from([(r.id, count)]), 0),
            "{topic}: schema ids of its messages"
        );
        assert!(
            stderr.contains(&format!("schema id {}", r.id)),
            "gen names the id: {stderr}"
        );
    }
    assert_eq!(assigned.len(), 3, "three schemas, three ids");

    // tally, reading the same registry, counts every event and dead-letters none.
    let mut tally = env.spawn_tally_with("run", &with_registry)?;
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    terminate(&mut tally, Duration::from_secs(30))?;
    idle?;
    let dead: Vec<(String, String)> =
        sqlx::query_as("SELECT topic, error_class FROM tally.dead_letters")
            .fetch_all(&env.pool)
            .await?;
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    let db = &c.clickhouse.database;
    for table in ["usage_events", "policy_decisions", "audit_events"] {
        let sql = format!("SELECT count() FROM {db}.{table} FORMAT TabSeparated");
        let rows: usize = ch_query(&c.clickhouse.url, &sql).await?.trim().parse()?;
        assert_eq!(rows, count, "{table}");
    }

    // Registering again (a second gen) returns the same ids: nothing new registered.
    tally_gen(
        &env,
        &with_registry,
        &[
            "--stream",
            "usage",
            "--encoding",
            "confluent",
            "--count",
            "1",
            "--malformed",
            "0",
        ],
    )?;
    let again = registry.registrations();
    assert_eq!(again.len(), 4);
    assert!(assigned.contains(&again[3].id), "{again:?}");

    // Without a registry: a warning, and id 1.
    let (_, stderr) = tally_gen(
        &env,
        &[],
        &[
            "--stream",
            "policy",
            "--encoding",
            "confluent",
            "--count",
            "3",
            "--malformed",
            "0",
            "--opa-share",
            "0",
            "--topic",
            &c.kafka.dlq_topic,
        ],
    )?;
    assert!(
        stderr.contains("warning") && stderr.contains("registry.url"),
        "{stderr}"
    );
    let (ids, _) = ids_on(&env, &c.kafka.dlq_topic, 3)?;
    assert_eq!(ids.get(&1), Some(&3), "{ids:?}");
    Ok(())
}
