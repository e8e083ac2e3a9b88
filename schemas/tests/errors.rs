//! Every `DecodeError` class, triggered from raw bytes.

use std::collections::BTreeSet;
use tally_schemas::*;

fn json_with(f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&encode_json(&sample_usage())).unwrap();
    f(v.as_object_mut().unwrap());
    serde_json::to_vec(&v).unwrap()
}

fn class(bytes: &[u8]) -> &'static str {
    Decoder::new()
        .decode::<UsageEvent>(bytes)
        .map(|_| "ok")
        .unwrap_or_else(|e| e.class())
}

/// Single-object bytes of a usage event mutated before encoding (validation
/// failures only show on decode).
fn avro_with(f: impl FnOnce(&mut UsageEvent)) -> Vec<u8> {
    let mut e = sample_usage();
    f(&mut e);
    encode_single_object(&e)
}

/// Patches the first occurrence of `from` in the Avro body.
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    bytes[at..at + from.len()].copy_from_slice(to);
    bytes
}

#[test]
fn empty() {
    assert_eq!(class(b""), "empty");
    assert_eq!(class(b" \n\t"), "empty");
}

#[test]
fn wrong_magic() {
    assert_eq!(class(b"hello"), "wrong_magic");
    assert_eq!(class(&[0xC3, 0x02, 0, 0]), "wrong_magic");
    assert_eq!(
        Decoder::new().decode::<UsageEvent>(b"[]").unwrap_err(),
        DecodeError::WrongMagic(b'[')
    );
}

#[test]
fn truncated() {
    assert_eq!(class(&[0, 0, 0]), "truncated");
    assert_eq!(class(&[0xC3, 0x01, 1, 2]), "truncated");
    let full = encode_single_object(&sample_usage());
    for cut in [11, 20, full.len() / 2, full.len() - 1] {
        assert_eq!(class(&full[..cut]), "truncated", "cut at {cut}");
        let slow = Decoder::new().without_fast_path();
        let err = slow.decode::<UsageEvent>(&full[..cut]).unwrap_err();
        assert_eq!(err.class(), "truncated", "value path, cut at {cut}: {err}");
    }
}

#[test]
fn unknown_schema_id() {
    let bytes = encode_confluent(&sample_usage(), 77);
    assert_eq!(
        Decoder::new().decode::<UsageEvent>(&bytes).unwrap_err(),
        DecodeError::UnknownSchemaId(77)
    );
}

#[test]
fn unknown_fingerprint() {
    let mut bytes = encode_single_object(&sample_usage());
    bytes[2] ^= 0xff;
    assert_eq!(class(&bytes), "unknown_fingerprint");
}

#[test]
fn schema_mismatch() {
    let policy = encode_single_object(&sample_policy_decision());
    assert_eq!(class(&policy), "schema_mismatch");
    let d = Decoder::new();
    d.register_confluent_schema(4, current_schema_text("audit.event.v1").unwrap())
        .unwrap();
    let bytes = encode_confluent(&sample_audit_event(), 4);
    assert_eq!(
        d.decode::<UsageEvent>(&bytes).unwrap_err().class(),
        "schema_mismatch"
    );
    // Same record name but a field type the reader cannot take.
    let mut v: serde_json::Value =
        serde_json::from_str(current_schema_text("llm.usage.v1").unwrap()).unwrap();
    for f in v["fields"].as_array_mut().unwrap() {
        if f["name"] == "model" {
            f["type"] = "long".into();
        }
    }
    d.register_confluent_schema(5, &v.to_string()).unwrap();
    let mut body = vec![0, 0, 0, 0, 5];
    // Re-encode the sample through apache_avro with the odd schema.
    let schema = apache_avro::Schema::parse_str(&v.to_string()).unwrap();
    let mut value = sample_usage().to_avro_value();
    if let apache_avro::types::Value::Record(fields) = &mut value {
        for (n, x) in fields.iter_mut() {
            if n == "model" {
                *x = apache_avro::types::Value::Long(3);
            }
        }
    }
    body.extend(apache_avro::to_avro_datum(&schema, value).unwrap());
    assert_eq!(
        d.decode::<UsageEvent>(&body).unwrap_err().class(),
        "schema_mismatch"
    );
}

#[test]
fn invalid_utf8() {
    // A string field holding invalid UTF-8 in Avro, both paths.
    let bytes = patch(
        encode_single_object(&sample_usage()),
        b"gateway",
        b"gat\xffway",
    );
    assert_eq!(class(&bytes), "invalid_utf8");
    let slow = Decoder::new().without_fast_path();
    assert_eq!(
        slow.decode::<UsageEvent>(&bytes).unwrap_err().class(),
        "invalid_utf8"
    );
    // And in JSON.
    let json = patch(encode_json(&sample_usage()), b"gateway", b"gat\xffway");
    assert_eq!(class(&json), "invalid_utf8");
}

#[test]
fn invalid_json() {
    assert_eq!(class(b"{\"event_id\": "), "invalid_json");
    assert_eq!(
        class(&json_with(|o| {
            o.insert("input_tokens".into(), "many".into());
        })),
        "invalid_json"
    );
}

#[test]
fn missing_field() {
    let bytes = json_with(|o| {
        o.remove("model");
    });
    assert_eq!(
        Decoder::new().decode::<UsageEvent>(&bytes).unwrap_err(),
        DecodeError::MissingField("model".into())
    );
}

#[test]
fn invalid_uuid() {
    let json = json_with(|o| {
        o.insert("event_id".into(), "not-a-uuid".into());
    });
    assert_eq!(class(&json), "invalid_uuid");
    let avro = patch(
        encode_single_object(&sample_usage()),
        b"0190a1b2",
        b"zz90a1b2",
    );
    assert_eq!(class(&avro), "invalid_uuid");
    let slow = Decoder::new().without_fast_path();
    assert_eq!(
        slow.decode::<UsageEvent>(&avro).unwrap_err().class(),
        "invalid_uuid"
    );
}

#[test]
fn invalid_timestamp() {
    let json = json_with(|o| {
        o.insert("occurred_at".into(), "yesterday".into());
    });
    assert_eq!(class(&json), "invalid_timestamp");
    let old = avro_with(|e| e.occurred_at = chrono::DateTime::UNIX_EPOCH);
    assert_eq!(class(&old), "invalid_timestamp");
}

#[test]
fn unknown_enum_symbol() {
    let json = json_with(|o| {
        o.insert("status".into(), "exploded".into());
    });
    assert_eq!(
        Decoder::new().decode::<UsageEvent>(&json).unwrap_err(),
        DecodeError::UnknownEnumSymbol {
            field: "status".into(),
            value: "exploded".into()
        }
    );
    // Avro enum index 9: rebuild the body with the status byte changed.
    let mut e = sample_usage();
    e.reported_cost = None;
    e.currency = "ZZZ".into();
    let bytes = encode_single_object(&e);
    // status (index 0 => 0x00), reported_cost null (0x00), currency "ZZZ".
    let bytes = patch(bytes, b"\x00\x00\x06ZZZ", b"\x12\x00\x06ZZZ");
    assert_eq!(class(&bytes), "unknown_enum_symbol");
    let slow = Decoder::new().without_fast_path();
    assert_eq!(
        slow.decode::<UsageEvent>(&bytes).unwrap_err().class(),
        "unknown_enum_symbol"
    );
}

#[test]
fn negative_value() {
    assert_eq!(
        class(&avro_with(|e| e.output_tokens = -5)),
        "negative_value"
    );
    assert_eq!(
        class(&json_with(|o| {
            o.insert("reported_cost".into(), "-0.01".into());
        })),
        "negative_value"
    );
}

#[test]
fn absurd_value() {
    assert_eq!(
        class(&avro_with(|e| e.input_tokens = 100_000_001)),
        "absurd_value"
    );
    assert_eq!(
        class(&avro_with(|e| e.latency_ms = 86_400_001)),
        "absurd_value"
    );
    assert_eq!(
        class(&avro_with(|e| e.model = "x".repeat(300))),
        "absurd_value"
    );
}

#[test]
fn empty_field() {
    assert_eq!(class(&avro_with(|e| e.tenant_id.clear())), "empty_field");
    assert_eq!(
        class(&json_with(|o| {
            o.insert("provider".into(), "".into());
        })),
        "empty_field"
    );
}

#[test]
fn invalid_currency() {
    assert_eq!(
        class(&avro_with(|e| e.currency = "usd".into())),
        "invalid_currency"
    );
}

#[test]
fn invalid_decimal() {
    assert_eq!(
        class(&json_with(|o| {
            o.insert("reported_cost".into(), "twelve".into());
        })),
        "invalid_decimal"
    );
    // Avro decimal bytes wider than 96 bits: replace the 3-byte unscaled
    // cost of the sample with 13 bytes by re-framing the body.
    let mut e = sample_usage();
    e.reported_cost = Some(rust_decimal::Decimal::new(1, 9)); // unscaled 1 => [0x02, 0x01]
    e.currency = "QQQ".into();
    let bytes = encode_single_object(&e);
    let mut big = vec![0x1a, 0x7f];
    big.extend([0xff; 12]); // 13 bytes, > 96 bits positive
    let at = bytes
        .windows(5)
        .position(|w| w == b"\x02\x01\x06QQ")
        .unwrap();
    let mut out = bytes[..at].to_vec();
    out.extend(big);
    out.extend_from_slice(&bytes[at + 2..]);
    assert_eq!(class(&out), "invalid_decimal");
    let slow = Decoder::new().without_fast_path();
    assert_eq!(
        slow.decode::<UsageEvent>(&out).unwrap_err().class(),
        "invalid_decimal"
    );
}

#[test]
fn avro() {
    let mut bytes = encode_single_object(&sample_usage());
    bytes.extend_from_slice(b"garbage");
    assert_eq!(class(&bytes), "avro");
    let slow = Decoder::new().without_fast_path();
    assert_eq!(
        slow.decode::<UsageEvent>(&bytes).unwrap_err().class(),
        "avro"
    );
    assert_eq!(
        Decoder::new()
            .register_confluent_schema(1, "{not a schema")
            .unwrap_err()
            .class(),
        "avro"
    );
}

#[test]
fn all_classes_are_covered_here() {
    // Keep this list in step with the tests above.
    let covered: BTreeSet<&str> = [
        "empty",
        "wrong_magic",
        "truncated",
        "unknown_schema_id",
        "unknown_fingerprint",
        "schema_mismatch",
        "invalid_utf8",
        "invalid_json",
        "missing_field",
        "invalid_uuid",
        "invalid_timestamp",
        "unknown_enum_symbol",
        "negative_value",
        "absurd_value",
        "empty_field",
        "invalid_currency",
        "invalid_decimal",
        "avro",
    ]
    .into();
    let all: BTreeSet<&str> = DecodeError::CLASSES.into();
    assert_eq!(covered, all);
}
