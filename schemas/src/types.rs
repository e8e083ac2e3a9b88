//! The four event types and their enums, with their JSON (serde) shape.
//!
//! Field names equal the Avro field names; they are the public contract.
//! Money is always [`Decimal`], never a float.

use crate::json;
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Declares a string-valued enum whose symbols equal its Avro enum symbols.
macro_rules! symbol_enum {
    (
        $(#[$meta:meta])*
        $name:ident, field = $field:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $sym:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every variant, in Avro symbol order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The Avro symbols, in order.
            pub const SYMBOLS: &'static [&'static str] = &[$($sym),+];
            /// Name of the field that holds this enum (used in errors).
            pub const FIELD: &'static str = $field;

            /// The snake_case symbol (same in Avro and JSON).
            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $sym),+ }
            }

            /// Parses a symbol.
            pub fn from_symbol(s: &str) -> Option<Self> {
                match s { $($sym => Some($name::$variant),)+ _ => None }
            }

            /// Position of the symbol in the Avro enum.
            pub fn index(&self) -> u32 {
                *self as u32
            }

            /// Variant at an Avro symbol index.
            pub fn from_index(i: u64) -> Option<Self> {
                usize::try_from(i).ok().and_then(|i| Self::ALL.get(i).copied())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::DecodeError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::from_symbol(s).ok_or_else(|| crate::DecodeError::UnknownEnumSymbol {
                    field: $field.to_string(),
                    value: s.to_string(),
                })
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str(concat!("a ", stringify!($name), " symbol"))
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::from_symbol(v).ok_or_else(|| {
                            E::custom(crate::error::marked("unknown_enum_symbol", $field, v))
                        })
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

symbol_enum! {
    /// Outcome of an LLM call.
    UsageStatus, field = "status" {
        Success = "success",
        Error = "error",
        Timeout = "timeout",
        RateLimited = "rate_limited",
    }
}

symbol_enum! {
    /// What a policy decided.
    Decision, field = "decision" {
        Allow = "allow",
        Deny = "deny",
        Warn = "warn",
        Modify = "modify",
        RequireApproval = "require_approval",
    }
}

symbol_enum! {
    /// Whether a policy decision was enforced or only monitored.
    Enforcement, field = "enforcement" {
        Enforce = "enforce",
        Monitor = "monitor",
    }
}

symbol_enum! {
    /// Severity of a policy decision or compliance violation.
    Severity, field = "severity" {
        Info = "info",
        Low = "low",
        Medium = "medium",
        High = "high",
        Critical = "critical",
    }
}

symbol_enum! {
    /// Kind of principal behind an audited action.
    ActorType, field = "actor_type" {
        User = "user",
        Service = "service",
        ApiKey = "api_key",
        System = "system",
    }
}

symbol_enum! {
    /// Result of an audited action.
    Outcome, field = "outcome" {
        Success = "success",
        Failure = "failure",
        Denied = "denied",
        Partial = "partial",
        Pending = "pending",
    }
}

fn default_currency() -> String {
    "USD".to_string()
}

/// One LLM API call (`llm.usage.v1`, Avro `tally.LlmUsage`).
///
/// The five token fields are disjoint classes: `input_tokens` excludes cached
/// and cache-write tokens, `output_tokens` excludes reasoning tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    #[serde(with = "json::uuid_str")]
    pub event_id: Uuid,
    #[serde(with = "json::ts")]
    pub occurred_at: DateTime<Utc>,
    pub tenant_id: String,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    pub source: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub request_id: String,
    pub provider: String,
    pub model: String,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub latency_ms: i64,
    pub status: UsageStatus,
    #[serde(default, with = "json::opt_decimal")]
    pub reported_cost: Option<Decimal>,
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Provider region (schema v2; `None` when written with v1).
    #[serde(default)]
    pub region: Option<String>,
}

/// One policy-engine decision (`policy.decision.v1`, Avro `tally.PolicyDecision`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDecision {
    #[serde(with = "json::uuid_str")]
    pub event_id: Uuid,
    #[serde(with = "json::ts")]
    pub occurred_at: DateTime<Utc>,
    pub tenant_id: String,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    pub source: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub decision_id: String,
    pub request_id: String,
    pub policy_id: String,
    pub policy_version: String,
    pub decision: Decision,
    pub enforcement: Enforcement,
    pub severity: Severity,
    #[serde(default)]
    pub rule_ids: Vec<String>,
    pub reason: String,
    pub evaluation_ms: i64,
}

/// One audited action (`audit.event.v1`, Avro `tally.AuditEvent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(with = "json::uuid_str")]
    pub event_id: Uuid,
    #[serde(with = "json::ts")]
    pub occurred_at: DateTime<Utc>,
    pub tenant_id: String,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    pub source: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub actor_type: ActorType,
    pub actor_id: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub outcome: Outcome,
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub user_agent: Option<String>,
    /// Free-form JSON text.
    pub details: String,
    pub personal_data: bool,
}

/// A compliance rule breached over a window (`compliance.violation.v1`,
/// Avro `tally.ComplianceViolation`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComplianceViolation {
    #[serde(with = "json::uuid_str")]
    pub violation_id: Uuid,
    pub rule: String,
    pub severity: Severity,
    pub tenant_id: String,
    pub subject_type: String,
    pub subject_id: String,
    #[serde(with = "json::ts")]
    pub window_start: DateTime<Utc>,
    #[serde(with = "json::ts")]
    pub window_end: DateTime<Utc>,
    #[serde(with = "json::decimal")]
    pub observed: Decimal,
    #[serde(with = "json::decimal")]
    pub threshold: Decimal,
    #[serde(default)]
    pub evidence_event_ids: Vec<String>,
    #[serde(with = "json::ts")]
    pub detected_at: DateTime<Utc>,
    pub message: String,
}

fn sample_time() -> DateTime<Utc> {
    // 2025-01-15T10:30:00.123456Z, micro precision so it survives Avro exactly.
    Utc.timestamp_micros(1_736_937_000_123_456)
        .single()
        .unwrap_or_default()
}

/// A valid usage event, for tests in this and other crates.
pub fn sample_usage() -> UsageEvent {
    UsageEvent {
        event_id: Uuid::from_u128(0x0190_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_4a5b),
        occurred_at: sample_time(),
        tenant_id: "tenant-acme".into(),
        team_id: Some("team-search".into()),
        project_id: Some("proj-42".into()),
        user_id: None,
        source: "gateway".into(),
        tags: BTreeMap::from([("env".to_string(), "prod".to_string())]),
        request_id: "req-0001".into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        input_tokens: 1200,
        cached_input_tokens: 300,
        cache_write_tokens: 0,
        output_tokens: 450,
        reasoning_tokens: 0,
        latency_ms: 812,
        status: UsageStatus::Success,
        reported_cost: Some(Decimal::new(1_234_567, 9)),
        currency: "USD".into(),
        region: None,
    }
}

/// A valid policy decision, for tests.
pub fn sample_policy_decision() -> PolicyDecision {
    PolicyDecision {
        event_id: Uuid::from_u128(0x0190_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_4a5c),
        occurred_at: sample_time(),
        tenant_id: "tenant-acme".into(),
        team_id: None,
        project_id: Some("proj-42".into()),
        user_id: Some("user-7".into()),
        source: "policy-engine".into(),
        tags: BTreeMap::new(),
        decision_id: "dec-1".into(),
        request_id: "req-0001".into(),
        policy_id: "pii-redaction".into(),
        policy_version: "3".into(),
        decision: Decision::Modify,
        enforcement: Enforcement::Enforce,
        severity: Severity::Medium,
        rule_ids: vec!["email".into(), "phone".into()],
        reason: "PII found in prompt".into(),
        evaluation_ms: 3,
    }
}

/// A valid audit event, for tests.
pub fn sample_audit_event() -> AuditEvent {
    AuditEvent {
        event_id: Uuid::from_u128(0x0190_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_4a5d),
        occurred_at: sample_time(),
        tenant_id: "tenant-acme".into(),
        team_id: Some("team-search".into()),
        project_id: None,
        user_id: Some("user-7".into()),
        source: "admin-api".into(),
        tags: BTreeMap::from([("region".to_string(), "eu".to_string())]),
        actor_type: ActorType::ApiKey,
        actor_id: "key-123".into(),
        action: "budget.update".into(),
        resource_type: "budget".into(),
        resource_id: "budget-9".into(),
        outcome: Outcome::Success,
        ip: Some("192.0.2.10".into()),
        user_agent: None,
        details: r#"{"old":"100","new":"250"}"#.into(),
        personal_data: false,
    }
}

/// A valid compliance violation, for tests.
pub fn sample_compliance_violation() -> ComplianceViolation {
    let t = sample_time();
    ComplianceViolation {
        violation_id: Uuid::from_u128(0x0190_a1b2_c3d4_7e5f_8a9b_0c1d_2e3f_4a5e),
        rule: "monthly_budget".into(),
        severity: Severity::High,
        tenant_id: "tenant-acme".into(),
        subject_type: "team".into(),
        subject_id: "team-search".into(),
        window_start: t - chrono::Duration::hours(1),
        window_end: t,
        observed: Decimal::new(2_500_000_000_123, 9),
        threshold: Decimal::new(2_000, 0),
        evidence_event_ids: vec!["0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into()],
        detected_at: t,
        message: "team-search spent 2500.000000000123 USD of a 2000 USD budget".into(),
    }
}
