//! Pure generator tests (no broker): determinism, shares, and that every
//! message decodes (or fails to decode) exactly as it claims.

// Share checks compare counts with expected fractions in f64 (never money).
#![allow(clippy::float_arithmetic)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tally_producers::gen::{Encoding, GenConfig, GenKind, Generator};
use tally_producers::malformed;
use tally_producers::world::demo_world;
use tally_schemas::{Decoder, UsageEvent};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 5, 31, 23, 0, 0).unwrap()
}

fn config(count: u64, seed: u64, encoding: Encoding) -> GenConfig {
    let world = demo_world(12, start() + Duration::hours(1));
    let mut cfg = GenConfig::new(world, count, seed);
    cfg.start = start();
    cfg.encoding = encoding;
    cfg
}

fn decoder(cfg: &GenConfig) -> Decoder {
    let d = Decoder::new();
    if cfg.encoding == Encoding::Confluent {
        let schema = tally_schemas::current_schema_text("llm.usage.v1").expect("bundled schema");
        d.register_confluent_schema(cfg.confluent_schema_id, schema)
            .expect("register schema");
    }
    d
}

#[test]
fn deterministic() {
    let mut cfg = config(3_000, 42, Encoding::Mixed);
    cfg.malformed = 0.05;
    let a: Vec<_> = Generator::new(cfg.clone()).collect();
    let b: Vec<_> = Generator::new(cfg.clone()).collect();
    assert_eq!(a.len(), 3_000);
    assert_eq!(a, b);
    cfg.seed = 43;
    let c: Vec<_> = Generator::new(cfg).collect();
    assert_ne!(a, c);
}

#[test]
fn shares_roughly_honored() {
    let mut cfg = config(40_000, 7, Encoding::Json);
    cfg.duplicates = 0.05;
    cfg.malformed = 0.03;
    cfg.late = 0.02;
    cfg.unpriced = 0.01;
    cfg.unknown_tenant = 0.01;
    let (span, start) = (cfg.span, cfg.start);
    let msgs: Vec<_> = Generator::new(cfg).collect();
    let n = msgs.len();
    let count = |k: fn(&GenKind) -> bool| msgs.iter().filter(|m| k(&m.kind)).count();
    let dups = count(|k| *k == GenKind::Duplicate);
    let bad = count(|k| matches!(k, GenKind::Malformed { .. }));
    let within = |got: usize, share: f64| {
        let want = (n as f64) * share;
        let ok = (got as f64) > want * 0.8 && (got as f64) < want * 1.2;
        assert!(ok, "got {got}, want ~{want}");
    };
    within(dups, 0.05);
    within(bad, 0.03);

    let good: Vec<&UsageEvent> = msgs
        .iter()
        .filter(|m| m.kind == GenKind::Good)
        .filter_map(|m| m.event.as_ref())
        .collect();
    let g = good.len();
    let share = |got: usize, want: f64| {
        let want = (g as f64) * want;
        let ok = (got as f64) > want * 0.7 && (got as f64) < want * 1.3;
        assert!(ok, "got {got}, want ~{want}");
    };
    share(good.iter().filter(|e| e.model == "mystery-1").count(), 0.01);
    share(
        good.iter().filter(|e| e.tenant_id == "t-unknown").count(),
        0.01,
    );

    // Event time: monotone cursor from start to start+span; late ones 1-6 h behind.
    let mut cursor = start;
    let mut late = 0;
    for e in &good {
        if e.occurred_at >= cursor {
            cursor = e.occurred_at;
        } else {
            late += 1;
            let behind = cursor - e.occurred_at;
            assert!(
                behind >= Duration::minutes(59)
                    && behind <= Duration::hours(6) + Duration::minutes(1)
            );
        }
        assert!(e.occurred_at <= start + span);
        assert!(e.occurred_at >= start - Duration::hours(6));
    }
    assert!(cursor > start + span - Duration::minutes(1));
    share(late, 0.02);

    // Duplicates repeat an earlier Good event exactly, sometimes long after.
    let mut first: HashMap<uuid::Uuid, (usize, &UsageEvent)> = HashMap::new();
    let mut max_gap = 0;
    for (i, m) in msgs.iter().enumerate() {
        let Some(e) = &m.event else { continue };
        match m.kind {
            GenKind::Good => {
                assert!(
                    first.insert(e.event_id, (i, e)).is_none(),
                    "good ids are unique"
                );
            }
            GenKind::Duplicate => {
                let (j, orig) = first
                    .get(&e.event_id)
                    .expect("duplicate of an earlier event");
                assert_eq!(*orig, e);
                max_gap = max_gap.max(i - j);
            }
            GenKind::Malformed { .. } => unreachable!(),
        }
    }
    assert!(max_gap > 1_000, "max gap {max_gap}");

    // Token classes, statuses, reported cost.
    assert!(good.iter().all(|e| e.reasoning_tokens == 0
        || e.model.starts_with('o')
        || e.model.contains("reason")
        || e.model.starts_with("gemini-2.5")));
    assert!(good.iter().any(|e| e.reasoning_tokens > 0));
    assert!(good.iter().any(|e| e.cached_input_tokens > 0));
    assert!(good.iter().any(|e| e.cache_write_tokens > 0));
    let with_cost = good.iter().filter(|e| e.reported_cost.is_some()).count();
    share(with_cost, 0.5);
    let statuses: BTreeSet<_> = good.iter().map(|e| e.status).collect();
    assert_eq!(statuses.len(), 4);
}

/// The reference run (200k events, default settings) against the demo
/// world's sizing: the biggest tenants exceed their request quota in some
/// event-minutes, small ones never; budgets spread over 50/80/100%.
#[test]
fn reference_run_sizing() {
    let world = demo_world(20, start() + Duration::hours(1));
    let mut cfg = GenConfig::new(world.clone(), 200_000, 1);
    cfg.start = Utc.with_ymd_and_hms(2025, 5, 31, 9, 0, 0).unwrap();
    cfg.encoding = Encoding::Json;
    let mut per_minute: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut spend: HashMap<(String, Option<String>), rust_decimal::Decimal> = HashMap::new();
    for m in Generator::new(cfg) {
        if m.kind != GenKind::Good {
            continue;
        }
        let e = m.event.unwrap();
        let minute = e.occurred_at.timestamp() / 60;
        *per_minute.entry((e.tenant_id.clone(), minute)).or_default() += 1;
        if let Some(p) = world.price_at(&e.provider, &e.model, e.occurred_at) {
            let c = p.cost(
                e.input_tokens,
                e.cached_input_tokens,
                e.cache_write_tokens,
                e.output_tokens,
                e.reasoning_tokens,
            );
            *spend.entry((e.tenant_id.clone(), None)).or_default() += c;
            if let Some(team) = e.team_id {
                *spend.entry((e.tenant_id, Some(team))).or_default() += c;
            }
        }
    }
    let over = |t: &str| {
        let quota = world.tenant(t).unwrap().requests_per_minute;
        per_minute
            .iter()
            .filter(|((id, _), n)| id == t && **n > quota)
            .count()
    };
    for t in ["t-001", "t-002", "t-003"] {
        let o = over(t);
        eprintln!("{t}: over quota in {o} minutes");
        assert!((1..=60).contains(&o), "{t} over quota in {o} minutes");
    }
    for t in &world.tenants[3..] {
        assert_eq!(over(&t.tenant_id), 0, "{}", t.tenant_id);
    }

    let mut crossed = [0usize; 3];
    for b in &world.budgets {
        let s = spend
            .get(&(b.tenant_id.clone(), b.team_id.clone()))
            .copied()
            .unwrap_or_default();
        let pct = s * rust_decimal::Decimal::from(100) / b.amount;
        for (i, t) in [50, 80, 100].into_iter().enumerate() {
            if pct >= rust_decimal::Decimal::from(t) {
                crossed[i] += 1;
            }
        }
    }
    let n = world.budgets.len();
    eprintln!("budgets crossing 50/80/100%: {crossed:?} of {n}");
    assert!(crossed[0] * 2 >= n, "{crossed:?} of {n}");
    assert!(
        crossed[1] >= 2 && crossed[1] < crossed[0],
        "{crossed:?} of {n}"
    );
    assert!(crossed[2] >= 1 && crossed[2] * 4 < n, "{crossed:?} of {n}");
}

fn check_decoding(encoding: Encoding) {
    let mut cfg = config(4_000, 99, encoding);
    cfg.malformed = 0.05;
    cfg.duplicates = 0.05;
    let decoder = decoder(&cfg);
    let mut classes = BTreeSet::new();
    let mut kinds = [0usize; 3];
    for m in Generator::new(cfg) {
        let got = decoder.decode::<UsageEvent>(&m.payload);
        match m.kind {
            GenKind::Malformed { class } => {
                kinds[2] += 1;
                assert!(m.event.is_none());
                let err = got.expect_err("poison must not decode");
                assert_eq!(err.class(), class, "{err}");
                classes.insert(class);
            }
            GenKind::Good | GenKind::Duplicate => {
                kinds[usize::from(m.kind == GenKind::Duplicate)] += 1;
                let e = m.event.expect("good messages carry their event");
                assert_eq!(m.key.as_deref(), Some(e.tenant_id.as_bytes()));
                assert_eq!(got.expect("good message decodes"), e);
            }
        }
    }
    assert!(kinds.iter().all(|k| *k > 0), "{kinds:?}");
    assert!(classes.len() >= 16, "{classes:?}");
}

#[test]
fn decodes_json() {
    check_decoding(Encoding::Json);
}

#[test]
fn decodes_avro() {
    check_decoding(Encoding::Avro);
}

#[test]
fn decodes_confluent() {
    check_decoding(Encoding::Confluent);
}

#[test]
fn decodes_mixed() {
    check_decoding(Encoding::Mixed);
}

#[test]
fn every_poison_kind_has_its_class() {
    let cfg = config(1, 5, Encoding::Json);
    let e = Generator::new(cfg.clone()).next().unwrap().event.unwrap();
    let decoder = decoder(&cfg);
    let mut wrong = Vec::new();
    for kind in 0..malformed::KINDS {
        let (payload, class) = malformed::build(kind, &e);
        let name = malformed::CATALOG[kind].0;
        match decoder.decode::<UsageEvent>(&payload) {
            Ok(_) => wrong.push(format!("{name}: decoded")),
            Err(err) if err.class() != class => {
                wrong.push(format!("{name}: want {class}, got {}: {err}", err.class()));
            }
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn encoding_from_str() {
    for (s, e) in [
        ("json", Encoding::Json),
        ("avro", Encoding::Avro),
        ("confluent", Encoding::Confluent),
        ("mixed", Encoding::Mixed),
    ] {
        assert_eq!(s.parse::<Encoding>().unwrap(), e);
        assert_eq!(e.to_string(), s);
    }
    assert!("xml".parse::<Encoding>().is_err());
}
