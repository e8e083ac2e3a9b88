//! Open Policy Agent decision-log events mapped to [`PolicyDecision`]s (pure).
//!
//! Guarantee: the mapping is a total, deterministic function of the event and the
//! [`OpaMapping`]: it never panics, returns the same decision (same `event_id`) for
//! every re-send of a `decision_id`, or a classed [`OpaError`] to dead-letter. Nothing
//! at or under a pointer OPA lists in `erased` is ever read (so never reconstructed,
//! even if a value is still there), and nothing of the event is kept beyond the mapped
//! fields below: the rest of `input`, `result`, `nd_builtin_cache`, `request_context`,
//! `mapped_result` and `metrics` are dropped.
//!
//! # Recognition
//! A JSON object is an OPA event (OPA's `EventV1`) when it has the keys `decision_id`
//! and `timestamp`, one of `path` or `query`, and neither `event_id` nor `occurred_at`
//! (the native `policy.decision.v1` JSON has both). Key presence decides, whatever the
//! values, so a malformed OPA event gets an `opa_*` reason, not a schema error.
//!
//! # Mapping (defaults of [`OpaMapping`]; every pointer is an RFC 6901 JSON pointer
//! into the whole event, and `""` turns an optional one off)
//! | field | rule |
//! |---|---|
//! | `tenant_id` | string or integer at `tenant` = `/input/tenant_id`; required (`opa_missing_tenant`, `opa_bad_tenant`) |
//! | `team_id`, `project_id`, `user_id` | string or integer at `team` = `/input/team_id`, `project` = `/input/project_id`, `user` = `""` (off: user ids stay out unless asked for) |
//! | `request_id` | string or integer at `request_id` = `/input/request_id`, else `""` |
//! | `decision` | `result` `true` → allow, `false` → deny; `result` an object → the value at `allow` = `/result/allow`: a boolean, or a decision symbol (`allow`, `deny`, `warn`, `modify`, `require_approval`). Anything else, an erased or absent result: `opa_missing_result` / `opa_bad_result` (OPA logs no result when evaluation failed) |
//! | `policy_id` | `path` without empty segments; with `policy_from_path` = `package` (default) the last segment (the rule) is dropped when there are two or more: `authz/allow` → `authz`, `/http/example/authz/allow` → `http/example/authz`, `allow` → `allow`; `path` = keep it whole. No `path` (an ad-hoc `query`): `opa_missing_path` |
//! | `policy_version` | `bundles.<bundle>.revision` when `bundle` names one; else the only bundle's revision; else `name@revision` of every bundle, sorted by name, joined by `,`; no bundles: `""` |
//! | `source` | string at `source` = `/labels/id` (the OPA instance), else `default_source` = `opa` |
//! | `occurred_at` | `timestamp` (RFC 3339, nanoseconds allowed), truncated to microseconds like the Avro schema (`opa_bad_timestamp`) |
//! | `event_id` | UUID v5 of `decision_id` in [`OPA_EVENT_NS`] |
//! | `enforcement` | at `enforcement` = `/result/enforcement`: `enforce`/`enforced`/`deny`/`block` → enforce, `monitor`/`dryrun`/`dry_run`/`dry-run`/`audit`/`warn` → monitor (any case); absent → `default_enforcement` = enforce; else `opa_bad_enforcement` |
//! | `severity` | a severity symbol (any case) at `severity` = `/result/severity`; absent → `default_severity` = medium; else `opa_bad_severity` |
//! | `reason` | a string, or an array of strings joined by `"; "`, at `reason` = `/result/reason`; else `""` |
//! | `rule_ids` | a string or an array of strings at `rule_ids` = `""` (off) |
//! | `evaluation_ms` | nanoseconds at `evaluation_ns` = `/metrics/timer_server_handler_ns` / 10⁶, capped at one day; absent or not a number: 0 (metrics are diagnostics) |
//! | `tags` | empty |
//!
//! A present value of the wrong type at a mapped pointer is `opa_bad_field` (naming the
//! field), except as stated above. Masked values (`masked`) are taken as OPA logged
//! them. The result is validated like every decoded event (schema classes such as
//! `empty_field`, `absurd_value`, `invalid_timestamp`).
//!
//! # Dedup
//! OPA re-sends a chunk after a failed upload, so one `decision_id` can arrive many
//! times: the dedup key of a policy decision is `decision_id` (see
//! [`super::dedup_key`]); `event_id` is derived from it, so both agree.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use tally_schemas::{Decision, DecodeError, Enforcement, Event, PolicyDecision, Severity, MAX_MS};
use uuid::Uuid;

/// Namespace of the v5 `event_id`s derived from OPA `decision_id`s.
pub const OPA_EVENT_NS: Uuid = Uuid::from_u128(0x0a7a_0de5_1c10_4d6e_8f2b_7c3a_9e15_d0c5);

/// How `policy_id` is taken from the event's `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyFromPath {
    /// Drop the last segment (the rule) when there are two or more.
    #[default]
    Package,
    /// Keep the whole path.
    Path,
}

/// Configurable pointers and defaults of the OPA mapping (see the module table).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpaMapping {
    pub tenant: String,
    pub team: String,
    pub project: String,
    pub user: String,
    pub request_id: String,
    pub allow: String,
    pub policy_from_path: PolicyFromPath,
    pub bundle: String,
    pub source: String,
    pub default_source: String,
    pub enforcement: String,
    pub default_enforcement: Enforcement,
    pub severity: String,
    pub default_severity: Severity,
    pub reason: String,
    pub rule_ids: String,
    pub evaluation_ns: String,
}

impl Default for OpaMapping {
    fn default() -> Self {
        Self {
            tenant: "/input/tenant_id".into(),
            team: "/input/team_id".into(),
            project: "/input/project_id".into(),
            user: String::new(),
            request_id: "/input/request_id".into(),
            allow: "/result/allow".into(),
            policy_from_path: PolicyFromPath::Package,
            bundle: String::new(),
            source: "/labels/id".into(),
            default_source: "opa".into(),
            enforcement: "/result/enforcement".into(),
            default_enforcement: Enforcement::Enforce,
            severity: "/result/severity".into(),
            default_severity: Severity::Medium,
            reason: "/result/reason".into(),
            rule_ids: String::new(),
            evaluation_ns: "/metrics/timer_server_handler_ns".into(),
        }
    }
}

impl OpaMapping {
    /// Checks the configuration: every pointer is `""` or starts with `/`, and the
    /// required ones (`tenant`, `allow`) and `default_source` are set.
    pub fn check(&self) -> Result<(), String> {
        let pointers = [
            ("tenant", &self.tenant),
            ("team", &self.team),
            ("project", &self.project),
            ("user", &self.user),
            ("request_id", &self.request_id),
            ("allow", &self.allow),
            ("source", &self.source),
            ("enforcement", &self.enforcement),
            ("severity", &self.severity),
            ("reason", &self.reason),
            ("rule_ids", &self.rule_ids),
            ("evaluation_ns", &self.evaluation_ns),
        ];
        for (key, p) in pointers {
            if !p.is_empty() && !p.starts_with('/') {
                return Err(format!(
                    "opa.{key}: JSON pointer must start with `/`: {p:?}"
                ));
            }
        }
        for (key, v) in [
            ("tenant", &self.tenant),
            ("allow", &self.allow),
            ("default_source", &self.default_source),
        ] {
            if v.is_empty() {
                return Err(format!("opa.{key} must not be empty"));
            }
        }
        Ok(())
    }
}

/// Why an OPA event could not be mapped. [`OpaError::class`] is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpaError {
    #[error("not an OPA decision-log event")]
    NotAnEvent,
    #[error("decision_id is missing or not a non-empty string")]
    MissingDecisionId,
    #[error("no tenant at {pointer}{}", if *.erased { " (erased by OPA)" } else { "" })]
    MissingTenant { pointer: String, erased: bool },
    #[error("tenant at {0} is not a non-empty string or integer")]
    BadTenant(String),
    #[error("no result{}", if *.erased { " (erased by OPA)" } else { " (evaluation error?)" })]
    MissingResult { erased: bool },
    #[error("result gives no decision: {0}")]
    BadResult(String),
    #[error("no policy path (ad-hoc query or empty path)")]
    MissingPath,
    #[error("timestamp is not RFC 3339: {0}")]
    BadTimestamp(String),
    #[error("unknown enforcement at {0}")]
    BadEnforcement(String),
    #[error("unknown severity at {0}")]
    BadSeverity(String),
    #[error("{field} at {pointer} has the wrong type")]
    BadField {
        field: &'static str,
        pointer: String,
    },
    #[error("erased is not a list of JSON pointers")]
    BadErased,
    #[error("mapped decision is invalid: {0}")]
    Invalid(DecodeError),
}

impl OpaError {
    /// Stable snake_case class, e.g. `"opa_missing_tenant"`; for [`OpaError::Invalid`]
    /// the schema's class (e.g. `"empty_field"`).
    pub fn class(&self) -> &'static str {
        match self {
            OpaError::NotAnEvent => "opa_not_an_event",
            OpaError::MissingDecisionId => "opa_missing_decision_id",
            OpaError::MissingTenant { .. } => "opa_missing_tenant",
            OpaError::BadTenant(_) => "opa_bad_tenant",
            OpaError::MissingResult { .. } => "opa_missing_result",
            OpaError::BadResult(_) => "opa_bad_result",
            OpaError::MissingPath => "opa_missing_path",
            OpaError::BadTimestamp(_) => "opa_bad_timestamp",
            OpaError::BadEnforcement(_) => "opa_bad_enforcement",
            OpaError::BadSeverity(_) => "opa_bad_severity",
            OpaError::BadField { .. } => "opa_bad_field",
            OpaError::BadErased => "opa_bad_erased",
            OpaError::Invalid(e) => e.class(),
        }
    }

    /// Every `opa_*` class (the schema classes of [`OpaError::Invalid`] aside).
    pub const CLASSES: [&'static str; 12] = [
        "opa_not_an_event",
        "opa_missing_decision_id",
        "opa_missing_tenant",
        "opa_bad_tenant",
        "opa_missing_result",
        "opa_bad_result",
        "opa_missing_path",
        "opa_bad_timestamp",
        "opa_bad_enforcement",
        "opa_bad_severity",
        "opa_bad_field",
        "opa_bad_erased",
    ];
}

/// Whether `v` has the shape of an OPA decision-log event (see the module docs).
pub fn is_opa_event(v: &Value) -> bool {
    let Some(o) = v.as_object() else {
        return false;
    };
    o.contains_key("decision_id")
        && o.contains_key("timestamp")
        && (o.contains_key("path") || o.contains_key("query"))
        && !o.contains_key("event_id")
        && !o.contains_key("occurred_at")
}

/// The parsed event when `payload` is a JSON object of OPA's shape; `None` otherwise
/// (the caller then decodes it as a native `policy.decision.v1` payload).
pub fn recognise(payload: &[u8]) -> Option<Value> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    let v: Value = serde_json::from_slice(payload).ok()?;
    is_opa_event(&v).then_some(v)
}

/// The v5 `event_id` of a decision id.
pub fn event_id(decision_id: &str) -> Uuid {
    Uuid::new_v5(&OPA_EVENT_NS, decision_id.as_bytes())
}

/// What a pointer finds, erased paths masked out.
enum Found<'a> {
    Absent,
    Erased,
    Value(&'a Value),
}

/// An event with its `erased` pointers.
struct Opa<'a> {
    root: &'a Value,
    erased: Vec<&'a str>,
}

/// Whether JSON pointer `a` is at or under `b`.
fn at_or_under(a: &str, b: &str) -> bool {
    a.strip_prefix(b)
        .is_some_and(|r| r.is_empty() || r.starts_with('/'))
}

impl<'a> Opa<'a> {
    fn new(root: &'a Value) -> Result<Self, OpaError> {
        let erased = match root.get("erased") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i.as_str() {
                    Some(p) if p.is_empty() || p.starts_with('/') => Ok(p),
                    _ => Err(OpaError::BadErased),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(OpaError::BadErased),
        };
        Ok(Self { root, erased })
    }

    /// The value at `pointer`, `Erased` when anything at, above or below it was
    /// erased (a value is taken whole or not at all).
    fn get(&self, pointer: &str) -> Found<'a> {
        self.lookup(pointer, true)
    }

    /// The value at `pointer`, `Erased` when it or a parent was erased; only for
    /// looking at the value's type, never at erased-below content.
    fn get_shape(&self, pointer: &str) -> Found<'a> {
        self.lookup(pointer, false)
    }

    fn lookup(&self, pointer: &str, whole: bool) -> Found<'a> {
        if pointer.is_empty() {
            return Found::Absent;
        }
        let hit = |e: &&str| at_or_under(pointer, e) || (whole && at_or_under(e, pointer));
        if self.erased.iter().any(hit) {
            return Found::Erased;
        }
        match self.root.pointer(pointer) {
            None | Some(Value::Null) => Found::Absent,
            Some(v) => Found::Value(v),
        }
    }

    /// An identifier (string or integer) at `pointer`; empty strings count as absent.
    fn ident(&self, field: &'static str, pointer: &str) -> Result<Option<String>, OpaError> {
        match self.get(pointer) {
            Found::Absent | Found::Erased => Ok(None),
            Found::Value(v) => {
                ident_text(v)
                    .map(|s| (!s.is_empty()).then_some(s))
                    .ok_or(OpaError::BadField {
                        field,
                        pointer: pointer.into(),
                    })
            }
        }
    }

    /// Texts (a string, or an array of strings) at `pointer`.
    fn texts(&self, field: &'static str, pointer: &str) -> Result<Vec<String>, OpaError> {
        let bad = || OpaError::BadField {
            field,
            pointer: pointer.into(),
        };
        match self.get(pointer) {
            Found::Absent | Found::Erased => Ok(Vec::new()),
            Found::Value(Value::String(s)) => Ok(vec![s.clone()]),
            Found::Value(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            Found::Value(_) => Err(bad()),
        }
    }

    /// A symbol (lower-cased string) at `pointer`, `None` when absent.
    fn symbol(&self, pointer: &str) -> Result<Option<String>, ()> {
        match self.get(pointer) {
            Found::Absent | Found::Erased => Ok(None),
            Found::Value(Value::String(s)) => Ok(Some(s.to_ascii_lowercase())),
            Found::Value(_) => Err(()),
        }
    }
}

fn ident_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn decision(ev: &Opa<'_>, m: &OpaMapping) -> Result<Decision, OpaError> {
    let from_bool = |b: bool| if b { Decision::Allow } else { Decision::Deny };
    match ev.get_shape("/result") {
        Found::Absent => Err(OpaError::MissingResult { erased: false }),
        Found::Erased => Err(OpaError::MissingResult { erased: true }),
        Found::Value(Value::Bool(b)) => Ok(from_bool(*b)),
        Found::Value(Value::Object(_)) => match ev.get(&m.allow) {
            Found::Value(Value::Bool(b)) => Ok(from_bool(*b)),
            Found::Value(Value::String(s)) => Decision::from_symbol(&s.to_ascii_lowercase())
                .ok_or_else(|| OpaError::BadResult(format!("unknown decision at {}", m.allow))),
            Found::Value(_) => Err(OpaError::BadResult(format!(
                "{} is neither a boolean nor a decision",
                m.allow
            ))),
            Found::Erased => Err(OpaError::BadResult(format!("{} erased by OPA", m.allow))),
            Found::Absent => Err(OpaError::BadResult(format!("no {}", m.allow))),
        },
        Found::Value(_) => Err(OpaError::BadResult(
            "result is neither a boolean nor an object".into(),
        )),
    }
}

/// `policy_id` from `path` (see the module table).
pub fn policy_from_path(path: &str, how: PolicyFromPath) -> Option<String> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let keep = match (how, segs.len()) {
        (_, 0) => return None,
        (PolicyFromPath::Package, n) if n >= 2 => n - 1,
        (_, n) => n,
    };
    Some(segs[..keep].join("/"))
}

fn policy_version(ev: &Opa<'_>, m: &OpaMapping) -> Result<String, OpaError> {
    let bad = || OpaError::BadField {
        field: "policy_version",
        pointer: "/bundles".into(),
    };
    let bundles = match ev.root.get("bundles") {
        None | Some(Value::Null) => return Ok(String::new()),
        Some(Value::Object(b)) => b,
        Some(_) => return Err(bad()),
    };
    let mut revs: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, b) in bundles {
        let rev = match b.get("revision") {
            None | Some(Value::Null) if b.is_object() => "",
            Some(Value::String(r)) => r.as_str(),
            _ => return Err(bad()),
        };
        revs.insert(name.as_str(), rev);
    }
    if !m.bundle.is_empty() {
        return Ok(revs.get(m.bundle.as_str()).copied().unwrap_or("").into());
    }
    if revs.len() == 1 {
        return Ok(revs.values().next().copied().unwrap_or("").into());
    }
    let parts: Vec<String> = revs.iter().map(|(n, r)| format!("{n}@{r}")).collect();
    Ok(parts.join(","))
}

fn enforcement(ev: &Opa<'_>, m: &OpaMapping) -> Result<Enforcement, OpaError> {
    let bad = || OpaError::BadEnforcement(m.enforcement.clone());
    match ev.symbol(&m.enforcement).map_err(|()| bad())? {
        None => Ok(m.default_enforcement),
        Some(s) => match s.as_str() {
            "enforce" | "enforced" | "deny" | "block" => Ok(Enforcement::Enforce),
            "monitor" | "dryrun" | "dry_run" | "dry-run" | "audit" | "warn" => {
                Ok(Enforcement::Monitor)
            }
            _ => Err(bad()),
        },
    }
}

fn severity(ev: &Opa<'_>, m: &OpaMapping) -> Result<Severity, OpaError> {
    let bad = || OpaError::BadSeverity(m.severity.clone());
    match ev.symbol(&m.severity).map_err(|()| bad())? {
        None => Ok(m.default_severity),
        Some(s) => Severity::from_symbol(&s).ok_or_else(bad),
    }
}

fn evaluation_ms(ev: &Opa<'_>, m: &OpaMapping) -> i64 {
    match ev.get(&m.evaluation_ns) {
        Found::Value(v) => v.as_u64().map_or(0, |ns| {
            i64::try_from(ns / 1_000_000).unwrap_or(MAX_MS).min(MAX_MS)
        }),
        _ => 0,
    }
}

fn occurred_at(root: &Value) -> Result<DateTime<Utc>, OpaError> {
    let s = match root.get("timestamp") {
        Some(Value::String(s)) => s,
        _ => return Err(OpaError::BadTimestamp("missing or not a string".into())),
    };
    let t = DateTime::parse_from_rfc3339(s)
        .map_err(|e| OpaError::BadTimestamp(e.to_string()))?
        .with_timezone(&Utc);
    DateTime::from_timestamp_micros(t.timestamp_micros())
        .ok_or_else(|| OpaError::BadTimestamp("out of range".into()))
}

fn tenant_of(ev: &Opa<'_>, m: &OpaMapping) -> Result<String, OpaError> {
    match ev.get(&m.tenant) {
        Found::Absent => Err(OpaError::MissingTenant {
            pointer: m.tenant.clone(),
            erased: false,
        }),
        Found::Erased => Err(OpaError::MissingTenant {
            pointer: m.tenant.clone(),
            erased: true,
        }),
        Found::Value(t) => ident_text(t)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OpaError::BadTenant(m.tenant.clone())),
    }
}

/// The tenant of an OPA event as [`map_event`] reads it (the `tenant` pointer,
/// `erased` honoured), without mapping the rest: what `tally ingest` keys the
/// event's Kafka message by.
pub fn tenant(v: &Value, m: &OpaMapping) -> Result<String, OpaError> {
    tenant_of(&Opa::new(v)?, m)
}

/// Maps one OPA decision-log event to a validated [`PolicyDecision`].
pub fn map_event(v: &Value, m: &OpaMapping) -> Result<PolicyDecision, OpaError> {
    if !is_opa_event(v) {
        return Err(OpaError::NotAnEvent);
    }
    let ev = Opa::new(v)?;
    let decision_id = match v.get("decision_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(OpaError::MissingDecisionId),
    };
    let tenant_id = tenant_of(&ev, m)?;
    let policy_id = match v.get("path") {
        Some(Value::String(p)) => policy_from_path(p, m.policy_from_path),
        _ => None,
    }
    .ok_or(OpaError::MissingPath)?;
    let occurred_at = occurred_at(v)?;
    let decision = decision(&ev, m)?;
    let source = ev
        .ident("source", &m.source)?
        .unwrap_or_else(|| m.default_source.clone());
    let out = PolicyDecision {
        event_id: event_id(&decision_id),
        occurred_at,
        tenant_id,
        team_id: ev.ident("team_id", &m.team)?,
        project_id: ev.ident("project_id", &m.project)?,
        user_id: ev.ident("user_id", &m.user)?,
        source,
        tags: BTreeMap::new(),
        request_id: ev.ident("request_id", &m.request_id)?.unwrap_or_default(),
        policy_id,
        policy_version: policy_version(&ev, m)?,
        decision,
        enforcement: enforcement(&ev, m)?,
        severity: severity(&ev, m)?,
        rule_ids: ev.texts("rule_ids", &m.rule_ids)?,
        reason: ev.texts("reason", &m.reason)?.join("; "),
        evaluation_ms: evaluation_ms(&ev, m),
        decision_id,
    };
    out.validate().map_err(OpaError::Invalid)?;
    Ok(out)
}
