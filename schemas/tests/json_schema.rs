//! The JSON Schemas in `schemas/json/` are exactly what `json_schema_text` generates
//! from the bundled `.avsc` files, and they agree with the decoder: every sample event
//! and JSON seed validates, and for every field of every subject, probed at its limits
//! and with wrong types, nulls and absence, a value the schema accepts decodes and a
//! value it rejects is dead-lettered, except the cases listed in [`SCHEMA_STRICTER`]
//! and [`SCHEMA_LOOSER`] (documented in docs/emitters.md).
//!
//! To regenerate after changing an `.avsc` file or a limit:
//! `TALLY_UPDATE_JSON_SCHEMAS=1 cargo test -p tally-schemas --test json_schema`.

use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;
use tally_schemas::{
    encode_json, json_schema, json_schema_path, json_schema_subjects, json_schema_text,
    sample_audit_event, sample_compliance_violation, sample_policy_decision, sample_usage,
    AuditEvent, ComplianceViolation, Decoder, PolicyDecision, UsageEvent, MAX_ID_LEN, MAX_TEXT_LEN,
};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_schemas_are_the_generated_ones() {
    let update = std::env::var_os("TALLY_UPDATE_JSON_SCHEMAS").is_some_and(|v| v == "1");
    let dir = crate_dir().join("json");
    let mut stale = Vec::new();
    let mut expected_files = BTreeSet::new();
    for subject in json_schema_subjects() {
        let text = json_schema_text(subject).expect("schema");
        let path = crate_dir().join(json_schema_path(subject));
        expected_files.insert(path.file_name().unwrap().to_string_lossy().to_string());
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    let extra: Vec<_> = present.difference(&expected_files).collect();
    assert!(
        stale.is_empty() && extra.is_empty(),
        "JSON Schemas out of date {stale:?}, unexpected files {extra:?}: run \
         TALLY_UPDATE_JSON_SCHEMAS=1 cargo test -p tally-schemas --test json_schema"
    );
}

// ---------------------------------------------------------------------------------
// A minimal JSON Schema validator for exactly the keywords the generator writes.
// Any other keyword fails the test, so the generator cannot drift past it.

fn validate(schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        errs.push(format!("{at}: schema is not an object"));
        return;
    };
    for (k, kv) in s {
        match k.as_str() {
            "$schema" | "$id" | "title" | "description" | "default" | "format" => {}
            "type" => {
                let types: Vec<&str> = match kv {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    _ => panic!("bad type keyword {kv}"),
                };
                if !types.iter().any(|t| has_type(v, t)) {
                    errs.push(format!("{at}: {v} is not of type {types:?}"));
                }
            }
            "properties" => {
                if let (Some(props), Some(obj)) = (kv.as_object(), v.as_object()) {
                    for (name, sub) in props {
                        if let Some(x) = obj.get(name) {
                            validate(sub, x, &format!("{at}/{name}"), errs);
                        }
                    }
                }
            }
            "required" => {
                if let Some(obj) = v.as_object() {
                    for name in kv.as_array().unwrap().iter().filter_map(Value::as_str) {
                        if !obj.contains_key(name) {
                            errs.push(format!("{at}: missing {name}"));
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(obj) = v.as_object() {
                    let known = s.get("properties").and_then(Value::as_object);
                    for (name, x) in obj {
                        if !known.is_some_and(|p| p.contains_key(name)) {
                            validate(kv, x, &format!("{at}/{name}"), errs);
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = v.as_array() {
                    for (i, x) in items.iter().enumerate() {
                        validate(kv, x, &format!("{at}/{i}"), errs);
                    }
                }
            }
            "enum" => {
                if !kv.as_array().unwrap().contains(v) {
                    errs.push(format!("{at}: {v} not in {kv}"));
                }
            }
            "anyOf" => {
                let ok = kv.as_array().unwrap().iter().any(|alt| {
                    let mut e = Vec::new();
                    validate(alt, v, at, &mut e);
                    e.is_empty()
                });
                if !ok {
                    errs.push(format!("{at}: {v} matches no alternative"));
                }
            }
            "pattern" => {
                if let Some(text) = v.as_str() {
                    let re = regex_lite::Regex::new(kv.as_str().unwrap()).unwrap();
                    if !re.is_match(text) {
                        errs.push(format!("{at}: {text:?} does not match {kv}"));
                    }
                }
            }
            "minLength" | "maxLength" => {
                if let Some(text) = v.as_str() {
                    let n = text.chars().count() as u64;
                    let bound = kv.as_u64().unwrap();
                    if (k == "minLength" && n < bound) || (k == "maxLength" && n > bound) {
                        errs.push(format!("{at}: length {n} breaks {k} {bound}"));
                    }
                }
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                if let (Some(x), Some(b)) = (v.as_f64(), kv.as_f64()) {
                    let ok = match k.as_str() {
                        "minimum" => x >= b,
                        "maximum" => x <= b,
                        "exclusiveMinimum" => x > b,
                        _ => x < b,
                    };
                    if !ok {
                        errs.push(format!("{at}: {v} breaks {k} {kv}"));
                    }
                }
            }
            other => panic!("the test validator does not know keyword {other:?}"),
        }
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        // Draft 2020-12: any number with a zero fractional part.
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "object" => v.is_object(),
        "array" => v.is_array(),
        other => panic!("unknown type {other}"),
    }
}

fn schema_errors(subject: &str, v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    validate(&json_schema(subject).unwrap(), v, "", &mut errs);
    errs
}

// ---------------------------------------------------------------------------------

/// The sample of `subject` as the JSON object `encode_json` writes.
fn sample(subject: &str) -> Value {
    let bytes = match subject {
        "llm.usage.v1" => encode_json(&sample_usage()),
        "policy.decision.v1" => encode_json(&sample_policy_decision()),
        "audit.event.v1" => encode_json(&sample_audit_event()),
        "compliance.violation.v1" => encode_json(&sample_compliance_violation()),
        other => panic!("no sample for {other}"),
    };
    serde_json::from_slice(&bytes).unwrap()
}

/// The decoder's verdict on a JSON object: `Ok` or the dead-letter class.
fn decode(subject: &str, v: &Value) -> Result<(), &'static str> {
    decode_bytes(subject, &serde_json::to_vec(v).unwrap())
}

fn decode_bytes(subject: &str, bytes: &[u8]) -> Result<(), &'static str> {
    let d = Decoder::new();
    let r = match subject {
        "llm.usage.v1" => d.decode::<UsageEvent>(bytes).map(drop),
        "policy.decision.v1" => d.decode::<PolicyDecision>(bytes).map(drop),
        "audit.event.v1" => d.decode::<AuditEvent>(bytes).map(drop),
        "compliance.violation.v1" => d.decode::<ComplianceViolation>(bytes).map(drop),
        other => panic!("no decoder for {other}"),
    };
    r.map_err(|e| e.class())
}

#[test]
fn samples_and_json_seeds_validate() {
    for subject in json_schema_subjects() {
        let v = sample(subject);
        assert_eq!(
            schema_errors(subject, &v),
            Vec::<String>::new(),
            "{subject}"
        );
    }
    let seeds = crate_dir().join("fuzz/seeds/json");
    let mut n = 0;
    for entry in std::fs::read_dir(&seeds).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let subject = match name.split('-').next() {
            Some("usage") => "llm.usage.v1",
            Some("policy") => "policy.decision.v1",
            Some("audit") => "audit.event.v1",
            Some("violation") => "compliance.violation.v1",
            _ => continue,
        };
        let bytes = std::fs::read(&path).unwrap();
        let ok = name.contains("-ok");
        assert_eq!(decode_bytes(subject, &bytes).is_ok(), ok, "{name}: decoder");
        // One seed nests deeper than serde_json's Value parser goes (the decoder
        // skips unknown fields without building them).
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        if ok {
            assert_eq!(schema_errors(subject, &v), Vec::<String>::new(), "{name}");
            n += 1;
        }
    }
    assert!(n >= 6, "only {n} JSON seeds checked");
}

/// What a probe does to a field.
enum Probe {
    Omit,
    Set(Value),
}

/// The probes of one property: wrong types, null, absence, every enum symbol, and
/// values at and just past each limit and pattern the schema states.
fn probes(subject: &str, prop: &Value) -> Vec<(String, Probe)> {
    let mut out = vec![
        ("<absent>".to_string(), Probe::Omit),
        ("null".into(), Probe::Set(Value::Null)),
        ("true".into(), Probe::Set(json!(true))),
        ("7".into(), Probe::Set(json!(7))),
        ("\"7\"".into(), Probe::Set(json!("7"))),
        ("[]".into(), Probe::Set(json!([]))),
        ("{}".into(), Probe::Set(json!({}))),
    ];
    let mut set = |label: &str, v: Value| out.push((label.to_string(), Probe::Set(v)));
    let string_part = prop
        .get("anyOf")
        .and_then(|a| a.get(0))
        .unwrap_or(prop)
        .clone();
    if let Some(symbols) = prop.get("enum").and_then(Value::as_array) {
        for s in symbols {
            set(&format!("symbol {s}"), s.clone());
        }
        set("symbol BOGUS", json!("BOGUS"));
        let upper = symbols[0].as_str().unwrap().to_uppercase();
        set("symbol in upper case", json!(upper));
    }
    if let Some(max) = prop.get("maxLength").and_then(Value::as_u64) {
        let max = max as usize;
        set("ASCII at maxLength", json!("x".repeat(max)));
        set("ASCII past maxLength", json!("x".repeat(max + 1)));
        set(
            "2-byte characters, maxLength of them",
            json!("é".repeat(max)),
        );
        set("empty string", json!(""));
    }
    if let Some(max) = prop.get("maximum").and_then(Value::as_i64) {
        set("integer 0", json!(0));
        set("integer at maximum", json!(max));
        set("integer past maximum", json!(max + 1));
        set("integer -1", json!(-1));
    }
    match string_part.get("format").and_then(Value::as_str) {
        Some("uuid") => {
            for (label, v) in [
                ("uuid lower case", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a60"),
                ("uuid upper case", "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A61"),
                ("uuid without hyphens", "0190a1b2c3d47e5f8a9b0c1d2e3f4a62"),
                ("uuid in braces", "{0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a63}"),
                (
                    "uuid as urn",
                    "urn:uuid:0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a64",
                ),
                ("uuid cut short", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a6"),
                ("uuid empty", ""),
            ] {
                set(label, json!(v));
            }
        }
        Some("date-time") => {
            // Kept between the violation sample's window_start and window_end, so
            // its cross-field rule (start <= end) holds; the year limits apart.
            let mut cases = vec![
                ("timestamp Z", "2025-01-15T10:00:00Z"),
                ("timestamp micros", "2025-01-15T10:00:00.123456Z"),
                ("timestamp millis", "2025-01-15T10:00:00.123Z"),
                ("timestamp nanos", "2025-01-15T10:00:00.123456789Z"),
                ("timestamp offset", "2025-01-15T11:00:00+01:00"),
                ("timestamp lower-case t and z", "2025-01-15t10:00:00z"),
                ("timestamp space separator", "2025-01-15 10:00:00Z"),
                ("timestamp without offset", "2025-01-15T10:00:00"),
                ("timestamp date only", "2025-01-15"),
                ("timestamp year 1999", "1999-12-31T23:59:59Z"),
                ("timestamp year 2101", "2101-01-01T00:00:00Z"),
            ];
            if subject != "compliance.violation.v1" {
                cases.push(("timestamp year 2000", "2000-01-01T00:00:00Z"));
                cases.push(("timestamp year 2100", "2100-12-31T23:59:59Z"));
            }
            for (label, v) in cases {
                set(label, json!(v));
            }
        }
        _ => {}
    }
    if let Some(p) = string_part.get("pattern").and_then(Value::as_str) {
        if p.contains("[A-Z]{3}") {
            for v in ["USD", "EUR", "usd", "EURO", "US"] {
                set(&format!("currency {v}"), json!(v));
            }
        }
        if p.contains("(0|[1-9]") {
            let big = prop["anyOf"][1]["exclusiveMaximum"].as_f64().unwrap();
            let int_digits = big.log10().round() as usize;
            let max = format!("{}.999999999", "9".repeat(int_digits));
            for (label, v) in [
                ("decimal 0", json!("0")),
                ("decimal 1.5", json!("1.5")),
                ("decimal 9 fractional digits", json!("0.000000001")),
                ("decimal 10 fractional digits", json!("0.0000000001")),
                ("decimal largest", json!(max)),
                (
                    "decimal one integer digit too many",
                    json!(format!("1{}", "0".repeat(int_digits))),
                ),
                ("decimal -1", json!("-1")),
                ("decimal exponent", json!("1e-3")),
                ("decimal leading zero", json!("01.5")),
                ("decimal padded", json!(" 1.5")),
                ("decimal with underscore", json!("1_000")),
                ("decimal text", json!("abc")),
                ("decimal number 1.5", json!(1.5)),
                ("decimal number -1", json!(-1)),
                ("decimal number past the bound", json!(big)),
            ] {
                set(label, v);
            }
        }
    }
    if prop.get("type") == Some(&json!("object")) {
        set("map of strings", json!({"a": "b", "": "empty key"}));
        set("map with a number", json!({"a": 1}));
    }
    if prop.get("type") == Some(&json!("array")) {
        set("array of strings", json!(["a", "b"]));
        set("array with a number", json!([1]));
    }
    if prop.get("type") == Some(&json!("integer")) {
        set("integer written 1.0", json!(1.0));
    }
    out
}

/// Where the schema is stricter than the decoder: it asks for the canonical form,
/// tally also accepts these (probe labels; an emitter following the schema loses
/// nothing). Listed in docs/emitters.md.
const SCHEMA_STRICTER: &[&str] = &[
    "decimal exponent",
    "decimal leading zero",
    "decimal padded",
    "decimal with underscore",
    "evidence_event_ids absent",
    "rule_ids absent",
    "timestamp lower-case t and z",
    "timestamp nanos",
    "timestamp space separator",
    "uuid as urn",
    "uuid in braces",
    "uuid without hyphens",
];

/// Where the schema is looser than the decoder: it accepts, tally dead-letters
/// (with the class). JSON Schema counts characters, not UTF-8 bytes, and calls 1.0
/// an integer. Listed in docs/emitters.md.
const SCHEMA_LOOSER: &[&str] = &[
    "2-byte characters, maxLength of them -> absurd_value",
    "integer written 1.0 -> invalid_json",
];

#[test]
fn schemas_and_decoder_agree_field_by_field() {
    let mut stricter = BTreeSet::new();
    let mut looser = BTreeSet::new();
    let mut probed = 0;
    for subject in json_schema_subjects() {
        let schema = json_schema(subject).unwrap();
        let base = sample(subject);
        assert!(decode(subject, &base).is_ok(), "{subject} sample");
        for (field, prop) in schema["properties"].as_object().unwrap() {
            for (label, probe) in probes(subject, prop) {
                let mut obj: Map<String, Value> = base.as_object().unwrap().clone();
                // Absence is about one field; every other probe about a kind of value.
                let label = match probe {
                    Probe::Omit => format!("{field} absent"),
                    Probe::Set(_) => label,
                };
                match probe {
                    Probe::Omit => {
                        obj.remove(field);
                    }
                    Probe::Set(v) => {
                        obj.insert(field.clone(), v);
                    }
                }
                let v = Value::Object(obj);
                let schema_ok = schema_errors(subject, &v).is_empty();
                let decoded = decode(subject, &v);
                probed += 1;
                match (schema_ok, decoded) {
                    (false, Ok(())) => {
                        stricter.insert(label);
                    }
                    (true, Err(class)) => {
                        looser.insert(format!("{label} -> {class}"));
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(probed > 500, "only {probed} probes");
    let want = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        (&looser, &stricter),
        (&want(SCHEMA_LOOSER), &want(SCHEMA_STRICTER)),
        "(schema accepts and decoder rejects, schema rejects and decoder accepts)"
    );
    // The limits the probes rest on are the ones event.rs exports.
    assert_eq!(MAX_ID_LEN, 256);
    assert_eq!(MAX_TEXT_LEN, 1 << 20);
}

/// The JSON rules docs/emitters.md states beyond what the schemas say.
#[test]
fn json_rules_stated_in_the_docs() {
    let usage = sample("llm.usage.v1");
    let with = |field: &str, raw: &str| {
        let mut obj = usage.as_object().unwrap().clone();
        obj.remove(field);
        let text = serde_json::to_string(&Value::Object(obj)).unwrap();
        format!("{},\"{field}\":{raw}}}", &text[..text.len() - 1])
    };
    let class = |text: String| decode_bytes("llm.usage.v1", text.as_bytes()).err();
    // A field given twice, an integer with an exponent, epoch-number timestamps.
    let twice = format!("{},\"model\":\"again\"}}", {
        let t = serde_json::to_string(&usage).unwrap();
        t[..t.len() - 1].to_string()
    });
    assert_eq!(class(twice), Some("invalid_json"));
    assert_eq!(class(with("input_tokens", "1e3")), Some("invalid_json"));
    assert_eq!(
        class(with("occurred_at", "1736937000")),
        Some("invalid_json")
    );
    assert_eq!(class(with("tags", "null")), Some("invalid_json"));
    assert_eq!(class(with("x_unknown", "{\"a\":[1]}")), None);
    // A year that is 2100 as written but 2101 in UTC.
    assert_eq!(
        class(with("occurred_at", "\"2100-12-31T23:00:00-05:00\"")),
        Some("invalid_timestamp")
    );
    // Nanoseconds survive JSON but not Avro, so the two copies differ in content
    // (and a re-send in the other encoding is a dedup_conflict).
    let nanos = with("occurred_at", "\"2025-01-15T10:30:00.123456789Z\"");
    let from_json: UsageEvent = Decoder::new().decode(nanos.as_bytes()).unwrap();
    let avro = tally_schemas::encode_single_object(&from_json);
    let from_avro: UsageEvent = Decoder::new().decode(&avro).unwrap();
    assert_ne!(encode_json(&from_json), encode_json(&from_avro));
    let micros = with("occurred_at", "\"2025-01-15T10:30:00.123456Z\"");
    let from_json: UsageEvent = Decoder::new().decode(micros.as_bytes()).unwrap();
    let avro = tally_schemas::encode_single_object(&from_json);
    let from_avro: UsageEvent = Decoder::new().decode(&avro).unwrap();
    assert_eq!(encode_json(&from_json), encode_json(&from_avro));
    // Decimals compare by value: "1.50" and "1.5" are the same content.
    let a: UsageEvent = Decoder::new()
        .decode(with("reported_cost", "\"1.50\"").as_bytes())
        .unwrap();
    let b: UsageEvent = Decoder::new()
        .decode(with("reported_cost", "\"1.5\"").as_bytes())
        .unwrap();
    assert_eq!(encode_json(&a), encode_json(&b));
}
