//! Decode micro-benchmark: ns per `UsageEvent` for the hand-written Avro
//! fast path, the apache_avro `Value` path, and JSON. Plain `Instant` loop;
//! run with `cargo bench -p tally-schemas --bench decode`.

use std::hint::black_box;
use std::time::{Duration, Instant};
use tally_schemas::*;

/// Returns picoseconds per record (integer math: no floats here).
fn bench(name: &str, payloads: &[Vec<u8>], decoder: &Decoder) -> u128 {
    // Warm up, then run for about a second.
    for p in payloads.iter().take(1000) {
        black_box(decoder.decode::<UsageEvent>(p).unwrap());
    }
    let mut n: u64 = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        for p in payloads {
            black_box(decoder.decode::<UsageEvent>(black_box(p)).unwrap());
        }
        n += payloads.len() as u64;
    }
    let ps = start.elapsed().as_nanos() * 1000 / u128::from(n);
    println!("{name:<28} {:>7} ns/record  ({n} records)", ps / 1000);
    ps
}

fn events() -> Vec<UsageEvent> {
    (0..256u32)
        .map(|i| {
            let mut e = sample_usage();
            e.event_id = uuid::Uuid::from_u128(u128::from(i) * 0x9E37_79B9_7F4A_7C15);
            e.request_id = format!("req-{i:08}");
            e.input_tokens = i64::from(i) * 37;
            e.output_tokens = i64::from(i) * 11;
            e.tags.insert("route".into(), format!("/v1/chat/{}", i % 7));
            e.region = (i % 2 == 0).then(|| "eu-west-1".to_string());
            e
        })
        .collect()
}

fn main() {
    let events = events();
    let single: Vec<Vec<u8>> = events.iter().map(encode_single_object).collect();
    let json: Vec<Vec<u8>> = events.iter().map(encode_json).collect();
    let avg = |v: &[Vec<u8>]| v.iter().map(Vec::len).sum::<usize>() / v.len();
    println!(
        "payload sizes: avro single-object {} B, json {} B",
        avg(&single),
        avg(&json)
    );
    let fast = Decoder::new();
    let slow = Decoder::new().without_fast_path();
    let f = bench("avro fast path", &single, &fast);
    let s = bench("avro apache_avro Value path", &single, &slow);
    let j = bench("json (serde_json)", &json, &fast);
    let conf: Vec<Vec<u8>> = events.iter().map(|e| encode_confluent(e, 1)).collect();
    fast.register_confluent_schema(1, current_schema_text("llm.usage.v1").unwrap())
        .unwrap();
    bench("avro fast path (confluent)", &conf, &fast);
    let ratio = |x: u128| format!("{}.{}", x * 10 / f / 10, x * 10 / f % 10);
    println!(
        "fast path is {}x faster than the Value path and {}x faster than JSON",
        ratio(s),
        ratio(j)
    );
}
