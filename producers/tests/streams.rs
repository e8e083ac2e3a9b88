//! Pure tests of the policy and audit generators and the oracle (no broker):
//! determinism, shares, decoding as tagged, OPA event shape, bursts that fire
//! the window rules, and the oracle's view of a stream.

// Share checks compare counts with expected fractions in f64 (never money).
#![allow(clippy::float_arithmetic)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tally_producers::cli::{configs, GenOptions, SchemaIds, StreamChoice};
use tally_producers::gen_policy::{policy_ids, tenant_policies};
use tally_producers::malformed::{AUDIT_CATALOG, POLICY_CATALOG};
use tally_producers::{
    audit_grants, demo_world, opa, oracle, tenant_actors, AuditGenConfig, AuditGenerator,
    AuditMessage, Encoding, GenKind, PolicyGenConfig, PolicyGenerator, PolicyMessage, StreamConfig,
    Wire, PRIVILEGED_ACTIONS,
};
use tally_schemas::{
    ActorType, AuditEvent, Decision, Decoder, Enforcement, Event, Outcome, PolicyDecision, Severity,
};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 5, 31, 23, 0, 0).unwrap()
}

fn stream(count: u64, seed: u64, encoding: Encoding) -> StreamConfig {
    let mut s = StreamConfig::new(demo_world(12, start()), count, seed);
    s.start = start();
    s.encoding = encoding;
    s
}

fn policy_cfg(count: u64, seed: u64, encoding: Encoding) -> PolicyGenConfig {
    let mut c = PolicyGenConfig::new(demo_world(1, start()), 0, 0);
    c.stream = stream(count, seed, encoding);
    c
}

fn audit_cfg(count: u64, seed: u64, encoding: Encoding) -> AuditGenConfig {
    let mut c = AuditGenConfig::new(demo_world(1, start()), 0, 0);
    c.stream = stream(count, seed, encoding);
    c
}

/// A decoder that knows the Confluent schema id 1 of `T`'s subject.
fn decoder_for<T: Event>() -> Decoder {
    let d = Decoder::new();
    let schema = tally_schemas::current_schema_text(T::SUBJECT).expect("bundled schema");
    d.register_confluent_schema(1, schema).expect("register");
    d
}

/// Fraction `got / n` within `lo..hi` times `want`.
fn near(what: &str, got: usize, n: usize, want: f64, (lo, hi): (f64, f64)) {
    let share = got as f64 / n.max(1) as f64;
    assert!(
        share > want * lo && share < want * hi,
        "{what}: {got}/{n} = {share:.4}, want ~{want}"
    );
}

#[test]
fn deterministic() {
    let p: Vec<_> = PolicyGenerator::new(policy_cfg(2_000, 5, Encoding::Mixed)).collect();
    let q: Vec<_> = PolicyGenerator::new(policy_cfg(2_000, 5, Encoding::Mixed)).collect();
    let r: Vec<_> = PolicyGenerator::new(policy_cfg(2_000, 6, Encoding::Mixed)).collect();
    assert_eq!(p.len(), 2_000);
    assert_eq!(p, q);
    assert_ne!(p, r);
    let a: Vec<_> = AuditGenerator::new(audit_cfg(2_000, 5, Encoding::Mixed)).collect();
    let b: Vec<_> = AuditGenerator::new(audit_cfg(2_000, 5, Encoding::Mixed)).collect();
    let c: Vec<_> = AuditGenerator::new(audit_cfg(2_000, 6, Encoding::Mixed)).collect();
    assert_eq!(a.len(), 2_000);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

fn kinds<E>(msgs: &[tally_producers::StreamMessage<E>]) -> [usize; 3] {
    let mut k = [0; 3];
    for m in msgs {
        k[match m.kind {
            GenKind::Good => 0,
            GenKind::Duplicate => 1,
            GenKind::Malformed { .. } => 2,
        }] += 1;
    }
    k
}

#[test]
fn policy_shares_and_variety() {
    let mut cfg = policy_cfg(30_000, 7, Encoding::Json);
    cfg.stream.duplicates = 0.05;
    cfg.stream.malformed = 0.03;
    let msgs: Vec<PolicyMessage> = PolicyGenerator::new(cfg).collect();
    let [good, dups, bad] = kinds(&msgs);
    // OPA chunk re-sends add a few duplicates on top of the drawn share.
    near("duplicates", dups, msgs.len(), 0.05, (0.85, 1.45));
    near("malformed", bad, msgs.len(), 0.03, (0.85, 1.15));
    let opa_good = msgs
        .iter()
        .filter(|m| m.kind == GenKind::Good && m.wire == Wire::Opa)
        .count();
    near("opa share", opa_good, good, 0.3, (0.9, 1.1));
    let opa_bad = msgs
        .iter()
        .filter(|m| matches!(m.kind, GenKind::Malformed { .. }) && m.wire == Wire::Opa)
        .count();
    near("opa poison", opa_bad, bad, 0.3, (0.75, 1.25));

    let good: Vec<&PolicyDecision> = msgs
        .iter()
        .filter(|m| m.kind == GenKind::Good)
        .filter_map(|m| m.event.as_ref())
        .collect();
    let decisions: BTreeSet<Decision> = good.iter().map(|d| d.decision).collect();
    assert_eq!(decisions.len(), Decision::ALL.len(), "{decisions:?}");
    let modes: BTreeSet<Enforcement> = good.iter().map(|d| d.enforcement).collect();
    assert_eq!(modes.len(), 2);
    let severities: BTreeSet<Severity> = good.iter().map(|d| d.severity).collect();
    assert_eq!(severities.len(), Severity::ALL.len(), "{severities:?}");
    let denies = good.iter().filter(|d| d.decision == Decision::Deny).count();
    near("denies", denies, good.len(), 0.1, (0.5, 2.5));
    let mut per_tenant: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for d in &good {
        per_tenant
            .entry(&d.tenant_id)
            .or_default()
            .insert(&d.policy_id);
        assert!(policy_ids().contains(&d.policy_id.as_str()));
    }
    assert_eq!(per_tenant.len(), 12);
    assert!(per_tenant.values().all(|p| p.len() >= 3), "{per_tenant:?}");
    // A tenant's policy keeps its mode.
    for d in &good {
        let mode = tenant_policies(7, &d.tenant_id)
            .into_iter()
            .find(|(p, _)| *p == d.policy_id)
            .map(|(_, m)| m);
        assert_eq!(mode, Some(d.enforcement), "{}", d.policy_id);
    }
}

/// The OPA decision-log shape the consumer recognises.
fn opa_shape(payload: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let o = v.as_object()?;
    let ok = o.contains_key("decision_id")
        && o.contains_key("timestamp")
        && (o.contains_key("path") || o.contains_key("query"))
        && !o.contains_key("event_id")
        && !o.contains_key("occurred_at");
    ok.then_some(v)
}

fn check_policy(encoding: Encoding) {
    let mut cfg = policy_cfg(6_000, 99, encoding);
    cfg.stream.malformed = 0.08;
    cfg.stream.duplicates = 0.08;
    let decoder = decoder_for::<PolicyDecision>();
    let msgs: Vec<PolicyMessage> = PolicyGenerator::new(cfg).collect();
    let mut classes = BTreeSet::new();
    let mut opa_sent: HashMap<String, &[u8]> = HashMap::new();
    for m in &msgs {
        if m.wire == Wire::Opa {
            let v = opa_shape(&m.payload).expect("OPA events have OPA's shape");
            if let Some(d) = &m.event {
                assert_eq!(v["decision_id"], d.decision_id.as_str());
                assert_eq!(d.event_id, opa::event_id(&d.decision_id));
                assert!(d.user_id.is_none() && d.tags.is_empty() && d.rule_ids.is_empty());
                assert_eq!(v["input"]["tenant_id"], d.tenant_id.as_str());
                d.validate().expect("expected decision is valid");
                match opa_sent.get(&d.decision_id) {
                    None => assert!(opa_sent.insert(d.decision_id.clone(), &m.payload).is_none()),
                    Some(first) => assert_eq!(*first, m.payload.as_slice(), "re-sent as is"),
                }
            }
        }
        match (&m.kind, &m.event, m.wire) {
            (GenKind::Malformed { class }, None, wire) => {
                classes.insert(*class);
                if wire == Wire::Poison {
                    let err = decoder.decode::<PolicyDecision>(&m.payload).unwrap_err();
                    assert_eq!(err.class(), *class, "{err}");
                    assert!(opa_shape(&m.payload).is_none());
                } else {
                    assert!(opa::POISON.iter().any(|(_, c)| c == class));
                }
            }
            (_, Some(d), Wire::Opa) => assert_eq!(m.key.as_deref(), Some(d.tenant_id.as_bytes())),
            (_, Some(d), _) => {
                assert_eq!(m.key.as_deref(), Some(d.tenant_id.as_bytes()));
                assert_eq!(&decoder.decode::<PolicyDecision>(&m.payload).unwrap(), d);
            }
            other => panic!("untagged message {other:?}"),
        }
    }
    assert!(kinds(&msgs).iter().all(|k| *k > 0));
    assert!(classes.len() >= 20, "{classes:?}");
}

#[test]
fn policy_json() {
    check_policy(Encoding::Json);
}

#[test]
fn policy_avro() {
    check_policy(Encoding::Avro);
}

#[test]
fn policy_confluent() {
    check_policy(Encoding::Confluent);
}

#[test]
fn policy_mixed() {
    check_policy(Encoding::Mixed);
}

#[test]
fn every_native_poison_kind_has_its_class() {
    let d = tally_schemas::sample_policy_decision();
    let a = tally_schemas::sample_audit_event();
    let (dp, da) = (decoder_for::<PolicyDecision>(), decoder_for::<AuditEvent>());
    let mut wrong = Vec::new();
    for (i, (name, _)) in POLICY_CATALOG.iter().enumerate() {
        let (payload, class) = tally_producers::malformed::build_from(POLICY_CATALOG, i, &d);
        match dp.decode::<PolicyDecision>(&payload) {
            Err(e) if e.class() == class => {}
            other => wrong.push(format!("policy {name}: want {class}, got {other:?}")),
        }
    }
    for (i, (name, _)) in AUDIT_CATALOG.iter().enumerate() {
        let (payload, class) = tally_producers::malformed::build_from(AUDIT_CATALOG, i, &a);
        match da.decode::<AuditEvent>(&payload) {
            Err(e) if e.class() == class => {}
            other => wrong.push(format!("audit {name}: want {class}, got {other:?}")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn deny_bursts_cross_a_lowered_threshold() {
    // 5000 messages over 2 h: ~42 a minute.
    let msgs: Vec<PolicyMessage> =
        PolicyGenerator::new(policy_cfg(5_000, 3, Encoding::Json)).collect();
    let o = oracle::policy(&msgs);
    let windows = o.deny_windows(60);
    let busiest = windows.values().copied().max().unwrap_or(0);
    let crossing = o.deny_rate_windows(5, 60);
    assert!(busiest >= 7, "busiest window has {busiest} denies");
    assert!(crossing.len() >= 3, "{crossing:?}");
    // Without bursts, denies spread out.
    let mut calm = policy_cfg(5_000, 3, Encoding::Json);
    calm.deny_burst = 0.0;
    let calm = oracle::policy(&PolicyGenerator::new(calm).collect::<Vec<_>>());
    let calm_max = calm.deny_windows(60).values().copied().max().unwrap_or(0);
    assert!(calm_max * 2 < busiest, "calm {calm_max} vs burst {busiest}");
    assert!(!o.enforced_denies(Severity::High).is_empty());
    assert!(!o.unenforced_denies(Severity::Info).is_empty());
}

fn check_audit(encoding: Encoding) {
    let mut cfg = audit_cfg(6_000, 11, encoding);
    cfg.stream.malformed = 0.06;
    cfg.stream.duplicates = 0.06;
    let decoder = decoder_for::<AuditEvent>();
    let msgs: Vec<AuditMessage> = AuditGenerator::new(cfg).collect();
    let mut classes = BTreeSet::new();
    for m in &msgs {
        match (&m.kind, &m.event) {
            (GenKind::Malformed { class }, None) => {
                assert_eq!(m.wire, Wire::Poison);
                let err = decoder.decode::<AuditEvent>(&m.payload).unwrap_err();
                assert_eq!(err.class(), *class, "{err}");
                classes.insert(*class);
            }
            (_, Some(e)) => {
                assert_eq!(m.key.as_deref(), Some(e.tenant_id.as_bytes()));
                assert_eq!(&decoder.decode::<AuditEvent>(&m.payload).unwrap(), e);
                serde_json::from_str::<Value>(&e.details).expect("details are JSON");
            }
            other => panic!("untagged message {other:?}"),
        }
    }
    assert!(kinds(&msgs).iter().all(|k| *k > 0));
    assert!(classes.len() >= 10, "{classes:?}");
}

#[test]
fn audit_json() {
    check_audit(Encoding::Json);
}

#[test]
fn audit_avro() {
    check_audit(Encoding::Avro);
}

#[test]
fn audit_confluent() {
    check_audit(Encoding::Confluent);
}

#[test]
fn audit_mixed() {
    check_audit(Encoding::Mixed);
}

#[test]
fn audit_variety_and_rules() {
    let mut cfg = audit_cfg(10_000, 21, Encoding::Json);
    cfg.stream.duplicates = 0.05;
    cfg.stream.malformed = 0.02;
    cfg.oversize = 0.01;
    let world = cfg.stream.world.clone();
    let msgs: Vec<AuditMessage> = AuditGenerator::new(cfg).collect();
    let [good, dups, bad] = kinds(&msgs);
    near("duplicates", dups, msgs.len(), 0.05, (0.85, 1.15));
    near("malformed", bad, msgs.len(), 0.02, (0.8, 1.2));
    let o = oracle::audit(&msgs);
    assert_eq!(o.unique.events.len(), good);
    let events = &o.unique.events;
    let types: BTreeSet<ActorType> = events.iter().map(|e| e.actor_type).collect();
    assert_eq!(types.len(), ActorType::ALL.len());
    let outcomes: BTreeSet<Outcome> = events.iter().map(|e| e.outcome).collect();
    assert_eq!(outcomes.len(), Outcome::ALL.len());
    let personal = events.iter().filter(|e| e.personal_data).count();
    near("personal data", personal, events.len(), 0.4, (0.5, 1.5));
    assert!(events
        .iter()
        .any(|e| e.ip.as_deref().is_some_and(|ip| ip.contains(':'))));
    assert!(events.iter().any(|e| e.user_agent.is_none()));
    let long_ua = events
        .iter()
        .filter(|e| e.user_agent.as_ref().is_some_and(|u| u.len() > 1024))
        .count();
    let long_details = events.iter().filter(|e| e.details.len() > 65_536).count();
    assert!(long_ua > 0 && long_details > 0, "{long_ua} {long_details}");
    // Actors are the tenant's own.
    for e in events {
        let actors = tenant_actors(&e.tenant_id);
        assert!(actors
            .iter()
            .any(|a| a.actor_id == e.actor_id && a.actor_type == e.actor_type));
    }

    // Every rule has work: privileged actions, ungranted personal data, bursts.
    let privileged = o.privileged(PRIVILEGED_ACTIONS);
    let actions: BTreeSet<&str> = privileged.iter().map(|e| e.action.as_str()).collect();
    assert!(actions.len() >= 5, "{actions:?}");
    assert!(o.privileged(&["role.*"]).len() >= 2);
    let grants = audit_grants(&world);
    let ignore = [Outcome::Failure, Outcome::Denied];
    let ungranted = o.ungranted_personal_data(&grants, &ignore).len();
    let all_personal = o.ungranted_personal_data(&[], &ignore).len();
    assert!(
        ungranted > 0 && ungranted < all_personal,
        "{ungranted} of {all_personal}"
    );
    let bursts = o.failure_burst_windows(10, 60);
    assert!(bursts.len() >= 3, "{bursts:?}");
    assert!(bursts.iter().all(|w| w.actor_type != ActorType::System));
}

#[test]
fn oracle_agrees_with_the_tags() {
    let mut cfg = policy_cfg(8_000, 17, Encoding::Mixed);
    cfg.stream.duplicates = 0.1;
    cfg.stream.malformed = 0.05;
    let msgs: Vec<PolicyMessage> = PolicyGenerator::new(cfg).collect();
    let o = oracle::policy(&msgs);
    let [good, dups, bad] = kinds(&msgs);
    let u = &o.unique;
    assert_eq!(
        (u.events.len(), u.resends, u.dead_letters()),
        (good, dups, bad)
    );
    assert!(u.mistagged.is_empty() && u.conflicts == 0);
    assert_eq!(u.messages, msgs.len());
    let counted: u64 = o.counts.values().map(|c| c.decisions).sum();
    assert_eq!(counted as usize, good);

    let amsgs: Vec<AuditMessage> =
        AuditGenerator::new(audit_cfg(4_000, 17, Encoding::Avro)).collect();
    let a = oracle::audit(&amsgs);
    assert!(a.unique.mistagged.is_empty() && a.unique.conflicts == 0);
    let logged: usize = a.logs.values().map(Vec::len).sum();
    assert_eq!(logged, a.unique.events.len());
    for (tenant, log) in &a.logs {
        assert_eq!(a.per_tenant[tenant] as usize, log.len());
        // The log is the tenant's good messages in stream (partition) order.
        let sent: Vec<&AuditEvent> = amsgs
            .iter()
            .filter(|m| m.kind == GenKind::Good)
            .filter_map(|m| m.event.as_ref())
            .filter(|e| e.tenant_id == *tenant)
            .collect();
        assert_eq!(sent, log.iter().collect::<Vec<_>>());
    }

    let mut ucfg = tally_producers::GenConfig::new(demo_world(12, start()), 3_000, 4);
    ucfg.start = start() - Duration::hours(1);
    ucfg.malformed = 0.02;
    let umsgs: Vec<_> = tally_producers::Generator::new(ucfg).collect();
    let usage = oracle::usage(&umsgs);
    assert!(usage.mistagged.is_empty() && usage.conflicts == 0);
    assert_eq!(
        usage.resends + usage.events.len() + usage.dead_letters(),
        3_000
    );
}

#[test]
fn gen_command_configs() {
    assert_eq!("Policy".parse::<StreamChoice>(), Ok(StreamChoice::Policy));
    assert!("metrics".parse::<StreamChoice>().is_err());
    let mut opts = GenOptions {
        stream: StreamChoice::All,
        count: 100,
        rate: None,
        encoding: Encoding::Json,
        duplicates: 0.02,
        late: 0.01,
        malformed: 0.0,
        seed: 9,
        tenants: 5,
        opa_share: 0.5,
        topic: None,
        price_change_at: start(),
        confluent_schema_ids: Default::default(),
    };
    opts.check().unwrap();
    let c = configs(&opts);
    let (u, p, a) = (c.usage.unwrap(), c.policy.unwrap(), c.audit.unwrap());
    assert_eq!(
        (u.count, u.seed, u.start),
        (100, 9, start() - Duration::hours(1))
    );
    assert_eq!(
        (p.opa_share, p.stream.start, p.stream.count),
        (0.5, u.start, 100)
    );
    assert_eq!((a.stream.seed, a.stream.world.tenants.len()), (9, 5));
    assert_eq!(
        (
            u.confluent_schema_id,
            p.stream.confluent_schema_id,
            a.stream.confluent_schema_id
        ),
        (1, 1, 1),
        "no registry: id 1"
    );
    opts.confluent_schema_ids = SchemaIds {
        usage: 11,
        policy: 12,
        audit: 13,
    };
    let c = configs(&opts);
    let (u, p, a) = (c.usage.unwrap(), c.policy.unwrap(), c.audit.unwrap());
    assert_eq!(
        (
            u.confluent_schema_id,
            p.stream.confluent_schema_id,
            a.stream.confluent_schema_id
        ),
        (11, 12, 13),
        "each stream's registered id"
    );
    opts.stream = StreamChoice::Audit;
    let c = configs(&opts);
    assert!(c.usage.is_none() && c.policy.is_none() && c.audit.is_some());
    opts.topic = Some("t".into());
    opts.check().unwrap();
    opts.stream = StreamChoice::All;
    assert!(opts.check().is_err());
    opts.stream = StreamChoice::Policy;
    opts.topic = None;
    opts.opa_share = 1.5;
    assert!(opts.check().is_err());
}
