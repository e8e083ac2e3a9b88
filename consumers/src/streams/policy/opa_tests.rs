//! Tests of the OPA mapping: examples per rule, every error class, and properties
//! (never panics on any JSON; erased and unmapped values never reach the output).

use super::opa::*;
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};
use tally_schemas::{Decision, Enforcement, Severity};

fn sample() -> Value {
    json!({
        "decision_id": "4ca636c1-55e4-417a-b1d8-4aceb67960d1",
        "labels": {"id": "opa-eu-1", "version": "0.70.0"},
        "bundles": {"authz": {"revision": "rev-42"}},
        "path": "http/example/authz/allow",
        "input": {
            "tenant_id": "tenant-acme",
            "team_id": "team-a",
            "request_id": "req-9",
            "user_id": "alice@example.com",
            "method": "GET",
            "password": "hunter2"
        },
        "result": {
            "allow": false,
            "enforcement": "dryrun",
            "severity": "HIGH",
            "reason": ["no role", "outside hours"]
        },
        "requested_by": "127.0.0.1:59334",
        "timestamp": "2026-12-01T10:30:00.123456789Z",
        "metrics": {"timer_server_handler_ns": 2_345_678},
        "erased": ["/input/password"],
        "masked": ["/input/user_id"],
        "nd_builtin_cache": {"time.now_ns": {"[]": 1}},
        "request_context": {"http": {"headers": {"authorization": ["Bearer secret-token"]}}},
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "req_id": 7
    })
}

fn map(v: &Value) -> Result<tally_schemas::PolicyDecision, OpaError> {
    map_event(v, &OpaMapping::default())
}

fn class(v: &Value) -> &'static str {
    map(v).map(|_| "ok").unwrap_or_else(|e| e.class())
}

#[test]
fn maps_a_decision_log_event() {
    let d = map(&sample()).unwrap();
    assert_eq!(d.event_id, event_id("4ca636c1-55e4-417a-b1d8-4aceb67960d1"));
    assert_eq!(d.decision_id, "4ca636c1-55e4-417a-b1d8-4aceb67960d1");
    assert_eq!(d.tenant_id, "tenant-acme");
    assert_eq!(d.team_id.as_deref(), Some("team-a"));
    assert_eq!(d.project_id, None);
    assert_eq!(d.user_id, None, "user ids stay out unless mapped");
    assert_eq!(d.request_id, "req-9");
    assert_eq!(d.source, "opa-eu-1");
    assert_eq!(d.policy_id, "http/example/authz");
    assert_eq!(d.policy_version, "rev-42");
    assert_eq!(d.decision, Decision::Deny);
    assert_eq!(d.enforcement, Enforcement::Monitor);
    assert_eq!(d.severity, Severity::High);
    assert_eq!(d.reason, "no role; outside hours");
    assert!(d.rule_ids.is_empty() && d.tags.is_empty());
    assert_eq!(d.evaluation_ms, 2);
    let t = Utc.with_ymd_and_hms(2026, 12, 1, 10, 30, 0).unwrap()
        + chrono::Duration::microseconds(123_456);
    assert_eq!(d.occurred_at, t, "nanoseconds truncated to microseconds");
    let text = serde_json::to_string(&d).unwrap();
    for secret in [
        "hunter2",
        "alice@",
        "GET",
        "secret-token",
        "127.0.0.1",
        "now_ns",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}

#[test]
fn boolean_results_defaults_and_resends() {
    let mut v = sample();
    v["result"] = json!(true);
    v.as_object_mut().unwrap().remove("bundles");
    v.as_object_mut().unwrap().remove("labels");
    v.as_object_mut().unwrap().remove("metrics");
    let d = map(&v).unwrap();
    assert_eq!(d.decision, Decision::Allow);
    assert_eq!(d.enforcement, Enforcement::Enforce);
    assert_eq!(d.severity, Severity::Medium);
    assert_eq!((d.reason.as_str(), d.source.as_str()), ("", "opa"));
    assert_eq!((d.policy_version.as_str(), d.evaluation_ms), ("", 0));
    v["result"] = json!(false);
    assert_eq!(map(&v).unwrap().decision, Decision::Deny);
    // A re-send (another OPA upload of the same chunk) maps to the same decision.
    assert_eq!(map(&v).unwrap(), map(&v.clone()).unwrap());
    // Decision symbols and integer tenants are accepted.
    v["result"] = json!({"allow": "Require_Approval"});
    v["input"]["tenant_id"] = json!(42);
    let d = map(&v).unwrap();
    assert_eq!(
        (d.decision, d.tenant_id.as_str()),
        (Decision::RequireApproval, "42")
    );
}

#[test]
fn recognition_by_shape() {
    assert!(is_opa_event(&sample()));
    let native = tally_schemas::encode_json(&tally_schemas::sample_policy_decision());
    assert!(
        recognise(&native).is_none(),
        "native JSON has event_id/occurred_at"
    );
    let bytes = serde_json::to_vec(&sample()).unwrap();
    assert_eq!(recognise(&bytes), Some(sample()));
    let mut padded = b"  \n".to_vec();
    padded.extend_from_slice(&bytes);
    assert!(recognise(&padded).is_some());
    assert!(recognise(b"[1]").is_none() && recognise(b"").is_none() && recognise(b"{").is_none());
    let mut q = sample();
    q.as_object_mut().unwrap().remove("path");
    q["query"] = json!("data.x = y");
    assert!(is_opa_event(&q));
    assert_eq!(
        class(&q),
        "opa_missing_path",
        "ad-hoc queries are no policy decisions"
    );
    assert_eq!(class(&json!({"decision_id": "x"})), "opa_not_an_event");
}

#[test]
fn policy_ids_from_paths() {
    use PolicyFromPath::*;
    assert_eq!(
        policy_from_path("authz/allow", Package).as_deref(),
        Some("authz")
    );
    assert_eq!(
        policy_from_path("/http/example/authz/allow", Package).as_deref(),
        Some("http/example/authz")
    );
    assert_eq!(policy_from_path("allow", Package).as_deref(), Some("allow"));
    assert_eq!(policy_from_path("//a//b/", Package).as_deref(), Some("a"));
    assert_eq!(
        policy_from_path("authz/allow", Path).as_deref(),
        Some("authz/allow")
    );
    assert_eq!(policy_from_path("/", Package), None);
}

#[test]
fn bundle_revisions() {
    let mut v = sample();
    v["bundles"] = json!({"z": {"revision": "2"}, "a": {"revision": "1"}, "c": {}});
    assert_eq!(map(&v).unwrap().policy_version, "a@1,c@,z@2");
    let m = OpaMapping {
        bundle: "z".into(),
        ..OpaMapping::default()
    };
    assert_eq!(map_event(&v, &m).unwrap().policy_version, "2");
    v["bundles"] = json!({"a": {"revision": 3}});
    assert_eq!(class(&v), "opa_bad_field");
    v["bundles"] = json!([]);
    assert_eq!(class(&v), "opa_bad_field");
}

#[test]
fn every_error_class() {
    let with = |ptr: &str, val: Value| {
        let mut v = sample();
        *v.pointer_mut(ptr).unwrap() = val;
        class(&v)
    };
    assert_eq!(with("/decision_id", json!(7)), "opa_missing_decision_id");
    assert_eq!(with("/decision_id", json!("")), "opa_missing_decision_id");
    assert_eq!(with("/input/tenant_id", Value::Null), "opa_missing_tenant");
    assert_eq!(with("/input/tenant_id", json!(["t"])), "opa_bad_tenant");
    assert_eq!(with("/input/tenant_id", json!("")), "opa_bad_tenant");
    assert_eq!(with("/result", Value::Null), "opa_missing_result");
    assert_eq!(with("/result", json!("yes")), "opa_bad_result");
    assert_eq!(with("/result", json!({"deny": true})), "opa_bad_result");
    assert_eq!(with("/result/allow", json!("maybe")), "opa_bad_result");
    assert_eq!(with("/result/allow", json!(1)), "opa_bad_result");
    assert_eq!(with("/path", json!(["a"])), "opa_missing_path");
    assert_eq!(with("/timestamp", json!("yesterday")), "opa_bad_timestamp");
    assert_eq!(
        with("/timestamp", json!(1_700_000_000)),
        "opa_bad_timestamp"
    );
    assert_eq!(
        with("/result/enforcement", json!("sometimes")),
        "opa_bad_enforcement"
    );
    assert_eq!(
        with("/result/enforcement", json!(true)),
        "opa_bad_enforcement"
    );
    assert_eq!(
        with("/result/severity", json!("urgent")),
        "opa_bad_severity"
    );
    assert_eq!(with("/result/reason", json!({"a": 1})), "opa_bad_field");
    assert_eq!(with("/result/reason", json!(["a", 1])), "opa_bad_field");
    assert_eq!(with("/input/team_id", json!(1.5)), "opa_bad_field");
    assert_eq!(with("/labels/id", json!(false)), "opa_bad_field");
    assert_eq!(with("/erased", json!("/input")), "opa_bad_erased");
    assert_eq!(with("/erased", json!(["input"])), "opa_bad_erased");
    // Validation of the mapped decision keeps the schema's classes.
    assert_eq!(
        with("/timestamp", json!("1999-01-01T00:00:00Z")),
        "invalid_timestamp"
    );
    assert_eq!(
        with("/input/tenant_id", json!("t".repeat(300))),
        "absurd_value"
    );
    assert_eq!(
        with("/result/reason", json!("r".repeat(2 << 20))),
        "absurd_value"
    );
    // Metrics are diagnostics: a bad one is 0, a huge one capped.
    assert_eq!(with("/metrics/timer_server_handler_ns", json!("x")), "ok");
    let mut v = sample();
    v["metrics"]["timer_server_handler_ns"] = json!(u64::MAX);
    assert_eq!(map(&v).unwrap().evaluation_ms, tally_schemas::MAX_MS);
    let mut seen = std::collections::BTreeSet::new();
    assert!(OpaError::CLASSES.iter().all(|c| seen.insert(*c)));
}

#[test]
fn erased_values_are_never_read() {
    let erase = |ptrs: &[&str]| {
        let mut v = sample();
        v["erased"] = json!(ptrs);
        v
    };
    let e = map(&erase(&["/input/tenant_id"])).unwrap_err();
    assert_eq!(
        e,
        OpaError::MissingTenant {
            pointer: "/input/tenant_id".into(),
            erased: true
        }
    );
    assert_eq!(class(&erase(&["/input"])), "opa_missing_tenant");
    assert_eq!(class(&erase(&[""])), "opa_missing_tenant");
    assert_eq!(class(&erase(&["/result"])), "opa_missing_result");
    assert_eq!(class(&erase(&["/result/allow"])), "opa_bad_result");
    // Erasing below a mapped value drops it whole; the decision itself stays.
    let d = map(&erase(&["/result/reason/1", "/input/team_id"])).unwrap();
    assert_eq!((d.reason.as_str(), d.team_id), ("", None));
    assert_eq!(d.decision, Decision::Deny);
    let d = map(&erase(&["/result/severity", "/result/enforcement"])).unwrap();
    assert_eq!(
        (d.severity, d.enforcement),
        (Severity::Medium, Enforcement::Enforce)
    );
}

#[test]
fn mapping_config() {
    let m: OpaMapping = toml::from_str(
        "tenant = \"/labels/tenant\"\nuser = \"/input/subject\"\ndefault_severity = \"high\"\npolicy_from_path = \"path\"",
    )
    .unwrap();
    assert_eq!(m.tenant, "/labels/tenant");
    assert_eq!(m.default_severity, Severity::High);
    assert_eq!(m.policy_from_path, PolicyFromPath::Path);
    assert_eq!(m.allow, OpaMapping::default().allow);
    m.check().unwrap();
    assert!(toml::from_str::<OpaMapping>("tenants = \"/x\"").is_err());
    assert!(toml::from_str::<OpaMapping>("default_enforcement = \"maybe\"").is_err());
    let bad = OpaMapping {
        reason: "result/reason".into(),
        ..OpaMapping::default()
    };
    assert!(bad.check().unwrap_err().contains("opa.reason"));
    let bad = OpaMapping {
        tenant: String::new(),
        ..OpaMapping::default()
    };
    assert!(bad.check().is_err());
}

/// Any JSON value, biased towards the keys and values the mapper looks at.
fn arb_json() -> impl Strategy<Value = Value> {
    let text = prop_oneof![
        Just("allow"),
        Just("deny"),
        Just("monitor"),
        Just("high"),
        Just(""),
        Just("2026-12-01T10:30:00.123456789Z"),
        Just("/input/tenant_id"),
        Just("/result"),
        Just("/input"),
        Just("a/b"),
        Just("~1"),
        Just("/0"),
        Just("\u{1f600}"),
    ]
    .prop_map(str::to_string);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text.clone().prop_map(Value::String),
        "\\PC{0,10}".prop_map(Value::String),
    ];
    let key = prop_oneof![
        Just("decision_id"),
        Just("timestamp"),
        Just("path"),
        Just("query"),
        Just("input"),
        Just("result"),
        Just("erased"),
        Just("bundles"),
        Just("labels"),
        Just("tenant_id"),
        Just("allow"),
        Just("revision"),
        Just("id"),
        Just("enforcement"),
        Just("severity"),
        Just("reason"),
        Just("metrics"),
        Just("timer_server_handler_ns"),
        Just("0"),
    ]
    .prop_map(str::to_string)
    .boxed();
    let key = prop_oneof![key, "\\PC{0,6}"];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every pointer of [`sample`], leaves and parents.
const SAMPLE_POINTERS: [&str; 24] = [
    "/decision_id",
    "/labels",
    "/labels/id",
    "/bundles",
    "/bundles/authz",
    "/bundles/authz/revision",
    "/path",
    "/input",
    "/input/tenant_id",
    "/input/team_id",
    "/input/request_id",
    "/result",
    "/result/allow",
    "/result/enforcement",
    "/result/severity",
    "/result/reason",
    "/result/reason/0",
    "/timestamp",
    "/metrics",
    "/metrics/timer_server_handler_ns",
    "/erased",
    "/erased/0",
    "/input/user_id",
    "/req_id",
];

/// [`sample`] with a few of its values (anywhere, so every stage of the mapping is
/// reached) replaced by any JSON.
fn arb_opa_shaped() -> impl Strategy<Value = Value> {
    prop::collection::vec(
        (prop::sample::select(SAMPLE_POINTERS.to_vec()), arb_json()),
        0..4,
    )
    .prop_map(|edits| {
        let mut v = sample();
        for (ptr, val) in edits {
            if let Some(slot) = v.pointer_mut(ptr) {
                *slot = val;
            }
        }
        v
    })
}

fn arb_mapping() -> impl Strategy<Value = OpaMapping> {
    let ptr = prop_oneof![
        Just(String::new()),
        Just("/input/tenant_id".to_string()),
        Just("/result".to_string()),
        Just("/input".to_string()),
        Just("/".to_string()),
        "\\PC{0,8}",
        "/[a-z0-9~/]{0,10}",
    ];
    (
        ptr.clone(),
        ptr.clone(),
        ptr.clone(),
        ptr.clone(),
        ptr.clone(),
        ptr,
    )
        .prop_map(
            |(tenant, allow, enforcement, severity, reason, rule_ids)| OpaMapping {
                tenant,
                allow,
                enforcement,
                severity,
                reason,
                rule_ids,
                user: "/input/user_id".into(),
                ..OpaMapping::default()
            },
        )
}

const MAPPED: [(&str, &str); 8] = [
    ("/input/tenant_id", "MKtenant"),
    ("/input/team_id", "MKteam"),
    ("/input/project_id", "MKproject"),
    ("/input/user_id", "MKuser"),
    ("/input/request_id", "MKrequest"),
    ("/labels/id", "MKsource"),
    ("/result/reason", "MKreason"),
    ("/result/rule_ids", "MKrule"),
];

/// An event whose every mapped and unmapped value is a distinct marker.
fn marked_event(erased: &[&str]) -> Value {
    let mut v = sample();
    v["input"] = json!({
        "tenant_id": "MKtenant", "team_id": "MKteam", "project_id": "MKproject",
        "user_id": "MKuser", "request_id": "MKrequest", "secret": "UNMAPPEDinput",
        "nested": {"deep": "UNMAPPEDnested"}
    });
    v["labels"] = json!({"id": "MKsource", "version": "UNMAPPEDlabel"});
    v["result"] = json!({
        "allow": false, "enforcement": "monitor", "severity": "critical",
        "reason": ["MKreason"], "rule_ids": ["MKrule"], "extra": "UNMAPPEDresult"
    });
    v["mapped_result"] = json!("UNMAPPEDmapped");
    v["erased"] = json!(erased);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_any_json(v in arb_json(), m in arb_mapping()) {
        let _ = map_event(&v, &OpaMapping::default());
        let _ = map_event(&v, &m);
        let _ = recognise(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn never_panics_on_opa_shaped_json(v in arb_opa_shaped(), m in arb_mapping()) {
        for m in [&OpaMapping::default(), &m] {
            if let Err(e) = map_event(&v, m) {
                prop_assert!(!e.class().is_empty());
                let _ = e.to_string();
            }
        }
    }

    #[test]
    fn never_panics_on_bytes(b in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = recognise(&b);
    }

    /// Whatever OPA lists as erased (even where the value is still present) never
    /// reaches the decision or the error; unmapped values never do; the rest is mapped.
    #[test]
    fn erased_and_unmapped_values_never_appear(
        picks in prop::collection::vec(prop::sample::select(vec![
            "", "/input", "/result", "/labels", "/input/tenant_id", "/input/team_id",
            "/input/project_id", "/input/user_id", "/input/request_id", "/labels/id",
            "/result/reason", "/result/reason/0", "/result/rule_ids", "/result/severity",
            "/result/enforcement", "/input/team_id/x", "/inputs", "/input/team", "/metrics",
        ]), 0..5)
    ) {
        let m = OpaMapping {
            user: "/input/user_id".into(),
            rule_ids: "/result/rule_ids".into(),
            ..OpaMapping::default()
        };
        let v = marked_event(&picks);
        let mapped = map_event(&v, &m);
        let out = match &mapped {
            Ok(d) => serde_json::to_string(d).unwrap(),
            Err(e) => format!("{e:?} {e}"),
        };
        let hidden = |p: &str| picks.iter().any(|e| {
            p.strip_prefix(e).is_some_and(|r| r.is_empty() || r.starts_with('/'))
                || e.strip_prefix(p).is_some_and(|r| r.starts_with('/'))
        });
        prop_assert_eq!(
            mapped.is_ok(),
            !hidden("/input/tenant_id") && !hidden("/result/allow"),
            "{}", out
        );
        for (ptr, marker) in MAPPED {
            if hidden(ptr) {
                prop_assert!(!out.contains(marker), "{} erased but in {}", ptr, out);
            } else if mapped.is_ok() {
                prop_assert!(out.contains(marker), "{} not erased, missing in {}", ptr, out);
            }
        }
        prop_assert!(!out.contains("UNMAPPED"), "unmapped value in {}", out);
        if let Ok(d) = &mapped {
            let sev = if hidden("/result/severity") { Severity::Medium } else { Severity::Critical };
            let enf = if hidden("/result/enforcement") { Enforcement::Enforce } else { Enforcement::Monitor };
            prop_assert_eq!((d.severity, d.enforcement), (sev, enf));
        }
    }
}

/// The fuzzing above reaches every stage: mapped events and most error classes occur.
#[test]
fn fuzzing_reaches_every_stage() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = arb_opa_shaped();
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for _ in 0..3000 {
        let v = strategy.new_tree(&mut runner).unwrap().current();
        let c = map(&v).map(|_| "ok").unwrap_or_else(|e| e.class());
        *seen.entry(c).or_default() += 1;
    }
    let opa = OpaError::CLASSES
        .iter()
        .filter(|c| seen.contains_key(*c))
        .count();
    assert!(seen.get("ok").copied().unwrap_or(0) > 300, "{seen:?}");
    assert!(opa >= 9, "only {opa} opa classes reached: {seen:?}");
}
