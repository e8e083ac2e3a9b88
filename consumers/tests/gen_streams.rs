//! The generated policy and audit streams against the consumer's pure stream code:
//! every OPA event the policy generator sends maps (default mapping) to exactly the
//! decision it is tagged with, or fails with the class it is tagged with; and the
//! rules, run over the oracle's unique events, raise what the oracle predicts.

use chrono::{TimeZone, Utc};
use std::collections::{BTreeMap, BTreeSet};
use tally::streams::audit::rules::{self as audit_rules, AuditRules, Grants, PrivilegedAction};
use tally::streams::policy::opa::{self, OpaMapping};
use tally::streams::policy::rules::{self as policy_rules, PolicyRules};
use tally::streams::window::Window;
use tally_producers::{
    audit_grants, demo_world, oracle, AuditGenConfig, AuditGenerator, Encoding, GenKind,
    PolicyGenConfig, PolicyGenerator, PolicyMessage, StreamConfig, Wire, PRIVILEGED_ACTIONS,
};
use tally_schemas::{Outcome, Severity};

fn stream(count: u64, seed: u64) -> StreamConfig {
    let start = Utc.with_ymd_and_hms(2026, 3, 1, 8, 0, 0).unwrap();
    let mut s = StreamConfig::new(demo_world(10, start), count, seed);
    s.start = start;
    s.encoding = Encoding::Mixed;
    s
}

fn policy_stream(count: u64, seed: u64, malformed: f64) -> Vec<PolicyMessage> {
    let mut c = PolicyGenConfig::new(demo_world(1, Utc::now()), 0, 0);
    c.stream = stream(count, seed);
    c.stream.malformed = malformed;
    c.stream.duplicates = 0.05;
    PolicyGenerator::new(c).collect()
}

#[test]
fn opa_events_map_as_tagged() {
    assert_eq!(opa::OPA_EVENT_NS, tally_producers::opa::OPA_EVENT_NS);
    let m = OpaMapping::default();
    let (mut mapped, mut classes) = (0, BTreeSet::new());
    for seed in 1..=3 {
        for msg in policy_stream(4_000, seed, 0.1) {
            let recognised = opa::recognise(&msg.payload);
            if msg.wire != Wire::Opa {
                assert!(recognised.is_none(), "native payload taken for OPA");
                continue;
            }
            let v = recognised.expect("OPA events are recognised");
            match (msg.kind, msg.event) {
                (GenKind::Malformed { class }, None) => {
                    let err = opa::map_event(&v, &m).expect_err("OPA poison must not map");
                    assert_eq!(err.class(), class, "{err}: {v}");
                    classes.insert(class);
                }
                (_, Some(want)) => {
                    assert_eq!(opa::map_event(&v, &m).expect("maps"), want, "{v}");
                    mapped += 1;
                }
                other => panic!("untagged OPA message {other:?}"),
            }
        }
    }
    assert!(mapped > 2_000, "{mapped}");
    let every: BTreeSet<&str> = tally_producers::opa::POISON
        .iter()
        .map(|(_, c)| *c)
        .collect();
    assert_eq!(classes, every);
}

#[test]
fn policy_rules_fire_as_the_oracle_predicts() {
    let o = oracle::policy(&policy_stream(5_000, 8, 0.0));
    let mut rules = PolicyRules::default();
    rules.deny_rate.threshold = 5;
    rules.deny_rate.window_secs = Window::MINUTE;
    let now = Utc::now();
    let (violations, counts) = policy_rules::evaluate(&o.unique.events, &rules, |_| 0, now);
    let mut by_rule: BTreeMap<&str, usize> = BTreeMap::new();
    let mut windows = BTreeSet::new();
    for v in &violations {
        *by_rule.entry(v.rule.as_str()).or_default() += 1;
        if v.rule == "deny_rate" {
            windows.insert((v.tenant_id.clone(), v.subject_id.clone(), v.window_start));
        }
    }
    let predicted: BTreeSet<_> = o
        .deny_rate_windows(5, 60)
        .into_iter()
        .map(|w| (w.tenant_id, w.policy_id, w.window_start))
        .collect();
    assert!(predicted.len() >= 3, "{predicted:?}");
    assert_eq!(windows, predicted);
    let denied = o.enforced_denies(Severity::High).len();
    let unenforced = o.unenforced_denies(Severity::Info).len();
    assert!(denied > 0 && unenforced > 0);
    assert_eq!(by_rule.get("policy_denied"), Some(&denied));
    assert_eq!(by_rule.get("unenforced_deny"), Some(&unenforced));
    let counted: i64 = counts.iter().map(|(_, n)| n).sum();
    let windowed: u64 = o.deny_windows(60).values().sum();
    assert_eq!(u64::try_from(counted).unwrap(), windowed);
}

#[test]
fn audit_rules_fire_as_the_oracle_predicts() {
    let mut c = AuditGenConfig::new(demo_world(1, Utc::now()), 0, 0);
    c.stream = stream(8_000, 5);
    let world = c.stream.world.clone();
    let o = oracle::audit(&AuditGenerator::new(c).collect::<Vec<_>>());
    let grant_list = audit_grants(&world);
    let grants: Grants = grant_list
        .iter()
        .map(|(t, a, r)| (t.as_str(), a.as_str(), r.as_str()))
        .collect();
    let mut rules = AuditRules::default();
    rules.privileged_action.actions = PRIVILEGED_ACTIONS
        .iter()
        .map(|a| PrivilegedAction {
            action: (*a).to_string(),
            severity: Severity::High,
        })
        .collect();
    let now = Utc::now();
    let (violations, _) = audit_rules::evaluate(&o.unique.events, &rules, &grants, |_| 0, now);
    let mut by_rule: BTreeMap<&str, usize> = BTreeMap::new();
    let mut bursts = BTreeSet::new();
    for v in &violations {
        *by_rule.entry(v.rule.as_str()).or_default() += 1;
        if v.rule == "failed_action_burst" {
            bursts.insert((v.tenant_id.clone(), v.subject_id.clone(), v.window_start));
        }
    }
    let ignore = [Outcome::Failure, Outcome::Denied];
    let personal = o.ungranted_personal_data(&grant_list, &ignore).len();
    let privileged = o.privileged(PRIVILEGED_ACTIONS).len();
    assert!(personal > 0 && privileged > 0);
    assert_eq!(by_rule.get("personal_data_access"), Some(&personal));
    assert_eq!(by_rule.get("privileged_action"), Some(&privileged));
    let predicted: BTreeSet<_> = o
        .failure_burst_windows(10, 60)
        .into_iter()
        .map(|w| (w.tenant_id, w.actor_id, w.window_start))
        .collect();
    assert!(predicted.len() >= 3, "{predicted:?}");
    assert_eq!(bursts, predicted);
}
