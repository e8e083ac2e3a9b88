//! `tally gen`: the generator configs of the requested streams, built from the
//! command's options, and their production to each stream's topic.
//!
//! Guarantee: [`configs`] is a pure function of the options, and [`run`] sends
//! exactly the messages of those configs' generators, one stream after the
//! other, each acknowledged in full before the next starts. So with the seed
//! `tally gen` prints, a test can regenerate every stream it sent.

use crate::common::{Outgoing, StreamConfig};
use crate::gen::{Encoding, GenConfig, Generator};
use crate::gen_audit::{AuditGenConfig, AuditGenerator};
use crate::gen_policy::{PolicyGenConfig, PolicyGenerator};
use crate::produce::{produce, ProduceReport};
use crate::world::demo_world;
use anyhow::{bail, Context};
use chrono::{DateTime, Duration, Utc};
use std::fmt;
use std::str::FromStr;

/// Which stream(s) `tally gen` produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamChoice {
    /// `llm.usage.v1` (the default).
    #[default]
    Usage,
    /// `policy.decision.v1`, native and OPA decision-log events.
    Policy,
    /// `audit.event.v1`.
    Audit,
    /// All three, one after the other.
    All,
}

impl StreamChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamChoice::Usage => "usage",
            StreamChoice::Policy => "policy",
            StreamChoice::Audit => "audit",
            StreamChoice::All => "all",
        }
    }

    fn has(self, s: StreamChoice) -> bool {
        self == s || self == StreamChoice::All
    }
}

impl fmt::Display for StreamChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StreamChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "usage" => Ok(StreamChoice::Usage),
            "policy" => Ok(StreamChoice::Policy),
            "audit" => Ok(StreamChoice::Audit),
            "all" => Ok(StreamChoice::All),
            other => Err(format!(
                "unknown stream {other:?} (expected usage, policy, audit or all)"
            )),
        }
    }
}

/// The topic of each stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub usage: String,
    pub policy: String,
    pub audit: String,
}

/// The options of `tally gen`.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub stream: StreamChoice,
    /// Messages per stream.
    pub count: u64,
    /// Messages per second, per stream (unlimited when `None`).
    pub rate: Option<u64>,
    pub encoding: Encoding,
    pub duplicates: f64,
    /// Usage only: share of late events.
    pub late: f64,
    pub malformed: f64,
    pub seed: u64,
    pub tenants: usize,
    /// Policy only: share of OPA decision-log events.
    pub opa_share: f64,
    /// Overrides the topic of the one stream chosen (not with `all`).
    pub topic: Option<String>,
    /// The demo world's price change; every stream's two hours of event time
    /// start an hour before it.
    pub price_change_at: DateTime<Utc>,
}

impl GenOptions {
    /// Rejects shares outside `0..=1` and a `topic` with `--stream all`.
    pub fn check(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("duplicates", self.duplicates),
            ("late", self.late),
            ("malformed", self.malformed),
            ("opa-share", self.opa_share),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("--{name} must be a share between 0 and 1, got {v}");
            }
        }
        if self.stream == StreamChoice::All && self.topic.is_some() {
            bail!("--topic names one stream's topic; it cannot be used with --stream all");
        }
        Ok(())
    }
}

/// The generator configs of the chosen streams (`None` for the others).
#[derive(Debug, Clone)]
pub struct Configs {
    pub usage: Option<GenConfig>,
    pub policy: Option<PolicyGenConfig>,
    pub audit: Option<AuditGenConfig>,
}

/// The configs `tally gen` runs for `opts`.
pub fn configs(opts: &GenOptions) -> Configs {
    let world = demo_world(opts.tenants, opts.price_change_at);
    let start = opts.price_change_at - Duration::hours(1);
    let stream = {
        let mut s = StreamConfig::new(world.clone(), opts.count, opts.seed);
        s.encoding = opts.encoding;
        s.duplicates = opts.duplicates;
        s.malformed = opts.malformed;
        s.start = start;
        s.span = Duration::hours(2);
        s
    };
    let usage = opts.stream.has(StreamChoice::Usage).then(|| {
        let mut g = GenConfig::new(world.clone(), opts.count, opts.seed);
        g.encoding = opts.encoding;
        g.duplicates = opts.duplicates;
        g.late = opts.late;
        g.malformed = opts.malformed;
        g.start = start;
        g.span = stream.span;
        g
    });
    let policy = opts.stream.has(StreamChoice::Policy).then(|| {
        let mut p = PolicyGenConfig::new(world.clone(), opts.count, opts.seed);
        p.stream = stream.clone();
        p.opa_share = opts.opa_share;
        p
    });
    let audit = opts.stream.has(StreamChoice::Audit).then(|| {
        let mut a = AuditGenConfig::new(world.clone(), opts.count, opts.seed);
        a.stream = stream.clone();
        a
    });
    Configs {
        usage,
        policy,
        audit,
    }
}

/// Produces the chosen streams to their topics; returns (topic, report) per stream.
pub async fn run(
    connection: &rdkafka::ClientConfig,
    topics: &Topics,
    opts: &GenOptions,
) -> anyhow::Result<Vec<(String, ProduceReport)>> {
    opts.check()?;
    let c = configs(opts);
    let topic = |default: &String| opts.topic.clone().unwrap_or_else(|| default.clone());
    let mut out = Vec::new();
    if let Some(g) = c.usage {
        out.push(
            send(
                connection,
                topic(&topics.usage),
                Generator::new(g),
                opts.rate,
            )
            .await?,
        );
    }
    if let Some(p) = c.policy {
        out.push(
            send(
                connection,
                topic(&topics.policy),
                PolicyGenerator::new(p),
                opts.rate,
            )
            .await?,
        );
    }
    if let Some(a) = c.audit {
        out.push(
            send(
                connection,
                topic(&topics.audit),
                AuditGenerator::new(a),
                opts.rate,
            )
            .await?,
        );
    }
    Ok(out)
}

async fn send<M: Outgoing, I: Iterator<Item = M>>(
    connection: &rdkafka::ClientConfig,
    topic: String,
    msgs: I,
    rate: Option<u64>,
) -> anyhow::Result<(String, ProduceReport)> {
    let report = produce(connection, &topic, msgs, rate, true)
        .await
        .with_context(|| format!("producing generated traffic to {topic}"))?;
    Ok((topic, report))
}
