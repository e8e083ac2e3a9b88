//! JSON Schemas (draft 2020-12) of the JSON encoding of each subject, generated from
//! its current bundled Avro schema plus the validation limits of [`crate::event`].
//!
//! Guarantee: the output is a deterministic function of the bundled `.avsc` text and
//! the limit table below (same input, same bytes), and a JSON object it accepts is
//! decoded by [`crate::Decoder`] without a dead letter (checked field by field, at
//! every limit, by `schemas/tests/json_schema.rs`; the committed copies in
//! `schemas/json/` are compared with this output there). It describes what an
//! emitter should send: where the decoder is more lenient (other UUID spellings,
//! nanosecond timestamps, missing arrays) the schema asks for the canonical form;
//! `docs/emitters.md` lists each case.
//!
//! Mapping: `string` → string; `long`/`int` → integer; `boolean` → boolean; `uuid` →
//! lower- or upper-case hyphenated UUID string; `timestamp-micros` → RFC 3339 string
//! with at most 6 fractional digits and a `Z` or `±hh:mm` offset; `decimal` → a decimal
//! string (or, accepted but discouraged, a JSON number); `enum` → its symbols; `map` →
//! object; `array` → array; `["null", T]` → T or null. A field with an Avro default is
//! optional (absent = the default); unknown fields are allowed (tally ignores them).

use crate::event::{MAX_ID_LEN, MAX_MS, MAX_TEXT_LEN, MAX_TOKENS};
use crate::registry::{schema_history, SUBJECTS};
use serde_json::{json, Map, Value};

/// The JSON Schema draft every generated schema declares.
pub const JSON_SCHEMA_DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";

/// Hyphenated UUID, either case (the form `encode_json` writes, in lower case).
const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// RFC 3339 date-time with a year in 2000..=2100 (the range `event.rs` accepts),
/// `T` separator, at most microseconds, and `Z` or a numeric offset.
const TIMESTAMP_PATTERN: &str = "^(20[0-9]{2}|2100)-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";

/// What `event.rs` enforces on one field beyond its Avro type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// Non-empty, at most [`MAX_ID_LEN`] bytes.
    Ident,
    /// Absent, null or at most [`MAX_ID_LEN`] bytes.
    OptIdent,
    /// At most [`MAX_TEXT_LEN`] bytes.
    Text,
    /// An integer in `0..=max`.
    Count(i64),
    /// Three upper-case ASCII letters.
    Currency,
    /// A decimal that is not negative.
    NonNegative,
}

/// The limits of `event.rs`, per subject and field (the envelope's first).
fn limits(subject: &str) -> Vec<(&'static str, Limit)> {
    use Limit::*;
    let envelope = [
        ("tenant_id", Ident),
        ("source", Ident),
        ("team_id", OptIdent),
        ("project_id", OptIdent),
        ("user_id", OptIdent),
    ];
    let own: &[(&'static str, Limit)] = match subject {
        "llm.usage.v1" => &[
            ("request_id", Ident),
            ("provider", Ident),
            ("model", Ident),
            ("input_tokens", Count(MAX_TOKENS)),
            ("cached_input_tokens", Count(MAX_TOKENS)),
            ("cache_write_tokens", Count(MAX_TOKENS)),
            ("output_tokens", Count(MAX_TOKENS)),
            ("reasoning_tokens", Count(MAX_TOKENS)),
            ("latency_ms", Count(MAX_MS)),
            ("currency", Currency),
            ("reported_cost", NonNegative),
            ("region", OptIdent),
        ],
        "policy.decision.v1" => &[
            ("decision_id", Ident),
            ("policy_id", Ident),
            ("reason", Text),
            ("evaluation_ms", Count(MAX_MS)),
        ],
        "audit.event.v1" => &[("actor_id", Ident), ("action", Ident), ("details", Text)],
        "compliance.violation.v1" => {
            return vec![("tenant_id", Ident), ("rule", Ident), ("message", Text)];
        }
        _ => &[],
    };
    envelope.iter().chain(own).copied().collect()
}

/// Path of the committed schema of `subject`, relative to the `schemas/` crate.
pub fn json_schema_path(subject: &str) -> String {
    format!("json/{subject}.schema.json")
}

/// The JSON Schema of `subject`'s JSON encoding (current schema version), or `None`
/// for a subject without bundled schemas.
pub fn json_schema(subject: &str) -> Option<Value> {
    let (version, text) = *schema_history(subject).last()?;
    // The bundled schemas are parsed (and tested) at start-up; a failure here is a
    // programming error in this crate, reported as "no schema".
    let avsc: Value = serde_json::from_str(text).ok()?;
    let limits = limits(subject);
    let fields = avsc.get("fields")?.as_array()?;
    let mut properties = Map::new();
    let mut required = Vec::new();
    for f in fields {
        let name = f.get("name")?.as_str()?;
        let limit = limits.iter().find(|(n, _)| *n == name).map(|(_, l)| *l);
        let mut prop = field_type(f.get("type")?, limit)?;
        if let (Some(doc), Some(obj)) = (f.get("doc"), prop.as_object_mut()) {
            obj.insert("description".into(), doc.clone());
        }
        match f.get("default") {
            Some(d) => {
                if let Some(obj) = prop.as_object_mut() {
                    obj.insert("default".into(), d.clone());
                }
            }
            None => required.push(Value::from(name)),
        }
        properties.insert(name.to_string(), prop);
    }
    let full_name = match (avsc.get("namespace"), avsc.get("name")) {
        (Some(Value::String(ns)), Some(Value::String(n))) => format!("{ns}.{n}"),
        (_, Some(Value::String(n))) => n.clone(),
        _ => return None,
    };
    let doc = avsc.get("doc").and_then(Value::as_str).unwrap_or_default();
    let description = format!(
        "{doc} JSON encoding of {subject} (Avro {full_name}), generated from \
         schemas/avro/{subject}/v{version}.avsc by schemas/src/json_schema.rs: do not edit. \
         Unknown fields are ignored. See docs/emitters.md."
    );
    Some(json!({
        "$schema": JSON_SCHEMA_DRAFT,
        "$id": format!("urn:tally:schema:{subject}:json"),
        "title": full_name,
        "description": description.trim_start(),
        "type": "object",
        "properties": properties,
        "required": required,
    }))
}

/// [`json_schema`] as the committed file holds it: pretty-printed, newline-terminated.
pub fn json_schema_text(subject: &str) -> Option<String> {
    let v = sorted(json_schema(subject)?);
    serde_json::to_string_pretty(&v).ok().map(|s| s + "\n")
}

/// `v` with every object's keys inserted in sorted order, so the text is the same
/// whether or not some crate turns on serde_json's `preserve_order`.
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Every subject with a generated JSON Schema.
pub fn json_schema_subjects() -> [&'static str; 4] {
    SUBJECTS
}

/// The schema of one Avro field type, with its `event.rs` limit applied.
fn field_type(t: &Value, limit: Option<Limit>) -> Option<Value> {
    match t {
        Value::String(name) => primitive(name, None, limit),
        Value::Array(branches) => {
            // Only ["null", T] unions occur in the bundled schemas.
            let [null, other] = branches.as_slice() else {
                return None;
            };
            if null != "null" {
                return None;
            }
            let mut inner = field_type(other, limit)?;
            let obj = inner.as_object_mut()?;
            match obj.get_mut("type") {
                Some(Value::String(ty)) => {
                    let ty = std::mem::take(ty);
                    obj.insert("type".into(), json!([ty, "null"]));
                }
                _ => {
                    let alts = obj.get_mut("anyOf")?.as_array_mut()?;
                    alts.push(json!({"type": "null"}));
                }
            }
            Some(inner)
        }
        Value::Object(o) => {
            let ty = o.get("type")?.as_str()?;
            match ty {
                "enum" => Some(json!({"type": "string", "enum": o.get("symbols")?})),
                "map" => Some(json!({
                    "type": "object",
                    "additionalProperties": field_type(o.get("values")?, None)?,
                })),
                "array" => Some(json!({
                    "type": "array",
                    "items": field_type(o.get("items")?, None)?,
                })),
                _ => primitive(ty, Some(o), limit),
            }
        }
        _ => None,
    }
}

/// A primitive Avro type, possibly with a logical type.
fn primitive(
    name: &str,
    attrs: Option<&Map<String, Value>>,
    limit: Option<Limit>,
) -> Option<Value> {
    let logical = attrs
        .and_then(|a| a.get("logicalType"))
        .and_then(Value::as_str);
    let mut v = match (name, logical) {
        ("string", Some("uuid")) => {
            json!({"type": "string", "format": "uuid", "pattern": UUID_PATTERN})
        }
        ("long", Some("timestamp-micros")) => {
            json!({"type": "string", "format": "date-time", "pattern": TIMESTAMP_PATTERN})
        }
        ("bytes", Some("decimal")) => {
            let attr = |k: &str| attrs.and_then(|a| a.get(k)).and_then(Value::as_u64);
            let (precision, scale) = (attr("precision")?, attr("scale")?);
            return Some(decimal(precision, scale, limit == Some(Limit::NonNegative)));
        }
        ("string", _) => json!({"type": "string"}),
        ("long" | "int", _) => json!({"type": "integer"}),
        ("boolean", _) => json!({"type": "boolean"}),
        _ => return None,
    };
    let obj = v.as_object_mut()?;
    let id_len = Value::from(MAX_ID_LEN);
    match limit {
        Some(Limit::Ident) => {
            obj.insert("minLength".into(), 1.into());
            obj.insert("maxLength".into(), id_len);
        }
        Some(Limit::OptIdent) => {
            obj.insert("maxLength".into(), id_len);
        }
        Some(Limit::Text) => {
            obj.insert("maxLength".into(), MAX_TEXT_LEN.into());
        }
        Some(Limit::Count(max)) => {
            obj.insert("minimum".into(), 0.into());
            obj.insert("maximum".into(), max.into());
        }
        Some(Limit::Currency) => {
            obj.insert("pattern".into(), "^[A-Z]{3}$".into());
        }
        Some(Limit::NonNegative) | None => {}
    }
    Some(v)
}

/// An Avro `decimal(precision, scale)`: a string of at most `precision - scale`
/// integer digits and `scale` fractional digits, or a JSON number below 10^(p-s).
fn decimal(precision: u64, scale: u64, non_negative: bool) -> Value {
    let int_digits = precision.saturating_sub(scale).max(1);
    let sign = if non_negative { "" } else { "-?" };
    let pattern = format!(
        "^{sign}(0|[1-9][0-9]{{0,{}}})(\\.[0-9]{{1,{scale}}})?$",
        int_digits - 1
    );
    let bound = format!("1{}", "0".repeat(usize::try_from(int_digits).unwrap_or(0)));
    let bound: Value = serde_json::from_str(&bound).unwrap_or(Value::Null);
    let mut number = json!({"type": "number", "exclusiveMaximum": bound.clone()});
    if let Some(n) = number.as_object_mut() {
        if non_negative {
            n.insert("minimum".into(), 0.into());
        } else if let Value::Number(b) = &bound {
            n.insert(
                "exclusiveMinimum".into(),
                serde_json::from_str(&format!("-{b}")).unwrap_or(Value::Null),
            );
        }
    }
    json!({
        "anyOf": [
            {"type": "string", "pattern": pattern},
            number,
        ],
        "description": format!(
            "Decimal, at most {scale} fractional digits: send a string (a JSON number is \
             accepted but loses digits beyond 15 significant ones)."
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subject_has_a_schema_and_every_limit_names_a_field() {
        for s in json_schema_subjects() {
            let v = json_schema(s).unwrap_or_else(|| panic!("no JSON schema for {s}"));
            let props = v["properties"].as_object().unwrap();
            for (field, _) in limits(s) {
                assert!(
                    props.contains_key(field),
                    "{s}: limit on unknown field {field}"
                );
            }
        }
        assert!(json_schema("nope").is_none());
    }

    #[test]
    fn decimal_patterns() {
        let d = decimal(18, 9, true);
        assert_eq!(
            d["anyOf"][0]["pattern"],
            "^(0|[1-9][0-9]{0,8})(\\.[0-9]{1,9})?$"
        );
        assert_eq!(d["anyOf"][1]["exclusiveMaximum"], json!(1_000_000_000u64));
        let d = decimal(28, 9, false);
        assert_eq!(
            d["anyOf"][0]["pattern"],
            "^-?(0|[1-9][0-9]{0,18})(\\.[0-9]{1,9})?$"
        );
        assert_eq!(
            d["anyOf"][1]["exclusiveMinimum"],
            json!(-10_000_000_000_000_000_000f64)
        );
    }
}
