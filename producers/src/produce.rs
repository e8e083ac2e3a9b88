//! Sends generated messages to Kafka with an idempotent, `acks=all`
//! producer, keeping many deliveries in flight and failing on the first
//! delivery error.

use crate::common::Outgoing;
use crate::gen::GenKind;
use anyhow::{anyhow, bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Deliveries awaited before more messages are enqueued.
const MAX_IN_FLIGHT: usize = 10_000;
/// Messages between rate-limit checks.
const RATE_BATCH: u64 = 1_000;
/// Interval between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What [`produce`] sent (all of it acknowledged by the brokers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProduceReport {
    pub sent: u64,
    pub good: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub elapsed: Duration,
}

/// Plain-text connection settings to `brokers` (tally's own commands pass
/// theirs, with TLS and SASL, from `tally::sinks::kafka_client`).
pub fn connection(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// The producer configuration `produce` uses: `connection` plus its own settings.
pub fn producer_config(connection: &ClientConfig) -> ClientConfig {
    let mut c = connection.clone();
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .set("message.timeout.ms", "120000");
    // Uncompressed unless the connection asks for a codec (e.g. zstd, as
    // upstream producers often do).
    if c.get("compression.type").is_none() {
        c.set("compression.type", "none");
    }
    c
}

/// Awaits one delivery; any failure is an error.
async fn settle(fut: DeliveryFuture) -> anyhow::Result<()> {
    match fut.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _msg))) => Err(anyhow!(e).context("kafka delivery failed")),
        Err(_) => bail!("kafka delivery future cancelled (producer dropped)"),
    }
}

/// Produces every message of `msgs` to `topic`, keyed as generated, and
/// waits until all of them are acknowledged. Messages of one key keep their
/// order (idempotent producer: retries never reorder a partition).
///
/// With `rate_per_sec`, sending is paced (checked every 1000 messages).
/// With `progress`, a line `gen: sent N/M (X msg/s)` goes to stderr about
/// every 2 s (M is the iterator's upper size hint, `?` if unknown).
pub async fn produce<M: Outgoing, I: Iterator<Item = M>>(
    connection: &ClientConfig,
    topic: &str,
    msgs: I,
    rate_per_sec: Option<u64>,
    progress: bool,
) -> anyhow::Result<ProduceReport> {
    let brokers = connection
        .get("bootstrap.servers")
        .unwrap_or("?")
        .to_string();
    let producer: FutureProducer = producer_config(connection)
        .create()
        .with_context(|| format!("creating kafka producer for {brokers}"))?;
    let total = msgs
        .size_hint()
        .1
        .map_or_else(|| "?".to_string(), |n| n.to_string());
    let started = Instant::now();
    let mut last_progress = started;
    let mut report = ProduceReport::default();
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::new();
    let rate = rate_per_sec.filter(|r| *r > 0);

    for msg in msgs {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(msg.payload());
        if let Some(key) = msg.key() {
            record = record.key(key);
        }
        loop {
            match producer.send_result(record) {
                Ok(fut) => {
                    in_flight.push_back(fut);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                    record = rec;
                    // Make room: settle the oldest delivery, or let librdkafka drain.
                    match in_flight.pop_front() {
                        Some(fut) => settle(fut).await?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => return Err(anyhow!(e).context("enqueueing kafka message")),
            }
        }
        while in_flight.len() > MAX_IN_FLIGHT {
            if let Some(fut) = in_flight.pop_front() {
                settle(fut).await?;
            }
        }

        report.sent += 1;
        match msg.kind() {
            GenKind::Good => report.good += 1,
            GenKind::Duplicate => report.duplicates += 1,
            GenKind::Malformed { .. } => report.malformed += 1,
        }

        if let Some(rate) = rate {
            if report.sent.is_multiple_of(RATE_BATCH) {
                // Where we should be at this count: sent / rate seconds.
                let due = Duration::from_millis(report.sent.saturating_mul(1000) / rate);
                let ahead = due.saturating_sub(started.elapsed());
                if !ahead.is_zero() {
                    tokio::time::sleep(ahead).await;
                }
            }
        }
        if progress && last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            eprintln!(
                "gen: sent {}/{} ({} msg/s)",
                report.sent,
                total,
                per_sec(report.sent, started.elapsed())
            );
        }
    }

    while let Some(fut) = in_flight.pop_front() {
        settle(fut).await?;
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing kafka producer")?;
    report.elapsed = started.elapsed();
    if progress {
        eprintln!(
            "gen: sent {}/{} ({} msg/s) done: {} good, {} duplicates, {} malformed",
            report.sent,
            total,
            per_sec(report.sent, report.elapsed),
            report.good,
            report.duplicates,
            report.malformed
        );
    }
    tracing::info!(
        sent = report.sent,
        good = report.good,
        duplicates = report.duplicates,
        malformed = report.malformed,
        elapsed_ms = u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
        "produce finished"
    );
    Ok(report)
}

/// Whole messages per second (integer arithmetic).
fn per_sec(n: u64, elapsed: Duration) -> u64 {
    let ms = u64::try_from(elapsed.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    n.saturating_mul(1000) / ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_math() {
        assert_eq!(per_sec(5000, Duration::from_secs(2)), 2500);
        assert_eq!(per_sec(0, Duration::ZERO), 0);
        let c = producer_config(&connection("localhost:9092"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
    }
}
