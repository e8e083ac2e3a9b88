//! What the pipeline must end up with for a generated stream, computed from the
//! generated messages alone (never from the consumer's code).
//!
//! Guarantee: every function here is a pure function of the messages in stream
//! order. The unique events of a stream are the first occurrence of each dedup
//! key — usage `(tenant_id, event_id)`, policy `(tenant_id, decision_id)`, audit
//! `(tenant_id, event_id)` — in stream order, which for one tenant is its
//! partition order (messages are keyed by tenant). Counts and windows are taken
//! over those unique events only; poison is counted per expected class.

use crate::common::StreamMessage;
use crate::gen::{GenKind, GenMessage};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use tally_schemas::{
    ActorType, AuditEvent, Decision, Enforcement, Outcome, PolicyDecision, Severity, UsageEvent,
};

/// What identifies a re-send of an event within its stream.
pub trait DedupKey {
    fn tenant_id(&self) -> &str;
    /// The id a re-send repeats (`decision_id` for policy decisions, else `event_id`).
    fn dedup_id(&self) -> String;
}

/// Implements [`DedupKey`] for event types with a `tenant_id`, given how to
/// read the dedup id.
macro_rules! dedup_key {
    ($($t:ty => |$e:ident| $id:expr),* $(,)?) => {$(
        impl DedupKey for $t {
            fn tenant_id(&self) -> &str {
                &self.tenant_id
            }
            fn dedup_id(&self) -> String {
                let $e = self;
                $id
            }
        }
    )*};
}

dedup_key!(
    UsageEvent => |e| e.event_id.to_string(),
    PolicyDecision => |d| d.decision_id.clone(),
    AuditEvent => |e| e.event_id.to_string(),
);

/// A generated message as the oracle reads it: its tag and its event.
pub trait Tagged<E> {
    fn tag(&self) -> GenKind;
    fn event(&self) -> Option<&E>;
}

impl Tagged<UsageEvent> for GenMessage {
    fn tag(&self) -> GenKind {
        self.kind
    }
    fn event(&self) -> Option<&UsageEvent> {
        self.event.as_ref()
    }
}

impl<E> Tagged<E> for StreamMessage<E> {
    fn tag(&self) -> GenKind {
        self.kind
    }
    fn event(&self) -> Option<&E> {
        self.event.as_ref()
    }
}

/// The unique events of a stream and what else it held.
#[derive(Debug, Clone, PartialEq)]
pub struct Unique<E> {
    /// The first occurrence of each dedup key, in stream order.
    pub events: Vec<E>,
    /// Messages repeating a key already seen, with the same content.
    pub resends: usize,
    /// Messages repeating a key already seen with other content (dedup
    /// conflicts; the generators make none).
    pub conflicts: usize,
    /// Poison messages per expected dead-letter class.
    pub malformed: BTreeMap<&'static str, usize>,
    /// Positions of messages whose tag disagrees with the stream: a `Good` on a
    /// key already seen, a `Duplicate` of an unseen key, or either without an
    /// event (the generators make none).
    pub mistagged: Vec<usize>,
    /// Messages read.
    pub messages: usize,
}

impl<E> Unique<E> {
    /// Messages that must end up as dead letters.
    pub fn dead_letters(&self) -> usize {
        self.malformed.values().sum()
    }
}

/// The unique events of `msgs` (see [`Unique`]).
pub fn unique<E, M>(msgs: &[M]) -> Unique<E>
where
    E: DedupKey + Clone + PartialEq,
    M: Tagged<E>,
{
    let mut out = Unique {
        events: Vec::new(),
        resends: 0,
        conflicts: 0,
        malformed: BTreeMap::new(),
        mistagged: Vec::new(),
        messages: msgs.len(),
    };
    let mut first: HashMap<(String, String), usize> = HashMap::new();
    for (i, m) in msgs.iter().enumerate() {
        let kind = m.tag();
        if let GenKind::Malformed { class } = kind {
            *out.malformed.entry(class).or_default() += 1;
            continue;
        }
        let Some(e) = m.event() else {
            out.mistagged.push(i);
            continue;
        };
        let key = (e.tenant_id().to_string(), e.dedup_id());
        match first.get(&key) {
            Some(&at) => {
                if out.events[at] == *e {
                    out.resends += 1;
                } else {
                    out.conflicts += 1;
                }
                if kind != GenKind::Duplicate {
                    out.mistagged.push(i);
                }
            }
            None => {
                first.insert(key, out.events.len());
                out.events.push(e.clone());
                if kind != GenKind::Good {
                    out.mistagged.push(i);
                }
            }
        }
    }
    out
}

/// Start of the epoch-aligned window of `secs` seconds holding `t`.
pub fn window_start(t: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    let secs = secs.max(1);
    DateTime::from_timestamp(t.timestamp().div_euclid(secs) * secs, 0).unwrap_or(t)
}

/// The usage stream's unique events.
pub fn usage(msgs: &[GenMessage]) -> Unique<UsageEvent> {
    unique(msgs)
}

/// Key of the policy decision counts (the rollup tables' key without the bucket).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub tenant_id: String,
    pub policy_id: String,
    pub decision: Decision,
    pub enforcement: Enforcement,
}

/// Decisions and their summed evaluation time under one [`PolicyKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyCount {
    pub decisions: u64,
    pub evaluation_ms: u64,
}

/// A (tenant, policy, window) `deny_rate` counts in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DenyWindow {
    pub tenant_id: String,
    pub policy_id: String,
    pub window_start: DateTime<Utc>,
}

/// What the policy stream must leave behind.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyOracle {
    pub unique: Unique<PolicyDecision>,
    /// Unique decisions per (tenant, policy, decision, enforcement).
    pub counts: BTreeMap<PolicyKey, PolicyCount>,
}

/// The policy stream's unique decisions and counts.
pub fn policy(msgs: &[StreamMessage<PolicyDecision>]) -> PolicyOracle {
    let unique = unique(msgs);
    let mut counts: BTreeMap<PolicyKey, PolicyCount> = BTreeMap::new();
    for d in &unique.events {
        let key = PolicyKey {
            tenant_id: d.tenant_id.clone(),
            policy_id: d.policy_id.clone(),
            decision: d.decision,
            enforcement: d.enforcement,
        };
        let c = counts.entry(key).or_default();
        c.decisions += 1;
        c.evaluation_ms += u64::try_from(d.evaluation_ms).unwrap_or(0);
    }
    PolicyOracle { unique, counts }
}

impl PolicyOracle {
    /// Denies (enforced or not) per (tenant, policy, window of `window_secs`).
    pub fn deny_windows(&self, window_secs: i64) -> BTreeMap<DenyWindow, u64> {
        let mut out: BTreeMap<DenyWindow, u64> = BTreeMap::new();
        for d in self
            .unique
            .events
            .iter()
            .filter(|d| d.decision == Decision::Deny)
        {
            let w = DenyWindow {
                tenant_id: d.tenant_id.clone(),
                policy_id: d.policy_id.clone(),
                window_start: window_start(d.occurred_at, window_secs),
            };
            *out.entry(w).or_default() += 1;
        }
        out
    }

    /// The windows with more than `threshold` denies (`deny_rate` fires once each).
    pub fn deny_rate_windows(&self, threshold: u64, window_secs: i64) -> Vec<DenyWindow> {
        self.deny_windows(window_secs)
            .into_iter()
            .filter(|(_, n)| *n > threshold)
            .map(|(w, _)| w)
            .collect()
    }

    /// Enforced denies of at least `min` severity (`policy_denied`).
    pub fn enforced_denies(&self, min: Severity) -> Vec<&PolicyDecision> {
        self.denies(Enforcement::Enforce, min)
    }

    /// Monitor-mode denies of at least `min` severity (`unenforced_deny`).
    pub fn unenforced_denies(&self, min: Severity) -> Vec<&PolicyDecision> {
        self.denies(Enforcement::Monitor, min)
    }

    fn denies(&self, mode: Enforcement, min: Severity) -> Vec<&PolicyDecision> {
        let hit = |d: &&PolicyDecision| {
            d.decision == Decision::Deny && d.enforcement == mode && d.severity >= min
        };
        self.unique.events.iter().filter(hit).collect()
    }
}

/// A (tenant, actor, window) `failed_action_burst` counts in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FailureWindow {
    pub tenant_id: String,
    pub actor_type: ActorType,
    /// As sent (the pipeline pseudonymises user actor ids; the counts are the same).
    pub actor_id: String,
    pub window_start: DateTime<Utc>,
}

/// What the audit stream must leave behind.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditOracle {
    pub unique: Unique<AuditEvent>,
    /// Unique events per tenant.
    pub per_tenant: BTreeMap<String, u64>,
    /// Each tenant's unique events in log order (leaf 0 first).
    pub logs: BTreeMap<String, Vec<AuditEvent>>,
}

/// The audit stream's unique events, counts and per-tenant logs.
pub fn audit(msgs: &[StreamMessage<AuditEvent>]) -> AuditOracle {
    let unique = unique(msgs);
    let mut per_tenant: BTreeMap<String, u64> = BTreeMap::new();
    let mut logs: BTreeMap<String, Vec<AuditEvent>> = BTreeMap::new();
    for e in &unique.events {
        *per_tenant.entry(e.tenant_id.clone()).or_default() += 1;
        logs.entry(e.tenant_id.clone()).or_default().push(e.clone());
    }
    AuditOracle {
        unique,
        per_tenant,
        logs,
    }
}

impl AuditOracle {
    /// Failure and denied outcomes per (tenant, actor, window of `window_secs`).
    pub fn failure_windows(&self, window_secs: i64) -> BTreeMap<FailureWindow, u64> {
        let mut out: BTreeMap<FailureWindow, u64> = BTreeMap::new();
        let failed = |e: &&AuditEvent| matches!(e.outcome, Outcome::Failure | Outcome::Denied);
        for e in self.unique.events.iter().filter(failed) {
            let w = FailureWindow {
                tenant_id: e.tenant_id.clone(),
                actor_type: e.actor_type,
                actor_id: e.actor_id.clone(),
                window_start: window_start(e.occurred_at, window_secs),
            };
            *out.entry(w).or_default() += 1;
        }
        out
    }

    /// The windows with at least `at_least` failures (`failed_action_burst`).
    pub fn failure_burst_windows(&self, at_least: u64, window_secs: i64) -> Vec<FailureWindow> {
        self.failure_windows(window_secs)
            .into_iter()
            .filter(|(_, n)| *n >= at_least)
            .map(|(w, _)| w)
            .collect()
    }

    /// Events whose action is on `actions` (an entry ending in `*` matches by
    /// prefix), whatever their outcome (`privileged_action`).
    pub fn privileged(&self, actions: &[&str]) -> Vec<&AuditEvent> {
        let listed = |a: &str| {
            actions.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => a.starts_with(prefix),
                None => *p == a,
            })
        };
        self.unique
            .events
            .iter()
            .filter(|e| listed(&e.action))
            .collect()
    }

    /// Personal-data events by actors without a grant for the resource type,
    /// outcomes in `ignore` aside (`personal_data_access`). `grants` are
    /// (tenant, actor id as sent, resource type or `*`).
    pub fn ungranted_personal_data(
        &self,
        grants: &[(String, String, String)],
        ignore: &[Outcome],
    ) -> Vec<&AuditEvent> {
        let granted = |e: &AuditEvent| {
            grants.iter().any(|(t, a, r)| {
                *t == e.tenant_id && *a == e.actor_id && (*r == e.resource_type || r == "*")
            })
        };
        self.unique
            .events
            .iter()
            .filter(|e| e.personal_data && !ignore.contains(&e.outcome) && !granted(e))
            .collect()
    }
}
