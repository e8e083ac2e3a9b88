//! Poison messages: each kind is built from a good event (by editing its JSON
//! as a `serde_json::Value`, or by byte surgery on an encoded payload) and
//! carries the `DecodeError::class()` the consumer's decoder must report.

use serde_json::Value;
use tally_schemas::{Event, UsageEvent};

/// Confluent schema id that is never registered.
pub const UNREGISTERED_SCHEMA_ID: u32 = 999_999;
/// A single-object fingerprint no schema has.
const BOGUS_FINGERPRINT: [u8; 8] = [0xDE, 0xAD, 0xBE, 0xEF, 0x0B, 0xAD, 0xF0, 0x0D];

/// The poison kinds in rotation order: (name, expected decoder class).
pub const CATALOG: &[(&str, &str)] = &[
    ("empty_payload", "empty"),
    ("unknown_leading_byte", "wrong_magic"),
    ("truncated_single_object_header", "truncated"),
    ("unregistered_confluent_schema", "unknown_schema_id"),
    ("unknown_fingerprint", "unknown_fingerprint"),
    ("not_json", "invalid_json"),
    ("invalid_utf8_in_json", "invalid_utf8"),
    ("json_missing_tenant_id", "missing_field"),
    ("bad_event_id", "invalid_uuid"),
    ("bad_occurred_at", "invalid_timestamp"),
    ("unknown_status", "unknown_enum_symbol"),
    ("negative_input_tokens", "negative_value"),
    ("absurd_output_tokens", "absurd_value"),
    ("empty_model", "empty_field"),
    ("bad_currency", "invalid_currency"),
    ("bad_reported_cost", "invalid_decimal"),
    ("truncated_json", "invalid_json"),
    ("occurred_at_1970", "invalid_timestamp"),
    ("negative_latency", "negative_value"),
    ("absurd_latency", "absurd_value"),
    ("empty_tenant_id", "empty_field"),
    ("tenant_id_not_a_string", "invalid_json"),
    ("truncated_confluent_header", "truncated"),
    ("truncated_avro_body", "truncated"),
    ("negative_reported_cost", "negative_value"),
];

/// Number of poison kinds.
pub const KINDS: usize = CATALOG.len();

/// Poison kinds of the policy stream (native encodings; OPA-shaped poison is
/// [`crate::opa::POISON`]), in rotation order.
pub const POLICY_CATALOG: &[(&str, &str)] = &[
    ("unknown_decision", "unknown_enum_symbol"),
    ("empty_payload", "empty"),
    ("negative_evaluation_ms", "negative_value"),
    ("unknown_leading_byte", "wrong_magic"),
    ("empty_decision_id", "empty_field"),
    ("truncated_single_object_header", "truncated"),
    ("unknown_enforcement", "unknown_enum_symbol"),
    ("unregistered_confluent_schema", "unknown_schema_id"),
    ("absurd_evaluation_ms", "absurd_value"),
    ("unknown_fingerprint", "unknown_fingerprint"),
    ("empty_policy_id", "empty_field"),
    ("not_json", "invalid_json"),
    ("occurred_at_1970", "invalid_timestamp"),
    ("invalid_utf8_in_json", "invalid_utf8"),
    ("empty_tenant_id", "empty_field"),
    ("json_missing_tenant_id", "missing_field"),
    ("truncated_json", "invalid_json"),
    ("bad_event_id", "invalid_uuid"),
    ("truncated_avro_body", "truncated"),
    ("truncated_confluent_header", "truncated"),
];

/// Poison kinds of the audit stream, in rotation order.
pub const AUDIT_CATALOG: &[(&str, &str)] = &[
    ("unknown_actor_type", "unknown_enum_symbol"),
    ("truncated_avro_body", "truncated"),
    ("empty_actor_id", "empty_field"),
    ("unknown_fingerprint", "unknown_fingerprint"),
    ("unknown_outcome", "unknown_enum_symbol"),
    ("empty_payload", "empty"),
    ("bad_occurred_at", "invalid_timestamp"),
    ("invalid_utf8_in_json", "invalid_utf8"),
    ("empty_action", "empty_field"),
    ("unregistered_confluent_schema", "unknown_schema_id"),
    ("tenant_id_not_a_string", "invalid_json"),
    ("truncated_json", "invalid_json"),
    ("json_missing_tenant_id", "missing_field"),
    ("unknown_leading_byte", "wrong_magic"),
    ("bad_event_id", "invalid_uuid"),
    ("truncated_single_object_header", "truncated"),
    ("not_json", "invalid_json"),
    ("truncated_confluent_header", "truncated"),
];

/// Poison made by setting one field of the event's JSON: (name, field, JSON value).
const EDITS: &[(&str, &str, &str)] = &[
    ("bad_event_id", "event_id", r#""not-a-uuid-0000""#),
    (
        "bad_occurred_at",
        "occurred_at",
        r#""2024-13-45T25:61:00Z""#,
    ),
    ("unknown_status", "status", r#""exploded""#),
    ("negative_input_tokens", "input_tokens", "-5"),
    ("absurd_output_tokens", "output_tokens", "1000000000000"),
    ("empty_model", "model", r#""""#),
    ("bad_currency", "currency", r#""usd!""#),
    ("bad_reported_cost", "reported_cost", r#""abc""#),
    (
        "occurred_at_1970",
        "occurred_at",
        r#""1970-01-01T00:00:00Z""#,
    ),
    ("negative_latency", "latency_ms", "-1"),
    ("absurd_latency", "latency_ms", "100000000000"),
    ("empty_tenant_id", "tenant_id", r#""""#),
    ("tenant_id_not_a_string", "tenant_id", "42"),
    ("negative_reported_cost", "reported_cost", r#""-0.5""#),
    ("unknown_decision", "decision", r#""maybe""#),
    ("unknown_enforcement", "enforcement", r#""sometimes""#),
    ("negative_evaluation_ms", "evaluation_ms", "-3"),
    ("absurd_evaluation_ms", "evaluation_ms", "100000000000"),
    ("empty_decision_id", "decision_id", r#""""#),
    ("empty_policy_id", "policy_id", r#""""#),
    ("unknown_actor_type", "actor_type", r#""robot""#),
    ("unknown_outcome", "outcome", r#""exploded""#),
    ("empty_actor_id", "actor_id", r#""""#),
    ("empty_action", "action", r#""""#),
];

/// The good event as a JSON object with `edit` applied.
fn edited<T: Event>(e: &T, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&tally_schemas::encode_json(e)).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        edit(map);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Builds usage poison kind `kind` (taken modulo [`KINDS`]) from `e`; returns
/// the payload and the decoder class it must fail with.
pub fn build(kind: usize, e: &UsageEvent) -> (Vec<u8>, &'static str) {
    build_from(CATALOG, kind, e)
}

/// Builds poison kind `kind` (taken modulo the catalog's length) of `catalog`
/// from `e`; returns the payload and the decoder class it must fail with.
pub fn build_from<T: Event>(
    catalog: &[(&'static str, &'static str)],
    kind: usize,
    e: &T,
) -> (Vec<u8>, &'static str) {
    let (name, class) = catalog[kind % catalog.len()];
    (poison(name, e), class)
}

/// The payload of the poison kind called `name`, built from `e`.
fn poison<T: Event>(name: &str, e: &T) -> Vec<u8> {
    match name {
        "empty_payload" => Vec::new(),
        "unknown_leading_byte" => {
            let mut p = vec![0x7F];
            p.extend_from_slice(&tally_schemas::encode_single_object(e));
            p
        }
        "truncated_single_object_header" => {
            let mut p = tally_schemas::encode_single_object(e);
            p.truncate(6);
            p
        }
        "unregistered_confluent_schema" => {
            tally_schemas::encode_confluent(e, UNREGISTERED_SCHEMA_ID)
        }
        "unknown_fingerprint" => {
            let mut p = tally_schemas::encode_single_object(e);
            if p.len() >= 10 {
                p[2..10].copy_from_slice(&BOGUS_FINGERPRINT);
            }
            p
        }
        "not_json" => {
            let tenant = serde_json::to_value(e)
                .ok()
                .and_then(|v| {
                    v.get("tenant_id")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_default();
            format!("{{tenant_id: {tenant}, this is not json}}").into_bytes()
        }
        "invalid_utf8_in_json" => {
            let mut p = tally_schemas::encode_json(e);
            let needle = b"\"source\":\"";
            let at = p
                .windows(needle.len())
                .position(|w| w == needle)
                .map_or(1, |i| i + needle.len());
            p.splice(at..at, [0xFF, 0xFE, 0xC0]);
            p
        }
        "json_missing_tenant_id" => edited(e, |m| {
            m.remove("tenant_id");
        }),
        "truncated_json" => {
            let mut p = tally_schemas::encode_json(e);
            p.truncate(p.len() / 2);
            p
        }
        "truncated_confluent_header" => {
            let mut p = tally_schemas::encode_confluent(e, 1);
            p.truncate(3);
            p
        }
        "truncated_avro_body" => {
            let mut p = tally_schemas::encode_single_object(e);
            // Keep the 10-byte header and cut the datum inside its uuid string.
            p.truncate(10 + 20);
            p
        }
        _ => {
            let (_, field, value) = EDITS
                .iter()
                .find(|(n, _, _)| *n == name)
                .unwrap_or_else(|| unreachable!("poison kind {name} has no builder"));
            let value: Value = serde_json::from_str(value).unwrap_or(Value::Null);
            edited(e, |m| {
                m.insert((*field).to_string(), value);
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_rich() {
        let classes: std::collections::BTreeSet<_> = CATALOG.iter().map(|(_, c)| *c).collect();
        assert!(classes.len() >= 16, "{classes:?}");
        let names: std::collections::BTreeSet<_> = CATALOG.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), CATALOG.len());
    }
}
