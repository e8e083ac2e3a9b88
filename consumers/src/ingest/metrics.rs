//! `tally ingest`'s own Prometheus recorder (the `metrics` facade, rendered by
//! the ingest listener's `/metrics`).
//!
//! Guarantee: every series is named `tally_ingest_*` with bounded labels
//! (`outcome`, `reason`: fixed lists registered at zero, so rates work from the
//! first request); `tally_ingest_events_total` counts only events Kafka
//! acknowledged, so it never runs ahead of the topic.

use super::body::BodyError;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use std::collections::BTreeMap;

pub const REQUESTS: &str = "tally_ingest_requests_total";
pub const REJECTED: &str = "tally_ingest_rejected_total";
pub const EVENTS: &str = "tally_ingest_events_total";
pub const EVENTS_UNKEYED: &str = "tally_ingest_events_unkeyed_total";
pub const BODY_BYTES: &str = "tally_ingest_body_bytes_total";
pub const DECOMPRESSED_BYTES: &str = "tally_ingest_decompressed_bytes_total";
pub const UPLOAD_DURATION: &str = "tally_ingest_upload_duration_seconds";
pub const IN_FLIGHT: &str = "tally_ingest_uploads_in_flight";

/// What became of a request: the `outcome` label of [`REQUESTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Accepted,
    BadRequest,
    TooLarge,
    Unauthorized,
    UnsupportedEncoding,
    Timeout,
    Busy,
    KafkaUnavailable,
    NotFound,
    MethodNotAllowed,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Accepted,
        Outcome::BadRequest,
        Outcome::TooLarge,
        Outcome::Unauthorized,
        Outcome::UnsupportedEncoding,
        Outcome::Timeout,
        Outcome::Busy,
        Outcome::KafkaUnavailable,
        Outcome::NotFound,
        Outcome::MethodNotAllowed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::Unauthorized => "unauthorized",
            Outcome::UnsupportedEncoding => "unsupported_encoding",
            Outcome::Timeout => "timeout",
            Outcome::Busy => "busy",
            Outcome::KafkaUnavailable => "kafka_unavailable",
            Outcome::NotFound => "not_found",
            Outcome::MethodNotAllowed => "method_not_allowed",
        }
    }
}

static META: Metadata<'static> = Metadata::new("tally", Level::INFO, Some(module_path!()));

/// Upper bounds of the upload duration buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct IngestMetrics {
    recorder: PrometheusRecorder,
    requests: BTreeMap<Outcome, Counter>,
    rejected: BTreeMap<&'static str, Counter>,
    pub events: Counter,
    pub events_unkeyed: Counter,
    pub body_bytes: Counter,
    pub decompressed_bytes: Counter,
    pub upload_duration: Histogram,
    pub in_flight: Gauge,
}

fn key(name: &'static str, label: Option<(&'static str, &'static str)>) -> Key {
    let labels: Vec<Label> = label.map(|(k, v)| Label::new(k, v)).into_iter().collect();
    Key::from_parts(name, labels)
}

impl Default for IngestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IngestMetrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(UPLOAD_DURATION.into()), &BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        let describe = [
            (REQUESTS, "Upload API requests, by outcome."),
            (REJECTED, "Upload bodies refused (400/413), by reason."),
            (EVENTS, "Events forwarded and acknowledged by Kafka (acks=all)."),
            (EVENTS_UNKEYED, "Events forwarded without a tenant key (no readable tenant; the pipeline dead-letters them)."),
            (BODY_BYTES, "Request body bytes received, as sent (compressed)."),
            (DECOMPRESSED_BYTES, "Request body bytes after decompression."),
        ];
        for (name, help) in describe {
            recorder.describe_counter(KeyName::from_const_str(name), None, help.into());
        }
        recorder.describe_histogram(
            KeyName::from_const_str(UPLOAD_DURATION),
            None,
            "Time from an accepted upload's request to its last acknowledgement.".into(),
        );
        recorder.describe_gauge(
            KeyName::from_const_str(IN_FLIGHT),
            None,
            "Uploads being processed now.".into(),
        );
        let counter = |name, label| recorder.register_counter(&key(name, label), &META);
        let requests = Outcome::ALL
            .into_iter()
            .map(|o| (o, counter(REQUESTS, Some(("outcome", o.name())))))
            .collect();
        let rejected = BodyError::REASONS
            .into_iter()
            .map(|r| (r, counter(REJECTED, Some(("reason", r)))))
            .collect();
        Self {
            requests,
            rejected,
            events: counter(EVENTS, None),
            events_unkeyed: counter(EVENTS_UNKEYED, None),
            body_bytes: counter(BODY_BYTES, None),
            decompressed_bytes: counter(DECOMPRESSED_BYTES, None),
            upload_duration: recorder.register_histogram(&key(UPLOAD_DURATION, None), &META),
            in_flight: recorder.register_gauge(&key(IN_FLIGHT, None), &META),
            recorder,
        }
    }

    pub fn request(&self, o: Outcome) {
        if let Some(c) = self.requests.get(&o) {
            c.increment(1);
        }
    }

    pub fn rejected(&self, e: &BodyError) {
        if let Some(c) = self.rejected.get(e.reason()) {
            c.increment(1);
        }
    }

    /// The Prometheus text exposition (histogram samples drained first).
    pub fn render(&self) -> String {
        let handle = self.recorder.handle();
        handle.run_upkeep();
        handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_registered_at_zero_and_named() {
        let m = IngestMetrics::new();
        m.request(Outcome::Accepted);
        m.rejected(&BodyError::Empty);
        m.events.increment(3);
        m.upload_duration.record(0.2);
        let text = m.render();
        assert!(
            text.contains("tally_ingest_requests_total{outcome=\"accepted\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tally_ingest_requests_total{outcome=\"busy\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tally_ingest_rejected_total{reason=\"bad_gzip\"} 0"),
            "{text}"
        );
        assert!(text.contains("tally_ingest_events_total 3"), "{text}");
        assert!(
            text.contains("# HELP tally_ingest_upload_duration_seconds"),
            "{text}"
        );
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            assert!(line.starts_with("tally_ingest_"), "{line}");
        }
    }
}
