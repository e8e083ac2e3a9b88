//! Forwarding an upload's events to the policy topic.
//!
//! Guarantee: [`Forwarder::forward`] returns `Ok` only once the broker has
//! acknowledged every event of the upload (acks=all, idempotent producer), each
//! as one message holding the event's original bytes, keyed by its tenant (no
//! key when it has none). On any error some events may be on the topic already:
//! the caller answers 5xx, OPA re-sends the whole upload, and the pipeline drops
//! the re-sent copies as duplicates of (tenant, decision_id).

use super::body::Event;
use crate::errors::StageError;
use crate::sinks::kafka_client::KafkaClient;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Why an upload was not (entirely) acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Retryable: the broker did not acknowledge every event in time (503).
    #[error("Kafka acknowledged {acked} of {total} events: {error}; retry the upload")]
    Unavailable {
        acked: usize,
        total: usize,
        error: String,
    },
    /// Event `index` can never be produced: larger than the producer's limit (413).
    #[error("event {index} ({bytes} bytes) is larger than a Kafka message may be: {error}")]
    EventTooLarge {
        index: usize,
        bytes: usize,
        error: String,
    },
}

pub struct Forwarder {
    brokers: KafkaClient,
    topic: String,
    timeout: Duration,
    producer: RwLock<Arc<FutureProducer>>,
}

fn make_producer(brokers: &KafkaClient, timeout: Duration) -> Result<FutureProducer, StageError> {
    let ms = timeout.as_millis().to_string();
    crate::engine::dlq::producer(brokers, &[("message.timeout.ms", ms.as_str())])
}

impl Forwarder {
    /// A forwarder to `topic`; each upload must be acknowledged within `timeout`.
    pub fn new(brokers: &KafkaClient, topic: &str, timeout: Duration) -> Result<Self, StageError> {
        Ok(Self {
            brokers: brokers.clone(),
            topic: topic.to_string(),
            timeout,
            producer: RwLock::new(Arc::new(make_producer(brokers, timeout)?)),
        })
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// An idempotent producer that hit a fatal error (e.g. a sequence gap the
    /// broker reports) refuses everything after; replace it so later uploads work.
    fn renew_if_fatal(&self, p: &FutureProducer) {
        if let Some((code, reason)) = p.client().fatal_error() {
            tracing::warn!(?code, %reason, "kafka producer failed fatally; creating a new one");
            match make_producer(&self.brokers, self.timeout) {
                Ok(fresh) => {
                    *self.producer.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh)
                }
                Err(e) => tracing::error!(error = %e, "cannot create a kafka producer"),
            }
        }
    }

    /// Produces every event (bytes `body[e.bytes]`) and waits for all acknowledgements.
    pub async fn forward(&self, body: &[u8], events: &[Event]) -> Result<(), ForwardError> {
        let producer = self.producer();
        let r = self.forward_with(&producer, body, events).await;
        if r.is_err() {
            self.renew_if_fatal(&producer);
        }
        r
    }

    async fn forward_with(
        &self,
        producer: &FutureProducer,
        body: &[u8],
        events: &[Event],
    ) -> Result<(), ForwardError> {
        let deadline = Instant::now() + self.timeout;
        let unavailable = |acked, error: String| ForwardError::Unavailable {
            acked,
            total: events.len(),
            error,
        };
        let mut pending = Vec::with_capacity(events.len());
        for (index, e) in events.iter().enumerate() {
            let payload = &body[e.bytes.clone()];
            loop {
                let mut record: FutureRecord<'_, str, [u8]> =
                    FutureRecord::to(&self.topic).payload(payload);
                if let Some(k) = &e.key {
                    record = record.key(k.as_str());
                }
                match producer.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((err, _)) => {
                        return Err(classify(index, payload.len(), &err, events.len()))
                    }
                }
            }
        }
        let mut acked = 0;
        let mut first_error = None;
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let all = futures::future::join_all(pending);
        let results = match tokio::time::timeout(wait, all).await {
            Ok(r) => r,
            Err(_) => {
                return Err(unavailable(
                    0,
                    "timed out waiting for acknowledgements".into(),
                ))
            }
        };
        for (index, r) in results.into_iter().enumerate() {
            match r {
                Ok(Ok(_)) => acked += 1,
                Ok(Err((err, _))) => {
                    let len = events[index].bytes.len();
                    first_error.get_or_insert_with(|| classify(index, len, &err, events.len()));
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| unavailable(0, "delivery cancelled".into()));
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(ForwardError::Unavailable { error, .. }) => Err(unavailable(acked, error)),
            Some(e) => Err(e),
        }
    }
}

/// An error of event `index` (`bytes` long) of an upload of `total` events.
fn classify(index: usize, bytes: usize, err: &KafkaError, total: usize) -> ForwardError {
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            ForwardError::EventTooLarge {
                index,
                bytes,
                error: err.to_string(),
            }
        }
        _ => ForwardError::Unavailable {
            acked: 0,
            total,
            error: err.to_string(),
        },
    }
}
