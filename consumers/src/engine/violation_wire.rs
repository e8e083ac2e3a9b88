//! How a violation looks on the violation topic, and how its id is read back.
//!
//! Guarantee: every message the relay publishes carries its violation id both in the
//! payload and in the `tally.violation_id` header (and in `ce_id` in CloudEvents
//! binary mode), and [`violation_id_in`] finds it again in any message tally ever
//! wrote (JSON or Avro single-object, with or without CloudEvents headers). So
//! changing `kafka.violation_encoding` or `kafka.violation_cloudevents` while
//! violations are in flight never makes the relay's reconciliation miss an id and
//! publish it twice.
//!
//! Encodings (`kafka.violation_encoding`): `json` (`tally_schemas::encode_json`,
//! the default) and `avro`: the Avro single-object encoding of the bundled
//! `compliance.violation.v1` schema (`C3 01`, the schema's CRC-64-AVRO fingerprint,
//! then the datum), self-describing without a registry. With
//! `kafka.violation_cloudevents = true` the message is also a CloudEvent in the
//! binary content mode of the CloudEvents Kafka protocol binding: the payload is the
//! event's `data` as is, `content-type` is its media type, and every other attribute
//! is a `ce_`-prefixed header.

use crate::config::{ConfigError, KafkaConfig};
use chrono::SecondsFormat;
use rdkafka::message::{Header, OwnedHeaders};
use serde::Deserialize;
use tally_schemas::{
    encode_json, encode_single_object, ComplianceViolation, Decoder, SINGLE_OBJECT_MAGIC,
};
use uuid::Uuid;

/// `ce_specversion`: the CloudEvents version the headers follow.
pub const CE_SPECVERSION: &str = "1.0";
/// `ce_type` of every violation: the payload's contract.
pub const CE_TYPE: &str = "tally.compliance.violation.v1";
/// `content-type` of a JSON payload.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// `content-type` of an Avro single-object payload (the CloudEvents Kafka binding's
/// example media type for Avro data; the `C3 01` magic and the fingerprint say which
/// schema wrote it).
pub const AVRO_CONTENT_TYPE: &str = "application/avro";
/// The headers tally has always written (docs/violations.md).
pub const ID_HEADER: &str = "tally.violation_id";
pub const RULE_HEADER: &str = "tally.rule";

/// `kafka.violation_encoding`: the payload format of published violations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ViolationEncoding {
    Json,
    Avro,
}

impl TryFrom<String> for ViolationEncoding {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "avro" => Ok(Self::Avro),
            _ => Err(format!(
                "violation_encoding must be \"json\" or \"avro\" (Avro single-object encoding), got {s:?}"
            )),
        }
    }
}

impl ViolationEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Avro => "avro",
        }
    }

    /// The media type of a payload in this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => JSON_CONTENT_TYPE,
            Self::Avro => AVRO_CONTENT_TYPE,
        }
    }
}

/// What the relay writes for one violation: payload and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViolationOutput {
    pub encoding: ViolationEncoding,
    /// CloudEvents binary content mode on top of the encoding.
    pub cloudevents: bool,
    /// `ce_source` (a URI-reference naming this tally deployment).
    pub source: String,
}

impl Default for ViolationOutput {
    /// JSON, no CloudEvents: what tally always published.
    fn default() -> Self {
        Self {
            encoding: ViolationEncoding::Json,
            cloudevents: false,
            source: "/tally".into(),
        }
    }
}

impl ViolationOutput {
    pub fn from_config(k: &KafkaConfig) -> Self {
        Self {
            encoding: k.violation_encoding,
            cloudevents: k.violation_cloudevents,
            source: k.violation_cloudevents_source.trim().to_string(),
        }
    }

    /// The message value of `v`.
    pub fn payload(&self, v: &ComplianceViolation) -> Vec<u8> {
        match self.encoding {
            ViolationEncoding::Json => encode_json(v),
            ViolationEncoding::Avro => encode_single_object(v),
        }
    }

    /// The headers of `v`, in order: the two tally has always written, then (in
    /// CloudEvents mode) `ce_specversion`, `ce_id`, `ce_source`, `ce_type`,
    /// `ce_subject`, `ce_time` and `content-type`.
    pub fn headers(&self, v: &ComplianceViolation) -> Vec<(&'static str, String)> {
        let id = v.violation_id.to_string();
        let mut h = vec![(ID_HEADER, id.clone()), (RULE_HEADER, v.rule.clone())];
        if self.cloudevents {
            h.extend([
                ("ce_specversion", CE_SPECVERSION.to_string()),
                ("ce_id", id),
                ("ce_source", self.source.clone()),
                ("ce_type", CE_TYPE.to_string()),
                ("ce_subject", v.tenant_id.clone()),
                (
                    "ce_time",
                    v.detected_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                ),
                ("content-type", self.encoding.content_type().to_string()),
            ]);
        }
        h
    }

    /// [`Self::headers`] as Kafka headers.
    pub fn kafka_headers(&self, v: &ComplianceViolation) -> OwnedHeaders {
        self.headers(v)
            .into_iter()
            .fold(OwnedHeaders::new(), |hs, (key, value)| {
                hs.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            })
    }
}

/// Checks the `[kafka] violation_*` keys (called by `Config::validate`).
pub fn check(k: &KafkaConfig) -> Result<(), ConfigError> {
    let source = k.violation_cloudevents_source.trim();
    let bad = source.is_empty() || source.chars().any(|c| c.is_control() || c == ' ');
    if k.violation_cloudevents && bad {
        return Err(ConfigError::Invalid {
            key: "kafka.violation_cloudevents_source".into(),
            message: format!(
                "must be a non-empty URI-reference without spaces while kafka.violation_cloudevents is on, got {source:?}"
            ),
        });
    }
    Ok(())
}

/// The violation id of a message found on the violation topic, whatever wrote it:
/// the payload's `violation_id` (JSON, or Avro single-object of any bundled
/// version), else the `tally.violation_id` header, else `ce_id`. `header` looks a
/// header up by name.
pub fn violation_id_in<'a>(
    decoder: &Decoder,
    payload: Option<&[u8]>,
    header: impl Fn(&str) -> Option<&'a [u8]>,
) -> Option<Uuid> {
    let from_payload = payload.and_then(|p| {
        if p.starts_with(&SINGLE_OBJECT_MAGIC) {
            decoder
                .decode::<ComplianceViolation>(p)
                .ok()
                .map(|v| v.violation_id)
        } else {
            let v: serde_json::Value = serde_json::from_slice(p).ok()?;
            Uuid::parse_str(v.get("violation_id")?.as_str()?).ok()
        }
    });
    let from_header = |name: &str| {
        header(name)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| Uuid::parse_str(s.trim()).ok())
    };
    from_payload
        .or_else(|| from_header(ID_HEADER))
        .or_else(|| from_header("ce_id"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_schemas::sample_compliance_violation;

    fn lookup<'a>(h: &'a [(&'static str, String)]) -> impl Fn(&str) -> Option<&'a [u8]> {
        move |name| {
            h.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_bytes())
        }
    }

    #[test]
    fn every_encoding_decodes_back_and_names_its_id() {
        let v = sample_compliance_violation();
        let decoder = Decoder::new();
        for encoding in [ViolationEncoding::Json, ViolationEncoding::Avro] {
            for cloudevents in [false, true] {
                let out = ViolationOutput {
                    encoding,
                    cloudevents,
                    ..Default::default()
                };
                let payload = out.payload(&v);
                let back: ComplianceViolation = decoder.decode(&payload).unwrap();
                assert_eq!(back, v, "{encoding:?}");
                let headers = out.headers(&v);
                assert_eq!(
                    violation_id_in(&decoder, Some(&payload), lookup(&headers)),
                    Some(v.violation_id)
                );
                // Headers alone (a payload this tally cannot read), and the payload alone.
                assert_eq!(
                    violation_id_in(&decoder, Some(b"\xc3\x01garbage"), lookup(&headers)),
                    Some(v.violation_id)
                );
                assert_eq!(
                    violation_id_in(&decoder, Some(&payload), |_| None),
                    Some(v.violation_id)
                );
            }
        }
        assert_eq!(
            ViolationOutput::default().payload(&v),
            encode_json(&v),
            "the default is what tally always published"
        );
        let ce_only = [("ce_id", v.violation_id.to_string())];
        assert_eq!(
            violation_id_in(&decoder, None, lookup(&ce_only)),
            Some(v.violation_id)
        );
        assert_eq!(violation_id_in(&decoder, Some(b"{}"), |_| None), None);
    }

    #[test]
    fn cloudevents_headers_follow_the_kafka_binding() {
        let v = sample_compliance_violation();
        let out = ViolationOutput {
            encoding: ViolationEncoding::Avro,
            cloudevents: true,
            source: "https://tally.example.com/prod".into(),
        };
        let h: std::collections::BTreeMap<&str, String> = out.headers(&v).into_iter().collect();
        let id = v.violation_id.to_string();
        assert_eq!(h["tally.violation_id"], id);
        assert_eq!(h["tally.rule"], v.rule);
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["ce_id"], id);
        assert_eq!(h["ce_source"], "https://tally.example.com/prod");
        assert_eq!(h["ce_type"], CE_TYPE);
        assert_eq!(h["ce_subject"], v.tenant_id);
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339(&h["ce_time"]).unwrap(),
            v.detected_at
        );
        assert_eq!(h["content-type"], "application/avro");
        assert_eq!(h.len(), 9);
        let plain = ViolationOutput::default().headers(&v);
        assert_eq!(plain.len(), 2, "{plain:?}");
    }

    #[test]
    fn config_keys_load_and_bad_values_name_their_key() {
        use crate::config::Config;
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = Config::load_from(None, &[]).unwrap();
        assert_eq!(
            ViolationOutput::from_config(&c.kafka),
            ViolationOutput::default()
        );
        let c = Config::load_from(
            None,
            &env(&[
                ("TALLY__KAFKA__VIOLATION_ENCODING", "avro"),
                ("TALLY__KAFKA__VIOLATION_CLOUDEVENTS", "true"),
                (
                    "TALLY__KAFKA__VIOLATION_CLOUDEVENTS_SOURCE",
                    "urn:x-tally:prod",
                ),
            ]),
        )
        .unwrap();
        let out = ViolationOutput::from_config(&c.kafka);
        assert_eq!(
            (out.encoding, out.cloudevents, out.source.as_str()),
            (ViolationEncoding::Avro, true, "urn:x-tally:prod")
        );
        for (pairs, key) in [
            (
                vec![("TALLY__KAFKA__VIOLATION_ENCODING", "xml")],
                "kafka.violation_encoding",
            ),
            (
                vec![("TALLY__KAFKA__VIOLATION_CLOUDEVENTS", "yes")],
                "kafka.violation_cloudevents",
            ),
            (
                vec![
                    ("TALLY__KAFKA__VIOLATION_CLOUDEVENTS", "true"),
                    ("TALLY__KAFKA__VIOLATION_CLOUDEVENTS_SOURCE", " "),
                ],
                "kafka.violation_cloudevents_source",
            ),
        ] {
            let err = Config::load_from(None, &env(&pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn encoding_names() {
        for (s, e) in [
            ("json", ViolationEncoding::Json),
            ("AVRO", ViolationEncoding::Avro),
        ] {
            assert_eq!(ViolationEncoding::try_from(s.to_string()), Ok(e));
        }
        let err = ViolationEncoding::try_from("protobuf".to_string()).unwrap_err();
        assert!(err.contains("violation_encoding"), "{err}");
    }
}
