//! Hashing throughput of the audit log, measured on one core (test-only, `--ignored`).
//!
//! Guarantee: prints leaves per second for (a) canonical encoding + leaf hash + tree
//! append of realistic stored rows and (b) leaf hash + append of pre-encoded bytes, and
//! fails if (a) is under 1 million leaves per second in an optimised build. Run with
//! `cargo test --release -p tally --lib audit::throughput -- --ignored --nocapture`.

use super::leaf::{tests::example, AuditLeaf};
use super::merkle::{node_hash, CompactRange, Hash};
use std::hint::black_box;
use std::time::{Duration, Instant};

const LEAVES: u64 = 2_000_000;

/// A few thousand distinct, realistically sized rows (~450 bytes encoded).
fn rows() -> Vec<AuditLeaf> {
    (0..4096u32)
        .map(|i| AuditLeaf {
            resource_id: format!("doc-{i:08}"),
            user_agent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36".into(),
            details: format!(
                "{{\"request_id\":\"req-{i:012}\",\"fields\":[\"name\",\"email\",\"address\"],\"rows\":{i},\"reason\":\"quarterly export for finance review\",\"ticket\":\"FIN-{i}\"}}"
            ),
            ..example()
        })
        .collect()
}

/// CPU time of this thread (Linux `/proc/thread-self/schedstat`, nanoseconds on CPU),
/// so a busy shared machine does not distort the per-core figure; wall time elsewhere.
fn cpu_now() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_else(|| START.elapsed())
}

static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Leaves per second of CPU time since `since` (from `cpu_now`).
fn per_sec(n: u64, since: Duration) -> f64 {
    // Reporting only: a rate for humans, not money.
    #[allow(clippy::float_arithmetic)]
    let r = n as f64 / (cpu_now() - since).as_secs_f64();
    r
}

#[test]
#[ignore = "throughput measurement: run in release with --ignored --nocapture"]
fn hashing_throughput() {
    let mut rows = rows();
    let avg = rows.iter().map(AuditLeaf::encoded_len).sum::<usize>() / rows.len();

    // (a) encode + leaf hash + append, as `tally audit verify` does per stored row.
    let mut range = CompactRange::new();
    let mut buf = Vec::with_capacity(1024);
    let t = cpu_now();
    for i in 0..LEAVES {
        let row = &mut rows[(i % 4096) as usize];
        row.leaf_index = i;
        buf.clear();
        row.encode_into(&mut buf);
        range.push(&buf);
    }
    black_box(range.root());
    let full = per_sec(LEAVES, t);

    // (a') the same for rows the size of the documented example.
    let mut small: Vec<AuditLeaf> = (0..4096u32)
        .map(|i| AuditLeaf {
            resource_id: format!("ds-{i}"),
            ..example()
        })
        .collect();
    let small_len = small.iter().map(AuditLeaf::encoded_len).sum::<usize>() / small.len();
    let mut range = CompactRange::new();
    let t = cpu_now();
    for i in 0..LEAVES {
        let row = &mut small[(i % 4096) as usize];
        row.leaf_index = i;
        buf.clear();
        row.encode_into(&mut buf);
        range.push(&buf);
    }
    black_box(range.root());
    let full_small = per_sec(LEAVES, t);

    // (b) leaf hash + append of pre-encoded bytes.
    let encoded: Vec<Vec<u8>> = rows.iter().map(AuditLeaf::encode).collect();
    let mut range = CompactRange::new();
    let t = cpu_now();
    for i in 0..LEAVES {
        range.push(&encoded[(i % 4096) as usize]);
    }
    black_box(range.root());
    let hash_only = per_sec(LEAVES, t);

    // (c) interior node hashes alone.
    let mut h: Hash = [7; 32];
    let t = cpu_now();
    for _ in 0..LEAVES {
        h = node_hash(&h, &h);
    }
    black_box(h);
    let nodes = per_sec(LEAVES, t);

    println!(
        "audit hashing per CPU-second of one core, {LEAVES} leaves of {avg} bytes: \
         encode+leaf+tree {full:.0}/s, leaf+tree {hash_only:.0}/s, node hashes {nodes:.0}/s; \
         encode+leaf+tree of {small_len}-byte leaves {full_small:.0}/s"
    );
    if !cfg!(debug_assertions) {
        assert!(full >= 1_000_000.0, "under 1M leaves/s: {full:.0}");
    }
}
