//! Deterministic synthetic LLM-usage traffic: good events, duplicates
//! (re-sends of earlier events, possibly in another encoding) and malformed
//! "poison" messages, each tagged with what a consumer should make of it.
//!
//! A [`Generator`] is a pure function of its [`GenConfig`]: the same config
//! yields byte-identical messages, so a test can regenerate a stream and
//! compare it with what the pipeline stored.

use crate::common::{burst_minute, cumulative, encode, pick, threshold, Clock, History, Mix, Step};
use crate::malformed;
use crate::world::{is_reasoning_model, World};
use chrono::{DateTime, Duration, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use tally_schemas::{UsageEvent, UsageStatus};
use uuid::Uuid;

/// Wire encoding of generated messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Plain JSON.
    Json,
    /// Avro single-object encoding (`C3 01` + fingerprint + datum).
    Avro,
    /// Confluent wire format (`00` + schema id + datum).
    Confluent,
    /// JSON and Avro single-object, chosen per message by the seeded rng.
    Mixed,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Avro => "avro",
            Encoding::Confluent => "confluent",
            Encoding::Mixed => "mixed",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Encoding::Json),
            "avro" => Ok(Encoding::Avro),
            "confluent" => Ok(Encoding::Confluent),
            "mixed" => Ok(Encoding::Mixed),
            other => Err(format!(
                "unknown encoding {other:?} (expected json, avro, confluent or mixed)"
            )),
        }
    }
}

/// What to generate. Shares are fractions of `count` in `0.0..=1.0`.
#[derive(Debug, Clone)]
pub struct GenConfig {
    /// Messages to emit in total, including duplicates and malformed ones.
    pub count: u64,
    pub seed: u64,
    pub encoding: Encoding,
    /// Schema id written into Confluent-framed messages.
    pub confluent_schema_id: u32,
    /// Share of messages that re-send an earlier good event.
    pub duplicates: f64,
    /// Share of good events whose `occurred_at` lies 1-6 h behind the cursor.
    pub late: f64,
    /// Share of messages that are poison (fail to decode).
    pub malformed: f64,
    /// Share of good events using a model from `world.unpriced`.
    pub unpriced: f64,
    /// Share of good events using a tenant from `world.unknown_tenants`.
    pub unknown_tenant: f64,
    /// Event time of the first message (truncated to whole milliseconds).
    pub start: DateTime<Utc>,
    /// Event-time spread of the run: the cursor moves from `start` to
    /// `start + span` over the `count` messages.
    pub span: Duration,
    pub world: World,
}

impl GenConfig {
    /// Defaults: mixed encoding, Confluent schema id 1, 2% duplicates, 1%
    /// late, no malformed, 0.2% unpriced, 0.1% unknown tenant, a 2 h span
    /// ending now. Set `start` explicitly when the stream must be reproducible.
    pub fn new(world: World, count: u64, seed: u64) -> Self {
        let span = Duration::hours(2);
        GenConfig {
            count,
            seed,
            encoding: Encoding::Mixed,
            confluent_schema_id: 1,
            duplicates: 0.02,
            late: 0.01,
            malformed: 0.0,
            unpriced: 0.002,
            unknown_tenant: 0.001,
            start: Utc::now() - span,
            span,
            world,
        }
    }
}

/// What a generated message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenKind {
    /// A new event (first sending of its `event_id`).
    Good,
    /// A re-send of an earlier good event (same id and content).
    Duplicate,
    /// Poison: decoding must fail with this `DecodeError::class()`.
    Malformed { class: &'static str },
}

/// One message to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct GenMessage {
    /// Kafka key: the tenant id bytes (`None` for some poison messages).
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub kind: GenKind,
    /// The event the payload encodes (`Some` for Good and Duplicate).
    pub event: Option<UsageEvent>,
}

/// Percentage of events that carry a team (the rest have `team_id: None`).
pub(crate) const TEAM_SET_PCT: Decimal = Decimal::from_parts(85, 0, 0, false, 0);
/// Rough mean of all token classes per event with the default distributions.
pub(crate) const MEAN_TOKENS_PER_EVENT: i64 = 6_200;

// Means of the token distributions below (log-uniform mean = (b-a)/ln(b/a)).
const E_INPUT: i64 = 3_330; // log-uniform 50..=20000
const E_OUTPUT: i64 = 666; // log-uniform 10..=4000
const E_REASONING: i64 = 3_756; // log-uniform 100..=20000
const CACHED_PCT: u32 = 30; // cached input: uniform 0..=3*input on 30% of events
const CACHE_WRITE_PCT: u32 = 8; // cache write: uniform 0..=input on 8% of events
const REASONING_PCT: u32 = 90; // reasoning tokens on 90% of reasoning-model events

/// Share (percent) of a burst minute's events re-assigned to the bursting tenant.
const BURST_PCT: u32 = 15;

const FEATURES: &[&str] = &["chat", "search", "summarize", "agent", "codegen", "extract"];
const REGIONS: &[&str] = &["us-east-1", "us-west-2", "eu-west-1", "ap-northeast-1"];

/// Relative popularity of the priced model at position `i` (0 = most popular).
fn model_weight(i: usize) -> u64 {
    60 / (u64::try_from(i).unwrap_or(u64::MAX - 2) + 2) + 1
}

/// Expected true cost of one good event with the default token distributions,
/// averaged over the priced models (at their first price version).
pub(crate) fn expected_cost_per_event(world: &World) -> Decimal {
    let models = world.priced_models();
    let pct = |p: u32| Decimal::from(p) / Decimal::from(100);
    let mut total = Decimal::ZERO;
    let mut weight_sum = Decimal::ZERO;
    for (i, (provider, model)) in models.iter().enumerate() {
        let Some(price) = world
            .prices
            .iter()
            .find(|p| p.provider == *provider && p.model == *model)
        else {
            continue;
        };
        let input = Decimal::from(E_INPUT);
        let reasoning = if is_reasoning_model(model) {
            Decimal::from(E_REASONING) * pct(REASONING_PCT)
        } else {
            Decimal::ZERO
        };
        let per_event = (input * price.input_per_m
            + input * pct(CACHED_PCT) * Decimal::new(15, 1) * price.cached_input_per_m
            + input * pct(CACHE_WRITE_PCT) * Decimal::new(5, 1) * price.cache_write_per_m)
            * pct(99)
            + (Decimal::from(E_OUTPUT) * price.output_per_m + reasoning * price.reasoning_per_m)
                * Decimal::new(965, 3);
        let w = Decimal::from(model_weight(i));
        total += per_event / Decimal::from(1_000_000) * w;
        weight_sum += w;
    }
    if weight_sum.is_zero() {
        Decimal::ZERO
    } else {
        total / weight_sum
    }
}

/// Log-uniform integer in `lo..=hi` (a skewed, heavy-ish tailed token count).
// Float arithmetic shapes a token-count distribution only (never money).
#[allow(clippy::float_arithmetic)]
fn log_uniform(rng: &mut SmallRng, lo: i64, hi: i64) -> i64 {
    let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
    let x = (l + rng.random::<f64>() * (h - l)).exp();
    (x.round() as i64).clamp(lo, hi)
}

/// The deterministic message stream of one [`GenConfig`].
pub struct Generator {
    cfg: GenConfig,
    rng: SmallRng,
    emitted: u64,
    clock: Clock,
    tenant_cum: Vec<u64>,
    models: Vec<(String, String)>,
    model_cum: Vec<u64>,
    history: History<UsageEvent>,
    malformed_next: usize,
    mix: Mix,
    t_late: u64,
    t_unpriced: u64,
    t_unknown: u64,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> Self {
        let rng = SmallRng::seed_from_u64(cfg.seed);
        let tenant_cum = cumulative(cfg.world.tenants.iter().map(|t| u64::from(t.weight)));
        let models = cfg.world.priced_models();
        let model_cum = cumulative((0..models.len()).map(model_weight));
        Generator {
            rng,
            emitted: 0,
            clock: Clock::new(cfg.start, cfg.span, cfg.count),
            tenant_cum,
            models,
            model_cum,
            history: History::new(),
            malformed_next: 0,
            mix: Mix::new(cfg.malformed, cfg.duplicates),
            t_late: threshold(cfg.late),
            t_unpriced: threshold(cfg.unpriced),
            t_unknown: threshold(cfg.unknown_tenant),
            cfg,
        }
    }

    /// The config this generator was built from.
    pub fn config(&self) -> &GenConfig {
        &self.cfg
    }

    fn chance(&mut self, threshold: u64) -> bool {
        u64::from(self.rng.random::<u32>()) < threshold
    }

    fn pct(&mut self, pct: u32) -> bool {
        self.rng.random_range(0..100u32) < pct
    }

    /// Event-time cursor (ms since epoch) for the current message.
    fn cursor_ms(&self) -> i64 {
        self.clock.at(self.emitted)
    }

    /// Encodes `e` in the configured encoding (Mixed picks JSON or Avro).
    fn encode(&mut self, e: &UsageEvent) -> Vec<u8> {
        let (enc, schema_id) = (self.cfg.encoding, self.cfg.confluent_schema_id);
        encode(&mut self.rng, enc, schema_id, e).0
    }

    /// Draws a fresh, valid event at the current cursor.
    fn sample_event(&mut self) -> UsageEvent {
        let cursor = self.cursor_ms();
        let occurred_ms = if self.chance(self.t_late) {
            cursor - self.rng.random_range(3_600_000..=21_600_000i64)
        } else {
            cursor
        };
        let occurred_at =
            DateTime::<Utc>::from_timestamp_millis(occurred_ms).unwrap_or(self.cfg.start);

        // Tenant: by weight; big tenants burst in some minutes.
        let unknown = self.chance(self.t_unknown);
        let world = &self.cfg.world;
        let (tenant_id, teams, projects) =
            if !world.unknown_tenants.is_empty() && (world.tenants.is_empty() || unknown) {
                let i = self.rng.random_range(0..world.unknown_tenants.len());
                (
                    world.unknown_tenants[i].clone(),
                    vec!["team-a".to_string()],
                    vec!["proj-1".to_string()],
                )
            } else if world.tenants.is_empty() {
                ("t-001".to_string(), Vec::new(), Vec::new())
            } else {
                let mut idx = pick(&mut self.rng, &self.tenant_cum);
                let minute = u64::try_from((cursor - self.clock.start_ms()) / 60_000).unwrap_or(0);
                let burst = burst_minute(self.cfg.seed, minute);
                let in_burst = self.rng.random_range(0..100u32) < BURST_PCT;
                if let (Some(h), true) = (burst, in_burst) {
                    let top = world.tenants.len().min(3);
                    idx = usize::try_from((h >> 16) % top as u64).unwrap_or(0);
                }
                let t = &world.tenants[idx];
                (t.tenant_id.clone(), t.teams.clone(), t.projects.clone())
            };
        let team_id = (!teams.is_empty() && self.rng.random_range(0..100u32) < 85)
            .then(|| teams[self.rng.random_range(0..teams.len())].clone());
        let project_id = (!projects.is_empty() && self.pct(80))
            .then(|| projects[self.rng.random_range(0..projects.len())].clone());
        let user_id = self
            .pct(90)
            .then(|| format!("u-{:04}", self.rng.random_range(0..500u32)));

        // Model: priced by popularity, or an unpriced one.
        let unpriced = self.chance(self.t_unpriced);
        let world = &self.cfg.world;
        let (provider, model) =
            if !world.unpriced.is_empty() && (self.models.is_empty() || unpriced) {
                world.unpriced[self.rng.random_range(0..world.unpriced.len())].clone()
            } else if self.models.is_empty() {
                ("acme".to_string(), "mystery-1".to_string())
            } else {
                self.models[pick(&mut self.rng, &self.model_cum)].clone()
            };

        // Tokens: disjoint classes.
        let mut input = log_uniform(&mut self.rng, 50, 20_000);
        let mut cached = if self.pct(CACHED_PCT) {
            self.rng.random_range(0..=3 * input)
        } else {
            0
        };
        let mut cache_write = if self.pct(CACHE_WRITE_PCT) {
            self.rng.random_range(0..=input)
        } else {
            0
        };
        let mut output = log_uniform(&mut self.rng, 10, 4_000);
        let mut reasoning = if is_reasoning_model(&model) && self.pct(REASONING_PCT) {
            log_uniform(&mut self.rng, 100, 20_000)
        } else {
            0
        };

        let roll = self.rng.random_range(0..1000u32);
        let status = match roll {
            0..950 => UsageStatus::Success,
            950..975 => UsageStatus::Error,
            975..990 => UsageStatus::Timeout,
            _ => UsageStatus::RateLimited,
        };
        let latency_ms = match status {
            UsageStatus::Success => {
                let per_token = self.rng.random_range(8..=25i64);
                120 + (output + reasoning) * per_token
                    + input / 50
                    + self.rng.random_range(0..300i64)
            }
            UsageStatus::Error => {
                output = 0;
                reasoning = 0;
                self.rng.random_range(50..=2_000i64)
            }
            UsageStatus::Timeout => self.rng.random_range(30_000..=120_000i64),
            UsageStatus::RateLimited => {
                input = 0;
                cached = 0;
                cache_write = 0;
                output = 0;
                reasoning = 0;
                self.rng.random_range(5..=100i64)
            }
        };

        let reported_cost = if self.rng.random_bool(0.5) {
            let true_cost = self
                .cfg
                .world
                .price_at(&provider, &model, occurred_at)
                .map(|p| p.cost(input, cached, cache_write, output, reasoning));
            let roll = self.rng.random_range(0..100u32);
            let cost = match true_cost {
                Some(c) if roll < 60 => c,
                // Within +-1% of the truth.
                Some(c) if roll < 95 => c * Decimal::new(self.rng.random_range(990..=1010), 3),
                // Off by a lot (a misconfigured gateway price).
                Some(c) => {
                    let factors = [1, 5, 30, 100];
                    c * Decimal::new(factors[self.rng.random_range(0..factors.len())], 1)
                }
                None => Decimal::new(self.rng.random_range(1..=50_000), 6),
            };
            Some(cost.round_dp(6).normalize())
        } else {
            None
        };

        let mut tags = BTreeMap::new();
        if self.pct(80) {
            let env = if self.pct(85) { "prod" } else { "staging" };
            tags.insert("env".to_string(), env.to_string());
            let f = FEATURES[self.rng.random_range(0..FEATURES.len())];
            tags.insert("feature".to_string(), f.to_string());
            if self.pct(10) {
                let n = self.rng.random_range(1..=5u32);
                tags.insert("experiment".to_string(), format!("exp-{n}"));
            }
        }
        let region = self
            .pct(70)
            .then(|| REGIONS[self.rng.random_range(0..REGIONS.len())].to_string());

        let event_id = uuid::Builder::from_random_bytes(self.rng.random::<[u8; 16]>()).into_uuid();
        let request_id = format!(
            "req-{:016x}{:08x}",
            self.rng.random::<u64>(),
            self.rng.random::<u32>()
        );
        UsageEvent {
            event_id,
            occurred_at,
            tenant_id,
            team_id,
            project_id,
            user_id,
            source: format!("gateway-{}", self.rng.random_range(1..=4u32)),
            tags,
            request_id,
            provider,
            model,
            input_tokens: input,
            cached_input_tokens: cached,
            cache_write_tokens: cache_write,
            output_tokens: output,
            reasoning_tokens: reasoning,
            latency_ms: latency_ms.min(86_400_000),
            status,
            reported_cost,
            currency: "USD".to_string(),
            region,
        }
    }

    fn good(&mut self) -> GenMessage {
        let e = self.sample_event();
        let payload = self.encode(&e);
        self.history.push(e.clone());
        GenMessage {
            key: Some(e.tenant_id.as_bytes().to_vec()),
            payload,
            kind: GenKind::Good,
            event: Some(e),
        }
    }

    fn duplicate(&mut self) -> GenMessage {
        // Half re-send something recent, half anything remembered (up to
        // HISTORY good events back); `next` only asks when there is one.
        let Some(e) = self.history.pick(&mut self.rng).cloned() else {
            return self.good();
        };
        let payload = self.encode(&e);
        GenMessage {
            key: Some(e.tenant_id.as_bytes().to_vec()),
            payload,
            kind: GenKind::Duplicate,
            event: Some(e),
        }
    }

    fn malformed(&mut self) -> GenMessage {
        let base = self.sample_event();
        let kind = self.malformed_next;
        self.malformed_next = (self.malformed_next + 1) % malformed::KINDS;
        let (payload, class) = malformed::build(kind, &base);
        GenMessage {
            key: (!payload.is_empty()).then(|| base.tenant_id.as_bytes().to_vec()),
            payload,
            kind: GenKind::Malformed { class },
            event: None,
        }
    }
}

impl Iterator for Generator {
    type Item = GenMessage;

    fn next(&mut self) -> Option<GenMessage> {
        if self.emitted >= self.cfg.count {
            return None;
        }
        let msg = match self.mix.step(&mut self.rng, !self.history.is_empty()) {
            Step::Malformed => self.malformed(),
            Step::Duplicate => self.duplicate(),
            Step::Good => self.good(),
        };
        self.emitted += 1;
        Some(msg)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.cfg.count - self.emitted).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Generator {}

/// Convenience: the event ids of all Good messages of a config, in order.
pub fn good_event_ids(cfg: &GenConfig) -> Vec<Uuid> {
    Generator::new(cfg.clone())
        .filter(|m| m.kind == GenKind::Good)
        .filter_map(|m| m.event.map(|e| e.event_id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::demo_world;
    use chrono::TimeZone;

    /// FNV-1a over every message's kind, key and payload.
    fn digest(cfg: GenConfig) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for m in Generator::new(cfg) {
            let kind = format!("{:?}", m.kind);
            let key = m.key.unwrap_or_default();
            for b in kind.bytes().chain(key).chain(m.payload).chain([0xFF]) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
            }
        }
        h
    }

    #[test]
    fn usage_stream_is_unchanged() {
        let change = Utc.with_ymd_and_hms(2025, 3, 1, 10, 0, 0).unwrap();
        let mut got = Vec::new();
        for (i, enc) in [Encoding::Mixed, Encoding::Confluent]
            .into_iter()
            .enumerate()
        {
            let mut cfg = GenConfig::new(demo_world(12, change), 3_000, 42 + i as u64);
            cfg.encoding = enc;
            cfg.malformed = 0.05;
            cfg.duplicates = 0.1;
            cfg.start = change - Duration::hours(1);
            got.push(digest(cfg));
        }
        assert_eq!(got, vec![0x086d_6d10_ab5e_d90d, 0xd6a8_c6fb_775b_3266]);
    }
}
