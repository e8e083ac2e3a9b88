//! Audit-event violation rules (pure): `personal_data_access`, `privileged_action`,
//! `failed_action_burst`.
//!
//! Guarantee: a violation id is derived only from what it is about, with
//! [`crate::streams::usage::rules::violation_id`]: `personal_data_access` and `privileged_action` once
//! per (tenant, event id), `failed_action_burst` once per (tenant, actor, event-time
//! window, window length, threshold). Given the failure count earlier batches left in
//! a window, any split of the same events into batches raises the same set of ids.
//!
//! The rules see events as they are stored: user actor ids already pseudonymised
//! (keyed HMAC, `crate::audit::pseudonym` on the audit-log branch), so the same
//! person keeps one actor id and the grants passed in must use the same form.
//!
//! - `personal_data_access`: `personal_data = true` by an actor with no grant for the
//!   event's `resource_type` (a grant of `*` covers every type). Outcomes in
//!   `ignore_outcomes` (default `failure`, `denied`: nothing was read; repeated ones
//!   are `failed_action_burst`'s) raise nothing. Severity `severity` (default high).
//! - `privileged_action`: an action on the configured list, whatever its outcome (an
//!   attempt is itself worth a record). An entry matches the action exactly, or, when
//!   it ends in `*`, every action starting with what precedes the `*`; the longest
//!   matching entry gives the severity.
//! - `failed_action_burst`: at least `at_least` (default 10) events with outcome
//!   `failure` or `denied` by one actor (type and id) of a tenant within an
//!   epoch-aligned window of `window_secs` (default 60) by `occurred_at`. The commit
//!   keeps the count per window (under a row lock), passes it in as `before`, and adds
//!   [`WindowStep::added`]; the crossing event is the evidence.

use super::super::clip;
use super::super::window::{self, Window};
use crate::streams::usage::rules::violation_id;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use tally_schemas::{ActorType, AuditEvent, ComplianceViolation, Outcome, Severity};

/// Every rule this stream raises (the `rule` of its violations).
pub const RULES: [&str; 3] = [
    "personal_data_access",
    "privileged_action",
    "failed_action_burst",
];

pub use super::super::window::WindowStep;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersonalDataRule {
    pub enabled: bool,
    pub severity: Severity,
    pub ignore_outcomes: Vec<Outcome>,
}

impl Default for PersonalDataRule {
    fn default() -> Self {
        Self {
            enabled: true,
            severity: Severity::High,
            ignore_outcomes: vec![Outcome::Failure, Outcome::Denied],
        }
    }
}

/// One entry of the privileged-action list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivilegedAction {
    /// An action, or a prefix followed by `*`.
    pub action: String,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivilegedActionRule {
    pub actions: Vec<PrivilegedAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailedBurstRule {
    pub enabled: bool,
    pub at_least: NonZeroU32,
    pub window_secs: Window,
    pub severity: Severity,
}

impl Default for FailedBurstRule {
    fn default() -> Self {
        Self {
            enabled: true,
            at_least: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
            window_secs: Window::MINUTE,
            severity: Severity::Medium,
        }
    }
}

/// The three rules' settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditRules {
    pub personal_data_access: PersonalDataRule,
    pub privileged_action: PrivilegedActionRule,
    pub failed_action_burst: FailedBurstRule,
}

/// Who may touch personal data of which resource types: tenant → actor id →
/// resource types, `*` meaning all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    by_tenant: HashMap<String, HashMap<String, HashSet<String>>>,
}

impl Grants {
    pub fn insert(&mut self, tenant_id: &str, actor_id: &str, resource_type: &str) {
        self.by_tenant
            .entry(tenant_id.into())
            .or_default()
            .entry(actor_id.into())
            .or_default()
            .insert(resource_type.into());
    }

    /// Whether the actor holds a grant for the resource type (or `*`).
    pub fn allows(&self, tenant_id: &str, actor_id: &str, resource_type: &str) -> bool {
        self.by_tenant
            .get(tenant_id)
            .and_then(|actors| actors.get(actor_id))
            .is_some_and(|types| types.contains(resource_type) || types.contains("*"))
    }
}

impl<'a> FromIterator<(&'a str, &'a str, &'a str)> for Grants {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str, &'a str)>>(iter: I) -> Self {
        let mut g = Grants::default();
        for (t, a, r) in iter {
            g.insert(t, a, r);
        }
        g
    }
}

fn per_event(
    rule: &str,
    e: &AuditEvent,
    severity: Severity,
    what: String,
    detected_at: DateTime<Utc>,
) -> ComplianceViolation {
    ComplianceViolation {
        violation_id: violation_id(rule, &[&e.tenant_id, &e.event_id.to_string()]),
        rule: rule.into(),
        severity,
        tenant_id: e.tenant_id.clone(),
        subject_type: "actor".into(),
        subject_id: e.actor_id.clone(),
        window_start: e.occurred_at,
        window_end: e.occurred_at,
        observed: Decimal::ONE,
        threshold: Decimal::ZERO,
        evidence_event_ids: vec![e.event_id.to_string()],
        detected_at,
        message: format!(
            "{} {} {what} ({} {} {}, {})",
            e.actor_type,
            clip(&e.actor_id, 256),
            clip(&e.action, 256),
            clip(&e.resource_type, 256),
            clip(&e.resource_id, 256),
            e.outcome
        ),
    }
}

/// Personal data touched by an actor without a grant for the resource type.
pub fn personal_data_access(
    e: &AuditEvent,
    rule: &PersonalDataRule,
    grants: &Grants,
    detected_at: DateTime<Utc>,
) -> Option<ComplianceViolation> {
    (rule.enabled
        && e.personal_data
        && !rule.ignore_outcomes.contains(&e.outcome)
        && !grants.allows(&e.tenant_id, &e.actor_id, &e.resource_type))
    .then(|| {
        let what = "on personal data without a grant for this resource type".to_string();
        per_event("personal_data_access", e, rule.severity, what, detected_at)
    })
}

/// Severity of `action` by the longest matching entry, if any.
pub fn privileged_severity(action: &str, rule: &PrivilegedActionRule) -> Option<Severity> {
    rule.actions
        .iter()
        .filter_map(|p| match p.action.strip_suffix('*') {
            Some(prefix) => action
                .starts_with(prefix)
                .then_some((prefix.len(), 0, p.severity)),
            None => (p.action == action).then_some((p.action.len(), 1, p.severity)),
        })
        .max()
        .map(|(_, _, s)| s)
}

/// An action on the configured list.
pub fn privileged_action(
    e: &AuditEvent,
    rule: &PrivilegedActionRule,
    detected_at: DateTime<Utc>,
) -> Option<ComplianceViolation> {
    let severity = privileged_severity(&e.action, rule)?;
    Some(per_event(
        "privileged_action",
        e,
        severity,
        "performed a privileged action".into(),
        detected_at,
    ))
}

/// The (tenant, actor, window) a failure is counted in (the commit's lock order).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BurstKey {
    pub tenant_id: String,
    pub actor_type: ActorType,
    pub actor_id: String,
    pub window_start: DateTime<Utc>,
}

/// The key an event counts under, if it failed or was denied and the rule is on.
pub fn burst_key(e: &AuditEvent, rule: &FailedBurstRule) -> Option<BurstKey> {
    (rule.enabled && matches!(e.outcome, Outcome::Failure | Outcome::Denied)).then(|| BurstKey {
        tenant_id: e.tenant_id.clone(),
        actor_type: e.actor_type,
        actor_id: e.actor_id.clone(),
        window_start: rule.window_secs.start(e.occurred_at),
    })
}

/// A batch's failures grouped by key, each group in batch order, keys sorted.
pub fn burst_groups<'a>(
    batch: &'a [AuditEvent],
    rule: &FailedBurstRule,
) -> BTreeMap<BurstKey, Vec<&'a AuditEvent>> {
    window::group(batch, |e| burst_key(e, rule))
}

/// `failed_action_burst` for one key: `before` is the count earlier batches left in
/// the window, `failures` this batch's failures of that key in batch order.
pub fn failed_action_burst(
    key: &BurstKey,
    before: i64,
    failures: &[&AuditEvent],
    rule: &FailedBurstRule,
    detected_at: DateTime<Utc>,
) -> WindowStep {
    let added = i64::try_from(failures.len()).unwrap_or(i64::MAX);
    let at_least = i64::from(rule.at_least.get());
    let violation = window::crossing(before, failures.len(), at_least).map(|(i, count)| {
        let w = rule.window_secs;
        let start = key.window_start.to_rfc3339();
        let (secs, n) = (w.secs().to_string(), at_least.to_string());
        let actor = format!("{}:{}", key.actor_type, key.actor_id);
        ComplianceViolation {
            violation_id: violation_id(
                "failed_action_burst",
                &[&key.tenant_id, &actor, &start, &secs, &n],
            ),
            rule: "failed_action_burst".into(),
            severity: rule.severity,
            tenant_id: key.tenant_id.clone(),
            subject_type: "actor".into(),
            subject_id: key.actor_id.clone(),
            window_start: key.window_start,
            window_end: w.end(key.window_start),
            observed: Decimal::from(count),
            threshold: Decimal::from(at_least),
            evidence_event_ids: vec![failures[i].event_id.to_string()],
            detected_at,
            message: format!(
                "{} failed or denied actions by {} in the {secs} s from {start}",
                count,
                clip(&actor, 300)
            ),
        }
    });
    WindowStep { added, violation }
}

/// All three rules over one batch. `before` gives the stored count of a burst key;
/// the result is the violations (in batch order for the per-event rules, then by
/// key) and the count to add per key.
pub fn evaluate(
    batch: &[AuditEvent],
    rules: &AuditRules,
    grants: &Grants,
    before: impl Fn(&BurstKey) -> i64,
    detected_at: DateTime<Utc>,
) -> (Vec<ComplianceViolation>, Vec<(BurstKey, i64)>) {
    let mut out = Vec::new();
    for e in batch {
        out.extend(personal_data_access(
            e,
            &rules.personal_data_access,
            grants,
            detected_at,
        ));
        out.extend(privileged_action(e, &rules.privileged_action, detected_at));
    }
    let mut counts = Vec::new();
    let rule = &rules.failed_action_burst;
    for (key, failures) in burst_groups(batch, rule) {
        let step = failed_action_burst(&key, before(&key), &failures, rule, detected_at);
        out.extend(step.violation);
        counts.push((key, step.added));
    }
    (out, counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;
    use tally_schemas::Event;
    use uuid::Uuid;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap()
    }

    fn event(n: u128, actor: u8, secs: i64, outcome: Outcome) -> AuditEvent {
        let mut e = tally_schemas::sample_audit_event();
        e.event_id = Uuid::from_u128(n + 1);
        e.actor_type = ActorType::User;
        e.actor_id = format!("a{actor}");
        e.occurred_at = t0() + Duration::seconds(secs);
        e.outcome = outcome;
        e
    }

    #[test]
    fn personal_data_needs_a_grant() {
        let rule = PersonalDataRule::default();
        let grants: Grants = [("tenant-acme", "a1", "budget"), ("tenant-acme", "a2", "*")]
            .into_iter()
            .collect();
        let mut e = event(1, 0, 0, Outcome::Success);
        assert!(
            personal_data_access(&e, &rule, &grants, t0()).is_none(),
            "no personal data"
        );
        e.personal_data = true;
        let v = personal_data_access(&e, &rule, &grants, t0()).unwrap();
        assert_eq!(
            v.violation_id,
            violation_id(
                "personal_data_access",
                &["tenant-acme", &e.event_id.to_string()]
            )
        );
        assert_eq!((v.severity, v.subject_id.as_str()), (Severity::High, "a0"));
        v.validate().unwrap();
        for actor in [1, 2] {
            e.actor_id = format!("a{actor}");
            assert!(personal_data_access(&e, &rule, &grants, t0()).is_none());
        }
        e.actor_id = "a1".into();
        e.resource_type = "user_profile".into();
        assert!(
            personal_data_access(&e, &rule, &grants, t0()).is_some(),
            "a1 holds budget only"
        );
        e.tenant_id = "other".into();
        e.actor_id = "a2".into();
        assert!(
            personal_data_access(&e, &rule, &grants, t0()).is_some(),
            "grants are per tenant"
        );
        e.outcome = Outcome::Denied;
        assert!(
            personal_data_access(&e, &rule, &grants, t0()).is_none(),
            "nothing was read"
        );
    }

    #[test]
    fn privileged_actions_by_longest_match() {
        let rule: PrivilegedActionRule = toml::from_str(
            "actions = [{ action = \"budget.*\", severity = \"medium\" }, \
             { action = \"budget.delete\", severity = \"critical\" }, \
             { action = \"*\", severity = \"info\" }, \
             { action = \"key.rotate\", severity = \"high\" }]",
        )
        .unwrap();
        assert_eq!(
            privileged_severity("budget.update", &rule),
            Some(Severity::Medium)
        );
        assert_eq!(
            privileged_severity("budget.delete", &rule),
            Some(Severity::Critical)
        );
        assert_eq!(
            privileged_severity("key.rotate", &rule),
            Some(Severity::High)
        );
        assert_eq!(
            privileged_severity("key.rotated", &rule),
            Some(Severity::Info)
        );
        let none = PrivilegedActionRule::default();
        assert_eq!(privileged_severity("budget.delete", &none), None);
        let mut e = event(3, 0, 0, Outcome::Denied);
        e.action = "budget.delete".into();
        let v = privileged_action(&e, &rule, t0()).unwrap();
        assert_eq!(v.severity, Severity::Critical);
        assert!(v.message.contains("budget.delete") && v.message.contains("denied"));
        v.validate().unwrap();
    }

    #[test]
    fn burst_crosses_at_n() {
        let rule = FailedBurstRule {
            at_least: NonZeroU32::new(3).unwrap(),
            ..FailedBurstRule::default()
        };
        let batch = vec![
            event(0, 0, 1, Outcome::Failure),
            event(1, 0, 2, Outcome::Success),
            event(2, 0, 3, Outcome::Denied),
            event(3, 1, 4, Outcome::Failure),
            event(4, 0, 5, Outcome::Failure),
            event(5, 0, 61, Outcome::Failure),
        ];
        let (v, counts) = evaluate(
            &batch,
            &AuditRules {
                failed_action_burst: rule,
                ..AuditRules::default()
            },
            &Grants::default(),
            |_| 0,
            t0(),
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].evidence_event_ids, vec![batch[4].event_id.to_string()]);
        assert_eq!(
            (v[0].observed, v[0].threshold),
            (Decimal::from(3), Decimal::from(3))
        );
        v[0].validate().unwrap();
        let added: Vec<i64> = counts.iter().map(|(_, n)| *n).collect();
        assert_eq!(added, vec![3, 1, 1]);
        assert!(toml::from_str::<FailedBurstRule>("at_least = 0").is_err());
    }

    /// Runs batches one after the other, keeping the per-window counts like the commit.
    fn run(batches: &[&[AuditEvent]], rules: &AuditRules, grants: &Grants) -> Vec<Uuid> {
        let mut counts: HashMap<BurstKey, i64> = HashMap::new();
        let mut ids = Vec::new();
        for b in batches {
            let (v, added) = evaluate(
                b,
                rules,
                grants,
                |k| counts.get(k).copied().unwrap_or(0),
                t0(),
            );
            ids.extend(v.iter().map(|x| x.violation_id));
            for (k, n) in added {
                *counts.entry(k).or_default() += n;
            }
        }
        ids.sort();
        ids
    }

    proptest! {
        /// Any split of the same events into batches raises the same violation ids, none
        /// twice, and a burst exactly for the windows whose failures reach N.
        #[test]
        fn any_split_raises_the_same_ids(
            specs in prop::collection::vec((0u8..3, 0i64..300, 0usize..5, any::<bool>(), 0u8..3), 1..80),
            cuts in prop::collection::btree_set(0usize..80, 0..10),
            at_least in 1u32..8,
            window in 1u64..200,
        ) {
            let batch: Vec<AuditEvent> = specs
                .iter()
                .enumerate()
                .map(|(n, (actor, secs, outcome, personal, action))| {
                    let mut e = event(n as u128, *actor, *secs, Outcome::ALL[*outcome]);
                    e.personal_data = *personal;
                    e.action = ["budget.update", "key.rotate", "chat.read"][usize::from(*action)].into();
                    e
                })
                .collect();
            let rules = AuditRules {
                privileged_action: toml::from_str("actions = [{ action = \"key.*\", severity = \"high\" }]").unwrap(),
                failed_action_burst: FailedBurstRule {
                    at_least: NonZeroU32::new(at_least).unwrap(),
                    window_secs: Window::seconds(window).unwrap(),
                    ..FailedBurstRule::default()
                },
                ..AuditRules::default()
            };
            let grants: Grants = [("tenant-acme", "a1", "*")].into_iter().collect();
            let whole = run(&[&batch], &rules, &grants);
            let mut dedup = whole.clone();
            dedup.dedup();
            prop_assert_eq!(&dedup, &whole, "an id raised twice");
            let mut parts: Vec<&[AuditEvent]> = Vec::new();
            let mut from = 0;
            for c in cuts.iter().copied().filter(|c| *c < batch.len()).chain([batch.len()]) {
                parts.push(&batch[from..c]);
                from = c;
            }
            prop_assert_eq!(&run(&parts, &rules, &grants), &whole);
            let mut per_window: HashMap<BurstKey, i64> = HashMap::new();
            for e in &batch {
                if let Some(k) = burst_key(e, &rules.failed_action_burst) {
                    *per_window.entry(k).or_default() += 1;
                }
            }
            let bursts = per_window.values().filter(|n| **n >= i64::from(at_least)).count();
            let singles: usize = batch.iter().map(|e| {
                usize::from(personal_data_access(e, &rules.personal_data_access, &grants, t0()).is_some())
                    + usize::from(privileged_action(e, &rules.privileged_action, t0()).is_some())
            }).sum();
            prop_assert_eq!(whole.len(), bursts + singles);
        }
    }
}
