//! The hand-written fast path and the apache_avro `Value` path agree.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use tally_schemas::*;
use uuid::Uuid;

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("\\PC{0,12}")
}

prop_compose! {
    fn usage()(
        id in any::<u128>(),
        micros in 946_684_800_000_000i64..4_102_444_800_000_000i64,
        tenant in "[a-z0-9-]{1,20}",
        team in opt_text(),
        project in opt_text(),
        user in opt_text(),
        source in "\\PC{1,16}",
        tags in proptest::collection::btree_map("\\PC{0,8}", "\\PC{0,8}", 0..5),
        request in "[ -~]{1,40}",
        provider in "(openai|anthropic|google|ñandú)",
        model in "\\PC{1,30}",
        tokens in proptest::array::uniform5(0i64..=MAX_TOKENS),
        latency in 0i64..=MAX_MS,
        status in 0u64..4,
        cost in proptest::option::of((0i64..999_999_999_999_999_999, 0u32..=9)),
        currency in "[A-Z]{3}",
        region in opt_text(),
    ) -> UsageEvent {
        UsageEvent {
            event_id: Uuid::from_u128(id),
            occurred_at: DateTime::<Utc>::from_timestamp_micros(micros).unwrap(),
            tenant_id: tenant,
            team_id: team,
            project_id: project,
            user_id: user,
            source,
            tags: tags.into_iter().collect::<BTreeMap<_, _>>(),
            request_id: request,
            provider,
            model,
            input_tokens: tokens[0],
            cached_input_tokens: tokens[1],
            cache_write_tokens: tokens[2],
            output_tokens: tokens[3],
            reasoning_tokens: tokens[4],
            latency_ms: latency,
            status: UsageStatus::from_index(status).unwrap(),
            reported_cost: cost.map(|(m, s)| {
                // Keep |cost| < 10^9 for decimal(18, 9).
                let d = Decimal::new(m, 9 + s);
                d.round_dp(9)
            }),
            currency,
            region,
        }
    }
}

fn both(
    bytes: &[u8],
) -> (
    Result<UsageEvent, DecodeError>,
    Result<UsageEvent, DecodeError>,
) {
    let fast = Decoder::new().decode::<UsageEvent>(bytes);
    let slow = Decoder::new()
        .without_fast_path()
        .decode::<UsageEvent>(bytes);
    (fast, slow)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn fast_and_value_paths_agree(e in usage()) {
        let bytes = encode_single_object(&e);
        let (fast, slow) = both(&bytes);
        prop_assert_eq!(fast.as_ref().unwrap(), &e);
        prop_assert_eq!(slow.as_ref().unwrap(), &e);

        // The hand-written encoder writes what apache_avro writes.
        let schema = apache_avro::Schema::parse_str(current_schema_text("llm.usage.v1").unwrap()).unwrap();
        let via_value = apache_avro::to_avro_datum(&schema, e.to_avro_value()).unwrap();
        if e.tags.len() <= 1 {
            // (apache_avro writes map entries in HashMap order.)
            prop_assert_eq!(&bytes[SINGLE_OBJECT_HEADER_LEN..], &via_value[..]);
        }
        let mut framed = bytes[..SINGLE_OBJECT_HEADER_LEN].to_vec();
        framed.extend_from_slice(&via_value);
        prop_assert_eq!(Decoder::new().decode::<UsageEvent>(&framed).unwrap(), e.clone());

        // v1 writer: both paths yield region None.
        let v1 = encode_single_object_with(&e, schema_history("llm.usage.v1")[0].1).unwrap();
        let (fast, slow) = both(&v1);
        let expect = UsageEvent { region: None, ..e.clone() };
        prop_assert_eq!(fast.unwrap(), expect.clone());
        prop_assert_eq!(slow.unwrap(), expect);

        // JSON agrees too.
        prop_assert_eq!(Decoder::new().decode::<UsageEvent>(&encode_json(&e)).unwrap(), e);
    }

    #[test]
    fn corrupted_bodies_fail_alike(e in usage(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()) {
        let mut bytes = encode_single_object(&e);
        let i = SINGLE_OBJECT_HEADER_LEN + at.index(bytes.len() - SINGLE_OBJECT_HEADER_LEN);
        if cut {
            bytes.truncate(i);
        } else {
            bytes[i] = byte;
        }
        let (fast, slow) = both(&bytes);
        match (&fast, &slow) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => {
                if cut {
                    prop_assert_eq!(a.class(), "truncated");
                    prop_assert_eq!(b.class(), "truncated");
                }
            }
            _ => prop_assert!(false, "paths disagree: fast={:?} slow={:?}", fast, slow),
        }
    }
}
