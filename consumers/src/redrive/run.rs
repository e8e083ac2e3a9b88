//! One `tally dlq redrive` run, end to end.
//!
//! Guarantee: under the dead-letter topic's redrive lock, an interrupted earlier
//! run is reconciled first (its `sending` letters looked up on the input topic
//! once its sends can no longer land); then the DLQ is read up to the end noted
//! at the start, in rounds of `--batch` letters: select, record `sending`,
//! produce, wait for every acknowledgement, record `sent`. A letter is produced
//! at most once per run and, without `--again`, at most once ever.

use super::store::{self, Row, Unsettled};
use super::topic::{self, Outgoing, Reader};
use super::{letter_id, select, topics, Letter, Options, Report, Source, HEADER_DLQ};
use crate::config::Config;
use crate::errors::{pg, StageError};
use rdkafka::producer::FutureProducer;
use sqlx::Connection;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Runs a redrive; `send_timeout`: how long the broker may take to acknowledge a letter.
pub async fn run(
    cfg: &Config,
    opts: &Options,
    send_timeout: Duration,
) -> Result<Report, StageError> {
    let (input, dlq) = topics(cfg, &opts.stream)
        .ok_or_else(|| StageError::Fatal(format!("unknown stream {}", opts.stream)))?;
    let brokers = crate::sinks::kafka_client::KafkaClient::new(&cfg.kafka);
    let mut report = Report {
        dlq_topic: dlq.clone(),
        input_topic: input.clone(),
        dry_run: opts.dry_run,
        ..Report::default()
    };
    let pool = crate::sinks::postgres::connect_pg(cfg).await?;
    // Held (open) for the whole run: one redrive of a DLQ at a time.
    let mut _lock = None;
    if !opts.dry_run {
        let mut conn = sqlx::PgConnection::connect_with(&crate::sinks::postgres::pg_options(cfg)?)
            .await
            .map_err(pg("redrive lock connection"))?;
        store::lock(&mut conn, &dlq).await?;
        _lock = Some(conn);
        reconcile(&brokers, &pool, &dlq, &mut report).await?;
    }
    let ranges: BTreeMap<i32, (i64, i64)> = topic::watermarks(&brokers, &dlq)
        .await?
        .into_iter()
        .map(|(p, (low, high))| (p, (opts.from_offset.unwrap_or(low).max(low), high)))
        .collect();
    let mut reader = Reader::new(&brokers, &dlq, &ranges)?;
    let mut round = Round {
        brokers: &brokers,
        pool: &pool,
        opts,
        dlq: &dlq,
        input: &input,
        producer: None,
        send_timeout,
        run_id: None,
        seen: BTreeSet::new(),
        chosen: Vec::new(),
    };
    let mut letters = Vec::with_capacity(opts.batch);
    while let Some(l) = reader.next().await? {
        report.scanned += 1;
        letters.push(l);
        if letters.len() >= opts.batch {
            round
                .choose(std::mem::take(&mut letters), &mut report)
                .await?;
            round.produce(false, &mut report).await?;
        }
    }
    round.choose(letters, &mut report).await?;
    round.produce(true, &mut report).await?;
    if let Some(id) = round.run_id {
        store::finish_run(&pool, id, report.produced).await?;
    }
    report.run_id = round.run_id;
    Ok(report)
}

/// Settles the `sending` letters of an interrupted run from the input topic.
async fn reconcile(
    brokers: &crate::sinks::kafka_client::KafkaClient,
    pool: &sqlx::PgPool,
    dlq: &str,
    report: &mut Report,
) -> Result<(), StageError> {
    let unsettled = store::unsettled(pool, dlq).await?;
    let Some(wait) = unsettled.iter().map(|u| u.settles_in).reduce(f64::max) else {
        return Ok(());
    };
    if wait > 0.0 {
        tracing::info!(
            letters = unsettled.len(),
            wait_secs = wait,
            "an earlier redrive was interrupted; waiting until its sends can no longer land"
        );
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
    let mut by_topic: BTreeMap<&str, Vec<&Unsettled>> = BTreeMap::new();
    for u in &unsettled {
        by_topic.entry(u.target_topic.as_str()).or_default().push(u);
    }
    for (target, rows) in by_topic {
        let wanted: BTreeSet<String> = rows
            .iter()
            .map(|u| letter_id(dlq, u.dlq_partition, u.dlq_offset))
            .collect();
        let ranges: BTreeMap<i32, (i64, i64)> = topic::watermarks(brokers, target)
            .await?
            .into_iter()
            .map(|(p, (low, high))| {
                let from = rows
                    .iter()
                    .map(|u| u.target_start.get(p as usize).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(low);
                (p, (from.max(low), high))
            })
            .collect();
        let mut found: BTreeMap<String, (i32, i64)> = BTreeMap::new();
        let mut reader = Reader::new(brokers, target, &ranges)?;
        while let Some(m) = reader.next().await? {
            let id = m
                .headers
                .iter()
                .find(|(k, _)| k == HEADER_DLQ)
                .and_then(|(_, v)| String::from_utf8(v.clone()?).ok());
            if let Some(id) = id.filter(|i| wanted.contains(i)) {
                found.entry(id).or_insert((m.partition, m.offset));
            }
        }
        for u in rows {
            let at = found
                .get(&letter_id(dlq, u.dlq_partition, u.dlq_offset))
                .copied();
            store::settle(pool, dlq, u, at).await?;
            if at.is_some() {
                report.reconciled_found += 1;
            } else {
                report.reconciled_missing += 1;
            }
        }
    }
    Ok(())
}

struct Round<'a> {
    brokers: &'a crate::sinks::kafka_client::KafkaClient,
    pool: &'a sqlx::PgPool,
    opts: &'a Options,
    dlq: &'a str,
    input: &'a str,
    producer: Option<FutureProducer>,
    send_timeout: Duration,
    run_id: Option<i64>,
    /// Sources selected in this run.
    seen: BTreeSet<Source>,
    /// Selected, not produced yet.
    chosen: Vec<(Letter, Source)>,
}

impl Round<'_> {
    /// Selects among `letters` (scanned in order) the ones to redrive.
    async fn choose(
        &mut self,
        letters: Vec<Letter>,
        report: &mut Report,
    ) -> Result<(), StageError> {
        if letters.is_empty() {
            return Ok(());
        }
        let coords: Vec<(i32, i64)> = letters.iter().map(|l| (l.partition, l.offset)).collect();
        let sources: Vec<Source> = letters.iter().filter_map(Letter::source).collect();
        let recorded = store::recorded(self.pool, self.dlq, self.input, &coords, &sources).await?;
        for l in letters {
            match (
                select(&l, self.opts, self.input, &recorded, &self.seen),
                l.source(),
            ) {
                (Ok(()), Some(source)) => {
                    *report
                        .selected
                        .entry(l.class().unwrap_or_default().to_string())
                        .or_default() += 1;
                    self.seen.insert(source.clone());
                    self.chosen.push((l, source));
                }
                (Ok(()), None) => {
                    *report
                        .skipped
                        .entry(super::Skip::NotADeadLetter)
                        .or_default() += 1
                }
                (Err(skip), _) => *report.skipped.entry(skip).or_default() += 1,
            }
        }
        Ok(())
    }

    /// Produces the chosen letters in rounds of `--batch` (`all`: the rest too).
    async fn produce(&mut self, all: bool, report: &mut Report) -> Result<(), StageError> {
        if self.opts.dry_run {
            self.chosen.clear();
            return Ok(());
        }
        while self.chosen.len() >= self.opts.batch || (all && !self.chosen.is_empty()) {
            let n = self.chosen.len().min(self.opts.batch);
            let round: Vec<(Letter, Source)> = self.chosen.drain(..n).collect();
            self.go(&round, report).await?;
        }
        Ok(())
    }

    /// One round: record `sending`, produce, wait for the acknowledgements, record `sent`.
    async fn go(
        &mut self,
        chosen: &[(Letter, Source)],
        report: &mut Report,
    ) -> Result<(), StageError> {
        let run_id = self.run_id().await?;
        let rows: Vec<Row<'_>> = chosen
            .iter()
            .map(|(l, s)| Row {
                dlq_partition: l.partition,
                dlq_offset: l.offset,
                class: l.class().unwrap_or_default(),
                source: s,
            })
            .collect();
        let settle = (self.send_timeout + Duration::from_secs(2)).as_secs_f64();
        store::record_sending(self.pool, self.dlq, self.input, run_id, settle, &rows).await?;
        let out: Vec<Outgoing<'_>> = chosen
            .iter()
            .map(|(l, _)| Outgoing {
                key: l.key.as_deref(),
                payload: l.payload.as_deref(),
                headers: l.redrive_headers(self.dlq, run_id),
            })
            .collect();
        let producer = match &self.producer {
            Some(p) => p,
            None => self
                .producer
                .insert(topic::producer(self.brokers, self.send_timeout)?),
        };
        let results = topic::send(producer, self.input, &out).await;
        crate::engine::failpoint::hit("redrive_after_produce").await?;
        let mut sent = Vec::new();
        let mut failed = Vec::new();
        for ((l, _), r) in chosen.iter().zip(results) {
            match r {
                Ok(at) => sent.push(((l.partition, l.offset), at)),
                Err(e) => failed.push(e),
            }
        }
        store::record_sent(self.pool, self.dlq, &sent).await?;
        report.produced += sent.len() as u64;
        if let Some(first) = failed.first() {
            return Err(StageError::Retryable(format!(
                "{} of {} letters were not acknowledged ({first}); run the command again: \
                 it first looks for them on {}",
                failed.len(),
                chosen.len(),
                self.input
            )));
        }
        Ok(())
    }

    /// The run's id, starting it (with the input topic's end offsets) on first use.
    async fn run_id(&mut self) -> Result<i64, StageError> {
        if let Some(id) = self.run_id {
            return Ok(id);
        }
        let ends: BTreeMap<i32, i64> = topic::watermarks(self.brokers, self.input)
            .await?
            .into_iter()
            .map(|(p, (_, high))| (p, high))
            .collect();
        let classes: Vec<String> = self.opts.classes.iter().cloned().collect();
        let id = store::start_run(
            self.pool,
            self.dlq,
            self.input,
            &classes,
            self.opts.again,
            &ends,
        )
        .await?;
        self.run_id = Some(id);
        Ok(id)
    }
}
