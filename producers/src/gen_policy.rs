//! Deterministic synthetic policy-decision traffic (`policy.decision.v1`):
//! native decisions (JSON, Avro single-object, Confluent) and Open Policy Agent
//! decision-log events, duplicates and poison, with deny bursts.
//!
//! Guarantee: a [`PolicyGenerator`] is a pure function of its
//! [`PolicyGenConfig`] (the same config yields byte-identical messages). Each
//! message is tagged with what the consumer must make of it ([`GenKind`],
//! [`Wire`]) and, unless it is poison, carries the decision the pipeline must
//! store for it (for an OPA event: the decision the default mapping yields). A
//! duplicate repeats an earlier decision's `decision_id` with the same content
//! (an OPA re-send repeats the event's bytes). Messages are keyed by tenant id,
//! so a tenant's decisions keep their order within a partition.
//!
//! Every tenant runs a few policies, each in enforce or monitor mode; decisions
//! mix allow, deny, warn, modify and require-approval with their severities. In
//! one event-time minute in four, a share ([`PolicyGenConfig::deny_burst`]) of
//! the messages are denies of one (tenant, policy), so that `deny_rate` crosses a
//! (lowered) threshold.

use crate::common::{
    chance, encode, one_of, pct, stream_iterator, threshold, uuid, Core, History, StreamConfig,
    StreamMessage, Tenant, Wire,
};
use crate::gen::GenKind;
use crate::malformed::{build_from, POLICY_CATALOG};
use crate::opa;
use crate::world::World;
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};
use tally_schemas::{Decision, Enforcement, PolicyDecision, Severity};

/// One message of the policy stream.
pub type PolicyMessage = StreamMessage<PolicyDecision>;

/// Keeps this stream's draws apart from other streams of the same seed.
const SALT: u64 = 0x0070_6f6c_6963_7900;

/// A policy every tenant may run.
struct PolicySpec {
    id: &'static str,
    version: u32,
    /// Weights of allow, deny, warn, modify, require_approval ([`Decision::ALL`] order).
    weights: [u32; 5],
    /// Severity of its non-allow decisions (varied by one step either way).
    severity: Severity,
    rules: &'static [&'static str],
    reasons: &'static [&'static str],
}

const POLICIES: &[PolicySpec] = &[
    PolicySpec {
        id: "llm/pii_redaction",
        version: 3,
        weights: [80, 3, 0, 17, 0],
        severity: Severity::Medium,
        rules: &["email", "phone", "iban", "passport"],
        reasons: &["PII found in prompt", "PII found in completion"],
    },
    PolicySpec {
        id: "llm/prompt_injection",
        version: 5,
        weights: [86, 12, 2, 0, 0],
        severity: Severity::High,
        rules: &["jailbreak", "system_prompt_leak", "indirect_injection"],
        reasons: &[
            "prompt injection detected",
            "system prompt extraction attempt",
        ],
    },
    PolicySpec {
        id: "llm/model_allowlist",
        version: 2,
        weights: [90, 10, 0, 0, 0],
        severity: Severity::Medium,
        rules: &["model_not_allowed", "region_not_allowed"],
        reasons: &["model not on the tenant allowlist", "region not allowed"],
    },
    PolicySpec {
        id: "llm/data_residency",
        version: 4,
        weights: [84, 8, 0, 0, 8],
        severity: Severity::High,
        rules: &["eu_only", "customer_data_export"],
        reasons: &[
            "data would leave the EU",
            "cross-border transfer needs approval",
        ],
    },
    PolicySpec {
        id: "llm/spend_guard",
        version: 1,
        weights: [82, 5, 13, 0, 0],
        severity: Severity::Low,
        rules: &["daily_cap", "per_request_cap"],
        reasons: &[
            "request exceeds the per-request cap",
            "team is over 90% of its daily budget",
        ],
    },
    PolicySpec {
        id: "llm/tool_use",
        version: 2,
        weights: [76, 9, 0, 0, 15],
        severity: Severity::Medium,
        rules: &["shell_exec", "external_http", "file_write"],
        reasons: &["tool call needs human approval", "tool not permitted"],
    },
    PolicySpec {
        id: "llm/output_safety",
        version: 6,
        weights: [90, 4, 6, 0, 0],
        severity: Severity::Critical,
        rules: &["self_harm", "violence", "malware"],
        reasons: &["unsafe completion blocked", "completion flagged for review"],
    },
];

/// Every policy id the generator uses.
pub fn policy_ids() -> Vec<&'static str> {
    POLICIES.iter().map(|p| p.id).collect()
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct PolicyGenConfig {
    pub stream: StreamConfig,
    /// Share of good decisions (and of poison) sent as OPA decision-log events.
    pub opa_share: f64,
    /// Share of the messages of a burst minute that are denies of the minute's
    /// (tenant, policy).
    pub deny_burst: f64,
}

impl PolicyGenConfig {
    /// [`StreamConfig::new`] defaults, 30% OPA events, 20% of a burst minute's
    /// messages in its deny burst.
    pub fn new(world: World, count: u64, seed: u64) -> Self {
        PolicyGenConfig {
            stream: StreamConfig::new(world, count, seed),
            opa_share: 0.3,
            deny_burst: 0.2,
        }
    }
}

/// The policies tenant `tenant_id` runs with `seed`: (policy id, mode), 3 to
/// all of them, about one in four in monitor mode.
pub fn tenant_policies(seed: u64, tenant_id: &str) -> Vec<(&'static str, Enforcement)> {
    let h = crate::common::mix(seed ^ SALT ^ crate::common::hash_str(tenant_id));
    let n = POLICIES.len();
    let take = 3 + usize::try_from(h % (n as u64 - 2)).unwrap_or(0);
    let first = usize::try_from((h >> 8) % n as u64).unwrap_or(0);
    (0..take)
        .map(|i| {
            let p = (first + i) % n;
            let mode_bits = crate::common::mix(h ^ p as u64);
            let mode = if mode_bits.is_multiple_of(4) {
                Enforcement::Monitor
            } else {
                Enforcement::Enforce
            };
            (POLICIES[p].id, mode)
        })
        .collect()
}

/// A decision as sent, with the OPA bytes when it went out as an OPA event.
#[derive(Debug, Clone)]
struct Sent {
    decision: PolicyDecision,
    opa: Option<Vec<u8>>,
}

/// The deterministic message stream of one [`PolicyGenConfig`].
pub struct PolicyGenerator {
    cfg: PolicyGenConfig,
    core: Core,
    tenants: Vec<Tenant>,
    /// Per tenant: (index into POLICIES, mode).
    policies: Vec<Vec<(usize, Enforcement)>>,
    history: History<Sent>,
    /// Further re-sends of an OPA chunk, emitted before anything new.
    pending: VecDeque<PolicyMessage>,
    native_next: usize,
    opa_next: usize,
    t_opa: u64,
    t_burst: u64,
}

impl PolicyGenerator {
    pub fn new(cfg: PolicyGenConfig) -> Self {
        let tenants = Tenant::all(&cfg.stream.world);
        let index: BTreeMap<&str, usize> = POLICIES
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id, i))
            .collect();
        let policies = tenants
            .iter()
            .map(|t| {
                tenant_policies(cfg.stream.seed, &t.id)
                    .into_iter()
                    .map(|(id, mode)| (index.get(id).copied().unwrap_or(0), mode))
                    .collect()
            })
            .collect();
        PolicyGenerator {
            core: Core::new(&cfg.stream, SALT),
            tenants,
            policies,
            history: History::new(),
            pending: VecDeque::new(),
            native_next: 0,
            opa_next: 0,
            t_opa: threshold(cfg.opa_share),
            t_burst: threshold(cfg.deny_burst),
            cfg,
        }
    }

    /// The config this generator was built from.
    pub fn config(&self) -> &PolicyGenConfig {
        &self.cfg
    }

    /// (tenant, policy slot, forced deny) of the next decision.
    fn subject(&mut self) -> (usize, usize, bool) {
        let burst = self.core.burst(self.cfg.stream.seed ^ SALT);
        let in_burst = chance(&mut self.core.rng, self.t_burst);
        if let (Some(h), true) = (burst, in_burst) {
            let top = self.tenants.len().min(3) as u64;
            let t = usize::try_from((h >> 16) % top).unwrap_or(0);
            let p = usize::try_from((h >> 32) % self.policies[t].len() as u64).unwrap_or(0);
            return (t, p, true);
        }
        let t = self.core.tenant().min(self.tenants.len() - 1);
        let p = self.core.rng.random_range(0..self.policies[t].len());
        (t, p, false)
    }

    /// Draws a fresh, valid native decision at the current cursor.
    fn sample(&mut self) -> PolicyDecision {
        let occurred_at = self.core.occurred_at(self.cfg.stream.start);
        let (t, slot, forced_deny) = self.subject();
        let (p, enforcement) = self.policies[t][slot];
        let spec = &POLICIES[p];
        let rng = &mut self.core.rng;
        let decision = if forced_deny {
            Decision::Deny
        } else {
            let total: u32 = spec.weights.iter().sum();
            let mut x = rng.random_range(0..total.max(1));
            let i = spec
                .weights
                .iter()
                .position(|w| {
                    let hit = x < *w;
                    x = x.saturating_sub(*w);
                    hit
                })
                .unwrap_or(0);
            Decision::ALL[i]
        };
        let (severity, rule_ids, reason) = if decision == Decision::Allow {
            let sev = if pct(rng, 80) {
                Severity::Info
            } else {
                Severity::Low
            };
            let reason = if pct(rng, 10) { "no rule matched" } else { "" };
            (sev, Vec::new(), reason.to_string())
        } else {
            let base = i64::from(spec.severity.index());
            let step = match rng.random_range(0..100u32) {
                0..20 => -1,
                20..80 => 0,
                _ => 1,
            };
            let sev = u64::try_from((base + step).clamp(0, 4)).unwrap_or(0);
            let first = rng.random_range(0..spec.rules.len());
            let n = rng.random_range(1..=2usize).min(spec.rules.len());
            let rules = (0..n)
                .map(|i| spec.rules[(first + i) % spec.rules.len()].to_string())
                .collect();
            let mut reason = one_of(rng, spec.reasons).to_string();
            if pct(rng, 30) {
                reason = format!("{reason}; {}", spec.rules[first]);
            }
            (
                Severity::from_index(sev).unwrap_or(spec.severity),
                rules,
                reason,
            )
        };
        let tenant = &self.tenants[t];
        let mut tags = BTreeMap::new();
        if pct(rng, 70) {
            let env = if pct(rng, 85) { "prod" } else { "staging" };
            tags.insert("env".to_string(), env.to_string());
        }
        PolicyDecision {
            event_id: uuid(rng),
            occurred_at,
            tenant_id: tenant.id.clone(),
            team_id: tenant.team(rng),
            project_id: tenant.project(rng),
            user_id: pct(rng, 70).then(|| format!("u-{:04}", rng.random_range(0..500u32))),
            source: one_of(rng, &["policy-gateway-1", "policy-gateway-2", "guardrails"])
                .to_string(),
            tags,
            decision_id: format!("dec-{}", uuid(rng).simple()),
            request_id: format!("req-{:016x}", rng.random::<u64>()),
            policy_id: spec.id.to_string(),
            policy_version: spec.version.to_string(),
            decision,
            enforcement,
            severity,
            rule_ids,
            reason,
            evaluation_ms: if pct(rng, 85) {
                rng.random_range(0..=4)
            } else {
                rng.random_range(5..=250)
            },
        }
    }

    fn message(kind: GenKind, d: &PolicyDecision, payload: Vec<u8>, wire: Wire) -> PolicyMessage {
        StreamMessage {
            key: Some(d.tenant_id.as_bytes().to_vec()),
            payload,
            kind,
            wire,
            event: Some(d.clone()),
        }
    }

    /// The rest of an OPA chunk re-send, if one is under way.
    fn queued(&mut self) -> Option<PolicyMessage> {
        self.pending.pop_front()
    }

    fn good(&mut self) -> PolicyMessage {
        let d = self.sample();
        if chance(&mut self.core.rng, self.t_opa) {
            let (d, ev) = opa::to_opa(&mut self.core.rng, &d, true);
            let payload = serde_json::to_vec(&ev).unwrap_or_default();
            self.history.push(Sent {
                decision: d.clone(),
                opa: Some(payload.clone()),
            });
            return Self::message(GenKind::Good, &d, payload, Wire::Opa);
        }
        let s = &self.cfg.stream;
        let (payload, wire) = encode(&mut self.core.rng, s.encoding, s.confluent_schema_id, &d);
        self.history.push(Sent {
            decision: d.clone(),
            opa: None,
        });
        Self::message(GenKind::Good, &d, payload, wire)
    }

    /// A re-send: native decisions re-encoded (maybe in another encoding), OPA
    /// events byte for byte, sometimes with the OPA events sent after them (a
    /// retried upload chunk).
    fn duplicate(&mut self) -> PolicyMessage {
        let rng = &mut self.core.rng;
        let back = self.history.pick_back(rng);
        let Some(sent) = self.history.back(back).cloned() else {
            return self.good();
        };
        let Some(bytes) = sent.opa else {
            let s = &self.cfg.stream;
            let (payload, wire) = encode(rng, s.encoding, s.confluent_schema_id, &sent.decision);
            return Self::message(GenKind::Duplicate, &sent.decision, payload, wire);
        };
        if pct(rng, 30) {
            let more = rng.random_range(1..=4usize).min(back);
            for newer in (back - more..back).rev() {
                if let Some(Sent {
                    decision,
                    opa: Some(b),
                }) = self.history.back(newer)
                {
                    let m = Self::message(GenKind::Duplicate, decision, b.clone(), Wire::Opa);
                    self.pending.push_back(m);
                }
            }
        }
        Self::message(GenKind::Duplicate, &sent.decision, bytes, Wire::Opa)
    }

    fn malformed(&mut self) -> PolicyMessage {
        let d = self.sample();
        let (payload, class, wire) = if chance(&mut self.core.rng, self.t_opa) {
            let (p, c) = opa::poison(&mut self.core.rng, self.opa_next, &d);
            self.opa_next += 1;
            (p, c, Wire::Opa)
        } else {
            let (p, c) = build_from(POLICY_CATALOG, self.native_next, &d);
            self.native_next += 1;
            (p, c, Wire::Poison)
        };
        StreamMessage {
            key: (!payload.is_empty()).then(|| d.tenant_id.as_bytes().to_vec()),
            payload,
            kind: GenKind::Malformed { class },
            wire,
            event: None,
        }
    }
}

stream_iterator!(PolicyGenerator, PolicyMessage);
