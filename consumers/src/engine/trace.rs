//! Trace context of a batch: its span and stage spans (exported only when
//! `tracing.otlp_endpoint` is set, see `telemetry.rs`), links from the batch
//! to the producers' traces, and the W3C trace context (`traceparent`,
//! `tracestate`) a message carries on to the dead letter and the violations it causes.
//!
//! Guarantee: tracing never changes what a batch decides or counts. A missing
//! or malformed `traceparent` is ignored (never poison); a message's trace
//! context is parsed and formatted by OpenTelemetry's `TraceContextPropagator`,
//! and only copied into headers and outbox rows, never read by a decision.

use crate::errors::StageError;
use crate::fasthash::Map;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::{Headers, OwnedHeaders, OwnedMessage};
use rdkafka::Message;
use std::collections::HashMap;
use tally_schemas::{AuditEvent, ComplianceViolation, PolicyDecision, UsageEvent};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// The `tracing` target of the spans meant for export: only the OpenTelemetry
/// layer sees them (the log never shows them).
pub const TARGET: &str = "tally::otel";

/// At most this many distinct producer trace contexts are linked from one
/// batch span (the SDK's default link limit per span).
pub const MAX_LINKS: usize = 128;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A message's W3C trace context, as the propagator formats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTrace {
    pub traceparent: String,
    /// None when the message had none (or an empty one).
    pub tracestate: Option<String>,
}

/// Kafka headers as the propagator reads them (names compared without case).
struct KafkaHeaders<'a>(&'a OwnedHeaders);

impl Extractor for KafkaHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

/// The producer's span context from `m`'s `traceparent` (and `tracestate`);
/// None when absent or invalid.
pub fn span_context(m: &OwnedMessage) -> Option<SpanContext> {
    let headers = m.headers()?;
    // Extracted onto an empty context: a failed parse must not fall back to
    // whatever span is current (the batch's own).
    let cx =
        TraceContextPropagator::new().extract_with_context(&Context::new(), &KafkaHeaders(headers));
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_remote()).then_some(sc)
}

impl MessageTrace {
    /// `m`'s trace context, validated and formatted again by the propagator.
    pub fn of(m: &OwnedMessage) -> Option<Self> {
        span_context(m).map(Self::from_span_context)
    }

    fn from_span_context(sc: SpanContext) -> Self {
        let mut carrier: HashMap<String, String> = HashMap::new();
        TraceContextPropagator::new()
            .inject_context(&Context::new().with_remote_span_context(sc), &mut carrier);
        Self {
            traceparent: carrier.remove(TRACEPARENT).unwrap_or_default(),
            tracestate: carrier.remove(TRACESTATE).filter(|s| !s.is_empty()),
        }
    }

    /// The headers to put on an outgoing message: (name, value).
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        std::iter::once((TRACEPARENT, self.traceparent.as_str()))
            .chain(self.tracestate.as_deref().map(|s| (TRACESTATE, s)))
    }
}

/// The span of one batch. Links to the distinct trace contexts its messages
/// carry (the first [`MAX_LINKS`]) are added only when the span is recorded.
pub fn batch_span(b: &BatchInfo<'_>, msgs: &[OwnedMessage]) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "batch",
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = b.topic,
        messaging.destination.partition.id = b.partition,
        messaging.consumer.group.name = b.group,
        messaging.batch.message_count = count(msgs.len()),
        tally.stream = b.stream,
        tally.first_offset = b.first,
        tally.last_offset = b.last,
        tally.replay = b.replay,
        tally.batch_id = Empty,
        tally.events = Empty,
        tally.duplicates = Empty,
        tally.dead_letters = Empty,
        tally.violations = Empty,
        tally.outcome = Empty,
    );
    if !span.is_disabled() {
        let mut seen = std::collections::HashSet::new();
        for sc in msgs.iter().filter_map(span_context) {
            if seen.len() >= MAX_LINKS {
                break;
            }
            if seen.insert((sc.trace_id(), sc.span_id())) {
                span.add_link(sc);
            }
        }
    }
    span
}

/// A count as a span attribute (an OTLP integer: `usize` would be a string).
pub fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What the batch span says about its batch.
pub struct BatchInfo<'a> {
    pub stream: &'static str,
    pub topic: &'a str,
    pub group: &'a str,
    pub partition: i32,
    pub first: i64,
    pub last: i64,
    pub replay: bool,
}

/// A stage's span (a child of the current span): `decode`, `screen`,
/// `claim`, `prepare`, `clickhouse`, `commit`, or `dlq` (inside `screen` or `claim`).
pub fn stage(name: &'static str) -> Span {
    tracing::info_span!(target: TARGET, "stage", otel.name = name, tally.stage = name)
}

/// Records the batch's outcome on its span.
pub fn finish<T>(span: &Span, r: &Result<T, StageError>) {
    match r {
        Ok(_) => {
            span.record("tally.outcome", "committed");
        }
        Err(StageError::LostOwnership(_)) => {
            span.record("tally.outcome", "lost_ownership");
        }
        Err(e) => {
            span.record("tally.outcome", "failed");
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", e.to_string());
        }
    }
}

/// Which event a violation names as its evidence (`evidence_event_ids`):
/// the tenant and the event id.
pub trait Evidence {
    fn evidence(&self) -> (&str, Uuid);
}

impl Evidence for UsageEvent {
    fn evidence(&self) -> (&str, Uuid) {
        (&self.tenant_id, self.event_id)
    }
}

impl Evidence for PolicyDecision {
    fn evidence(&self) -> (&str, Uuid) {
        (&self.tenant_id, self.event_id)
    }
}

impl Evidence for AuditEvent {
    fn evidence(&self) -> (&str, Uuid) {
        (&self.tenant_id, self.event_id)
    }
}

/// Which messages of a batch carry a trace context, by the (tenant, event
/// id) of their owned event: a violation naming that event as its evidence
/// carries it. Noting is a header scan; the context is parsed only for a
/// violation that needs it.
#[derive(Debug)]
pub struct Carry<'a> {
    msgs: &'a [OwnedMessage],
    by_event: Map<(String, Uuid), usize>,
}

impl<'a> Carry<'a> {
    pub fn new(msgs: &'a [OwnedMessage]) -> Self {
        Self {
            msgs,
            by_event: Map::default(),
        }
    }

    /// Notes `event`, decoded from `msgs[msg]`, if that message has a
    /// `traceparent` header (the first occurrence of an id wins).
    pub fn note(&mut self, event: &impl Evidence, msg: usize) {
        let traced = self
            .msgs
            .get(msg)
            .and_then(|m| m.headers())
            .is_some_and(|h| h.iter().any(|x| x.key.eq_ignore_ascii_case(TRACEPARENT)));
        if traced {
            let (tenant, id) = event.evidence();
            self.by_event.entry((tenant.to_string(), id)).or_insert(msg);
        }
    }

    /// The trace context of the event `v` names first as its evidence.
    pub fn for_violation(&self, v: &ComplianceViolation) -> Option<MessageTrace> {
        if self.by_event.is_empty() {
            return None;
        }
        let id = Uuid::parse_str(v.evidence_event_ids.first()?).ok()?;
        let msg = self.by_event.get(&(v.tenant_id.clone(), id))?;
        MessageTrace::of(self.msgs.get(*msg)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, Timestamp};

    fn message(headers: &[(&str, &str)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            7,
            (!headers.is_empty()).then_some(h),
        )
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_carried_as_sent() {
        let t = MessageTrace::of(&message(&[(TRACEPARENT, TP), (TRACESTATE, "vendor=x")]))
            .expect("valid");
        assert_eq!(t.traceparent, TP);
        assert_eq!(t.tracestate.as_deref(), Some("vendor=x"));
        let t = MessageTrace::of(&message(&[("TraceParent", TP)])).expect("any case");
        assert_eq!(t.tracestate, None);
        assert_eq!(t.headers().count(), 1);
    }

    #[test]
    fn a_bad_or_missing_traceparent_is_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(
                MessageTrace::of(&message(&[(TRACEPARENT, bad)])),
                None,
                "{bad}"
            );
        }
        assert_eq!(MessageTrace::of(&message(&[])), None);
        assert_eq!(MessageTrace::of(&message(&[("other", "x")])), None);
    }

    #[test]
    fn a_violation_finds_its_evidence() {
        let mut e = tally_schemas::sample_usage();
        let msgs = [message(&[]), message(&[(TRACEPARENT, TP)])];
        let t = MessageTrace::of(&msgs[1]).expect("valid");
        let mut untraced = Carry::new(&msgs);
        untraced.note(&e, 0);
        let mut carry = Carry::new(&msgs);
        carry.note(&e, 1);
        let v = ComplianceViolation {
            violation_id: Uuid::nil(),
            rule: "budget_threshold".into(),
            severity: tally_schemas::Severity::Medium,
            tenant_id: e.tenant_id.clone(),
            subject_type: "budget".into(),
            subject_id: "b".into(),
            window_start: e.occurred_at,
            window_end: e.occurred_at,
            observed: rust_decimal::Decimal::ONE,
            threshold: rust_decimal::Decimal::ONE,
            evidence_event_ids: vec![e.event_id.to_string()],
            detected_at: e.occurred_at,
            message: String::new(),
        };
        assert_eq!(carry.for_violation(&v), Some(t));
        assert_eq!(untraced.for_violation(&v), None);
        e.tenant_id = "other".into();
        let other = ComplianceViolation {
            tenant_id: e.tenant_id.clone(),
            ..v.clone()
        };
        assert_eq!(carry.for_violation(&other), None, "ids are per tenant");
    }
}
