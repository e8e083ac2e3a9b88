//! Open Policy Agent decision-log events (OPA's `EventV1` JSON) for the policy
//! stream: good ones rendered from a decision, and poison ones that fail the
//! mapping with a known class.
//!
//! Guarantee: for a decision returned by [`to_opa`], tally's default OPA mapping
//! (`[opa]` in the config, `streams/policy/opa.rs` in the consumer) maps the
//! returned event back to exactly that decision; every kind in [`POISON`] is an
//! event of OPA's shape that the mapping rejects with the class listed beside
//! it. This module does not use the consumer's code: it follows the mapping's
//! documented rules, and the consumer's tests check the two agree.
//!
//! What the default mapping keeps (so what a rendered decision can carry):
//! tenant, team, project and request id from `input`; the decision, enforcement,
//! severity and reason from `result`; `policy_id` from `path` minus its last
//! segment; the version from `bundles`; `source` from `labels.id` (else `opa`);
//! `evaluation_ms` from `metrics.timer_server_handler_ns`; time truncated to
//! microseconds; `event_id` derived from `decision_id`. No user id, tags or rule
//! ids.

use crate::common::{one_of, pct, uuid};
use chrono::{DateTime, Duration, FixedOffset, SecondsFormat, Utc};
use rand::rngs::SmallRng;
use rand::Rng;
use serde_json::{json, Map, Value};
use tally_schemas::{Decision, Enforcement, PolicyDecision, Severity};
use uuid::Uuid;

/// Namespace of the v5 `event_id`s derived from OPA `decision_id`s (the
/// consumer's `OPA_EVENT_NS`; its tests assert the two are equal).
pub const OPA_EVENT_NS: Uuid = Uuid::from_u128(0x0a7a_0de5_1c10_4d6e_8f2b_7c3a_9e15_d0c5);

/// The `event_id` tally gives the decision with this `decision_id`.
pub fn event_id(decision_id: &str) -> Uuid {
    Uuid::new_v5(&OPA_EVENT_NS, decision_id.as_bytes())
}

/// OPA-shaped poison in rotation order: (name, the mapping's error class).
pub const POISON: &[(&str, &str)] = &[
    ("opa_missing_tenant", "opa_missing_tenant"),
    ("opa_ad_hoc_query", "opa_missing_path"),
    ("opa_erased_tenant", "opa_missing_tenant"),
    ("opa_missing_result", "opa_missing_result"),
    ("opa_bad_tenant", "opa_bad_tenant"),
    ("opa_bad_result", "opa_bad_result"),
    ("opa_bad_timestamp", "opa_bad_timestamp"),
    ("opa_bad_enforcement", "opa_bad_enforcement"),
    ("opa_bad_severity", "opa_bad_severity"),
    ("opa_bad_team", "opa_bad_field"),
    ("opa_bad_erased", "opa_bad_erased"),
    ("opa_empty_decision_id", "opa_missing_decision_id"),
    ("opa_timestamp_1999", "invalid_timestamp"),
    ("opa_long_tenant", "absurd_value"),
];

/// OPA instances (`labels.id`); `None` leaves the labels out (source `opa`).
const INSTANCES: &[Option<&str>] = &[
    Some("opa-eu-1"),
    Some("opa-eu-2"),
    Some("opa-us-1"),
    Some("opa-sidecar"),
    None,
];
/// Rules queried under a policy's package (the mapping drops them).
const RULES: &[&str] = &["allow", "decision", "main"];
const ENFORCE: &[&str] = &["enforce", "enforced", "block", "deny", "ENFORCE"];
const MONITOR: &[&str] = &[
    "monitor", "dryrun", "dry_run", "dry-run", "audit", "warn", "DryRun",
];

/// `s` upper-cased, capitalised or as it is (the mapping ignores case).
fn any_case(rng: &mut SmallRng, s: &str) -> String {
    match rng.random_range(0..5u32) {
        0 => s.to_ascii_uppercase(),
        1 => {
            let mut c = s.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        }
        _ => s.to_string(),
    }
}

/// The boolean an allow/deny decision has in a bare boolean `result`.
fn boolean(d: &PolicyDecision) -> Option<bool> {
    match d.decision {
        Decision::Allow => Some(true),
        Decision::Deny => Some(false),
        _ => None,
    }
}

/// `result` as an object: the decision under `allow` (a boolean or a symbol),
/// enforcement, severity and reason (each left out when the default applies).
fn result(rng: &mut SmallRng, d: &PolicyDecision) -> Value {
    let boolean = boolean(d);
    let mut r = Map::new();
    let allow = match boolean {
        Some(b) if pct(rng, 80) => Value::Bool(b),
        _ => Value::from(any_case(rng, d.decision.as_str())),
    };
    r.insert("allow".into(), allow);
    let enforcement = match d.enforcement {
        Enforcement::Enforce if pct(rng, 50) => None,
        Enforcement::Enforce => Some(*one_of(rng, ENFORCE)),
        Enforcement::Monitor => Some(*one_of(rng, MONITOR)),
    };
    if let Some(e) = enforcement {
        r.insert("enforcement".into(), Value::from(e));
    }
    if d.severity != Severity::Medium || pct(rng, 50) {
        r.insert("severity".into(), any_case(rng, d.severity.as_str()).into());
    }
    if !d.reason.is_empty() {
        let reason = if d.reason.contains("; ") && pct(rng, 70) {
            Value::from(d.reason.split("; ").collect::<Vec<_>>())
        } else {
            Value::from(d.reason.as_str())
        };
        r.insert("reason".into(), reason);
    }
    // Logged by real policies, ignored by the mapping.
    r.insert("matched".into(), Value::from(d.decision != Decision::Allow));
    Value::Object(r)
}

/// `bundles` and the version the mapping derives from them (`""`: none).
fn bundles(rng: &mut SmallRng, version: &str) -> (Option<Value>, String) {
    match rng.random_range(0..10u32) {
        0 => (None, String::new()),
        1 | 2 => {
            let shared = format!("shared-{}", rng.random_range(1..=9u32));
            let v = json!({"llm": {"revision": version}, "shared": {"revision": shared}});
            (Some(v), format!("llm@{version},shared@{shared}"))
        }
        _ => (
            Some(json!({"llm": {"revision": version}})),
            version.to_string(),
        ),
    }
}

/// The `timestamp` text: `t` plus sub-microsecond nanoseconds, in UTC or +02:00.
fn timestamp(rng: &mut SmallRng, t: DateTime<Utc>) -> String {
    let t = t + Duration::nanoseconds(rng.random_range(0..1000i64));
    match FixedOffset::east_opt(7200).filter(|_| pct(rng, 20)) {
        Some(offset) => t
            .with_timezone(&offset)
            .to_rfc3339_opts(SecondsFormat::Nanos, false),
        None => t.to_rfc3339_opts(SecondsFormat::Nanos, true),
    }
}

/// Renders `d` as an OPA decision-log event and returns the decision the
/// default mapping yields for it with the event (`d` with a fresh
/// `decision_id`, its derived `event_id`, an OPA source and bundle version, and
/// without the fields the mapping does not carry). `plain` allows a bare
/// boolean `result` for an enforced allow or deny (the decision then gets the
/// mapping's defaults: medium severity, no reason).
pub(crate) fn to_opa(
    rng: &mut SmallRng,
    d: &PolicyDecision,
    plain: bool,
) -> (PolicyDecision, Value) {
    let mut d = d.clone();
    d.decision_id = uuid(rng).to_string();
    d.event_id = event_id(&d.decision_id);
    d.tags.clear();
    d.rule_ids.clear();
    let user = d.user_id.take();

    let mut input = Map::new();
    input.insert("tenant_id".into(), d.tenant_id.as_str().into());
    for (k, v) in [("team_id", &d.team_id), ("project_id", &d.project_id)] {
        match v {
            Some(v) => input.insert(k.into(), v.as_str().into()),
            None if pct(rng, 30) => input.insert(k.into(), Value::Null),
            None => None,
        };
    }
    if !d.request_id.is_empty() {
        input.insert("request_id".into(), d.request_id.as_str().into());
    }
    if let Some(u) = user {
        input.insert("user".into(), json!({"id": u, "roles": ["member"]}));
    }
    input.insert("action".into(), "llm.completion".into());
    input.insert("prompt_chars".into(), rng.random_range(1..20_000u32).into());

    let mut ev = Map::new();
    ev.insert("decision_id".into(), d.decision_id.as_str().into());
    let rule = one_of(rng, RULES);
    let slash = if pct(rng, 20) { "/" } else { "" };
    ev.insert(
        "path".into(),
        format!("{slash}{}/{rule}", d.policy_id).into(),
    );
    ev.insert("input".into(), Value::Object(input));
    let bare = boolean(&d).filter(|_| plain && d.enforcement == Enforcement::Enforce);
    match bare.filter(|_| pct(rng, 30)) {
        Some(b) => {
            d.severity = Severity::Medium;
            d.reason.clear();
            ev.insert("result".into(), Value::Bool(b));
        }
        None => {
            ev.insert("result".into(), result(rng, &d));
        }
    }
    ev.insert("timestamp".into(), timestamp(rng, d.occurred_at).into());
    match *one_of(rng, INSTANCES) {
        Some(id) => {
            d.source = id.to_string();
            ev.insert("labels".into(), json!({"id": id, "version": "0.70.0"}));
        }
        None => d.source = "opa".into(),
    }
    let (b, version) = bundles(rng, &format!("rev-{}", d.policy_version));
    d.policy_version = version;
    if let Some(b) = b {
        ev.insert("bundles".into(), b);
    }
    if pct(rng, 90) {
        let ns = u64::try_from(d.evaluation_ms).unwrap_or(0) * 1_000_000
            + rng.random_range(0..1_000_000u64);
        let eval = rng.random_range(1_000..ns.max(1_001));
        ev.insert(
            "metrics".into(),
            json!({"timer_server_handler_ns": ns, "timer_rego_query_eval_ns": eval}),
        );
    } else {
        d.evaluation_ms = 0;
    }
    if pct(rng, 30) {
        // OPA drops erased values and lists their pointers.
        ev.insert("erased".into(), json!(["/input/password"]));
        ev.insert("masked".into(), json!(["/input/user/id"]));
    }
    ev.insert("requested_by".into(), "10.0.0.7:43122".into());
    ev.insert("req_id".into(), rng.random_range(1..100_000u32).into());
    (d, Value::Object(ev))
}

/// Builds OPA poison kind `kind` (modulo [`POISON`]'s length) from decision `d`:
/// the payload and the class the mapping must fail with.
pub(crate) fn poison(
    rng: &mut SmallRng,
    kind: usize,
    d: &PolicyDecision,
) -> (Vec<u8>, &'static str) {
    let (name, class) = POISON[kind % POISON.len()];
    let mut d = d.clone();
    // Every edit below applies to an object result with all its keys.
    d.enforcement = Enforcement::Monitor;
    let (_, mut v) = to_opa(rng, &d, false);
    let set = |v: &mut Value, pointer: &str, value: Value| {
        if let Some(slot) = v.pointer_mut(pointer) {
            *slot = value;
        }
    };
    let remove = |v: &mut Value, parent: &str, key: &str| {
        if let Some(Value::Object(m)) = v.pointer_mut(parent) {
            m.remove(key);
        }
    };
    match name {
        "opa_missing_tenant" => remove(&mut v, "/input", "tenant_id"),
        "opa_ad_hoc_query" => {
            remove(&mut v, "", "path");
            v["query"] = Value::from("data.llm.model_allowlist.allow == true");
        }
        "opa_erased_tenant" => v["erased"] = json!(["/input/tenant_id"]),
        "opa_missing_result" => {
            remove(&mut v, "", "result");
            v["error"] = json!({"code": "eval_conflict_error", "message": "conflicting rules"});
        }
        "opa_bad_tenant" => set(&mut v, "/input/tenant_id", Value::Bool(true)),
        "opa_bad_result" => set(&mut v, "/result/allow", Value::from(1)),
        "opa_bad_timestamp" => v["timestamp"] = Value::from("yesterday at noon"),
        "opa_bad_enforcement" => set(&mut v, "/result/enforcement", "sometimes".into()),
        "opa_bad_severity" => v["result"]["severity"] = Value::from("urgent"),
        "opa_bad_team" => v["input"]["team_id"] = json!({"id": 7}),
        "opa_bad_erased" => v["erased"] = Value::from("/input/password"),
        "opa_empty_decision_id" => v["decision_id"] = Value::from(""),
        "opa_timestamp_1999" => v["timestamp"] = Value::from("1999-12-31T23:59:59.5Z"),
        "opa_long_tenant" => set(&mut v, "/input/tenant_id", "t".repeat(300).into()),
        _ => unreachable!("every OPA poison kind is handled"),
    }
    (serde_json::to_vec(&v).unwrap_or_default(), class)
}
