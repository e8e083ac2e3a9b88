//! Dead-letter topic writer.
//!
//! Guarantee: at least once on the topic, exactly once in Postgres
//! `dead_letters`. A batch's dead letters are acknowledged by the broker
//! (acks=all) before the batch commits, so a source offset is never committed
//! ahead of its dead letter. A crash between the two can repeat a dead letter on
//! the topic; consumers of the DLQ dedup on the source topic/partition/offset headers.
//! A dead letter carries its message's `traceparent` and `tracestate` (`trace.rs`).

use crate::errors::{classify_kafka, StageError};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

/// A poison message with everything needed to re-drive it.
pub struct Poison<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: Option<&'a rdkafka::message::BorrowedHeaders>,
    /// The poison message's W3C trace context, carried as `traceparent` /
    /// `tracestate` (when `headers` are not copied, which would carry it anyway).
    pub trace: Option<&'a crate::engine::trace::MessageTrace>,
    pub partition: i32,
    pub offset: i64,
    pub class: &'a str,
    pub message: &'a str,
}

pub fn producer(
    kafka: &crate::sinks::kafka_client::KafkaClient,
    extra: &[(&str, &str)],
) -> Result<FutureProducer, StageError> {
    let mut cfg = kafka.config();
    cfg.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5");
    for (k, v) in extra {
        cfg.set(*k, *v);
    }
    cfg.create()
        .map_err(|e| StageError::Fatal(format!("kafka producer: {e}")))
}

/// Sends the batch's poison messages and waits until every one is acknowledged.
pub async fn send_all(
    producer: &FutureProducer,
    dlq_topic: &str,
    source_topic: &str,
    poison: &[Poison<'_>],
) -> Result<(), StageError> {
    let mut pending = Vec::with_capacity(poison.len());
    for p in poison {
        let partition = p.partition.to_string();
        let offset = p.offset.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "tally.error.class",
                value: Some(p.class),
            })
            .insert(Header {
                key: "tally.error.message",
                value: Some(p.message),
            })
            .insert(Header {
                key: "tally.source.topic",
                value: Some(source_topic),
            })
            .insert(Header {
                key: "tally.source.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "tally.source.offset",
                value: Some(&offset),
            });
        if let Some(original) = p.headers {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        } else if let Some(trace) = p.trace {
            for (key, value) in trace.headers() {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq_topic)
            .payload(p.payload)
            .headers(headers);
        if let Some(k) = p.key {
            record = record.key(k);
        }
        let fut = producer
            .send_result(record)
            .map_err(|(e, _)| classify_kafka("dead-letter enqueue", &e))?;
        pending.push(fut);
    }
    for fut in pending {
        match tokio::time::timeout(Duration::from_secs(60), fut).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) => return Err(classify_kafka("dead-letter delivery", &e)),
            Ok(Err(_)) => {
                return Err(StageError::Retryable(
                    "dead-letter delivery cancelled".into(),
                ))
            }
            Err(_) => {
                return Err(StageError::Retryable(
                    "dead-letter delivery timed out".into(),
                ))
            }
        }
    }
    Ok(())
}
