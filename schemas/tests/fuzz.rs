//! Decoders fuzzed: structured random inputs — mutations of the valid and hostile encodings
//! kept in `schemas/fuzz/seeds/<codec>/` — go through `Decoder::decode` for each codec (JSON,
//! Avro single-object, Confluent framing), on the hand-written fast path and on the
//! `apache_avro` path alike, with zero panics allowed and the heap capped.
//!
//! - Deterministic: input `i` of a codec is a pure function of (`TALLY_FUZZ_SEED`, codec, `i`),
//!   so any failure is replayed with `TALLY_FUZZ_FROM=i TALLY_FUZZ_INPUTS=1 TALLY_FUZZ_TRACE=1`.
//! - `TALLY_FUZZ_INPUTS` inputs per codec: 100k by default (seconds, part of `make test`);
//!   `make fuzz` runs 10M per codec with optimisations and overflow checks on.
//! - Bounded memory: the global allocator refuses to hold more than [`HEAP_BUDGET`] bytes
//!   beyond what the process held before, so a decoder that allocates what a hostile length
//!   field claims aborts the run (a panic would be caught; an allocation failure is not).
//! - Differential: a usage event that both Avro paths accept must come out equal.

use cap::Cap;
use std::alloc::System;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::Instant;
use tally_schemas::*;

#[global_allocator]
static HEAP: Cap<System> = Cap::new(System, usize::MAX);

/// Most live heap the fuzz tests may hold beyond the process's at their start (all codecs
/// together). A legitimate payload of the fuzzed sizes needs well under 1 MiB.
const HEAP_BUDGET: usize = 64 << 20;

fn cap_heap() {
    static CAP: Once = Once::new();
    CAP.call_once(|| {
        HEAP.set_limit(HEAP.allocated() + HEAP_BUDGET)
            .expect("set heap limit");
    });
}

// ---- seeds -------------------------------------------------------------------------------

/// Confluent schema ids the fuzzed decoders know (seeds carry them in their header).
const CONFLUENT_IDS: [(u32, &str); 6] = [
    (1, "usage-v2"),
    (2, "usage-v1"),
    (3, "usage-evolved"),
    (4, "policy"),
    (5, "audit"),
    (6, "violation"),
];

/// `schemas/fuzz` of the checkout under test (`TALLY_REPO_ROOT`, else the current
/// directory, where cargo runs this crate's tests), the build-time path only last.
fn fuzz_dir() -> PathBuf {
    let candidates = [
        std::env::var_os("TALLY_REPO_ROOT").map(|r| PathBuf::from(r).join("schemas/fuzz")),
        std::env::current_dir().ok().map(|d| d.join("fuzz")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("seeds").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz"))
}

fn seeds_dir() -> PathBuf {
    fuzz_dir().join("seeds")
}

fn evolved_schema() -> String {
    std::fs::read_to_string(fuzz_dir().join("usage-evolved.avsc"))
        .expect("schemas/fuzz/usage-evolved.avsc")
}

/// Peak resident set size of this process so far (Linux), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn schema_text(name: &str) -> String {
    match name {
        "usage-v2" => schema_history("llm.usage.v1")[1].1.to_string(),
        "usage-v1" => schema_history("llm.usage.v1")[0].1.to_string(),
        "usage-evolved" => evolved_schema(),
        "policy" => current_schema_text("policy.decision.v1").unwrap().into(),
        "audit" => current_schema_text("audit.event.v1").unwrap().into(),
        "violation" => current_schema_text("compliance.violation.v1")
            .unwrap()
            .into(),
        other => panic!("no schema {other}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Usage,
    Policy,
    Audit,
    Violation,
}

impl Kind {
    /// From a seed file name: `<kind>-...` (single-object, JSON) or `idN-<kind>...`.
    fn of(name: &str) -> Kind {
        let name = name
            .split_once('-')
            .filter(|_| name.starts_with("id"))
            .map_or(name, |x| x.1);
        match name.split('-').next() {
            Some("usage") => Kind::Usage,
            Some("policy") => Kind::Policy,
            Some("audit") => Kind::Audit,
            Some("violation") => Kind::Violation,
            _ => panic!("seed {name}: name must start with the event kind"),
        }
    }
}

#[derive(Clone)]
struct Seed {
    name: String,
    kind: Kind,
    bytes: Vec<u8>,
}

fn load_seeds(codec: &str) -> Vec<Seed> {
    let dir = seeds_dir().join(codec);
    let mut seeds: Vec<Seed> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            Seed {
                kind: Kind::of(&name),
                bytes: std::fs::read(&p).unwrap(),
                name,
            }
        })
        .collect();
    seeds.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

// ---- the decoders under test ---------------------------------------------------------------

struct Decoders {
    fast: Decoder,
    slow: Decoder,
}

impl Decoders {
    fn new() -> Self {
        let (fast, slow) = (Decoder::new(), Decoder::new().without_fast_path());
        for (id, name) in CONFLUENT_IDS {
            let text = schema_text(name);
            fast.register_confluent_schema(id, &text).unwrap();
            slow.register_confluent_schema(id, &text).unwrap();
        }
        Decoders { fast, slow }
    }
}

/// What decoding one input gave: `"ok"` or the error class, per path.
#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<&'static str, u64>,
    disagreements: Vec<String>,
}

fn class<T>(r: &Result<T, DecodeError>) -> &'static str {
    r.as_ref().map(|_| "ok").unwrap_or_else(|e| e.class())
}

fn decode_as<T: Event>(d: &Decoders, input: &[u8], both: bool, t: &mut Tally) {
    let r = d.fast.decode::<T>(input);
    *t.outcomes.entry(class(&r)).or_default() += 1;
    if both {
        let _ = d.slow.decode::<T>(input);
    }
}

/// Decodes `input` as its seed's kind on both paths, and as a usage event (what tally
/// consumes) whatever the seed was.
fn decode_input(d: &Decoders, kind: Kind, input: &[u8], avro: bool, t: &mut Tally) {
    let fast = d.fast.decode::<UsageEvent>(input);
    *t.outcomes.entry(class(&fast)).or_default() += 1;
    if avro {
        let slow = d.slow.decode::<UsageEvent>(input);
        let agree = match (&fast, &slow) {
            (Ok(a), Ok(b)) => a == b,
            (Err(_), Err(_)) => true,
            _ => false,
        };
        if !agree && t.disagreements.len() < 5 {
            t.disagreements
                .push(format!("fast={fast:?} slow={slow:?} input={}", hex(input)));
        }
    }
    match kind {
        Kind::Usage => {}
        Kind::Policy => decode_as::<PolicyDecision>(d, input, avro, t),
        Kind::Audit => decode_as::<AuditEvent>(d, input, avro, t),
        Kind::Violation => decode_as::<ComplianceViolation>(d, input, avro, t),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---- structured random inputs -------------------------------------------------------------

/// SplitMix64: tiny, seedable, the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, codec: &str, i: u64) -> Self {
        let mut r = Rng(seed ^ i.wrapping_mul(0xA24B_AED4_963E_E407));
        for b in codec.bytes() {
            r.0 ^= u64::from(b);
            r.next();
        }
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Values a hostile length, count, index or timestamp field might claim.
const HOSTILE: &[i64] = &[
    0,
    1,
    -1,
    2,
    -2,
    15,
    16,
    17,
    127,
    128,
    255,
    256,
    65_535,
    65_536,
    1 << 20,
    (1 << 20) + 1,
    1 << 24,
    1 << 28,
    512 << 20,
    (512 << 20) + 1,
    i32::MAX as i64,
    i32::MIN as i64,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 53,
    1 << 60,
    i64::MAX,
    i64::MIN,
    i64::MAX - 1,
    i64::MIN + 1,
    253_402_300_800_000_000, // year 10000 in µs
    -62_135_596_800_000_000, // year 1 in µs
];

/// JSON fragments that tend to break parsers and value conversions.
const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "null",
    "true",
    "false",
    "0",
    "-0",
    "-",
    "1e999",
    "-1e999",
    "1e-999",
    "1.7976931348623157e308",
    "5e-324",
    "18446744073709551616",
    "-9223372036854775809",
    "9223372036854775807",
    "100000001",
    "0.1",
    "1E400",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\",
    "\"1e99999999\"",
    "\"1e-99999999\"",
    "\"-1e28\"",
    "\"79228162514264337593543950336\"",
    "\"0.00000000000000000000000000001\"",
    "\"9999999999999999999999999999.9\"",
    "\"NaN\"",
    "\"  1.5  \"",
    "\"9999-12-31T23:59:59Z\"",
    "\"+275760-09-13T00:00:00Z\"",
    "\"2024-02-30T00:00:00Z\"",
    "\"2024-01-01T00:00:00+25:00\"",
    "\"1970-01-01T00:00:00.9999999999Z\"",
    "\"00000000-0000-0000-0000-000000000000\"",
    "\"urn:uuid:0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b\"",
    "\"\"",
    "{}",
    "[]",
    "\"tags\"",
    "\"status\"",
    "\"rate_limited\"",
    "\"reported_cost\"",
    "\"event_id\"",
    "\"occurred_at\"",
    "\"region\"",
    "\"currency\"",
    "\"usd\"",
    "\"input_tokens\"",
    "\u{feff}",
    "\u{7f}",
    "\u{10ffff}",
    " ",
    "\n",
];

fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z > 0x7f {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Bytes a varint starting at `i` takes (at most 10; to the end if unterminated).
fn varint_len(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .take(10)
        .position(|x| x & 0x80 == 0)
        .map_or((b.len() - i).min(10), |p| p + 1)
}

struct Codec {
    name: &'static str,
    json: bool,
    header: usize,
    seeds: Vec<Seed>,
}

const MAX_INPUT: usize = 1 << 14;

impl Codec {
    fn new(name: &'static str) -> Self {
        let (json, header) = match name {
            "json" => (true, 0),
            "single_object" => (false, SINGLE_OBJECT_HEADER_LEN),
            "confluent" => (false, CONFLUENT_HEADER_LEN),
            _ => unreachable!(),
        };
        Codec {
            name,
            json,
            header,
            seeds: load_seeds(name),
        }
    }

    /// Input `i`: a seed, mutated 1-4 times (now and then up to 32), and its kind.
    fn input(&self, seed: u64, i: u64) -> (Kind, Vec<u8>) {
        let mut r = Rng::new(seed, self.name, i);
        let s = r.pick(&self.seeds);
        let mut b = s.bytes.clone();
        if r.one_in(64) {
            // Untouched seeds now and then, so valid inputs keep being decoded.
            return (s.kind, b);
        }
        let most = if r.one_in(8) { 32 } else { 4 };
        let rounds = 1 + r.below(most);
        for _ in 0..rounds {
            self.mutate(&mut r, &mut b);
            b.truncate(MAX_INPUT);
        }
        if self.json && !r.one_in(8) {
            // Most JSON inputs stay UTF-8, or the UTF-8 check would stop them all.
            b = String::from_utf8_lossy(&b).into_owned().into_bytes();
        }
        (s.kind, b)
    }

    fn mutate(&self, r: &mut Rng, b: &mut Vec<u8>) {
        // Avro mutations aim past the header most of the time.
        let at = |r: &mut Rng, len: usize, lo: usize| -> usize {
            if len == 0 {
                0
            } else if lo < len && !r.one_in(8) {
                lo + r.below(len - lo)
            } else {
                r.below(len)
            }
        };
        let ops = if self.json { 16 } else { 14 };
        match r.below(ops) {
            0 | 1 if !b.is_empty() => {
                let i = at(r, b.len(), self.header);
                b[i] ^= 1 << r.below(8);
            }
            2 if !b.is_empty() => {
                let i = at(r, b.len(), self.header);
                b[i] = *r.pick(&[0, 1, 2, 0x7f, 0x80, 0x81, 0xfe, 0xff, b'{', b'"', b'0']);
            }
            3 if !b.is_empty() => {
                let i = at(r, b.len(), self.header);
                let d = 1 + r.below(35) as u8;
                b[i] = if r.one_in(2) {
                    b[i].wrapping_add(d)
                } else {
                    b[i].wrapping_sub(d)
                };
            }
            4 => {
                let n = r.below(b.len() + 1);
                b.truncate(n);
            }
            5 if !b.is_empty() => {
                let i = at(r, b.len(), self.header);
                let n = 1 + r.below((b.len() - i).min(16));
                b.drain(i..i + n);
            }
            6 => {
                let i = at(r, b.len(), self.header);
                let n = 1 + r.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
                b.splice(i..i, bytes);
            }
            7 if !b.is_empty() => {
                // Repeat a chunk (grows maps, arrays and nesting).
                let a = r.below(b.len());
                let n = 1 + r.below((b.len() - a).min(64));
                let chunk = b[a..a + n].to_vec();
                let most = if r.one_in(4) { 64 } else { 3 };
                let times = 1 + r.below(most);
                let at_ = r.below(b.len() + 1);
                for _ in 0..times {
                    b.splice(at_..at_, chunk.iter().copied());
                }
            }
            8 | 9 if !self.json && b.len() > self.header => {
                // A hostile value in place of the varint at a random position: lengths,
                // block counts, union and enum indexes, timestamps.
                let i = at(r, b.len(), self.header);
                let old = if r.one_in(4) { 0 } else { varint_len(b, i) };
                let mut v = Vec::new();
                let n = if r.one_in(4) {
                    (b.len() - i) as i64 + r.below(3) as i64 - 1
                } else {
                    *r.pick(HOSTILE)
                };
                put_long(&mut v, n);
                if r.one_in(16) {
                    // Over-long encodings: padded, or never terminated.
                    let pad = if r.one_in(2) { 10 } else { 3 };
                    v = vec![0x80; pad];
                    if r.one_in(2) {
                        v.push(0x01);
                    }
                }
                b.splice(i..i + old, v);
            }
            10 => {
                // Splice with another seed of this codec.
                let other = &r.pick(&self.seeds).bytes;
                let a = r.below(b.len() + 1);
                let c = r.below(other.len() + 1);
                b.truncate(a);
                b.extend_from_slice(&other[c..]);
            }
            11 if !self.json => {
                // Another writer: a known header on a body written for a different one, or
                // an unknown id or fingerprint.
                let other = &r.pick(&self.seeds).bytes;
                if other.len() >= self.header && b.len() >= self.header && !r.one_in(8) {
                    b[..self.header].copy_from_slice(&other[..self.header]);
                } else if b.len() >= self.header {
                    for x in &mut b[1..self.header] {
                        *x = r.next() as u8;
                    }
                }
            }
            12 if r.one_in(8) => {
                // Random bytes behind the codec's header.
                let n = r.below(64);
                let head = b[..self.header.min(b.len())].to_vec();
                *b = head;
                b.extend((0..n).map(|_| r.next() as u8));
            }
            12 | 13 if self.json => {
                let tok = if r.one_in(32) {
                    "[".repeat(1 + r.below(300))
                } else {
                    r.pick(JSON_TOKENS).to_string()
                };
                let i = r.below(b.len() + 1);
                b.splice(i..i, tok.into_bytes());
            }
            14 | 15 if self.json => {
                // Replace the value after a random ':' (a field's value).
                let colons: Vec<usize> = b
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c == b':')
                    .map(|(i, _)| i + 1)
                    .collect();
                if colons.is_empty() {
                    return;
                }
                let start = *r.pick(&colons);
                let end = b[start..]
                    .iter()
                    .position(|c| *c == b',' || *c == b'}')
                    .map_or(b.len(), |p| start + p);
                let tok = r.pick(JSON_TOKENS).to_string();
                b.splice(start..end, tok.into_bytes());
            }
            _ => {
                if !b.is_empty() {
                    let i = r.below(b.len());
                    b[i] = r.next() as u8;
                }
            }
        }
    }
}

// ---- the run ------------------------------------------------------------------------------

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Serialises the report lines of codecs fuzzed in parallel.
static REPORT: Mutex<()> = Mutex::new(());

fn fuzz(codec_name: &'static str) {
    cap_heap();
    let codec = Codec::new(codec_name);
    let seed = env_u64("TALLY_FUZZ_SEED", 0x7a11_f022);
    let from = env_u64("TALLY_FUZZ_FROM", 0);
    let count = env_u64("TALLY_FUZZ_INPUTS", 100_000);
    let trace = std::env::var_os("TALLY_FUZZ_TRACE").is_some();
    let d = Decoders::new();
    let mut tally = Tally::default();
    let mut panics: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut bytes = 0u64;
    let started = Instant::now();
    let mut last_report = Instant::now();
    for i in from..from + count {
        let (kind, input) = codec.input(seed, i);
        bytes += input.len() as u64;
        if trace {
            eprintln!("{codec_name} input {i}: {}", hex(&input));
        }
        let high = HEAP.max_allocated();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            decode_input(&d, kind, &input, !codec.json, &mut tally)
        }));
        let raised = HEAP.max_allocated() - high;
        if raised > 16 << 20 {
            eprintln!(
                "fuzz {codec_name}: input {i} raised the heap's high-water mark by {} KiB: {}",
                raised >> 10,
                hex(&input)
            );
        }
        if outcome.is_err() {
            panics.push((i, input));
        }
        if last_report.elapsed().as_secs() >= 60 {
            last_report = Instant::now();
            eprintln!(
                "fuzz {codec_name}: {} of {count} inputs, {} panics, heap {} KiB (peak {} KiB)",
                i + 1 - from,
                panics.len(),
                HEAP.allocated() >> 10,
                HEAP.max_allocated() >> 10
            );
        }
    }
    let ms = started.elapsed().as_millis().max(1);
    {
        let _g = REPORT.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!(
            "fuzz {codec_name}: {count} inputs (seed {seed:#x}, from {from}) in {} s = {} inputs/s, \
             mean {} B; {} panics; {} Avro path disagreements; peak heap {} KiB, peak RSS {} KiB",
            ms / 1000,
            u128::from(count) * 1000 / ms,
            bytes / count.max(1),
            panics.len(),
            tally.disagreements.len(),
            HEAP.max_allocated() >> 10,
            peak_rss_kib()
        );
        eprintln!("fuzz {codec_name}: outcomes {:?}", tally.outcomes);
    }
    if !panics.is_empty() {
        let dir = std::env::temp_dir().join("tally-fuzz-panics");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, input) in panics.iter().take(20) {
            let path = dir.join(format!("{codec_name}-{seed:x}-{i}.bin"));
            std::fs::write(&path, input).unwrap();
            eprintln!("panic on input {i}: {} ({})", hex(input), path.display());
        }
        panic!("{} of {count} {codec_name} inputs panicked", panics.len());
    }
    assert!(
        tally.disagreements.is_empty(),
        "the fast and apache_avro paths disagree:\n{}",
        tally.disagreements.join("\n")
    );
    // The mutations must reach past the framing, into the decoders and validation.
    let deep = tally
        .outcomes
        .iter()
        .filter(|(c, _)| !matches!(**c, "empty" | "wrong_magic" | "truncated" | "invalid_json"))
        .map(|(_, n)| n)
        .sum::<u64>();
    assert!(
        count < 1000 || deep * 20 > count,
        "too few inputs got past the framing: {:?}",
        tally.outcomes
    );
}

#[test]
fn fuzz_json() {
    fuzz("json");
}

#[test]
fn fuzz_single_object() {
    fuzz("single_object");
}

#[test]
fn fuzz_confluent() {
    fuzz("confluent");
}

/// Every seed named `*-ok*` decodes; the others are kept for the paths they open.
#[test]
fn seeds_are_what_their_names_say() {
    cap_heap();
    let d = Decoders::new();
    for codec in ["json", "single_object", "confluent"] {
        for s in load_seeds(codec) {
            let r = match s.kind {
                Kind::Usage => d.fast.decode::<UsageEvent>(&s.bytes).map(drop),
                Kind::Policy => d.fast.decode::<PolicyDecision>(&s.bytes).map(drop),
                Kind::Audit => d.fast.decode::<AuditEvent>(&s.bytes).map(drop),
                Kind::Violation => d.fast.decode::<ComplianceViolation>(&s.bytes).map(drop),
            };
            if s.name.contains("-ok") {
                r.unwrap_or_else(|e| panic!("{codec}/{}: {e}", s.name));
            } else {
                assert!(r.is_err(), "{codec}/{} decodes", s.name);
            }
        }
    }
}

/// Length prefixes and block counts that claim far more than the payload holds are refused
/// without allocating what they claim, on every path (the heap cap aborts otherwise).
#[test]
fn hostile_lengths_allocate_nothing_they_claim() {
    cap_heap();
    let d = Decoders::new();
    let usage = encode_single_object(&sample_usage());
    let confluent_evolved = load_seeds("confluent")
        .into_iter()
        .find(|s| s.name == "id3-usage-ok-evolved.bin")
        .expect("the evolved Confluent seed")
        .bytes;
    // The first length prefix of a body: event_id's (a 36-byte string: zig-zag 72).
    for (what, bytes, at) in [
        ("single-object", usage.clone(), SINGLE_OBJECT_HEADER_LEN),
        ("confluent evolved", confluent_evolved, CONFLUENT_HEADER_LEN),
    ] {
        assert_eq!(bytes[at], 72, "{what}: event_id length prefix");
        for claim in [
            1i64 << 20,
            1 << 28,
            (512 << 20) - 1,
            1 << 31,
            1 << 40,
            1 << 60,
            i64::MAX,
        ] {
            let mut hostile = bytes[..at].to_vec();
            put_long(&mut hostile, claim);
            hostile.extend_from_slice(&bytes[at + 1..]);
            for (path, dec) in [("fast", &d.fast), ("apache_avro", &d.slow)] {
                let err = dec.decode::<UsageEvent>(&hostile).unwrap_err();
                assert_eq!(
                    err.class(),
                    "truncated",
                    "{what}, {path}, claim {claim}: {err}"
                );
            }
        }
    }
}

// ---- seeds ---------------------------------------------------------------------------------

fn full_usage() -> UsageEvent {
    let mut e = sample_usage();
    e.user_id = Some("user-ü-7".into());
    e.tags = BTreeMap::from([
        ("env".to_string(), "prod".to_string()),
        ("région".to_string(), "eu-west-1".to_string()),
        (String::new(), "empty key".to_string()),
    ]);
    e.status = UsageStatus::RateLimited;
    e.reasoning_tokens = MAX_TOKENS;
    e.latency_ms = MAX_MS;
    e.reported_cost = Some("999999999.999999999".parse().unwrap());
    e.region = Some("us-east-1".into());
    e
}

/// The evolved writer's value of `e`: the v2 fields plus the fields only it has.
fn evolved_value(e: &UsageEvent) -> apache_avro::types::Value {
    use apache_avro::types::Value as V;
    let V::Record(mut fields) = e.to_avro_value() else {
        unreachable!()
    };
    let at = fields.iter().position(|(n, _)| n == "tags").unwrap() + 1;
    let map = |kv: &[(&str, i64)]| {
        V::Map(
            kv.iter()
                .map(|(k, v)| (k.to_string(), V::Long(*v)))
                .collect(),
        )
    };
    fields.insert(
        at,
        (
            "labels".into(),
            V::Array(vec![map(&[("a", 1), ("b", -2)]), map(&[])]),
        ),
    );
    let link = |hop: &str, next: V| {
        V::Record(vec![
            ("hop".into(), V::String(hop.into())),
            ("next".into(), next),
        ])
    };
    let null = || V::Union(0, Box::new(V::Null));
    fields.extend([
        (
            "origin".into(),
            V::Record(vec![
                ("host".into(), V::String("gw-1".into())),
                ("port".into(), V::Int(9092)),
                ("checksum".into(), V::Fixed(4, vec![1, 2, 3, 4])),
                ("weight".into(), V::Double(0.5)),
                (
                    "flags".into(),
                    V::Array(vec![V::Boolean(true), V::Boolean(false)]),
                ),
                ("kind".into(), V::Enum(1, "core".into())),
                ("seen".into(), V::Date(19_000)),
            ]),
        ),
        (
            "chain".into(),
            V::Union(
                1,
                Box::new(link("a", V::Union(1, Box::new(link("b", null()))))),
            ),
        ),
        ("nothing".into(), V::Array(vec![V::Null, V::Null, V::Null])),
        (
            "list_price".into(),
            V::Decimal(apache_avro::Decimal::from(vec![
                0, 0, 0, 0, 0, 0x12, 0xd6, 0x87,
            ])),
        ),
    ]);
    V::Record(fields)
}

/// Writes `schemas/fuzz/seeds/` afresh from the sample events (run by hand when a schema or
/// a sample changes: `cargo test -p tally-schemas --test fuzz -- --ignored write_seeds`).
#[test]
#[ignore]
fn write_seeds() {
    let dir = seeds_dir();
    let write = |codec: &str, name: &str, bytes: &[u8]| {
        let d = dir.join(codec);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    let usage = sample_usage();
    let full = full_usage();
    let mut bare = sample_usage();
    bare.team_id = None;
    bare.project_id = None;
    bare.tags.clear();
    bare.reported_cost = None;
    let (policy, audit, violation) = (
        sample_policy_decision(),
        sample_audit_event(),
        sample_compliance_violation(),
    );

    // JSON
    write("json", "usage-ok-sample.json", &encode_json(&usage));
    write("json", "usage-ok-full.json", &encode_json(&full));
    write("json", "usage-ok-bare.json", &encode_json(&bare));
    let mut v: serde_json::Value = serde_json::from_slice(&encode_json(&usage)).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("team_id");
    o.remove("tags");
    o.remove("region");
    o.insert("reported_cost".into(), serde_json::json!(0.001234567));
    o.insert(
        "producer".into(),
        serde_json::json!({"v": [1, 2.5, null, {"x": "y"}], "ok": true}),
    );
    write(
        "json",
        "usage-ok-numbers-unknown-fields.json",
        &serde_json::to_vec(&v).unwrap(),
    );
    write("json", "policy-ok.json", &encode_json(&policy));
    write("json", "audit-ok.json", &encode_json(&audit));
    write("json", "violation-ok.json", &encode_json(&violation));
    let mut deep = encode_json(&usage);
    deep.pop();
    deep.extend_from_slice(format!(",\"x\":{}1{}}}", "[".repeat(200), "]".repeat(200)).as_bytes());
    write("json", "usage-ok-deep-unknown-field.json", &deep);

    // Avro single-object
    let v1 = schema_history("llm.usage.v1")[0].1;
    write(
        "single_object",
        "usage-ok-v2.bin",
        &encode_single_object(&usage),
    );
    write(
        "single_object",
        "usage-ok-v2-full.bin",
        &encode_single_object(&full),
    );
    write(
        "single_object",
        "usage-ok-v2-bare.bin",
        &encode_single_object(&bare),
    );
    write(
        "single_object",
        "usage-ok-v1.bin",
        &encode_single_object_with(&full, v1).unwrap(),
    );
    write(
        "single_object",
        "policy-ok.bin",
        &encode_single_object(&policy),
    );
    write(
        "single_object",
        "audit-ok.bin",
        &encode_single_object(&audit),
    );
    write(
        "single_object",
        "violation-ok.bin",
        &encode_single_object(&violation),
    );
    let so = encode_single_object(&usage);
    let mut huge = so[..SINGLE_OBJECT_HEADER_LEN].to_vec();
    put_long(&mut huge, 1 << 60);
    huge.extend_from_slice(&so[SINGLE_OBJECT_HEADER_LEN + 1..]);
    write("single_object", "usage-bad-length-2p60.bin", &huge);

    // Confluent
    write(
        "confluent",
        "id1-usage-ok-v2.bin",
        &encode_confluent(&full, 1),
    );
    write(
        "confluent",
        "id2-usage-ok-v1.bin",
        &encode_confluent_with(&usage, 2, v1).unwrap(),
    );
    let evolved = apache_avro::Schema::parse_str(&evolved_schema()).unwrap();
    let mut id3 = vec![0, 0, 0, 0, 3];
    id3.extend(apache_avro::to_avro_datum(&evolved, evolved_value(&full)).unwrap());
    write("confluent", "id3-usage-ok-evolved.bin", &id3);
    let mut id3b = vec![0, 0, 0, 0, 3];
    id3b.extend(apache_avro::to_avro_datum(&evolved, evolved_value(&usage)).unwrap());
    write("confluent", "id3-usage-ok-evolved-sample.bin", &id3b);
    write(
        "confluent",
        "id4-policy-ok.bin",
        &encode_confluent(&policy, 4),
    );
    write(
        "confluent",
        "id5-audit-ok.bin",
        &encode_confluent(&audit, 5),
    );
    write(
        "confluent",
        "id6-violation-ok.bin",
        &encode_confluent(&violation, 6),
    );
    // The labels array claiming 2^28 maps, right after the tags map {env: prod}.
    let tags: &[u8] = &[2, 6, b'e', b'n', b'v', 8, b'p', b'r', b'o', b'd', 0, 4];
    let at = id3b.windows(tags.len()).position(|w| w == tags).unwrap() + tags.len() - 1;
    let mut count = id3b[..at].to_vec();
    put_long(&mut count, 1 << 28);
    count.extend_from_slice(&id3b[at + 1..]);
    write("confluent", "id3-usage-bad-array-count.bin", &count);
}

/// Nesting a million levels deep, in a field tally ignores and in one it reads, ends in a
/// result, not a stack overflow (which would abort the process).
#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    cap_heap();
    let d = Decoders::new();
    for field in ["x", "tags", "team_id"] {
        let mut json = encode_json(&sample_usage());
        json.pop();
        let depth = 1_000_000;
        json.extend_from_slice(format!(",\"{field}\":").as_bytes());
        json.extend(std::iter::repeat_n(b'[', depth));
        json.extend(std::iter::repeat_n(b']', depth));
        json.push(b'}');
        let _ = d.fast.decode::<UsageEvent>(&json);
    }
}
