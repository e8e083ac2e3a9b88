//! Schema evolution: history compatibility and cross-version decoding.

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use tally_schemas::*;

fn parse(text: &str) -> Schema {
    Schema::parse_str(text).unwrap()
}

fn v1() -> &'static str {
    schema_history("llm.usage.v1")[0].1
}

#[test]
fn every_history_is_backward_compatible_step_by_step() {
    for subject in SUBJECTS {
        let history = schema_history(subject);
        assert!(!history.is_empty(), "{subject} has no schema");
        for pair in history.windows(2) {
            let (old_v, old) = pair[0];
            let (new_v, new) = pair[1];
            assert_eq!(new_v, old_v + 1, "{subject}: versions must be consecutive");
            // The new reader reads data written with the old writer.
            compat::can_read(old, new)
                .unwrap_or_else(|e| panic!("{subject} v{new_v} cannot read v{old_v}: {e}"));
            // apache_avro's checker alone, on everything but decimal fields.
            if !old.contains("decimal") {
                SchemaCompatibility::can_read(&parse(old), &parse(new)).unwrap();
            }
        }
    }
    // v2 only adds an optional field, so v1 readers also read v2 data.
    let h = schema_history("llm.usage.v1");
    compat::can_read(h[1].1, h[0].1).unwrap();
    // A change that drops a required field's default-less addition is caught.
    let mut bad: serde_json::Value = serde_json::from_str(h[1].1).unwrap();
    bad["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "x", "type": "long"}));
    assert!(compat::can_read(h[1].1, &bad.to_string()).is_err());
}

#[test]
fn v1_writer_decodes_with_region_none_single_object() {
    let mut e = sample_usage();
    e.region = Some("dropped-by-v1".into());
    let bytes = encode_single_object_with(&e, v1()).unwrap();
    assert_ne!(&bytes[2..10], &encode_single_object(&e)[2..10]);
    for d in [Decoder::new(), Decoder::new().without_fast_path()] {
        let back: UsageEvent = d.decode(&bytes).unwrap();
        assert_eq!(back.region, None);
        assert_eq!(
            back,
            UsageEvent {
                region: None,
                ..e.clone()
            }
        );
    }
}

#[test]
fn v1_writer_decodes_with_region_none_confluent() {
    let e = sample_usage();
    for d in [Decoder::new(), Decoder::new().without_fast_path()] {
        d.register_confluent_schema(1, v1()).unwrap();
        let bytes = encode_confluent_with(&e, 1, v1()).unwrap();
        assert_eq!(d.decode::<UsageEvent>(&bytes).unwrap(), e);
    }
}

#[test]
fn v2_writer_region_is_decoded_and_v1_readers_ignore_it() {
    let mut e = sample_usage();
    e.region = Some("us-east-1".into());
    // (apache_avro's own resolution rejects short decimals, see avro.rs.)
    e.reported_cost = None;
    let d = Decoder::new();
    let so = encode_single_object(&e);
    assert_eq!(
        d.decode::<UsageEvent>(&so).unwrap().region.as_deref(),
        Some("us-east-1")
    );
    d.register_confluent_schema(2, current_schema_text("llm.usage.v1").unwrap())
        .unwrap();
    let cf = encode_confluent(&e, 2);
    assert_eq!(d.decode::<UsageEvent>(&cf).unwrap(), e);
    // A v1 reader (e.g. an older consumer) resolves v2 data and drops region.
    let v = apache_avro::from_avro_datum(
        &parse(current_schema_text("llm.usage.v1").unwrap()),
        &mut &cf[CONFLUENT_HEADER_LEN..],
        Some(&parse(v1())),
    )
    .unwrap();
    let apache_avro::types::Value::Record(fields) = v else {
        panic!("not a record")
    };
    assert!(fields.iter().all(|(n, _)| n != "region"));
    assert_eq!(fields.len(), 20);
}

#[test]
fn unknown_registry_schema_goes_through_resolution() {
    // A future writer with one more field and reordered docs: not a bundled
    // layout, so the decoder resolves it against the current reader schema.
    let mut future: serde_json::Value =
        serde_json::from_str(current_schema_text("llm.usage.v1").unwrap()).unwrap();
    future["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(
            {"name": "future_field", "type": "string", "default": "x"}
        ));
    future["doc"] = "changed".into();
    let text = future.to_string();
    let d = Decoder::new();
    d.register_confluent_schema(9, &text).unwrap();
    let mut e = sample_usage();
    e.region = Some("ap-south-1".into());
    let bytes = encode_confluent_with(&e, 9, &text).unwrap();
    assert_eq!(d.decode::<UsageEvent>(&bytes).unwrap(), e);
}

#[test]
fn doc_only_changes_keep_the_fast_path_layout() {
    let mut v: serde_json::Value = serde_json::from_str(v1()).unwrap();
    v["doc"] = "reworded".into();
    let d = Decoder::new();
    d.register_confluent_schema(3, &v.to_string()).unwrap();
    let bytes = encode_confluent_with(&sample_usage(), 3, v1()).unwrap();
    assert_eq!(d.decode::<UsageEvent>(&bytes).unwrap(), sample_usage());
}

#[test]
fn fingerprints_are_the_spec_canonical_form() {
    for subject in SUBJECTS {
        for (_, text) in schema_history(subject) {
            let s = parse(text);
            let pcf = parsing_canonical_form(&s);
            assert!(!pcf.contains("logicalType") && !pcf.contains("precision"));
            assert!(!pcf.contains("doc") && !pcf.contains("default"));
            assert_eq!(rabin_fingerprint(&s), crc64_avro(pcf.as_bytes()));
        }
    }
}
