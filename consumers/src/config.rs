//! Configuration: raw, then validated, then built.
//!
//! Layers, later wins: the embedded defaults (`config.defaults.toml`), a TOML
//! file, then `TALLY__SECTION__KEY` environment variables. A key that is not in
//! the defaults is an error naming it; a value of the wrong type or out of range
//! is an error naming the key. Secrets (passwords in URLs) never reach `Debug`.

use rust_decimal::Decimal;
use serde::Deserialize;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

mod ingest;
mod security;
mod topics;
pub use ingest::IngestConfig;
pub use security::{KAFKA_PROTOCOLS, PG_SSLMODES, SASL_MECHANISMS};
pub use topics::TopicConfig;

const DEFAULTS: &str = include_str!("config.defaults.toml");

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("unknown config key `{key}` (from {origin})")]
    UnknownKey { key: String, origin: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub instance_id: String,
    pub usage_topic: String,
    pub dlq_topic: String,
    pub violation_topic: String,
    pub usage_partitions: i32,
    pub violation_partitions: i32,
    pub violation_encoding: crate::engine::violation_wire::ViolationEncoding,
    pub violation_cloudevents: bool,
    pub violation_cloudevents_source: String,
    pub session_timeout_ms: u32,
    pub max_poll_interval_ms: u32,
    pub receive_message_max_bytes: u32,
    pub fetch_queue_max_kbytes: u32,
    pub commit_interval_ms: u64,
    pub replication_factor: i32,
    pub topic_config: TopicConfig,
    pub security_protocol: String,
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: String,
    pub sasl_password_file: String,
    pub ssl_ca_location: String,
    pub ssl_certificate_location: String,
    pub ssl_key_location: String,
    pub ssl_key_password: String,
    pub ssl_key_password_file: String,
    pub ssl_endpoint_identification: bool,
    pub properties: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub url: String,
    pub max_connections: u32,
    pub password: String,
    pub password_file: String,
    pub sslmode: String,
    pub ssl_root_cert: String,
    pub ssl_client_cert: String,
    pub ssl_client_key: String,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    pub password_file: String,
    pub ca_file: String,
    pub compression: ChCompression,
}

/// How insert bodies travel to ClickHouse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChCompression {
    /// LZ4 blocks (ClickHouse's native compression): fewer bytes on the wire.
    Lz4,
    /// Plain: no compression CPU on either side, for a server on the same host.
    None,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub url: String,
    pub timeout_ms: u64,
    pub username: String,
    pub password: String,
    pub password_file: String,
    pub ca_file: String,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub batch_max_messages: usize,
    pub batch_linger_ms: u64,
    pub buffer_max_bytes: usize,
    pub max_batches_in_flight: usize,
    pub dedup_lookback_hours: i64,
    pub cost_mismatch_tolerance: String,
    pub reference_refresh_ms: u64,
    pub fairness_events_per_sec: u32,
    pub max_retries: usize,
    pub takeover_grace_ms: u64,
    pub prune_interval_ms: u64,
    pub circuit_open_after_failures: u32,
    pub circuit_open_after_ms: u64,
    pub circuit_max_backoff_ms: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub stall_after_ms: u64,
}

/// The whole validated configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub postgres: PostgresConfig,
    pub clickhouse: ClickHouseConfig,
    pub registry: RegistryConfig,
    pub pipeline: PipelineConfig,
    pub server: ServerConfig,
    pub streams: StreamsConfig,
    pub policy: PolicyConfig,
    pub opa: crate::streams::policy::opa::OpaMapping,
    pub audit: AuditConfig,
    pub ingest: IngestConfig,
    pub tracing: crate::telemetry::TracingConfig,
}

/// Which input streams `tally run` consumes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    pub usage: bool,
    pub policy: bool,
    pub audit: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub topic: String,
    pub dlq_topic: String,
    pub partitions: i32,
    pub rules: crate::streams::policy::rules::PolicyRules,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub topic: String,
    pub dlq_topic: String,
    pub partitions: i32,
    pub checkpoint_topic: String,
    pub signing_key: String,
    pub signing_key_file: String,
    pub pseudonym_key: String,
    pub pseudonym_key_file: String,
    pub pseudonym_key_version: u32,
    pub max_user_agent_bytes: usize,
    pub max_details_bytes: usize,
    pub checkpoint_interval_ms: u64,
    pub rules: crate::streams::audit::rules::AuditRules,
}

impl fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditConfig")
            .field("topic", &self.topic)
            .field("checkpoint_topic", &self.checkpoint_topic)
            .field("signing_key", &"***")
            .field("pseudonym_key", &"***")
            .field("pseudonym_key_version", &self.pseudonym_key_version)
            .finish_non_exhaustive()
    }
}

impl AuditConfig {
    /// The checkpoint signer (validated at load when the audit stream is on).
    pub fn signer(&self) -> Result<crate::audit::note::NoteSigner, ConfigError> {
        crate::audit::note::NoteSigner::from_key_string(self.signing_key.trim()).map_err(|e| {
            ConfigError::Invalid {
                key: "audit.signing_key".into(),
                message: format!("{e} (expected PRIVATE+KEY+<name>+<key id>+<base64>; `tally audit keygen NAME` makes one)"),
            }
        })
    }

    /// The pseudonym key (validated at load when the audit stream is on).
    pub fn pseudonym_key(&self) -> Result<crate::audit::pseudonym::PseudonymKey, ConfigError> {
        crate::audit::pseudonym::PseudonymKey::from_base64(
            self.pseudonym_key_version,
            self.pseudonym_key.trim(),
        )
        .map_err(|e| ConfigError::Invalid {
            key: "audit.pseudonym_key".into(),
            message: format!(
                "{e} (base64 of at least 32 random bytes, e.g. `openssl rand -base64 32`)"
            ),
        })
    }

    pub fn limits(&self) -> crate::audit::leaf::FieldLimits {
        crate::audit::leaf::FieldLimits {
            max_user_agent_bytes: self.max_user_agent_bytes,
            max_details_bytes: self.max_details_bytes,
        }
    }
}

impl Config {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut merged: toml::Table = DEFAULTS.parse().map_err(|e| ConfigError::File {
            path: "<embedded defaults>".into(),
            message: format!("{e}"),
        })?;
        let defaults = merged.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let table: toml::Table = text.parse().map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: format!("{e}"),
            })?;
            overlay(&mut merged, &defaults, table, &path.display().to_string())?;
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("TALLY__") else {
                continue;
            };
            let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let [section, key] = parts.as_slice() else {
                return Err(ConfigError::UnknownKey {
                    key: parts.join("."),
                    origin: format!("environment variable {name}; expected TALLY__SECTION__KEY"),
                });
            };
            let mut sec = toml::Table::new();
            sec.insert(
                key.clone(),
                env_value(value, defaults_value(&defaults, section, key)),
            );
            let mut table = toml::Table::new();
            table.insert(section.clone(), toml::Value::Table(sec));
            overlay(
                &mut merged,
                &defaults,
                table,
                &format!("environment variable {name}"),
            )?;
        }
        let mut config = build(merged)?;
        security::resolve_secret_files(&mut config)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        };
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        for (key, topic) in [
            ("kafka.usage_topic", &self.kafka.usage_topic),
            ("kafka.dlq_topic", &self.kafka.dlq_topic),
            ("kafka.violation_topic", &self.kafka.violation_topic),
            ("kafka.group_id", &self.kafka.group_id),
        ] {
            if topic.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.kafka.usage_partitions < 1 || self.kafka.violation_partitions < 1 {
            return Err(invalid(
                "kafka.usage_partitions",
                "partition counts must be >= 1",
            ));
        }
        topics::validate(self.kafka.replication_factor, &self.kafka.topic_config)?;
        if !self.postgres.url.starts_with("postgres://")
            && !self.postgres.url.starts_with("postgresql://")
        {
            return Err(invalid(
                "postgres.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if self.postgres.max_connections < 2 {
            return Err(invalid("postgres.max_connections", "must be >= 2"));
        }
        if !self.clickhouse.url.starts_with("http://")
            && !self.clickhouse.url.starts_with("https://")
        {
            return Err(invalid(
                "clickhouse.url",
                "must start with http:// or https://",
            ));
        }
        security::validate(self)?;
        crate::engine::violation_wire::check(&self.kafka)?;
        if self.pipeline.batch_max_messages == 0 || self.pipeline.batch_max_messages > 1_000_000 {
            return Err(invalid(
                "pipeline.batch_max_messages",
                "must be within 1..=1000000 (one ClickHouse block)",
            ));
        }
        if self.pipeline.max_batches_in_flight == 0 {
            return Err(invalid("pipeline.max_batches_in_flight", "must be >= 1"));
        }
        if self.pipeline.buffer_max_bytes < 1 << 20 {
            return Err(invalid(
                "pipeline.buffer_max_bytes",
                "must be >= 1048576 (1 MiB)",
            ));
        }
        if !(1024..=2_097_151).contains(&self.kafka.fetch_queue_max_kbytes) {
            return Err(invalid(
                "kafka.fetch_queue_max_kbytes",
                "must be within 1024..=2097151 (librdkafka's queued.max.messages.kbytes)",
            ));
        }
        if self.pipeline.dedup_lookback_hours < 1 {
            return Err(invalid("pipeline.dedup_lookback_hours", "must be >= 1"));
        }
        if self.pipeline.prune_interval_ms < 100 {
            return Err(invalid("pipeline.prune_interval_ms", "must be >= 100"));
        }
        if self.pipeline.fairness_events_per_sec == 0 {
            return Err(invalid("pipeline.fairness_events_per_sec", "must be > 0"));
        }
        match Decimal::from_str(&self.pipeline.cost_mismatch_tolerance) {
            Ok(d) if d >= Decimal::ZERO => {}
            _ => {
                return Err(invalid(
                    "pipeline.cost_mismatch_tolerance",
                    "must be a non-negative decimal such as \"0.01\"",
                ))
            }
        }
        if !self.server.listen.is_empty()
            && self.server.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid("server.listen", "must be empty or host:port"));
        }
        for (key, topic) in [
            ("policy.topic", &self.policy.topic),
            ("policy.dlq_topic", &self.policy.dlq_topic),
            ("audit.topic", &self.audit.topic),
            ("audit.dlq_topic", &self.audit.dlq_topic),
            ("audit.checkpoint_topic", &self.audit.checkpoint_topic),
        ] {
            if topic.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.policy.partitions < 1 {
            return Err(invalid("policy.partitions", "must be >= 1"));
        }
        if self.audit.partitions < 1 {
            return Err(invalid("audit.partitions", "must be >= 1"));
        }
        if let Err(m) = self.opa.check() {
            let key = m
                .split(':')
                .next()
                .unwrap_or("opa")
                .split(' ')
                .next()
                .unwrap_or("opa");
            return Err(invalid(key, &m));
        }
        if self.audit.checkpoint_interval_ms < 1000 {
            return Err(invalid("audit.checkpoint_interval_ms", "must be >= 1000"));
        }
        // Keys are checked when set; `require_audit_keys` (tally run) demands them.
        if !self.audit.signing_key.trim().is_empty() {
            self.audit.signer()?;
        }
        if !self.audit.pseudonym_key.trim().is_empty() {
            self.audit.pseudonym_key()?;
        }
        self.ingest.validate()?;
        if !(self.streams.usage || self.streams.policy || self.streams.audit) {
            return Err(invalid(
                "streams",
                "at least one of streams.usage, streams.policy, streams.audit must be on",
            ));
        }
        Ok(())
    }

    /// The consumer group of a stream: `kafka.group_id` for usage,
    /// `<kafka.group_id>.<stream>` for the others (each stream rebalances on its own).
    pub fn group_for(&self, stream: &str) -> String {
        if stream == "usage" {
            self.kafka.group_id.clone()
        } else {
            format!("{}.{stream}", self.kafka.group_id)
        }
    }

    /// The topics and consumer group of a stream (`usage`, `policy`, `audit`).
    pub fn route(&self, stream: &str) -> crate::engine::pipeline::Route {
        let (topic, dlq_topic) = match stream {
            "policy" => (&self.policy.topic, &self.policy.dlq_topic),
            "audit" => (&self.audit.topic, &self.audit.dlq_topic),
            _ => (&self.kafka.usage_topic, &self.kafka.dlq_topic),
        };
        crate::engine::pipeline::Route {
            topic: topic.clone(),
            dlq_topic: dlq_topic.clone(),
            group: self.group_for(stream),
        }
    }

    /// Which stream reads `topic` (None: not an input topic).
    pub fn stream_of_topic(&self, topic: &str) -> Option<&'static str> {
        if topic == self.kafka.usage_topic {
            Some("usage")
        } else if topic == self.policy.topic {
            Some("policy")
        } else if topic == self.audit.topic {
            Some("audit")
        } else {
            None
        }
    }

    /// `tally run` with the audit stream on needs both audit keys.
    pub fn require_audit_keys(&self) -> Result<(), ConfigError> {
        if !self.streams.audit {
            return Ok(());
        }
        for (key, value, how) in [
            (
                "audit.signing_key",
                &self.audit.signing_key,
                "`tally audit keygen NAME` makes one",
            ),
            (
                "audit.pseudonym_key",
                &self.audit.pseudonym_key,
                "`openssl rand -base64 32` makes one",
            ),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!(
                        "must be set while streams.audit is on ({how}; or set streams.audit = false)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The cost mismatch tolerance as an exact decimal (validated at load).
    pub fn cost_mismatch_tolerance(&self) -> Decimal {
        Decimal::from_str(&self.pipeline.cost_mismatch_tolerance).unwrap_or(Decimal::ZERO)
    }
}

fn defaults_value<'a>(
    defaults: &'a toml::Table,
    section: &str,
    key: &str,
) -> Option<&'a toml::Value> {
    defaults.get(section)?.as_table()?.get(key)
}

/// An environment value typed like the default it replaces.
fn env_value(raw: &str, default: Option<&toml::Value>) -> toml::Value {
    match default {
        Some(toml::Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .unwrap_or_else(|_| toml::Value::String(raw.into())),
        Some(toml::Value::Boolean(_)) => raw
            .trim()
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .unwrap_or_else(|_| toml::Value::String(raw.into())),
        // A table (e.g. kafka.topic_config) as a TOML inline table: `{ "retention.ms" = "1000" }`.
        Some(toml::Value::Table(_)) => format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        _ => toml::Value::String(raw.into()),
    }
}

fn overlay(
    merged: &mut toml::Table,
    defaults: &toml::Table,
    layer: toml::Table,
    origin: &str,
) -> Result<(), ConfigError> {
    for (section, value) in layer {
        let Some(default_section) = defaults.get(&section).and_then(|v| v.as_table()) else {
            return Err(ConfigError::UnknownKey {
                key: section,
                origin: origin.into(),
            });
        };
        let toml::Value::Table(entries) = value else {
            return Err(ConfigError::Invalid {
                key: section,
                message: format!("must be a table (from {origin})"),
            });
        };
        for (key, v) in entries {
            if !default_section.contains_key(&key) {
                return Err(ConfigError::UnknownKey {
                    key: format!("{section}.{key}"),
                    origin: origin.into(),
                });
            }
            if let Some(toml::Value::Table(target)) = merged.get_mut(&section) {
                target.insert(key, v);
            }
        }
    }
    Ok(())
}

fn build(merged: toml::Table) -> Result<Config, ConfigError> {
    // Deserialize section by section so a type error names `section.key`.
    fn section<T: serde::de::DeserializeOwned>(
        merged: &toml::Table,
        name: &str,
    ) -> Result<T, ConfigError> {
        let value = merged
            .get(name)
            .cloned()
            .unwrap_or(toml::Value::Table(toml::Table::new()));
        let table = value.as_table().cloned().unwrap_or_default();
        T::deserialize(value).map_err(|e| {
            let message = e.to_string();
            let key = table
                .keys()
                .find(|k| message.contains(k.as_str()))
                .map(|k| format!("{name}.{k}"))
                .unwrap_or_else(|| name.to_string());
            ConfigError::Invalid {
                key,
                message: message.trim().to_string(),
            }
        })
    }
    Ok(Config {
        kafka: section(&merged, "kafka")?,
        postgres: section(&merged, "postgres")?,
        clickhouse: section(&merged, "clickhouse")?,
        registry: section(&merged, "registry")?,
        pipeline: section(&merged, "pipeline")?,
        server: section(&merged, "server")?,
        streams: section(&merged, "streams")?,
        policy: section(&merged, "policy")?,
        opa: section(&merged, "opa")?,
        audit: section(&merged, "audit")?,
        ingest: section(&merged, "ingest")?,
        tracing: section(&merged, "tracing")?,
    })
}

/// Replaces the password of a URL with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((creds, host)) => match creds.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("kafka.brokers", &self.kafka.brokers)
            .field("kafka.group_id", &self.kafka.group_id)
            .field("kafka.usage_topic", &self.kafka.usage_topic)
            .field("kafka.security_protocol", &self.kafka.security_protocol)
            .field("postgres.url", &redact_url(&self.postgres.url))
            .field("clickhouse.url", &self.clickhouse.url)
            .field(
                "clickhouse.password",
                &if self.clickhouse.password.is_empty() {
                    ""
                } else {
                    "***"
                },
            )
            .field("clickhouse.ca_file", &self.clickhouse.ca_file)
            .field("postgres.sslmode", &self.postgres.sslmode)
            .field("registry.url", &self.registry.url)
            .field(
                "pipeline.batch_max_messages",
                &self.pipeline.batch_max_messages,
            )
            .field("pipeline.batch_linger_ms", &self.pipeline.batch_linger_ms)
            .field(
                "pipeline.dedup_lookback_hours",
                &self.pipeline.dedup_lookback_hours,
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test keys of docs/audit-log.md (never use them for anything else).
    const KEYS: [(&str, &str); 2] = [
        (
            "TALLY__AUDIT__SIGNING_KEY",
            "PRIVATE+KEY+tally.example/audit+50f02fb7+AQcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH",
        ),
        (
            "TALLY__AUDIT__PSEUDONYM_KEY",
            "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s=",
        ),
    ];

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        KEYS.iter()
            .chain(pairs.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_audit_stream_needs_its_keys() {
        let c = Config::load_from(None, &[]).unwrap();
        let err = c.require_audit_keys().unwrap_err().to_string();
        assert!(err.contains("audit.signing_key"), "{err}");
        let off = [("TALLY__STREAMS__AUDIT".to_string(), "false".to_string())];
        Config::load_from(None, &off)
            .unwrap()
            .require_audit_keys()
            .unwrap();
        Config::load_from(None, &env(&[]))
            .unwrap()
            .require_audit_keys()
            .unwrap();
        let bad = env(&[("TALLY__AUDIT__PSEUDONYM_KEY", "c2hvcnQ=")]);
        let err = Config::load_from(None, &bad).unwrap_err().to_string();
        assert!(err.contains("audit.pseudonym_key"), "{err}");
    }

    #[test]
    fn stream_rules_load_from_a_file() {
        let dir = std::env::temp_dir().join(format!("tally-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("rules.toml");
        std::fs::write(
            &f,
            "[policy]\nrules = { deny_rate = { threshold = 5, window_secs = 60 } }\n\
             [audit]\nrules = { privileged_action = { actions = [{ action = \"role.*\", severity = \"high\" }] } }\n",
        )
        .unwrap();
        let c = Config::load_from(Some(&f), &env(&[])).unwrap();
        assert_eq!(c.policy.rules.deny_rate.threshold, 5);
        assert!(c.policy.rules.policy_denied.enabled);
        assert_eq!(c.audit.rules.privileged_action.actions.len(), 1);
        std::fs::write(&f, "[policy]\nrules = { deny_rat = {} }\n").unwrap();
        let err = Config::load_from(Some(&f), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.rules"), "{err}");
    }

    #[test]
    fn defaults_load() {
        let c = Config::load_from(None, &env(&[])).unwrap();
        assert_eq!(c.kafka.usage_topic, "llm.usage.v1");
        assert_eq!(c.pipeline.batch_max_messages, 20000);
    }

    #[test]
    fn env_overrides_and_types() {
        let c = Config::load_from(
            None,
            &env(&[
                ("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "123"),
                ("TALLY__KAFKA__GROUP_ID", "g2"),
            ]),
        )
        .unwrap();
        assert_eq!(c.pipeline.batch_max_messages, 123);
        assert_eq!(c.kafka.group_id, "g2");
    }

    #[test]
    fn unknown_env_key_is_named() {
        let err = Config::load_from(None, &env(&[("TALLY__KAFKA__BROKER", "x")])).unwrap_err();
        assert!(err.to_string().contains("kafka.broker"), "{err}");
        let err = Config::load_from(None, &env(&[("TALLY__NOPE__X", "x")])).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = Config::load_from(
            None,
            &env(&[("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "many")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("pipeline.batch_max_messages"),
            "{err}"
        );
        let err = Config::load_from(None, &env(&[("TALLY__PIPELINE__BATCH_MAX_MESSAGES", "0")]))
            .unwrap_err();
        assert!(
            err.to_string().contains("pipeline.batch_max_messages"),
            "{err}"
        );
        for (var, value, key) in [
            (
                "TALLY__PIPELINE__BUFFER_MAX_BYTES",
                "1000",
                "pipeline.buffer_max_bytes",
            ),
            (
                "TALLY__PIPELINE__MAX_BATCHES_IN_FLIGHT",
                "0",
                "pipeline.max_batches_in_flight",
            ),
            (
                "TALLY__KAFKA__FETCH_QUEUE_MAX_KBYTES",
                "10",
                "kafka.fetch_queue_max_kbytes",
            ),
            (
                "TALLY__KAFKA__FETCH_QUEUE_MAX_KBYTES",
                "3000000",
                "kafka.fetch_queue_max_kbytes",
            ),
        ] {
            let err = Config::load_from(None, &env(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{var}={value}: {err}");
        }
        let err =
            Config::load_from(None, &env(&[("TALLY__POSTGRES__URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("postgres.url"), "{err}");
    }

    #[test]
    fn file_layer_and_unknown_file_key() {
        let dir = std::env::temp_dir().join(format!("tally-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[kafka]\ngroup_id = \"from-file\"\n").unwrap();
        let c = Config::load_from(Some(&good), &env(&[])).unwrap();
        assert_eq!(c.kafka.group_id, "from-file");
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[clickhouse]\nuri = \"http://x\"\n").unwrap();
        let err = Config::load_from(Some(&bad), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("clickhouse.uri"), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Config::load_from(
            None,
            &env(&[("TALLY__POSTGRES__URL", "postgres://u:hunter2@h/db")]),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("u:***@h/db"));
    }
}
