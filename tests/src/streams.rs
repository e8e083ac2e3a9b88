//! Traffic and oracles for the policy-decision and audit-event streams: a
//! seeded mix of schema-encoded and OPA-shaped decisions, audit events with
//! personal data, failure bursts and privileged actions, re-sends and poison;
//! and what the pipeline must have stored, computed from the produced messages
//! alone (first occurrence per dedup key, in produce order per tenant).

use crate::{ch_query, check_violation_topic, TestEnv, TEST_PSEUDONYM_KEY, TEST_VERIFIER_KEY};
use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tally::audit::checkpoint::Checkpoint;
use tally::audit::leaf::{AuditLeaf, FieldLimits};
use tally::audit::merkle;
use tally::audit::note::{self, NoteVerifier};
use tally::audit::pseudonym::PseudonymKey;
use tally_schemas::{
    encode_json, encode_single_object, ActorType, AuditEvent, Decision, Enforcement, Outcome,
    PolicyDecision, Severity,
};
use uuid::Uuid;

/// One message to produce: key (the tenant), payload, and what it is.
#[derive(Clone)]
pub struct Msg {
    pub key: String,
    pub payload: Vec<u8>,
    pub kind: Kind,
}

#[derive(Clone)]
pub enum Kind {
    Decision(Box<PolicyDecision>),
    Audit(Box<AuditEvent>),
    Poison,
}

pub const TENANTS: [&str; 3] = ["t-acme", "t-globex", "t-initech"];
const POLICIES: [&str; 2] = ["llm/guard", "llm/pii"];

fn start() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(ChronoDuration::minutes(10))
        .unwrap_or_else(|_| Utc::now())
        - ChronoDuration::minutes(30)
}

/// An OPA decision-log event for `d` (policy `<policy>/allow`, result object).
fn opa_event(d: &PolicyDecision) -> Vec<u8> {
    let enforcement = match d.enforcement {
        Enforcement::Monitor => "dryrun",
        _ => "enforce",
    };
    serde_json::to_vec(&serde_json::json!({
        "decision_id": d.decision_id,
        "labels": {"id": d.source, "version": "0.70.0"},
        "path": format!("{}/allow", d.policy_id),
        "input": {"tenant_id": d.tenant_id, "request_id": d.request_id, "prompt": "secret prompt"},
        "result": {
            "allow": d.decision == Decision::Allow,
            "enforcement": enforcement,
            "severity": d.severity.as_str(),
            "reason": d.reason,
        },
        "timestamp": d.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "metrics": {"timer_server_handler_ns": d.evaluation_ms * 1_000_000},
    }))
    .unwrap_or_default()
}

/// Re-sends a random earlier good message (identical bytes); false if none yet.
fn resend(rng: &mut SmallRng, out: &mut Vec<Msg>, sent: &[usize]) -> bool {
    if sent.is_empty() {
        return false;
    }
    let again = out[sent[rng.random_range(0..sent.len())]].clone();
    out.push(again);
    true
}

/// `n` policy messages: decisions in JSON, Avro single-object and OPA form,
/// about 8% identical re-sends and 3% poison; bursts of denies per policy.
pub fn policy_traffic(n: usize, seed: u64) -> Vec<Msg> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let t0 = start();
    let mut out: Vec<Msg> = Vec::with_capacity(n);
    let mut sent: Vec<usize> = Vec::new();
    for i in 0..n {
        let roll: f64 = rng.random();
        if roll < 0.08 && resend(&mut rng, &mut out, &sent) {
            continue;
        }
        if roll < 0.11 {
            let payload = if rng.random_bool(0.5) {
                b"{\"decision_id\": 7".to_vec()
            } else {
                // OPA-shaped but with no tenant: dead-lettered by the mapping.
                serde_json::to_vec(&serde_json::json!({
                    "decision_id": format!("bad-{i}"), "path": "llm/guard/allow",
                    "input": {}, "result": true, "timestamp": t0.to_rfc3339(),
                }))
                .unwrap_or_default()
            };
            out.push(Msg {
                key: TENANTS[0].into(),
                payload,
                kind: Kind::Poison,
            });
            continue;
        }
        let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
        let mut d = tally_schemas::sample_policy_decision();
        d.tenant_id = tenant.into();
        d.decision_id = format!("dec-{seed}-{i}");
        d.event_id = tally::streams::policy::opa::event_id(&d.decision_id);
        d.policy_id = POLICIES[rng.random_range(0..POLICIES.len())].into();
        d.occurred_at = t0 + ChronoDuration::seconds(rng.random_range(0..1200));
        d.decision = if rng.random_bool(0.6) {
            Decision::Deny
        } else {
            Decision::Allow
        };
        d.enforcement = if rng.random_bool(0.3) {
            Enforcement::Monitor
        } else {
            Enforcement::Enforce
        };
        d.severity = [
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ][rng.random_range(0..4)];
        d.source = "opa-test".into();
        d.reason = format!("reason {}", i % 7);
        d.evaluation_ms = rng.random_range(0..50);
        let opa = rng.random_bool(0.3);
        if opa {
            // What the OPA mapping keeps of such an event.
            d.team_id = None;
            d.project_id = None;
            d.user_id = None;
            d.tags.clear();
            d.rule_ids.clear();
            d.policy_version = String::new();
            d.request_id = format!("req-{i}");
        }
        let payload = if opa {
            opa_event(&d)
        } else if rng.random_bool(0.5) {
            encode_json(&d)
        } else {
            encode_single_object(&d)
        };
        sent.push(out.len());
        out.push(Msg {
            key: tenant.into(),
            payload,
            kind: Kind::Decision(Box::new(d)),
        });
    }
    out
}

/// `n` audit messages: users (pseudonymised when stored), services and API
/// keys; personal-data reads, privileged `role.grant`s, failure bursts; about
/// 8% identical re-sends and 3% poison.
pub fn audit_traffic(n: usize, seed: u64) -> Vec<Msg> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xa0d1);
    let t0 = start();
    let mut out: Vec<Msg> = Vec::with_capacity(n);
    let mut sent: Vec<usize> = Vec::new();
    for i in 0..n {
        let roll: f64 = rng.random();
        if roll < 0.08 && resend(&mut rng, &mut out, &sent) {
            continue;
        }
        if roll < 0.11 {
            out.push(Msg {
                key: TENANTS[1].into(),
                payload: b"\xc3\x01garbage".to_vec(),
                kind: Kind::Poison,
            });
            continue;
        }
        let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
        let mut e = tally_schemas::sample_audit_event();
        e.tenant_id = tenant.into();
        e.event_id = Uuid::from_u128(u128::from(seed) << 64 | i as u128);
        e.occurred_at = t0
            + ChronoDuration::seconds(rng.random_range(0..1200))
            + ChronoDuration::microseconds(rng.random_range(0..1_000_000));
        let actor = rng.random_range(0..6);
        (e.actor_type, e.actor_id) = match actor {
            0..=3 => (ActorType::User, format!("user{actor}@example.com")),
            4 => (ActorType::Service, "svc-billing".into()),
            _ => (ActorType::ApiKey, "key-7".into()),
        };
        e.user_id = (e.actor_type == ActorType::User).then(|| e.actor_id.clone());
        e.ip = Some(format!("192.0.2.{}", actor + 1));
        e.action = ["read", "export", "role.grant", "login"][rng.random_range(0..4)].into();
        e.resource_type = ["dataset", "prompt_log"][rng.random_range(0..2)].into();
        e.resource_id = format!("r-{}", i % 13);
        // user2 fails in bursts.
        e.outcome = if actor == 2 && rng.random_bool(0.8) {
            Outcome::Failure
        } else if rng.random_bool(0.1) {
            Outcome::Denied
        } else {
            Outcome::Success
        };
        e.personal_data = rng.random_bool(0.3);
        e.details = format!("{{\"n\":{i}}}");
        e.user_agent = Some("tally-test/1".into());
        sent.push(out.len());
        let payload = if rng.random_bool(0.5) {
            encode_json(&e)
        } else {
            encode_single_object(&e)
        };
        out.push(Msg {
            key: tenant.into(),
            payload,
            kind: Kind::Audit(Box::new(e)),
        });
    }
    out
}

/// Sends `msgs` to `topic`, keyed by tenant, in order, waiting for every ack.
pub async fn produce_to(env: &TestEnv, topic: &str, msgs: &[Msg]) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.cfg.kafka.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let sends = msgs.iter().map(|m| {
        producer.send(
            FutureRecord::to(topic).key(&m.key).payload(&m.payload),
            Duration::from_secs(30),
        )
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| anyhow::anyhow!("send: {e}"))?;
    }
    Ok(())
}

/// First occurrences of each decision (tenant, decision id), in produce order.
pub fn unique_decisions(msgs: &[Msg]) -> Vec<PolicyDecision> {
    let mut seen = HashSet::new();
    msgs.iter()
        .filter_map(|m| match &m.kind {
            Kind::Decision(d) if seen.insert((d.tenant_id.clone(), d.decision_id.clone())) => {
                Some((**d).clone())
            }
            _ => None,
        })
        .collect()
}

/// First occurrences of each audit event (tenant, event id), in produce order.
pub fn unique_audit(msgs: &[Msg]) -> Vec<AuditEvent> {
    let mut seen = HashSet::new();
    msgs.iter()
        .filter_map(|m| match &m.kind {
            Kind::Audit(e) if seen.insert((e.tenant_id.clone(), e.event_id)) => Some((**e).clone()),
            _ => None,
        })
        .collect()
}

pub fn poison_count(msgs: &[Msg]) -> usize {
    msgs.iter()
        .filter(|m| matches!(m.kind, Kind::Poison))
        .count()
}

/// Decisions per (tenant, policy, decision, enforcement).
pub fn decision_counts(ds: &[PolicyDecision]) -> BTreeMap<(String, String, String, String), u64> {
    let mut out = BTreeMap::new();
    for d in ds {
        *out.entry((
            d.tenant_id.clone(),
            d.policy_id.clone(),
            d.decision.as_str().to_string(),
            d.enforcement.as_str().to_string(),
        ))
        .or_insert(0) += 1;
    }
    out
}

/// Violations the policy rules must raise, by rule, with a deny-rate threshold
/// of `threshold` per (tenant, policy, `window_secs` window).
pub fn expected_policy_violations(
    ds: &[PolicyDecision],
    threshold: u64,
    window_secs: i64,
) -> BTreeMap<&'static str, u64> {
    let denied = ds
        .iter()
        .filter(|d| {
            d.decision == Decision::Deny
                && d.enforcement == Enforcement::Enforce
                && matches!(d.severity, Severity::High | Severity::Critical)
        })
        .count() as u64;
    let unenforced = ds
        .iter()
        .filter(|d| d.decision == Decision::Deny && d.enforcement == Enforcement::Monitor)
        .count() as u64;
    let mut windows: BTreeMap<(String, String, i64), u64> = BTreeMap::new();
    for d in ds.iter().filter(|d| d.decision == Decision::Deny) {
        let w = d.occurred_at.timestamp().div_euclid(window_secs);
        *windows
            .entry((d.tenant_id.clone(), d.policy_id.clone(), w))
            .or_insert(0) += 1;
    }
    let rate = windows.values().filter(|n| **n > threshold).count() as u64;
    BTreeMap::from([
        ("policy_denied", denied),
        ("unenforced_deny", unenforced),
        ("deny_rate", rate),
    ])
}

/// Violations the audit rules must raise, by rule: `role.grant` is the one
/// privileged action, `granted` (tenant, actor) may read personal data of any
/// type, a burst is at least `at_least` failures or denials by one actor in a
/// `window_secs` window.
pub fn expected_audit_violations(
    es: &[AuditEvent],
    granted: &[(&str, &str)],
    at_least: u64,
    window_secs: i64,
) -> BTreeMap<&'static str, u64> {
    let privileged = es.iter().filter(|e| e.action == "role.grant").count() as u64;
    let personal = es
        .iter()
        .filter(|e| {
            e.personal_data
                && !matches!(e.outcome, Outcome::Failure | Outcome::Denied)
                && !granted.contains(&(e.tenant_id.as_str(), e.actor_id.as_str()))
        })
        .count() as u64;
    let mut windows: BTreeMap<(String, String, i64), u64> = BTreeMap::new();
    for e in es
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Failure | Outcome::Denied))
    {
        let w = e.occurred_at.timestamp().div_euclid(window_secs);
        *windows
            .entry((e.tenant_id.clone(), e.actor_id.clone(), w))
            .or_insert(0) += 1;
    }
    let bursts = windows.values().filter(|n| **n >= at_least).count() as u64;
    BTreeMap::from([
        ("privileged_action", privileged),
        ("personal_data_access", personal),
        ("failed_action_burst", bursts),
    ])
}

pub const RULES: &str = r#"
[policy]
rules = { deny_rate = { threshold = 20, window_secs = 300 } }
[audit]
rules = { privileged_action = { actions = [{ action = "role.grant", severity = "high" }] }, failed_action_burst = { at_least = 5, window_secs = 300 } }
"#;

/// Actors that may read personal data (any resource type) in the test world.
pub const GRANTED: [(&str, &str); 2] =
    [("t-acme", "user0@example.com"), ("t-globex", "svc-billing")];

/// Waits until every enabled stream's topic is consumed and nothing is pending.
pub async fn wait_idle(env: &TestEnv, timeout: Duration) -> anyhow::Result<()> {
    let idle = tally::cli::report::wait_idle(&env.cfg, &env.pool, timeout).await?;
    anyhow::ensure!(idle, "the pipeline did not catch up within {timeout:?}");
    Ok(())
}

pub async fn count(env: &TestEnv, sql: &str) -> anyhow::Result<u64> {
    let text = ch_query(&env.cfg.clickhouse.url, sql).await?;
    Ok(text.trim().parse()?)
}

pub async fn violations_by_rule(env: &TestEnv) -> anyhow::Result<BTreeMap<String, u64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT rule, count(*) FROM tally.violations GROUP BY rule")
            .fetch_all(&env.pool)
            .await?;
    Ok(rows.into_iter().map(|(r, n)| (r, n as u64)).collect())
}

/// Every tenant's tree, checkpoints and stored rows against the oracle.
pub async fn check_logs(env: &TestEnv, events: &[AuditEvent]) -> anyhow::Result<Vec<String>> {
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
pub async fn check_streams(
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

/// Writes the rules config of these tests (returns its path, for
/// `TALLY_CONFIG`) and the grants of [`GRANTED`].
pub async fn setup_streams(env: &TestEnv) -> anyhow::Result<String> {
    let dir = crate::repo_root().join(".local/logs");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{}-rules.toml", env.name));
    std::fs::write(&file, RULES)?;
    for (t, a) in GRANTED {
        sqlx::query("INSERT INTO tally.audit_grants VALUES ($1, $2, '*')")
            .bind(t)
            .bind(a)
            .execute(&env.pool)
            .await?;
    }
    Ok(file.display().to_string())
}
