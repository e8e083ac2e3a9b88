//! tally event types and their codecs.
//!
//! Four events — [`UsageEvent`] (`llm.usage.v1`), [`PolicyDecision`]
//! (`policy.decision.v1`), [`AuditEvent`] (`audit.event.v1`) and
//! [`ComplianceViolation`] (`compliance.violation.v1`) — in three wire
//! formats: Confluent framing, Avro single-object encoding and JSON.
//!
//! The Avro schemas are bundled from `schemas/avro/<subject>/v<N>.avsc`; the
//! highest version is current. [`Decoder::decode`] accepts any format and
//! any bundled (or registered) writer version, and always validates.
//!
//! ```
//! use tally_schemas::{encode_single_object, sample_usage, Decoder, UsageEvent};
//! let bytes = encode_single_object(&sample_usage());
//! let back: UsageEvent = Decoder::new().decode(&bytes).unwrap();
//! assert_eq!(back, sample_usage());
//! ```

mod avro;
mod bounds;
pub mod compat;
mod decoder;
mod error;
mod event;
mod fast;
mod json;
mod json_schema;
mod registry;
mod types;
mod wire;

pub use avro::AvroRecord;
pub use bounds::{MAX_DEPTH, MAX_EMPTY_ITEMS};
pub use decoder::Decoder;
pub use error::DecodeError;
pub use event::{Event, MAX_ID_LEN, MAX_MS, MAX_TEXT_LEN, MAX_TOKENS};
pub use fast::FastLayout;
pub use json::encode_json;
pub use json_schema::{
    json_schema, json_schema_path, json_schema_subjects, json_schema_text, JSON_SCHEMA_DRAFT,
};
pub use registry::{
    crc64_avro, current_schema_text, parsing_canonical_form, rabin_fingerprint, schema_history,
    SUBJECTS,
};
pub use types::{
    sample_audit_event, sample_compliance_violation, sample_policy_decision, sample_usage,
    ActorType, AuditEvent, ComplianceViolation, Decision, Enforcement, Outcome, PolicyDecision,
    Severity, UsageEvent, UsageStatus,
};
pub use wire::{
    detect, encode_avro_body_with, encode_confluent, encode_confluent_with, encode_single_object,
    encode_single_object_with, WireFormat, CONFLUENT_HEADER_LEN, CONFLUENT_MAGIC,
    SINGLE_OBJECT_HEADER_LEN, SINGLE_OBJECT_MAGIC,
};

/// Re-exported so callers can name schema types without their own dependency.
pub use apache_avro;
