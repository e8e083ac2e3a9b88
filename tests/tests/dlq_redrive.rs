//! `tally dlq redrive` against the real broker, ClickHouse and Postgres: events
//! dead-lettered for a reason that can be fixed (a Confluent schema id the
//! registry did not have yet; OPA events whose tenant the `[opa]` mapping did not
//! find) are counted exactly once after the fix and a redrive, re-sends among
//! them included; a second run re-produces nothing; a run killed between
//! producing and recording is finished by the next one without producing twice.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_producers::{demo_world, Encoding, GenConfig, GenKind, GenMessage, World};
use tally_tests::opa::*;
use tally_tests::streams::{produce_to, wait_idle, Kind, Msg};
use tally_tests::*;

/// A schema registry whose schemas can be added while it runs (`GET /schemas/ids/{id}`).
async fn registry() -> anyhow::Result<(String, Arc<Mutex<HashMap<u32, String>>>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let schemas: Arc<Mutex<HashMap<u32, String>>> = Arc::default();
    let known = schemas.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let known = known.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let id = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.strip_prefix("/schemas/ids/"))
                    .and_then(|s| s.parse::<u32>().ok());
                let schema = id.and_then(|i| known.lock().ok()?.get(&i).cloned());
                let (status, body) = match schema {
                    Some(s) => ("200 OK", serde_json::json!({ "schema": s }).to_string()),
                    None => ("404 Not Found", r#"{"error_code":40403}"#.to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok((url, schemas))
}

fn world_and_config(count: u64, seed: u64) -> (World, GenConfig) {
    let change = Utc::now()
        .duration_trunc(ChronoDuration::hours(1))
        .expect("hour")
        - ChronoDuration::hours(1);
    let world = demo_world(12, change);
    let mut g = GenConfig::new(world.clone(), count, seed);
    g.duplicates = 0.05;
    g.start = change - ChronoDuration::hours(1);
    g.span = ChronoDuration::hours(2);
    (world, g)
}

/// `tally dlq redrive <args>`: its stdout, or an error with its stderr.
fn redrive(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut all = vec!["dlq", "redrive"];
    all.extend_from_slice(args);
    let out = env.run_command(&all, extra)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "tally {all:?} failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ tally {}\n{stdout}", all.join(" "));
    Ok(stdout)
}

/// The number after `prefix` on the report line starting with it.
fn figure(report: &str, prefix: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no `{prefix}` in:\n{report}"))
}

async fn dead_letters(env: &TestEnv, topic: &str) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT error_class, count(*) FROM tally.dead_letters WHERE topic = $1 GROUP BY 1",
    )
    .bind(topic)
    .fetch_all(&env.pool)
    .await?;
    Ok(rows.into_iter().collect())
}

async fn usage_problems(env: &TestEnv, exp: &Expected) -> anyhow::Result<Vec<String>> {
    let mut problems = diff(
        "postgres spend_daily",
        &exp.totals,
        &pg_totals(&env.pool).await?,
    );
    for table in ["usage_events", "usage_1m", "usage_1h", "usage_1d"] {
        problems.extend(diff(
            &format!("clickhouse {table}"),
            &exp.totals,
            &ch_totals(env, table).await?,
        ));
    }
    Ok(problems)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_events_of_an_unregistered_schema_count_once_after_registration_and_redrive(
) -> anyhow::Result<()> {
    const LATE_ID: u32 = 9;
    let (url, schemas) = registry().await?;
    let env = test_env(
        "redrive_usage",
        2,
        &[("TALLY__REGISTRY__URL", url.as_str())],
    )
    .await?;
    let (world, mut g) = world_and_config(900, 1);
    env.seed(&world).await?;
    g.encoding = Encoding::Mixed;
    g.malformed = 0.04;
    let counted = generate(g.clone());
    // Events of an emitter that switched to a schema id not registered yet.
    g.seed = 2;
    g.count = 300;
    g.malformed = 0.0;
    g.encoding = Encoding::Confluent;
    g.confluent_schema_id = LATE_ID;
    let late = generate(g);
    // And re-sends, under that id, of events already counted.
    let resent: Vec<GenMessage> = counted
        .iter()
        .filter(|m| m.kind == GenKind::Good)
        .take(40)
        .map(|m| {
            let e = m.event.clone().expect("good event");
            GenMessage {
                key: m.key.clone(),
                payload: tally_schemas::encode_confluent(&e, LATE_ID),
                kind: GenKind::Duplicate,
                event: Some(e),
            }
        })
        .collect();
    let first: Vec<GenMessage> = counted
        .iter()
        .chain(&late)
        .chain(&resent)
        .cloned()
        .collect();
    produce(&env, &first, None).await?;
    let mut run = TallyProcess(env.spawn_tally("run")?);
    env.wait_handled(first.len() as i64, Duration::from_secs(120))
        .await?;

    let before = expected(&counted, &world);
    let problems = usage_problems(&env, &before).await?;
    assert!(problems.is_empty(), "before the redrive: {problems:#?}");
    let unregistered = before
        .malformed
        .get("unknown_schema_id")
        .copied()
        .unwrap_or(0) as i64;
    let dead = dead_letters(&env, &env.cfg.kafka.usage_topic).await?;
    let waiting = (late.len() + resent.len()) as i64;
    assert_eq!(
        dead["unknown_schema_id"],
        waiting + unregistered,
        "{dead:?}"
    );
    let dead_before: i64 = dead.values().sum();

    // The fix: the schema is registered. A dry run first changes nothing.
    let schema = tally_schemas::current_schema_text("llm.usage.v1").expect("schema");
    schemas
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .insert(LATE_ID, schema.to_string());
    let args = ["--stream", "usage", "--class", "unknown_schema_id"];
    let dry = redrive(&env, &[&args[..], &["--dry-run"]].concat(), &[])?;
    assert_eq!(
        figure(&dry, "would produce"),
        (waiting + unregistered) as u64,
        "{dry}"
    );
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.dlq_redrive_runs")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(runs, 0, "a dry run records nothing");

    let report = redrive(&env, &args, &[])?;
    let produced = figure(&report, "produced");
    assert_eq!(produced, (waiting + unregistered) as u64, "{report}");
    env.wait_handled(
        first.len() as i64 + produced as i64,
        Duration::from_secs(120),
    )
    .await?;
    // Every event counted once: the late ones now, the re-sends as duplicates.
    let all: Vec<GenMessage> = counted
        .iter()
        .chain(&late)
        .chain(&resent)
        .cloned()
        .collect();
    let after = expected(&all, &world);
    assert!(after.totals != before.totals, "the redrive must add spend");
    let problems = usage_problems(&env, &after).await?;
    assert!(problems.is_empty(), "after the redrive: {problems:#?}");
    // Letters of a schema id still unknown are dead-lettered again, once each.
    let dead = dead_letters(&env, &env.cfg.kafka.usage_topic).await?;
    assert_eq!(
        dead.values().sum::<i64>(),
        dead_before + unregistered,
        "{dead:?}"
    );

    // A second run: nothing re-produced, the ones that failed again named.
    let again = redrive(&env, &args, &[])?;
    assert_eq!(figure(&again, "produced"), 0, "{again}");
    assert!(
        again.contains(&format!(
            "skipped {unregistered}: redriven before and dead-lettered again"
        )) || unregistered == 0,
        "{again}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.handled().await?, first.len() as i64 + produced as i64);
    let problems = usage_problems(&env, &after).await?;
    assert!(problems.is_empty(), "after the second run: {problems:#?}");
    terminate(&mut run.0, Duration::from_secs(30))?;
    Ok(())
}

/// The events as an emitter keying by tenant sends them.
fn msgs(events: &[OpaEvent]) -> Vec<Msg> {
    events
        .iter()
        .map(|e| Msg {
            key: e.owner.clone(),
            payload: e.json.clone().into_bytes(),
            kind: Kind::Poison,
        })
        .collect()
}

/// The redriven messages on the policy topic, by the letter they came from.
fn redriven_on_topic(env: &TestEnv, at_least: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for m in read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.policy.topic,
        at_least,
        Duration::from_secs(20),
    )? {
        if let Some(id) = m.headers.get("tally.redrive.dlq") {
            *out.entry(id.clone()).or_insert(0) += 1;
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opa_events_the_mapping_missed_count_once_after_the_fix_even_across_a_crashed_redrive(
) -> anyhow::Result<()> {
    let env = test_env(
        "redrive_policy",
        2,
        &[
            ("TALLY__STREAMS__POLICY", "true"),
            ("TALLY__STREAMS__USAGE", "false"),
            ("TALLY__STREAMS__AUDIT", "false"),
        ],
    )
    .await?;
    let good = opa_events("ok", 150, TenantAt::TenantId);
    // A fleet of OPAs whose policy input now names the tenant `org_id`.
    let moved = opa_events("org", 120, TenantAt::OrgId);
    let mut traffic = msgs(&good);
    traffic.extend(msgs(&moved));
    traffic.extend(msgs(&moved[..20])); // OPA re-sent a chunk
    traffic.extend((0..10).map(|i| Msg {
        key: "t-acme".into(),
        payload: format!("{{\"decision_id\": {i}").into_bytes(),
        kind: Kind::Poison,
    }));
    produce_to(&env, &env.cfg.policy.topic, &traffic).await?;
    let mut run = TallyProcess(env.spawn_tally("run")?);
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    terminate(&mut run.0, Duration::from_secs(30))?;
    idle?;
    assert_eq!(decision_rows(&env).await?, expected_rows(&good));
    let dead = dead_letters(&env, &env.cfg.policy.topic).await?;
    let want: BTreeMap<String, i64> = [
        ("invalid_json".into(), 10),
        ("opa_missing_tenant".into(), 140),
    ]
    .into();
    assert_eq!(dead, want);

    // The fix: the mapping reads the tenant where those OPAs put it now.
    let fixed = [("TALLY__OPA__TENANT", "/input/org_id")];
    let mut run = TallyProcess(env.spawn_tally_with("fixed", &fixed)?);
    let args = [
        "--stream",
        "policy",
        "--class",
        "opa_missing_tenant",
        "--batch",
        "50",
        "--timeout-ms",
        "2000",
    ];
    // Killed after its second round was produced, before it was recorded.
    let out = env.run_command(
        &[&["dlq", "redrive"][..], &args].concat(),
        &[("TALLY_FAILPOINTS", "redrive_after_produce=abort@2")],
    )?;
    assert!(!out.status.success(), "the failpoint must kill the run");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failpoint redrive_after_produce fired"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tally.dlq_redrives WHERE state = 'sending'")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(sending, 50, "the second round is produced but not recorded");

    // The next run finds that round on the topic, records it, and produces the rest.
    let report = redrive(&env, &args, &[])?;
    assert!(
        report.contains("interrupted earlier run: 50 sends found"),
        "{report}"
    );
    assert_eq!(figure(&report, "produced"), 40, "{report}");
    let on_topic = redriven_on_topic(&env, traffic.len() + 140)?;
    assert_eq!(on_topic.len(), 140, "every letter redriven");
    assert!(
        on_topic.values().all(|n| *n == 1),
        "a letter on the topic twice: {on_topic:?}"
    );

    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    idle?;
    let want_rows = expected_rows(good.iter().chain(&moved));
    assert_eq!(decision_rows(&env).await?, want_rows);
    assert_eq!(
        dead_letters(&env, &env.cfg.policy.topic).await?,
        want,
        "no new dead letters"
    );

    // Again: nothing re-produced. With --again everything is, and the pipeline
    // drops every copy as a duplicate.
    let report = redrive(&env, &args, &[])?;
    assert_eq!(figure(&report, "produced"), 0, "{report}");
    assert!(report.contains("skipped 140: redriven before"), "{report}");
    // Narrower selections (dry runs): past every partition's end, after every letter.
    let past_end = redrive(
        &env,
        &[&args[..], &["--from-offset", "1000000", "--dry-run"]].concat(),
        &[],
    )?;
    assert_eq!(figure(&past_end, "scanned"), 0, "{past_end}");
    let later = (Utc::now() + ChronoDuration::minutes(5)).to_rfc3339();
    let later = redrive(
        &env,
        &[&args[..], &["--since", &later, "--again", "--dry-run"]].concat(),
        &[],
    )?;
    assert!(
        later.contains("skipped 140: dead-lettered before --since"),
        "{later}"
    );
    let report = redrive(&env, &[&args[..], &["--again"]].concat(), &[])?;
    assert_eq!(figure(&report, "produced"), 140, "{report}");
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    terminate(&mut run.0, Duration::from_secs(30))?;
    idle?;
    assert_eq!(
        decision_rows(&env).await?,
        want_rows,
        "--again counted nothing twice"
    );
    assert_eq!(dead_letters(&env, &env.cfg.policy.topic).await?, want);
    Ok(())
}
