//! `kafka.replication_factor` and `kafka.topic_config`: how `tally migrate`
//! creates topics (docs/operations.md, "Kafka topics").
//!
//! Guarantee: both are checked when the configuration loads, each problem
//! named by its key: the factor is 1..=32767 (Kafka's int16), topic config
//! names look like Kafka's (`retention.ms`), values are strings or integers,
//! and `min.insync.replicas` is at most the replication factor (else no write
//! with acks=all could ever succeed).

use super::ConfigError;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

/// Topic-level settings applied to every topic `tally migrate` creates,
/// e.g. `{ "retention.ms" = "604800000", "min.insync.replicas" = "2" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicConfig(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for TopicConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Text(String),
            Int(i64),
            Bool(bool),
        }
        let raw: BTreeMap<String, Value> = BTreeMap::deserialize(d).map_err(|e| {
            serde::de::Error::custom(format!(
                "topic_config: {e} (expected a table of Kafka topic configs, e.g. {{ \"retention.ms\" = \"604800000\" }})"
            ))
        })?;
        Ok(TopicConfig(
            raw.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Text(s) => s,
                        Value::Int(i) => i.to_string(),
                        Value::Bool(b) => b.to_string(),
                    };
                    (k, v)
                })
                .collect(),
        ))
    }
}

impl TopicConfig {
    /// The entries as `NewTopic::set` takes them.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Checks `kafka.replication_factor` and `kafka.topic_config` together.
pub fn validate(replication_factor: i32, topic_config: &TopicConfig) -> Result<(), ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid { key, message };
    if !(1..=i32::from(i16::MAX)).contains(&replication_factor) {
        return Err(invalid(
            "kafka.replication_factor".into(),
            format!("{replication_factor} must be within 1..=32767 (1 for a single local broker, 3 in production)"),
        ));
    }
    for (name, value) in &topic_config.0 {
        let key = format!("kafka.topic_config.\"{name}\"");
        let well_formed = !name.is_empty()
            && name.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_' || c == '-'
            })
            && !name.starts_with('.')
            && !name.ends_with('.');
        if !well_formed {
            return Err(invalid(
                key,
                "is not a Kafka topic config name (lower case, dotted, e.g. retention.ms)".into(),
            ));
        }
        if value.trim().is_empty() || value.trim() != value {
            return Err(invalid(
                key,
                format!("{value:?}: must be a non-empty value without surrounding spaces"),
            ));
        }
        let integer =
            name.ends_with(".ms") || name.ends_with(".bytes") || name == "min.insync.replicas";
        if integer && value.parse::<i64>().is_err() {
            return Err(invalid(key, format!("{value:?} is not an integer")));
        }
        if name == "min.insync.replicas" {
            let n: i64 = value.parse().unwrap_or(0);
            if n < 1 || n > i64::from(replication_factor) {
                return Err(invalid(
                    key,
                    format!(
                        "{n} must be within 1..=kafka.replication_factor ({replication_factor}): \
                         with more in-sync replicas required than exist, no write with acks=all succeeds"
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tc(pairs: &[(&str, &str)]) -> TopicConfig {
        TopicConfig(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn factor_and_configs_are_checked_with_their_keys() {
        validate(1, &TopicConfig::default()).unwrap();
        validate(
            3,
            &tc(&[("retention.ms", "604800000"), ("min.insync.replicas", "2")]),
        )
        .unwrap();
        let e = validate(0, &TopicConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.replication_factor"), "{e}");
        let e = validate(1, &tc(&[("min.insync.replicas", "2")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kafka.topic_config.\"min.insync.replicas\"")
                && e.contains("replication_factor"),
            "{e}"
        );
        let e = validate(1, &tc(&[("retention.ms", "a week")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("retention.ms") && e.contains("integer"), "{e}");
        let e = validate(1, &tc(&[("Retention MS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Retention MS"), "{e}");
    }
}
