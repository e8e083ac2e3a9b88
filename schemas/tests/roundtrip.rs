//! Round trips of all four events through all three wire formats.

use tally_schemas::*;

const ID: u32 = 17;

fn round_trip<T: Event + PartialEq + std::fmt::Debug>(e: &T) {
    let d = Decoder::new();
    // JSON
    let json = encode_json(e);
    assert_eq!(d.decode::<T>(&json).unwrap(), *e, "json");
    // single-object
    let so = encode_single_object(e);
    assert_eq!(&so[..2], &SINGLE_OBJECT_MAGIC);
    assert_eq!(d.decode::<T>(&so).unwrap(), *e, "single-object");
    // Confluent, registered with the current schema text
    let cf = encode_confluent(e, ID);
    assert_eq!(
        d.decode::<T>(&cf).unwrap_err(),
        DecodeError::UnknownSchemaId(ID)
    );
    assert!(!d.has_confluent_schema(ID));
    d.register_confluent_schema(ID, current_schema_text(T::SUBJECT).unwrap())
        .unwrap();
    assert!(d.has_confluent_schema(ID));
    assert_eq!(d.decode::<T>(&cf).unwrap(), *e, "confluent");
    // Same body after the header, whichever framing.
    assert_eq!(&so[SINGLE_OBJECT_HEADER_LEN..], &cf[CONFLUENT_HEADER_LEN..]);
    // And the apache_avro value path agrees.
    let slow = Decoder::new().without_fast_path();
    assert_eq!(slow.decode::<T>(&so).unwrap(), *e, "value path");
}

#[test]
fn usage_round_trips() {
    round_trip(&sample_usage());
    let mut e = sample_usage();
    e.region = Some("eu-west-1".into());
    e.reported_cost = None;
    e.team_id = None;
    e.tags.clear();
    e.status = UsageStatus::RateLimited;
    round_trip(&e);
}

#[test]
fn policy_round_trips() {
    round_trip(&sample_policy_decision());
    let mut e = sample_policy_decision();
    e.rule_ids.clear();
    e.decision = Decision::RequireApproval;
    round_trip(&e);
}

#[test]
fn audit_round_trips() {
    round_trip(&sample_audit_event());
    let mut e = sample_audit_event();
    e.ip = None;
    e.user_agent = Some("curl/8".into());
    e.personal_data = true;
    round_trip(&e);
}

#[test]
fn compliance_round_trips() {
    round_trip(&sample_compliance_violation());
    let mut e = sample_compliance_violation();
    e.observed = "-12.5".parse().unwrap();
    e.threshold = "9999999999999999999.999999999".parse().unwrap();
    round_trip(&e);
}

#[test]
fn json_shape_is_the_contract() {
    let v: serde_json::Value = serde_json::from_slice(&encode_json(&sample_usage())).unwrap();
    assert_eq!(v["event_id"], "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
    assert_eq!(v["occurred_at"], "2025-01-15T10:30:00.123456Z");
    assert_eq!(v["reported_cost"], "0.001234567");
    assert_eq!(v["status"], "success");
    assert_eq!(v["currency"], "USD");
    assert!(v["region"].is_null());
}

#[test]
fn json_input_is_lenient_where_promised() {
    let d = Decoder::new();
    let mut v: serde_json::Value = serde_json::from_slice(&encode_json(&sample_usage())).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("team_id");
    o.remove("tags");
    o.remove("currency");
    o.remove("region");
    o.insert("reported_cost".into(), serde_json::json!(0.25));
    o.insert("something_new".into(), serde_json::json!({"x": 1}));
    o.insert("occurred_at".into(), "2025-01-15T12:30:00.5+02:00".into());
    let e: UsageEvent = d.decode(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(e.team_id, None);
    assert!(e.tags.is_empty());
    assert_eq!(e.currency, "USD");
    assert_eq!(e.reported_cost, Some("0.25".parse().unwrap()));
    assert_eq!(e.occurred_at.to_rfc3339(), "2025-01-15T10:30:00.500+00:00");
}

#[test]
fn enums_expose_symbols() {
    assert_eq!(UsageStatus::RateLimited.as_str(), "rate_limited");
    assert_eq!(Severity::Critical.as_str(), "critical");
    assert_eq!("api_key".parse::<ActorType>().unwrap(), ActorType::ApiKey);
    assert_eq!(Outcome::SYMBOLS.len(), 5);
}

#[test]
fn decoder_is_shareable_across_threads() {
    let d = std::sync::Arc::new(Decoder::new());
    let bytes = encode_confluent(&sample_usage(), 5);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let d = d.clone();
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                if i == 0 {
                    d.register_confluent_schema(5, current_schema_text("llm.usage.v1").unwrap())
                        .unwrap();
                }
                loop {
                    match d.decode::<UsageEvent>(&bytes) {
                        Ok(e) => return e,
                        Err(DecodeError::UnknownSchemaId(5)) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), sample_usage());
    }
}
