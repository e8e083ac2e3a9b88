//! The policy-decision and audit-event streams on the real broker, ClickHouse
//! and Postgres, beside the usage stream: exact rows and rollups, each
//! violation once, personal identifiers never stored, and every tenant's
//! Merkle log identical to one rebuilt from the produced events; then crashes
//! at the named failpoints with the audit stream running, and the logs neither
//! fork nor renumber.

use chrono::{Duration as ChronoDuration, DurationRound, Utc};
use std::collections::BTreeMap;
use std::time::Duration;
use tally::audit::checkpoint::Checkpoint;
use tally::audit::leaf::{AuditLeaf, FieldLimits};
use tally::audit::merkle;
use tally::audit::note::{self, NoteVerifier};
use tally::audit::pseudonym::PseudonymKey;
use tally_producers::{demo_world, Encoding, GenConfig};
use tally_schemas::AuditEvent;
use tally_tests::streams::*;
use tally_tests::*;

const RULES: &str = r#"
[policy]
rules = { deny_rate = { threshold = 20, window_secs = 300 } }
[audit]
rules = { privileged_action = { actions = [{ action = "role.grant", severity = "high" }] }, failed_action_burst = { at_least = 5, window_secs = 300 } }
"#;

/// Actors that may read personal data (any resource type) in the test world.
const GRANTED: [(&str, &str); 2] = [("t-acme", "user0@example.com"), ("t-globex", "svc-billing")];

async fn streams_env(name: &str, extra: &[(&str, &str)]) -> anyhow::Result<(TestEnv, String)> {
    let mut all = vec![
        ("TALLY__STREAMS__POLICY", "true"),
        ("TALLY__STREAMS__AUDIT", "true"),
        ("TALLY__AUDIT__CHECKPOINT_INTERVAL_MS", "2000"),
    ];
    all.extend_from_slice(extra);
    let env = test_env(name, 2, &all).await?;
    let dir = repo_root().join(".local/logs");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{name}-rules.toml"));
    std::fs::write(&file, RULES)?;
    for (t, a) in GRANTED {
        sqlx::query("INSERT INTO tally.audit_grants VALUES ($1, $2, '*')")
            .bind(t)
            .bind(a)
            .execute(&env.pool)
            .await?;
    }
    Ok((env, file.display().to_string()))
}

/// Waits until every enabled stream's topic is consumed and nothing is pending.
async fn wait_idle(env: &TestEnv, timeout: Duration) -> anyhow::Result<()> {
    let idle = tally::cli::report::wait_idle(&env.cfg, &env.pool, timeout).await?;
    anyhow::ensure!(idle, "the pipeline did not catch up within {timeout:?}");
    Ok(())
}

async fn count(env: &TestEnv, sql: &str) -> anyhow::Result<u64> {
    let text = ch_query(&env.cfg.clickhouse.url, sql).await?;
    Ok(text.trim().parse()?)
}

async fn violations_by_rule(env: &TestEnv) -> anyhow::Result<BTreeMap<String, u64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT rule, count(*) FROM tally.violations GROUP BY rule")
            .fetch_all(&env.pool)
            .await?;
    Ok(rows.into_iter().map(|(r, n)| (r, n as u64)).collect())
}

/// Every tenant's tree, checkpoints and stored rows against the oracle.
async fn check_logs(env: &TestEnv, events: &[AuditEvent]) -> anyhow::Result<Vec<String>> {
    let key = PseudonymKey::from_base64(1, TEST_PSEUDONYM_KEY)?;
    let verifier = NoteVerifier::parse(TEST_VERIFIER_KEY)?;
    let db = &env.cfg.clickhouse.database;
    let mut problems = Vec::new();
    for tenant in TENANTS {
        let mine: Vec<&AuditEvent> = events.iter().filter(|e| e.tenant_id == tenant).collect();
        let hashes: Vec<merkle::Hash> = mine
            .iter()
            .enumerate()
            .map(|(i, e)| {
                AuditLeaf::from_event(e, i as u64, &key, FieldLimits::default()).leaf_hash()
            })
            .collect();
        let stored = ch_query(
            &env.cfg.clickhouse.url,
            &format!(
                "SELECT leaf_index, toString(event_id) FROM {db}.audit_events WHERE tenant_id = '{tenant}' \
                 ORDER BY leaf_index FORMAT TSV"
            ),
        )
        .await?;
        let want: Vec<String> = mine
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{i}\t{}", e.event_id))
            .collect();
        let got: Vec<&str> = stored.lines().collect();
        if got != want.iter().map(String::as_str).collect::<Vec<_>>() {
            problems.push(format!(
                "{tenant}: stored leaves differ from the oracle ({} stored, {} expected; first stored {:?})",
                got.len(),
                want.len(),
                got.first()
            ));
        }
        let notes: Vec<String> = sqlx::query_scalar(
            "SELECT signed_note FROM tally.audit_checkpoints WHERE tenant_id = $1 ORDER BY checkpoint_id",
        )
        .bind(tenant)
        .fetch_all(&env.pool)
        .await?;
        let Some(last) = notes.last() else {
            problems.push(format!("{tenant}: no checkpoint"));
            continue;
        };
        for n in &notes {
            let opened = note::open(n.as_bytes(), std::slice::from_ref(&verifier))?;
            let c = Checkpoint::from_text(&opened.text)?;
            let size = c.size as usize;
            if size > hashes.len() || c.root != merkle::root(&hashes[..size]) {
                problems.push(format!(
                    "{tenant}: checkpoint at size {size} does not match the oracle's tree (a fork)"
                ));
            }
        }
        let opened = note::open(last.as_bytes(), std::slice::from_ref(&verifier))?;
        let c = Checkpoint::from_text(&opened.text)?;
        if c.size as usize != hashes.len() {
            problems.push(format!(
                "{tenant}: latest checkpoint has size {}, the oracle {}",
                c.size,
                hashes.len()
            ));
        }
    }
    Ok(problems)
}

/// Rows, rollups, dead letters, violations and logs of both streams.
async fn check_streams(
    env: &TestEnv,
    policy: &[Msg],
    audit: &[Msg],
) -> anyhow::Result<Vec<String>> {
    let db = &env.cfg.clickhouse.database;
    let mut problems = Vec::new();
    let decisions = unique_decisions(policy);
    let events = unique_audit(audit);
    let raw = count(env, &format!("SELECT count() FROM {db}.policy_decisions")).await?;
    if raw != decisions.len() as u64 {
        problems.push(format!(
            "policy_decisions: {raw} rows, {} decisions",
            decisions.len()
        ));
    }
    for table in [
        "policy_decisions_1m",
        "policy_decisions_1h",
        "policy_decisions_1d",
    ] {
        let text = ch_query(
            &env.cfg.clickhouse.url,
            &format!(
                "SELECT tenant_id, policy_id, decision, enforcement, sum(decisions) FROM {db}.{table} \
                 GROUP BY tenant_id, policy_id, decision, enforcement ORDER BY 1, 2, 3, 4 FORMAT TSV"
            ),
        )
        .await?;
        let got: BTreeMap<(String, String, String, String), u64> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((
                    (f[0].into(), f[1].into(), f[2].into(), f[3].into()),
                    f.get(4)?.parse().ok()?,
                ))
            })
            .collect();
        if got != decision_counts(&decisions) {
            problems.push(format!("{table}: counts differ from the oracle"));
        }
    }
    let stored = count(env, &format!("SELECT count() FROM {db}.audit_events")).await?;
    if stored != events.len() as u64 {
        problems.push(format!(
            "audit_events: {stored} rows, {} events",
            events.len()
        ));
    }
    let leaked = count(
        env,
        &format!(
            "SELECT count() FROM {db}.audit_events WHERE position(user_id, '@') > 0 \
             OR position(actor_id, '@') > 0 OR position(ip, '192.0.2.') > 0"
        ),
    )
    .await?;
    if leaked > 0 {
        problems.push(format!(
            "{leaked} audit rows hold a raw personal identifier"
        ));
    }
    let dead: Vec<(String, i64)> = sqlx::query_as(
        "SELECT topic, count(*) FROM tally.dead_letters GROUP BY topic ORDER BY topic",
    )
    .fetch_all(&env.pool)
    .await?;
    let dead: BTreeMap<String, i64> = dead.into_iter().collect();
    for (topic, msgs) in [
        (&env.cfg.policy.topic, policy),
        (&env.cfg.audit.topic, audit),
    ] {
        let want = poison_count(msgs) as i64;
        let got = dead.get(topic.as_str()).copied().unwrap_or(0);
        if got != want {
            problems.push(format!(
                "{topic}: {got} dead letters, {want} poison messages sent"
            ));
        }
    }
    let by_rule = violations_by_rule(env).await?;
    let mut want = expected_policy_violations(&decisions, 20, 300);
    want.extend(expected_audit_violations(&events, &GRANTED, 5, 300));
    for (rule, n) in want {
        let got = by_rule.get(rule).copied().unwrap_or(0);
        if got != n {
            problems.push(format!("violations {rule}: {got}, expected {n}"));
        }
    }
    problems.extend(check_logs(env, &events).await?);
    problems.extend(check_violation_topic(env).await?);
    Ok(problems)
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_and_audit_streams_beside_usage_count_exactly_and_logs_match_the_oracle(
) -> anyhow::Result<()> {
    let (env, rules) = streams_env("streams_exact", &[]).await?;
    let change = Utc::now().duration_trunc(ChronoDuration::hours(1))? - ChronoDuration::hours(1);
    let world = demo_world(8, change);
    env.seed(&world).await?;
    let mut gen = GenConfig::new(world.clone(), 2_000, 5);
    gen.encoding = Encoding::Mixed;
    gen.duplicates = 0.05;
    gen.malformed = 0.01;
    gen.start = change - ChronoDuration::hours(1);
    gen.span = ChronoDuration::hours(2);
    let usage = generate(gen);
    let exp = expected(&usage, &world);
    produce(&env, &usage, None).await?;
    let policy = policy_traffic(1_500, 3);
    let audit = audit_traffic(1_500, 3);
    produce_to(&env, &env.cfg.policy.topic, &policy).await?;
    produce_to(&env, &env.cfg.audit.topic, &audit).await?;
    let mut tally = env.spawn_tally_with("run", &[("TALLY_CONFIG", rules.as_str())])?;
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    // An idle log's checkpoint is re-signed (interval 2 s in this test).
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.audit_checkpoints")
        .fetch_one(&env.pool)
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.audit_checkpoints")
        .fetch_one(&env.pool)
        .await?;
    terminate(&mut tally, Duration::from_secs(30))?;
    idle?;
    let mut problems = check_streams(&env, &policy, &audit).await?;
    problems.extend(check_totals(&env, &exp).await?);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        after > before,
        "idle logs were not re-signed ({before} -> {after})"
    );
    let published = read_topic(
        &env.cfg.kafka.brokers,
        &env.cfg.audit.checkpoint_topic,
        before as usize,
        Duration::from_secs(30),
    )?;
    assert!(
        published.len() as i64 >= before,
        "{} checkpoints on the topic, {before} signed",
        published.len()
    );
    Ok(())
}

/// Whether a crash at this point leaves the batch pending.
fn leaves_pending(point: &str) -> bool {
    point != "after_commit"
}

async fn audit_crash_at(point: &'static str) -> anyhow::Result<()> {
    let name = format!("sfp_{}", point.replace('_', ""));
    let (env, rules) = streams_env(
        &name,
        &[
            ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "300"),
            ("TALLY__PIPELINE__TAKEOVER_GRACE_MS", "300"),
            ("TALLY__KAFKA__INSTANCE_ID", "sfp"),
        ],
    )
    .await?;
    let policy = policy_traffic(800, 11);
    let audit = audit_traffic(1_200, 11);
    produce_to(&env, &env.cfg.audit.topic, &audit).await?;
    produce_to(&env, &env.cfg.policy.topic, &policy).await?;
    // Armed in the audit stream only: the policy stream runs on meanwhile.
    let spec = format!("audit.{point}=abort@2");
    let mut crashed = env.spawn_tally_with(
        "crash",
        &[
            ("TALLY_FAILPOINTS", spec.as_str()),
            ("TALLY_CONFIG", rules.as_str()),
        ],
    )?;
    if wait_exit(&mut crashed, Duration::from_secs(90)).is_none() {
        kill9(&mut crashed);
    }
    assert!(
        env.log_text("crash")
            .contains(&format!("failpoint {point} fired")),
        "{point}: the failpoint was never reached"
    );
    let pending = env.pending_batches().await?;
    let audit_pending: Vec<i64> = sqlx::query_scalar(
        "SELECT batch_id FROM tally.batches WHERE state = 'pending' AND topic = $1",
    )
    .bind(&env.cfg.audit.topic)
    .fetch_all(&env.pool)
    .await?;
    if leaves_pending(point) {
        assert!(
            !audit_pending.is_empty(),
            "{point}: the crash left no pending audit batch (pending: {pending:?})"
        );
    }
    let mut again = env.spawn_tally_with("again", &[("TALLY_CONFIG", rules.as_str())])?;
    let idle = wait_idle(&env, Duration::from_secs(120)).await;
    terminate(&mut again, Duration::from_secs(30))?;
    idle?;
    for b in pending {
        let (state, attempts) = env.batch_state(b).await?;
        assert_eq!(state, "done", "{point}: batch {b} was not replayed");
        assert!(attempts >= 2, "{point}: batch {b} done without a replay");
    }
    let problems = check_streams(&env, &policy, &audit).await?;
    assert!(problems.is_empty(), "{point}: {problems:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_policy_crash_after_claim() -> anyhow::Result<()> {
    audit_crash_at("after_claim").await
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_policy_crash_after_a_clickhouse_table() -> anyhow::Result<()> {
    audit_crash_at("after_clickhouse_table").await
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_policy_crash_before_commit() -> anyhow::Result<()> {
    audit_crash_at("before_commit").await
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_and_policy_crash_after_commit() -> anyhow::Result<()> {
    audit_crash_at("after_commit").await
}
