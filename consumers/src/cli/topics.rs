//! The Kafka topics of `tally migrate`: created with `kafka.replication_factor`
//! and `kafka.topic_config`, or (`--skip-topics`) only checked.
//!
//! Guarantee: an existing topic is never changed (a different partition count or
//! replication factor is noted, not altered); a factor above the cluster's
//! broker count is refused before any topic is created, naming the key; with
//! `--skip-topics` nothing is created and every topic an enabled stream needs
//! that is missing is named in the error.

use crate::config::Config;
use crate::errors::{classify_kafka, StageError};
use crate::sinks::kafka_client::KafkaClient;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use std::collections::BTreeMap;
use std::time::Duration;

/// A topic tally uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// Used by an enabled stream (`streams.*`) or the violation relay.
    pub needed: bool,
}

/// Every topic `tally migrate` creates, in a fixed order.
pub fn wanted(cfg: &Config) -> Vec<TopicSpec> {
    let (k, s) = (&cfg.kafka, &cfg.streams);
    [
        (&k.usage_topic, k.usage_partitions, s.usage),
        (&k.dlq_topic, k.usage_partitions, s.usage),
        (&k.violation_topic, k.violation_partitions, true),
        (&cfg.policy.topic, cfg.policy.partitions, s.policy),
        (&cfg.policy.dlq_topic, cfg.policy.partitions, s.policy),
        (&cfg.audit.topic, cfg.audit.partitions, s.audit),
        (&cfg.audit.dlq_topic, cfg.audit.partitions, s.audit),
        (&cfg.audit.checkpoint_topic, cfg.audit.partitions, s.audit),
    ]
    .into_iter()
    .map(|(name, partitions, needed)| TopicSpec {
        name: name.clone(),
        partitions,
        needed,
    })
    .collect()
}

/// What the cluster holds: its broker count, and per topic (partitions,
/// fewest replicas of any partition).
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub brokers: usize,
    pub topics: BTreeMap<String, (i32, usize)>,
}

/// Reads the metadata of every topic (asking for all topics never creates one,
/// even on a broker that auto-creates topics asked for by name).
pub async fn describe(cfg: &Config) -> Result<Cluster, StageError> {
    let client = KafkaClient::new(&cfg.kafka);
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = client
            .config()
            .create()
            .map_err(|e| StageError::Fatal(format!("kafka client: {e}")))?;
        let md = c
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| classify_kafka("kafka metadata", &e))?;
        let topics = md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| {
                let replicas = t
                    .partitions()
                    .iter()
                    .map(|p| p.replicas().len())
                    .min()
                    .unwrap_or(0);
                (
                    t.name().to_string(),
                    (
                        i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                        replicas,
                    ),
                )
            })
            .collect();
        Ok(Cluster {
            brokers: md.brokers().len(),
            topics,
        })
    })
    .await
    .map_err(|e| StageError::Fatal(format!("kafka metadata task: {e}")))?
}

/// Notes on existing topics that differ from the configuration (never changed).
pub fn differences(cfg: &Config, cluster: &Cluster) -> Vec<String> {
    let rf = cfg.kafka.replication_factor;
    wanted(cfg)
        .iter()
        .filter_map(|t| {
            let (partitions, replicas) = cluster.topics.get(&t.name)?;
            let mut d = Vec::new();
            if *partitions != t.partitions {
                d.push(format!(
                    "{partitions} partitions (configured {})",
                    t.partitions
                ));
            }
            if usize::try_from(rf).is_ok_and(|rf| rf != *replicas) {
                d.push(format!(
                    "{replicas} replicas (kafka.replication_factor is {rf})"
                ));
            }
            (!d.is_empty()).then(|| {
                format!(
                    "topic {} exists with {}; migrate never changes an existing topic",
                    t.name,
                    d.join(", ")
                )
            })
        })
        .collect()
}

/// Creates the missing topics with the configured factor and topic configs;
/// returns the topics created ("already exists" is success: another migrate
/// may have been first).
pub async fn create(cfg: &Config) -> Result<Vec<String>, StageError> {
    let cluster = describe(cfg).await?;
    let missing: Vec<TopicSpec> = wanted(cfg)
        .into_iter()
        .filter(|t| !cluster.topics.contains_key(&t.name))
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let rf = cfg.kafka.replication_factor;
    if usize::try_from(rf).is_ok_and(|rf| rf > cluster.brokers) {
        return Err(StageError::Fatal(format!(
            "kafka.replication_factor = {rf}, but the cluster at {} has {} broker(s): a topic cannot have more \
             replicas than brokers (use 1 for a single local broker; nothing was created)",
            cfg.kafka.brokers, cluster.brokers
        )));
    }
    let admin: AdminClient<DefaultClientContext> =
        KafkaClient::new(&cfg.kafka)
            .config()
            .create()
            .map_err(|e| StageError::Fatal(format!("kafka admin: {e}")))?;
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            cfg.kafka.topic_config.pairs().fold(
                NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(rf)),
                |n, (k, v)| n.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(|e| StageError::Retryable(format!("create topics: {e}")))?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(t) => created.push(t),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e @ RDKafkaErrorCode::InvalidReplicationFactor)) => {
                return Err(StageError::Fatal(format!(
                    "create topic {t}: the broker refused kafka.replication_factor = {rf}: {e}"
                )))
            }
            Err((t, e @ (RDKafkaErrorCode::InvalidConfig | RDKafkaErrorCode::PolicyViolation))) => {
                return Err(StageError::Fatal(format!(
                    "create topic {t}: the broker refused kafka.topic_config {:?}: {e}",
                    cfg.kafka.topic_config.0
                )))
            }
            Err((t, e)) => return Err(StageError::Fatal(format!("create topic {t}: {e}"))),
        }
    }
    Ok(created)
}

/// `--skip-topics`: creates nothing; the topics an enabled stream needs must
/// exist. Returns notes (differences, unneeded missing topics); a missing
/// needed topic is an error naming every one.
pub async fn check(cfg: &Config) -> Result<Vec<String>, StageError> {
    let cluster = describe(cfg).await?;
    let (mut needed, mut unneeded) = (Vec::new(), Vec::new());
    for t in wanted(cfg)
        .into_iter()
        .filter(|t| !cluster.topics.contains_key(&t.name))
    {
        let what = format!("{} ({} partitions)", t.name, t.partitions);
        if t.needed {
            needed.push(what);
        } else {
            unneeded.push(what);
        }
    }
    if !needed.is_empty() {
        return Err(StageError::Fatal(format!(
            "--skip-topics: {} topic(s) that tally needs do not exist: {}; create them with \
             replication factor {} and the configs of kafka.topic_config (docs/operations.md), then migrate again",
            needed.len(),
            needed.join(", "),
            cfg.kafka.replication_factor
        )));
    }
    let mut notes = differences(cfg, &cluster);
    if !unneeded.is_empty() {
        notes.push(format!(
            "not found, not needed while their streams are off: {}",
            unneeded.join(", ")
        ));
    }
    Ok(notes)
}
