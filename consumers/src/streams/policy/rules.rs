//! Policy-decision violation rules (pure): `policy_denied`, `unenforced_deny`,
//! `deny_rate`.
//!
//! Guarantee: a violation id is derived only from what it is about, with
//! [`crate::streams::usage::rules::violation_id`]: `policy_denied` and `unenforced_deny` once per
//! (tenant, decision id), `deny_rate` once per (tenant, policy, event-time window,
//! window length, threshold). Given the deny count earlier batches left in a window,
//! any split of the same decisions into batches raises the same set of ids.
//!
//! - `policy_denied`: an enforced `deny` whose severity is at least `min_severity`
//!   (default `high`); the violation has the decision's severity.
//! - `unenforced_deny`: a `deny` in monitor mode (dry run: it would have blocked and did
//!   not), severity at least `min_severity` (default `info`: every one).
//! - `deny_rate`: more than `threshold` (default 100) `deny` decisions, enforced or not,
//!   of one (tenant, policy) within an epoch-aligned window of `window_secs` (default
//!   300) by `occurred_at`. The commit keeps the count per window (under a row lock),
//!   passes it in as `before`, and adds [`WindowStep::added`]; the crossing decision
//!   is the evidence.

use super::super::clip;
use super::super::window::{self, Window, WindowStep};
use crate::streams::usage::rules::violation_id;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::BTreeMap;
use tally_schemas::{ComplianceViolation, Decision, Enforcement, PolicyDecision, Severity};

/// Every rule this stream raises (the `rule` of its violations).
pub const RULES: [&str; 3] = ["policy_denied", "unenforced_deny", "deny_rate"];

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyDeniedRule {
    pub enabled: bool,
    pub min_severity: Severity,
}

impl Default for PolicyDeniedRule {
    fn default() -> Self {
        Self {
            enabled: true,
            min_severity: Severity::High,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnenforcedDenyRule {
    pub enabled: bool,
    pub min_severity: Severity,
}

impl Default for UnenforcedDenyRule {
    fn default() -> Self {
        Self {
            enabled: true,
            min_severity: Severity::Info,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DenyRateRule {
    pub enabled: bool,
    /// Raised when the window's count goes above this.
    pub threshold: u32,
    pub window_secs: Window,
    pub severity: Severity,
}

impl Default for DenyRateRule {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 100,
            window_secs: Window::FIVE_MINUTES,
            severity: Severity::Medium,
        }
    }
}

/// The three rules' settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyRules {
    pub policy_denied: PolicyDeniedRule,
    pub unenforced_deny: UnenforcedDenyRule,
    pub deny_rate: DenyRateRule,
}

/// A violation about one decision, once per (rule, tenant, decision id).
fn per_decision(
    rule: &str,
    d: &PolicyDecision,
    what: &str,
    detected_at: DateTime<Utc>,
) -> ComplianceViolation {
    ComplianceViolation {
        violation_id: violation_id(rule, &[&d.tenant_id, &d.decision_id]),
        rule: rule.into(),
        severity: d.severity,
        tenant_id: d.tenant_id.clone(),
        subject_type: "policy".into(),
        subject_id: d.policy_id.clone(),
        window_start: d.occurred_at,
        window_end: d.occurred_at,
        observed: Decimal::ONE,
        threshold: Decimal::ZERO,
        evidence_event_ids: vec![d.event_id.to_string()],
        detected_at,
        message: format!(
            "policy {} {what} decision {} ({} severity): {}",
            clip(&d.policy_id, 256),
            clip(&d.decision_id, 256),
            d.severity,
            clip(&d.reason, 512)
        ),
    }
}

/// An enforced deny at or above the configured severity.
pub fn policy_denied(
    d: &PolicyDecision,
    rule: &PolicyDeniedRule,
    detected_at: DateTime<Utc>,
) -> Option<ComplianceViolation> {
    (rule.enabled
        && d.decision == Decision::Deny
        && d.enforcement == Enforcement::Enforce
        && d.severity >= rule.min_severity)
        .then(|| per_decision("policy_denied", d, "denied (enforced)", detected_at))
}

/// A deny in monitor mode: it would have blocked and did not.
pub fn unenforced_deny(
    d: &PolicyDecision,
    rule: &UnenforcedDenyRule,
    detected_at: DateTime<Utc>,
) -> Option<ComplianceViolation> {
    (rule.enabled
        && d.decision == Decision::Deny
        && d.enforcement == Enforcement::Monitor
        && d.severity >= rule.min_severity)
        .then(|| {
            per_decision(
                "unenforced_deny",
                d,
                "would have denied (monitor mode, not enforced)",
                detected_at,
            )
        })
}

/// The (tenant, policy, window) a deny is counted in (the commit's lock order).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DenyRateKey {
    pub tenant_id: String,
    pub policy_id: String,
    pub window_start: DateTime<Utc>,
}

/// The key a decision counts under, if it is a deny and the rule is on.
pub fn deny_rate_key(d: &PolicyDecision, rule: &DenyRateRule) -> Option<DenyRateKey> {
    (rule.enabled && d.decision == Decision::Deny).then(|| DenyRateKey {
        tenant_id: d.tenant_id.clone(),
        policy_id: d.policy_id.clone(),
        window_start: rule.window_secs.start(d.occurred_at),
    })
}

/// A batch's denies grouped by key, each group in batch order, keys sorted.
pub fn deny_rate_groups<'a>(
    batch: &'a [PolicyDecision],
    rule: &DenyRateRule,
) -> BTreeMap<DenyRateKey, Vec<&'a PolicyDecision>> {
    window::group(batch, |d| deny_rate_key(d, rule))
}

/// `deny_rate` for one key: `before` is the count earlier batches left in the window,
/// `denies` this batch's denies of that key in batch order.
pub fn deny_rate(
    key: &DenyRateKey,
    before: i64,
    denies: &[&PolicyDecision],
    rule: &DenyRateRule,
    detected_at: DateTime<Utc>,
) -> WindowStep {
    let added = i64::try_from(denies.len()).unwrap_or(i64::MAX);
    let at_least = i64::from(rule.threshold) + 1;
    let violation = window::crossing(before, denies.len(), at_least).map(|(i, count)| {
        let w = rule.window_secs;
        let start = key.window_start.to_rfc3339();
        let (secs, threshold) = (w.secs().to_string(), rule.threshold.to_string());
        ComplianceViolation {
            violation_id: violation_id(
                "deny_rate",
                &[&key.tenant_id, &key.policy_id, &start, &secs, &threshold],
            ),
            rule: "deny_rate".into(),
            severity: rule.severity,
            tenant_id: key.tenant_id.clone(),
            subject_type: "policy".into(),
            subject_id: key.policy_id.clone(),
            window_start: key.window_start,
            window_end: w.end(key.window_start),
            observed: Decimal::from(count),
            threshold: Decimal::from(rule.threshold),
            evidence_event_ids: vec![denies[i].event_id.to_string()],
            detected_at,
            message: format!(
                "policy {} of tenant {} denied more than {threshold} requests in the {secs} s from {start}",
                clip(&key.policy_id, 256),
                clip(&key.tenant_id, 256),
            ),
        }
    });
    WindowStep { added, violation }
}

/// All three rules over one batch. `before` gives the stored count of a deny-rate
/// key; the result is the violations (in batch order for the per-decision rules,
/// then by key) and the count to add per key.
pub fn evaluate(
    batch: &[PolicyDecision],
    rules: &PolicyRules,
    before: impl Fn(&DenyRateKey) -> i64,
    detected_at: DateTime<Utc>,
) -> (Vec<ComplianceViolation>, Vec<(DenyRateKey, i64)>) {
    let mut out = Vec::new();
    for d in batch {
        out.extend(policy_denied(d, &rules.policy_denied, detected_at));
        out.extend(unenforced_deny(d, &rules.unenforced_deny, detected_at));
    }
    let mut counts = Vec::new();
    for (key, denies) in deny_rate_groups(batch, &rules.deny_rate) {
        let step = deny_rate(&key, before(&key), &denies, &rules.deny_rate, detected_at);
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
    use std::collections::{BTreeSet, HashMap};
    use tally_schemas::Event;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap()
    }

    fn decision(
        n: usize,
        tenant: u8,
        policy: u8,
        secs: i64,
        decision: Decision,
        enforcement: Enforcement,
        severity: Severity,
    ) -> PolicyDecision {
        let mut d = tally_schemas::sample_policy_decision();
        d.decision_id = format!("dec-{n}");
        d.event_id = super::super::opa::event_id(&d.decision_id);
        d.tenant_id = format!("t{tenant}");
        d.policy_id = format!("p{policy}");
        d.occurred_at = t0() + Duration::seconds(secs);
        (d.decision, d.enforcement, d.severity) = (decision, enforcement, severity);
        d
    }

    fn deny(n: usize, secs: i64) -> PolicyDecision {
        decision(
            n,
            0,
            0,
            secs,
            Decision::Deny,
            Enforcement::Enforce,
            Severity::High,
        )
    }

    #[test]
    fn per_decision_rules() {
        let rules = PolicyRules::default();
        let now = t0();
        let d = deny(1, 0);
        let v = policy_denied(&d, &rules.policy_denied, now).unwrap();
        assert_eq!(
            v.violation_id,
            violation_id("policy_denied", &["t0", "dec-1"])
        );
        assert_eq!((v.severity, v.subject_id.as_str()), (Severity::High, "p0"));
        v.validate().unwrap();
        assert!(unenforced_deny(&d, &rules.unenforced_deny, now).is_none());
        let mut low = d.clone();
        low.severity = Severity::Medium;
        assert!(policy_denied(&low, &rules.policy_denied, now).is_none());
        let mut dry = low.clone();
        dry.enforcement = Enforcement::Monitor;
        assert!(policy_denied(&dry, &rules.policy_denied, now).is_none());
        let v = unenforced_deny(&dry, &rules.unenforced_deny, now).unwrap();
        assert_eq!(v.rule, "unenforced_deny");
        assert!(v.message.contains("monitor mode"));
        v.validate().unwrap();
        let mut allow = d.clone();
        allow.decision = Decision::Allow;
        assert!(policy_denied(&allow, &rules.policy_denied, now).is_none());
        let off = PolicyDeniedRule {
            enabled: false,
            ..PolicyDeniedRule::default()
        };
        assert!(policy_denied(&d, &off, now).is_none());
    }

    #[test]
    fn deny_rate_crosses_once_per_window() {
        let rule = DenyRateRule {
            threshold: 2,
            window_secs: Window::seconds(60).unwrap(),
            ..DenyRateRule::default()
        };
        let batch: Vec<_> = (0..4).map(|n| deny(n, 10 + n as i64)).collect();
        let groups = deny_rate_groups(&batch, &rule);
        assert_eq!(groups.len(), 1);
        let (key, denies) = groups.iter().next().unwrap();
        assert_eq!(key.window_start, t0());
        let step = deny_rate(key, 0, denies, &rule, t0());
        assert_eq!(step.added, 4);
        let v = step.violation.unwrap();
        assert_eq!(v.observed, Decimal::from(3));
        assert_eq!(v.evidence_event_ids, vec![batch[2].event_id.to_string()]);
        assert_eq!(v.window_end, t0() + Duration::seconds(60));
        v.validate().unwrap();
        assert!(deny_rate(key, 3, denies, &rule, t0()).violation.is_none());
        assert!(deny_rate(key, 0, &denies[..2], &rule, t0())
            .violation
            .is_none());
        // A deny a window later counts in another window.
        assert_ne!(deny_rate_key(&deny(9, 70), &rule).unwrap(), key.clone());
        let mut allow = deny(10, 0);
        allow.decision = Decision::Allow;
        assert!(deny_rate_key(&allow, &rule).is_none());
    }

    #[test]
    fn rules_deserialize_with_defaults() {
        let r: PolicyRules =
            toml::from_str("[deny_rate]\nthreshold = 5\nwindow_secs = 60\n").unwrap();
        assert_eq!(r.deny_rate.threshold, 5);
        assert_eq!(r.deny_rate.window_secs.secs(), 60);
        assert_eq!(r.policy_denied, PolicyDeniedRule::default());
        assert!(toml::from_str::<PolicyRules>("[deny_rate]\nwindow_secs = 0\n").is_err());
    }

    /// Runs batches one after the other, keeping the per-window counts like the commit.
    fn run(batches: &[&[PolicyDecision]], rules: &PolicyRules) -> BTreeSet<uuid::Uuid> {
        let mut counts: HashMap<DenyRateKey, i64> = HashMap::new();
        let mut ids = BTreeSet::new();
        for b in batches {
            let (v, added) = evaluate(b, rules, |k| counts.get(k).copied().unwrap_or(0), t0());
            for x in &v {
                assert!(ids.insert(x.violation_id), "raised twice: {x:?}");
            }
            for (k, n) in added {
                *counts.entry(k).or_default() += n;
            }
        }
        ids
    }

    proptest! {
        /// Any split of the same decisions into batches raises the same violation ids,
        /// each once, and deny_rate exactly for the windows whose count ends above it.
        #[test]
        fn any_split_raises_the_same_ids(
            specs in prop::collection::vec(
                (0u8..2, 0u8..2, 0i64..600, 0u8..3, any::<bool>(), 0usize..5), 1..80),
            cuts in prop::collection::btree_set(0usize..80, 0..10),
            threshold in 0u32..12,
            window in 1u64..400,
        ) {
            let batch: Vec<PolicyDecision> = specs
                .iter()
                .enumerate()
                .map(|(n, (t, p, s, dec, enf, sev))| {
                    let dec = [Decision::Deny, Decision::Allow, Decision::Warn][usize::from(*dec)];
                    let enf = if *enf { Enforcement::Enforce } else { Enforcement::Monitor };
                    decision(n, *t, *p, *s, dec, enf, Severity::ALL[*sev])
                })
                .collect();
            let rules = PolicyRules {
                deny_rate: DenyRateRule {
                    threshold,
                    window_secs: Window::seconds(window).unwrap(),
                    ..DenyRateRule::default()
                },
                ..PolicyRules::default()
            };
            let whole = run(&[&batch], &rules);
            let mut parts: Vec<&[PolicyDecision]> = Vec::new();
            let mut from = 0;
            for c in cuts.iter().copied().filter(|c| *c < batch.len()).chain([batch.len()]) {
                parts.push(&batch[from..c]);
                from = c;
            }
            prop_assert_eq!(&run(&parts, &rules), &whole);
            let mut per_window: HashMap<DenyRateKey, i64> = HashMap::new();
            for d in &batch {
                if let Some(k) = deny_rate_key(d, &rules.deny_rate) {
                    *per_window.entry(k).or_default() += 1;
                }
            }
            let over = per_window.values().filter(|n| **n > i64::from(threshold)).count();
            let singles = batch.iter().filter(|d| {
                policy_denied(d, &rules.policy_denied, t0()).is_some()
                    || unenforced_deny(d, &rules.unenforced_deny, t0()).is_some()
            }).count();
            prop_assert_eq!(whole.len(), over + singles);
        }
    }
}
