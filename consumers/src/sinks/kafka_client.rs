//! The Kafka connection settings every consumer, producer and admin client
//! tally makes starts from: brokers, TLS, SASL and pass-through properties.
//!
//! Guarantee: one builder, so no client can connect with weaker security than
//! the configuration asks for; its `Debug` never shows a secret.

use crate::config::KafkaConfig;
use rdkafka::ClientConfig;
use std::fmt;

/// Connection settings shared by every Kafka client (cheap to clone).
#[derive(Clone)]
pub struct KafkaClient {
    base: ClientConfig,
    brokers: String,
    protocol: String,
}

impl KafkaClient {
    /// From the validated `[kafka]` section.
    pub fn new(k: &KafkaConfig) -> Self {
        let protocol = k.security_protocol.to_ascii_lowercase();
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &k.brokers)
            .set("security.protocol", &protocol);
        if protocol.starts_with("sasl_") {
            c.set("sasl.mechanism", &k.sasl_mechanism)
                .set("sasl.username", &k.sasl_username)
                .set("sasl.password", &k.sasl_password);
        }
        if protocol.ends_with("ssl") {
            for (name, value) in [
                ("ssl.ca.location", &k.ssl_ca_location),
                ("ssl.certificate.location", &k.ssl_certificate_location),
                ("ssl.key.location", &k.ssl_key_location),
                ("ssl.key.password", &k.ssl_key_password),
            ] {
                if !value.is_empty() {
                    c.set(name, value);
                }
            }
            c.set(
                "ssl.endpoint.identification.algorithm",
                if k.ssl_endpoint_identification {
                    "https"
                } else {
                    "none"
                },
            );
        }
        for (name, value) in &k.properties {
            c.set(name, value);
        }
        Self {
            base: c,
            brokers: k.brokers.clone(),
            protocol,
        }
    }

    /// Plain text to `brokers` (tests and local tools).
    pub fn plaintext(brokers: &str) -> Self {
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", brokers);
        Self {
            base,
            brokers: brokers.to_string(),
            protocol: "plaintext".into(),
        }
    }

    /// A fresh copy of the settings, for one client to add its role's own.
    pub fn config(&self) -> ClientConfig {
        self.base.clone()
    }

    pub fn brokers(&self) -> &str {
        &self.brokers
    }
}

impl fmt::Debug for KafkaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaClient")
            .field("brokers", &self.brokers)
            .field("security.protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(pairs: &[(&str, &str)]) -> Config {
        let env: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("TALLY__STREAMS__AUDIT".to_string(), "false".to_string())])
            .collect();
        Config::load_from(None, &env).unwrap()
    }

    #[test]
    fn every_security_setting_reaches_the_client_and_debug_hides_secrets() {
        let cfg = load(&[
            ("TALLY__KAFKA__BROKERS", "b1:9093,b2:9093"),
            ("TALLY__KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
            ("TALLY__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("TALLY__KAFKA__SASL_USERNAME", "tally"),
            ("TALLY__KAFKA__SASL_PASSWORD", "hunter2-secret"),
            ("TALLY__KAFKA__SSL_CA_LOCATION", "/etc/hostname"),
        ]);
        let k = KafkaClient::new(&cfg.kafka);
        let c = k.config();
        assert_eq!(c.get("bootstrap.servers"), Some("b1:9093,b2:9093"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("tally"));
        assert_eq!(c.get("sasl.password"), Some("hunter2-secret"));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/hostname"));
        assert_eq!(
            c.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        assert!(!format!("{k:?}").contains("hunter2"));
    }

    #[test]
    fn plaintext_sets_no_sasl_or_tls_property() {
        let c = KafkaClient::new(&load(&[]).kafka).config();
        assert_eq!(c.get("security.protocol"), Some("plaintext"));
        assert_eq!(c.get("sasl.mechanism"), None);
        assert_eq!(c.get("ssl.endpoint.identification.algorithm"), None);
    }
}
