//! Poison messages: each kind is built from a good event (by editing its JSON
//! as a `serde_json::Value`, or by byte surgery on an encoded payload) and
//! carries the `DecodeError::class()` the consumer's decoder must report.

use serde_json::Value;
use tally_schemas::UsageEvent;

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

/// The good event as a JSON object with `edit` applied.
fn edited(e: &UsageEvent, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&tally_schemas::encode_json(e)).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        edit(map);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn set(e: &UsageEvent, field: &str, value: Value) -> Vec<u8> {
    edited(e, |m| {
        m.insert(field.to_string(), value);
    })
}

/// Builds poison kind `kind` (taken modulo [`KINDS`]) from `e`; returns the
/// payload and the decoder class it must fail with.
pub fn build(kind: usize, e: &UsageEvent) -> (Vec<u8>, &'static str) {
    let kind = kind % KINDS;
    let (name, class) = CATALOG[kind];
    let payload = match name {
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
        "not_json" => format!("{{tenant_id: {}, this is not json}}", e.tenant_id).into_bytes(),
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
        "bad_event_id" => set(e, "event_id", Value::from("not-a-uuid-0000")),
        "bad_occurred_at" => set(e, "occurred_at", Value::from("2024-13-45T25:61:00Z")),
        "unknown_status" => set(e, "status", Value::from("exploded")),
        "negative_input_tokens" => set(e, "input_tokens", Value::from(-5)),
        "absurd_output_tokens" => set(e, "output_tokens", Value::from(1_000_000_000_000i64)),
        "empty_model" => set(e, "model", Value::from("")),
        "bad_currency" => set(e, "currency", Value::from("usd!")),
        "bad_reported_cost" => set(e, "reported_cost", Value::from("abc")),
        "truncated_json" => {
            let mut p = tally_schemas::encode_json(e);
            p.truncate(p.len() / 2);
            p
        }
        "occurred_at_1970" => set(e, "occurred_at", Value::from("1970-01-01T00:00:00Z")),
        "negative_latency" => set(e, "latency_ms", Value::from(-1)),
        "absurd_latency" => set(e, "latency_ms", Value::from(100_000_000_000i64)),
        "empty_tenant_id" => set(e, "tenant_id", Value::from("")),
        "tenant_id_not_a_string" => set(e, "tenant_id", Value::from(42)),
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
        "negative_reported_cost" => set(e, "reported_cost", Value::from("-0.5")),
        _ => unreachable!("every catalog entry is handled"),
    };
    (payload, class)
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
