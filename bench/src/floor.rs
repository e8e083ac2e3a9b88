//! The broker's latency floor: a bare consumer (no processing, no writes) on a
//! topic produced at the steady rate, measured the way tally's steady state is
//! (event i scheduled at `start + i / rate`, counted when the consumer has
//! more than i messages). Whatever tally's percentiles add above these is
//! tally's; what these show, every consumer of this broker on this machine pays.
//!
//! Guarantee: the same producer, rate, event count and quantile code as the
//! tally steady run; production starts only once the consumer has its
//! partitions, as it does for tally.

use crate::child::ChildRun;
use anyhow::{bail, Context};
use rdkafka::consumer::Consumer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::config::Config;
use tally_producers::{Encoding, Generator};

/// Produces `count` events at `rate`/s to `cfg`'s usage topic while a bare
/// consumer of a fresh group reads them; returns the run with its
/// (since start, messages consumed) samples, one per message.
pub async fn run(cfg: &Config, rate: u64, count: u64, seed: u64) -> anyhow::Result<ChildRun> {
    let started = Instant::now();
    let assigned = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (brokers, topic, group) = (
            cfg.kafka.brokers.clone(),
            cfg.kafka.usage_topic.clone(),
            cfg.kafka.group_id.clone(),
        );
        let assigned = assigned.clone();
        tokio::task::spawn_blocking(move || {
            consume(&brokers, &topic, &group, count, started, &assigned)
        })
    };
    while !assigned.load(Ordering::Relaxed) {
        if consumer.is_finished() || started.elapsed() > Duration::from_secs(60) {
            consumer.await??;
            bail!("the floor consumer had no partitions within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = started.elapsed();
    let gen = crate::setup::gen_config(count, seed, Encoding::Json, 60);
    let r = tally_producers::produce(
        &tally_producers::connection(&cfg.kafka.brokers),
        &cfg.kafka.usage_topic,
        Generator::new(gen),
        Some(rate),
        false,
    )
    .await
    .context("floor produce")?;
    let produced = started.elapsed();
    if r.good != count {
        bail!("floor: produced {} good events, expected {count}", r.good);
    }
    let visible = consumer.await??;
    Ok(ChildRun {
        events: count,
        elapsed: visible.last().map_or(Duration::ZERO, |v| v.0),
        produce_window: Some((ready, produced)),
        visible,
        ready: Some(ready),
        ..ChildRun::default()
    })
}

/// Reads until `n` messages arrived; one (since start, count) sample per message.
fn consume(
    brokers: &str,
    topic: &str,
    group: &str,
    n: u64,
    started: Instant,
    assigned: &AtomicBool,
) -> anyhow::Result<Vec<(Duration, u64)>> {
    let consumer = crate::setup::bare_consumer(brokers, topic, group)?;
    let timeout = crate::setup::deadline(n);
    let mut seen = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut msgs = 0u64;
    while msgs < n {
        if started.elapsed() > timeout {
            bail!("the floor consumer got {msgs} of {n} messages within {timeout:?}");
        }
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(_)) => {
                msgs += 1;
                seen.push((started.elapsed(), msgs));
            }
            Some(Err(e)) => tracing::warn!(error = %e, "floor consumer error"),
            None => {}
        }
        if !assigned.load(Ordering::Relaxed) && consumer.assignment().is_ok_and(|a| a.count() > 0) {
            assigned.store(true, Ordering::Relaxed);
        }
    }
    Ok(seen)
}
