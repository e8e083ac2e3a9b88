//! The Kafka side of a redrive: reading a fixed range of a topic, producing letters back.
//!
//! Guarantee: a [`Reader`] delivers every message of each partition from its start
//! offset up to the end noted before reading (never what arrives meanwhile, so
//! a run is bounded), in offset order per partition, or fails; [`send`] returns
//! each message's (partition, offset) once the broker acknowledged it with
//! acks=all, or the error of each one it did not.

use super::Letter;
use crate::errors::StageError;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::sinks::kafka_client::KafkaClient;

fn client(brokers: &KafkaClient) -> rdkafka::ClientConfig {
    let mut c = brokers.config();
    c.set(
        "group.id",
        format!("tally-dlq-redrive-{}", std::process::id()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.partition.eof", "true")
    .set("auto.offset.reset", "earliest")
    .set("receive.message.max.bytes", "2147483647");
    c
}

/// (low, high) watermarks of every partition of `topic`.
pub async fn watermarks(
    brokers: &KafkaClient,
    topic: &str,
) -> Result<BTreeMap<i32, (i64, i64)>, StageError> {
    let consumer: BaseConsumer = client(brokers)
        .create()
        .map_err(|e| StageError::Fatal(format!("kafka client: {e}")))?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| StageError::Retryable(format!("kafka metadata of {topic}: {e}")))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| {
                StageError::Fatal(format!(
                    "topic {topic} does not exist (run `tally migrate`)"
                ))
            })?;
        let mut out = BTreeMap::new();
        for p in t.partitions().iter().map(|p| p.id()) {
            let w = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .map_err(|e| StageError::Retryable(format!("watermarks of {topic}/{p}: {e}")))?;
            out.insert(p, w);
        }
        Ok(out)
    })
    .await
    .map_err(|e| StageError::Fatal(format!("reading watermarks: {e}")))?
}

/// Reads every message of `topic` in fixed ranges (partition -> [start, end)).
pub struct Reader {
    topic: String,
    consumer: Option<StreamConsumer>,
    todo: BTreeMap<i32, (i64, i64)>,
}

impl Reader {
    pub fn new(
        brokers: &KafkaClient,
        topic: &str,
        ranges: &BTreeMap<i32, (i64, i64)>,
    ) -> Result<Self, StageError> {
        let todo: BTreeMap<i32, (i64, i64)> = ranges
            .iter()
            .filter(|(_, (s, e))| s < e)
            .map(|(p, r)| (*p, *r))
            .collect();
        if todo.is_empty() {
            return Ok(Self {
                topic: topic.into(),
                consumer: None,
                todo,
            });
        }
        let consumer: StreamConsumer = client(brokers)
            .create()
            .map_err(|e| StageError::Fatal(format!("kafka client: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        for (p, (start, _)) in &todo {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*start))
                .map_err(|e| StageError::Fatal(format!("assign {topic}/{p}: {e}")))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| StageError::Fatal(format!("assign {topic}: {e}")))?;
        Ok(Self {
            topic: topic.into(),
            consumer: Some(consumer),
            todo,
        })
    }

    /// The next message (None: every range read).
    pub async fn next(&mut self) -> Result<Option<Letter>, StageError> {
        let Some(consumer) = &self.consumer else {
            return Ok(None);
        };
        let quiet = Duration::from_secs(30);
        let topic = &self.topic;
        while !self.todo.is_empty() {
            let m = match tokio::time::timeout(quiet, consumer.recv()).await {
                Err(_) => {
                    return Err(StageError::Retryable(format!(
                        "reading {topic}: nothing for {} s with partitions {:?} unfinished",
                        quiet.as_secs(),
                        self.todo.keys().collect::<Vec<_>>()
                    )))
                }
                Ok(Err(KafkaError::PartitionEOF(p))) => {
                    self.todo.remove(&p);
                    continue;
                }
                Ok(Err(e)) => return Err(StageError::Retryable(format!("reading {topic}: {e}"))),
                Ok(Ok(m)) => m,
            };
            let p = m.partition();
            let Some(&(_, end)) = self.todo.get(&p) else {
                continue;
            };
            if m.offset() >= end {
                self.todo.remove(&p);
                continue;
            }
            if m.offset() + 1 >= end {
                self.todo.remove(&p);
            }
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default();
            return Ok(Some(Letter {
                partition: p,
                offset: m.offset(),
                timestamp: m
                    .timestamp()
                    .to_millis()
                    .and_then(DateTime::<Utc>::from_timestamp_millis),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
            }));
        }
        Ok(None)
    }
}

/// One message to produce.
pub struct Outgoing<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Vec<(String, Vec<u8>)>,
}

pub fn producer(brokers: &KafkaClient, timeout: Duration) -> Result<FutureProducer, StageError> {
    let ms = timeout.as_millis().to_string();
    crate::engine::dlq::producer(brokers, &[("message.timeout.ms", ms.as_str())])
}

/// Produces `msgs` to `topic` and waits for every acknowledgement: per message,
/// its (partition, offset) or why it was not acknowledged.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    msgs: &[Outgoing<'_>],
) -> Vec<Result<(i32, i64), String>> {
    let mut pending = Vec::with_capacity(msgs.len());
    for m in msgs {
        let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
        for (k, v) in &m.headers {
            headers = headers.insert(Header {
                key: k.as_str(),
                value: Some(v.as_slice()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = m.key {
            record = record.key(k);
        }
        if let Some(p) = m.payload {
            record = record.payload(p);
        }
        pending.push(producer.send(record, Duration::from_secs(5)));
    }
    futures::future::join_all(pending)
        .await
        .into_iter()
        .map(|r| {
            r.map(|d| (d.partition, d.offset))
                .map_err(|(e, _)| e.to_string())
        })
        .collect()
}
