//! Machinery the stream generators share: seeded draws, the event-time cursor,
//! wire encodings, re-send history, burst minutes and the message type of the
//! policy and audit streams.
//!
//! Guarantee: every helper is a pure function of its arguments and of the state
//! of the rng it is handed, so a generator built on them stays a pure function
//! of its config (the same config yields byte-identical messages).

use crate::gen::{Encoding, GenKind, GenMessage};
use chrono::{DateTime, Duration, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use tally_schemas::Event;

/// Good events remembered for re-sending as duplicates.
pub(crate) const HISTORY: usize = 5_000;
/// Event-time minutes during which something bursts: 1 in this many.
pub(crate) const BURST_EVERY: u64 = 4;

/// Maps a probability to a threshold on a uniform `u32` draw.
// Float arithmetic on a probability (never money): p * 2^32.
#[allow(clippy::float_arithmetic)]
pub(crate) fn threshold(p: f64) -> u64 {
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
    (p * 4_294_967_296.0) as u64
}

/// 64-bit mix (splitmix64 finaliser) for per-minute and per-tenant decisions.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a string, for deriving per-name decisions from a seed.
pub(crate) fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

/// `Some(hash)` when event-time minute `minute` is a burst minute of `seed`.
pub(crate) fn burst_minute(seed: u64, minute: u64) -> Option<u64> {
    let h = mix(seed ^ minute.wrapping_mul(0x0100_0000_01B3));
    h.is_multiple_of(BURST_EVERY).then_some(h)
}

/// Picks an index by cumulative weights (`cum` is strictly increasing).
pub(crate) fn pick(rng: &mut SmallRng, cum: &[u64]) -> usize {
    let total = cum.last().copied().unwrap_or(0);
    if total == 0 {
        return 0;
    }
    let x = rng.random_range(0..total);
    cum.partition_point(|&c| c <= x)
}

/// Running sums of `weights` (each at least 1), for [`pick`].
pub(crate) fn cumulative(weights: impl Iterator<Item = u64>) -> Vec<u64> {
    weights
        .scan(0u64, |acc, w| {
            *acc += w.max(1);
            Some(*acc)
        })
        .collect()
}

/// A uniformly chosen element of a non-empty slice.
pub(crate) fn one_of<'a, T>(rng: &mut SmallRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// `true` with `pct` percent probability.
pub(crate) fn pct(rng: &mut SmallRng, pct: u32) -> bool {
    rng.random_range(0..100u32) < pct
}

/// A random (version 4 layout) UUID from the rng.
pub(crate) fn uuid(rng: &mut SmallRng) -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rng.random::<[u8; 16]>()).into_uuid()
}

/// Wire format of a generated payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    /// The event's own JSON (`encode_json`).
    Json,
    /// Avro single-object encoding.
    Avro,
    /// Confluent framing.
    Confluent,
    /// An Open Policy Agent decision-log event (JSON), valid or not.
    Opa,
    /// Poison from the malformed catalog (see the message's `GenKind::Malformed`).
    Poison,
}

/// Encodes `e` in `encoding` (Mixed draws JSON or Avro single-object from `rng`).
pub(crate) fn encode<T: Event>(
    rng: &mut SmallRng,
    encoding: Encoding,
    schema_id: u32,
    e: &T,
) -> (Vec<u8>, Wire) {
    match encoding {
        Encoding::Json => (tally_schemas::encode_json(e), Wire::Json),
        Encoding::Avro => (tally_schemas::encode_single_object(e), Wire::Avro),
        Encoding::Confluent => (
            tally_schemas::encode_confluent(e, schema_id),
            Wire::Confluent,
        ),
        Encoding::Mixed => {
            if rng.random_bool(0.5) {
                (tally_schemas::encode_json(e), Wire::Json)
            } else {
                (tally_schemas::encode_single_object(e), Wire::Avro)
            }
        }
    }
}

/// The event-time cursor: moves from `start` to `start + span` over `count` messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    start_ms: i64,
    span_ms: i64,
    count: u64,
}

impl Clock {
    pub(crate) fn new(start: DateTime<Utc>, span: Duration, count: u64) -> Self {
        Clock {
            start_ms: start.timestamp_millis(),
            span_ms: span.num_milliseconds().max(0),
            count,
        }
    }

    pub(crate) fn start_ms(&self) -> i64 {
        self.start_ms
    }

    /// Cursor (ms since epoch) for the message at position `emitted`.
    pub(crate) fn at(&self, emitted: u64) -> i64 {
        let count = i128::from(self.count.max(1));
        let off = i128::from(self.span_ms) * i128::from(emitted) / count;
        self.start_ms + i64::try_from(off).unwrap_or(i64::MAX / 2)
    }
}

/// The last [`HISTORY`] good items, for re-sending.
#[derive(Debug, Clone)]
pub(crate) struct History<T> {
    items: VecDeque<T>,
}

impl<T> History<T> {
    pub(crate) fn new() -> Self {
        History {
            items: VecDeque::with_capacity(HISTORY),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(crate) fn push(&mut self, item: T) {
        if self.items.len() == HISTORY {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    /// How far back to re-send from: half the time something recent (the last
    /// 20), half the time anything remembered. Panics when empty.
    pub(crate) fn pick_back(&self, rng: &mut SmallRng) -> usize {
        let n = self.items.len();
        if rng.random_bool(0.5) {
            rng.random_range(0..n.min(20))
        } else {
            rng.random_range(0..n)
        }
    }

    /// The item `back` positions before the newest (0 = newest), if remembered.
    pub(crate) fn back(&self, back: usize) -> Option<&T> {
        let n = self.items.len();
        back.checked_add(1)
            .and_then(|b| n.checked_sub(b))
            .and_then(|i| self.items.get(i))
    }

    /// A remembered item chosen by [`History::pick_back`].
    pub(crate) fn pick(&self, rng: &mut SmallRng) -> Option<&T> {
        if self.is_empty() {
            return None;
        }
        let back = self.pick_back(rng);
        self.back(back)
    }
}

/// What the next message of a stream is, by one draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Malformed,
    Duplicate,
    Good,
}

/// Shares of poison and duplicates as thresholds on one `u32` draw.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mix {
    malformed: u64,
    duplicate: u64,
}

impl Mix {
    pub(crate) fn new(malformed: f64, duplicates: f64) -> Self {
        let malformed = threshold(malformed);
        Mix {
            malformed,
            duplicate: malformed + threshold(duplicates),
        }
    }

    /// Draws the next step; a duplicate needs something to re-send.
    pub(crate) fn step(&self, rng: &mut SmallRng, can_resend: bool) -> Step {
        let roll = u64::from(rng.random::<u32>());
        if roll < self.malformed {
            Step::Malformed
        } else if roll < self.duplicate && can_resend {
            Step::Duplicate
        } else {
            Step::Good
        }
    }
}

/// `true` with probability `t / 2^32` (see [`threshold`]).
pub(crate) fn chance(rng: &mut SmallRng, t: u64) -> bool {
    u64::from(rng.random::<u32>()) < t
}

/// A seeded rng for one stream: `salt` keeps streams of one seed apart.
pub(crate) fn stream_rng(seed: u64, salt: u64) -> SmallRng {
    SmallRng::seed_from_u64(mix(seed ^ salt))
}

/// One message of the policy or audit stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamMessage<E> {
    /// Kafka key: the tenant id bytes (`None` for some poison messages).
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub kind: GenKind,
    pub wire: Wire,
    /// The event the pipeline must store for this payload (`Some` for Good and
    /// Duplicate; for an OPA event, the decision the mapping must yield).
    pub event: Option<E>,
}

/// A message [`crate::produce`] can send.
pub trait Outgoing {
    fn key(&self) -> Option<&[u8]>;
    fn payload(&self) -> &[u8];
    fn kind(&self) -> GenKind;
}

/// Implements [`Outgoing`] for message types with `key`, `payload` and `kind` fields.
macro_rules! outgoing {
    ($($t:ty $(: $g:ident)?),*) => {$(
        impl$(<$g>)? Outgoing for $t {
            fn key(&self) -> Option<&[u8]> {
                self.key.as_deref()
            }
            fn payload(&self) -> &[u8] {
                &self.payload
            }
            fn kind(&self) -> GenKind {
                self.kind
            }
        }
    )*};
}

outgoing!(GenMessage, StreamMessage<E>: E);

/// `Iterator` and `ExactSizeIterator` for a stream generator with a `core:
/// Core`, a `history: History<_>` and `queued`, `good`, `duplicate` and
/// `malformed` methods: one message per step until the count is reached,
/// queued ones first.
macro_rules! stream_iterator {
    ($gen:ty, $msg:ty) => {
        impl Iterator for $gen {
            type Item = $msg;

            fn next(&mut self) -> Option<$msg> {
                if self.core.done() {
                    return None;
                }
                let msg = match self.queued() {
                    Some(m) => m,
                    None => match self.core.step(!self.history.is_empty()) {
                        $crate::common::Step::Malformed => self.malformed(),
                        $crate::common::Step::Duplicate => self.duplicate(),
                        $crate::common::Step::Good => self.good(),
                    },
                };
                self.core.emitted += 1;
                Some(msg)
            }

            fn size_hint(&self) -> (usize, Option<usize>) {
                let left = self.core.left();
                (left, Some(left))
            }
        }

        impl ExactSizeIterator for $gen {}
    };
}
pub(crate) use stream_iterator;

/// Settings every stream generator shares. Shares are fractions of `count` in
/// `0.0..=1.0`.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Seed of every random draw.
    pub seed: u64,
    /// Length of the stream in messages (duplicates and poison included).
    pub count: u64,
    /// How good events and duplicates are encoded (OPA events aside).
    pub encoding: Encoding,
    /// Schema id of Confluent-framed messages.
    pub confluent_schema_id: u32,
    /// Share of messages re-sending an earlier good event.
    pub duplicates: f64,
    /// Share of poison messages.
    pub malformed: f64,
    /// Event time at the first message.
    pub start: DateTime<Utc>,
    /// The cursor moves from `start` to `start + span` over the `count` messages.
    pub span: Duration,
    /// Tenants (with their teams, projects and traffic weights).
    pub world: crate::world::World,
}

impl StreamConfig {
    /// Defaults: mixed encoding, Confluent schema id 1, 2% duplicates, no
    /// malformed, a 2 h span ending now. Set `start` explicitly when the stream
    /// must be reproducible.
    pub fn new(world: crate::world::World, count: u64, seed: u64) -> Self {
        let span = Duration::hours(2);
        StreamConfig {
            seed,
            count,
            world,
            start: Utc::now() - span,
            span,
            encoding: Encoding::Mixed,
            confluent_schema_id: 1,
            duplicates: 0.02,
            malformed: 0.0,
        }
    }
}

/// The state every stream generator keeps: rng, position, cursor, tenant weights.
pub(crate) struct Core {
    pub(crate) rng: SmallRng,
    pub(crate) emitted: u64,
    count: u64,
    pub(crate) clock: Clock,
    pub(crate) mix: Mix,
    pub(crate) tenant_cum: Vec<u64>,
}

impl Core {
    pub(crate) fn new(cfg: &StreamConfig, salt: u64) -> Self {
        Core {
            rng: stream_rng(cfg.seed, salt),
            emitted: 0,
            count: cfg.count,
            clock: Clock::new(cfg.start, cfg.span, cfg.count),
            mix: Mix::new(cfg.malformed, cfg.duplicates),
            tenant_cum: cumulative(cfg.world.tenants.iter().map(|t| u64::from(t.weight))),
        }
    }

    /// Event-time cursor of the current message, ms since epoch.
    pub(crate) fn cursor_ms(&self) -> i64 {
        self.clock.at(self.emitted)
    }

    /// The current message's event time with random sub-millisecond microseconds.
    pub(crate) fn occurred_at(&mut self, fallback: DateTime<Utc>) -> DateTime<Utc> {
        let us = self.cursor_ms() * 1000 + self.rng.random_range(0..1000i64);
        DateTime::from_timestamp_micros(us).unwrap_or(fallback)
    }

    /// `Some(hash)` when the current epoch minute is a burst minute of `seed`.
    pub(crate) fn burst(&self, seed: u64) -> Option<u64> {
        burst_minute(seed, u64::try_from(self.cursor_ms() / 60_000).unwrap_or(0))
    }

    /// A tenant index by weight (0 when there are no tenants).
    pub(crate) fn tenant(&mut self) -> usize {
        pick(&mut self.rng, &self.tenant_cum)
    }

    /// Messages still to emit.
    pub(crate) fn left(&self) -> usize {
        usize::try_from(self.count.saturating_sub(self.emitted)).unwrap_or(usize::MAX)
    }

    /// Whether the stream has all its messages.
    pub(crate) fn done(&self) -> bool {
        self.emitted >= self.count
    }

    /// What the next message is (a duplicate only when `can_resend`).
    pub(crate) fn step(&mut self, can_resend: bool) -> Step {
        self.mix.step(&mut self.rng, can_resend)
    }
}

/// A tenant as the policy and audit generators see it.
#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    pub(crate) id: String,
    teams: Vec<String>,
    projects: Vec<String>,
}

impl Tenant {
    /// The world's tenants, or one stand-in tenant (`t-001`) when it has none.
    pub(crate) fn all(world: &crate::world::World) -> Vec<Tenant> {
        let mut out: Vec<Tenant> = world
            .tenants
            .iter()
            .map(|t| Tenant {
                id: t.tenant_id.clone(),
                teams: t.teams.clone(),
                projects: t.projects.clone(),
            })
            .collect();
        if out.is_empty() {
            out.push(Tenant {
                id: "t-001".into(),
                teams: Vec::new(),
                projects: Vec::new(),
            });
        }
        out
    }

    /// One of the tenant's teams on 85% of draws.
    pub(crate) fn team(&self, rng: &mut SmallRng) -> Option<String> {
        (!self.teams.is_empty() && pct(rng, 85)).then(|| one_of(rng, &self.teams).clone())
    }

    /// One of the tenant's projects on 80% of draws.
    pub(crate) fn project(&self, rng: &mut SmallRng) -> Option<String> {
        (!self.projects.is_empty() && pct(rng, 80)).then(|| one_of(rng, &self.projects).clone())
    }
}
