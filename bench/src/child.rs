//! `tally run` as a child process on a run's topic and databases, timed until
//! its offsets of record reach N, with its memory sampled from /proc and,
//! in steady state, traffic produced at a fixed rate while it runs.
//!
//! Guarantee: "done" means every event is in ClickHouse and Postgres: the
//! offsets of record only move in a batch's final Postgres commit, which
//! follows its ClickHouse inserts; the done batches' event count is read back
//! and any shortfall is reported.

use anyhow::{bail, Context};
use sqlx::postgres::PgPool;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally::config::Config;
use tally_producers::{Encoding, Generator};

const POLL: Duration = Duration::from_millis(100);

/// Fixed-rate traffic produced while the child runs.
pub struct Steady {
    pub rate: u64,
    pub count: u64,
    pub seed: u64,
    pub tenants: usize,
    /// Sample the 1m rollup's request count (produce-to-visible latency).
    pub watch_rollup: bool,
}

/// What one child run measured.
#[derive(Debug, Default, Clone)]
pub struct ChildRun {
    pub events: u64,
    pub elapsed: Duration,
    pub first_progress: Option<Duration>,
    pub peak_rss_kb: u64,
    /// (seconds since spawn, RSS kB), every 100 ms.
    pub rss: Vec<(f64, u64)>,
    pub cpu: Duration,
    pub done_events: i64,
    pub counters: Option<String>,
    /// Steady state: when production started and ended (since spawn).
    pub produce_window: Option<(Duration, Duration)>,
    /// Steady state: (since spawn, requests visible in usage_1m).
    pub visible: Vec<(Duration, u64)>,
    /// Steady state: when tally's consumer had its partitions (since spawn);
    /// production starts then.
    pub ready: Option<Duration>,
}

/// The tally binary: `TALLY_BIN`, else `tally` next to this executable.
pub fn tally_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TALLY_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().context("locating tally-bench")?;
    let bin = me.with_file_name("tally");
    if !bin.exists() {
        bail!(
            "{} not found; build it (cargo build --release -p tally) or set TALLY_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

async fn scalar(pool: &PgPool, sql: &str, group: &str, topic: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql)
        .bind(group)
        .bind(topic)
        .fetch_one(pool)
        .await?)
}

const OFFSETS: &str = "SELECT coalesce(sum(next_offset),0)::bigint FROM tally.consumer_offsets WHERE group_id = $1 AND topic = $2";
const DONE: &str = "SELECT coalesce(sum(events),0)::bigint FROM tally.batches WHERE group_id = $1 AND topic = $2 AND state = 'done'";

/// The last `lines` lines of a file (for error messages).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The counters of the child's final "tally run stopped" log line.
pub fn counters_from_log(text: &str) -> Option<String> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("tally run stopped"))?;
    let mut clean = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            clean.push(c);
        }
    }
    let start = clean.find("metrics=")? + "metrics=".len();
    Some(clean[start..].trim().trim_matches('"').to_string())
}

/// Runs `tally run` on `cfg` until its offsets of record reach `n`.
pub async fn run(
    cfg: &Config,
    config_file: Option<&Path>,
    n: u64,
    label: &str,
    steady: Option<&Steady>,
) -> anyhow::Result<ChildRun> {
    let exe = tally_bin()?;
    let pool = tally::sinks::postgres::connect_pg(cfg).await?;
    let log_path = std::env::temp_dir().join(format!("tally-bench-{label}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let (group, topic) = (cfg.kafka.group_id.clone(), cfg.kafka.usage_topic.clone());
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&exe);
    if let Some(f) = config_file {
        cmd.arg("--config").arg(f);
    }
    let mut child = cmd
        .arg("run")
        .env("TALLY__KAFKA__BROKERS", &cfg.kafka.brokers)
        .env("TALLY__KAFKA__USAGE_TOPIC", &topic)
        .env("TALLY__KAFKA__DLQ_TOPIC", &cfg.kafka.dlq_topic)
        .env("TALLY__KAFKA__VIOLATION_TOPIC", &cfg.kafka.violation_topic)
        .env("TALLY__KAFKA__GROUP_ID", &group)
        .env("TALLY__POSTGRES__URL", &cfg.postgres.url)
        // Loopback: plain text unless the bench config asks for TLS (libpq's
        // default `prefer` would encrypt, and load the system CAs per connection).
        .env(
            "TALLY__POSTGRES__SSLMODE",
            if cfg.postgres.sslmode.is_empty() {
                "disable"
            } else {
                cfg.postgres.sslmode.as_str()
            },
        )
        .env("TALLY__CLICKHOUSE__URL", &cfg.clickhouse.url)
        .env("TALLY__CLICKHOUSE__DATABASE", &cfg.clickhouse.database)
        .env("TALLY__SERVER__LISTEN", "")
        // usage events only: the policy and audit streams have their own topics
        .env("TALLY__STREAMS__POLICY", "false")
        .env("TALLY__STREAMS__AUDIT", "false")
        // info (a few lines a run; the stop line carries the counters)
        .env("TALLY_LOG", "info,sqlx=warn,librdkafka=warn")
        .env_remove("TALLY_LOG_FORMAT")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {} run", exe.display()))?;
    let pid = child.id().context("child has no pid")?;
    eprintln!(
        "bench: {label}: tally run pid {pid}, log {}",
        log_path.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let rss = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (stop, rss) = (stop.clone(), rss.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kb) = crate::procs::status_kb(pid, "VmRSS") {
                    if let Ok(mut v) = rss.lock() {
                        v.push((started.elapsed().as_secs_f64(), kb));
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        })
    };
    // A steady state starts once tally runs: production waits until its
    // consumer has its partitions, so the percentiles measure it consuming, not
    // its startup (migrations, reference data, the group join), which would
    // otherwise put the first second or two of events above the p99.
    let ready = match steady {
        Some(_) => Some(wait_assigned(started, &mut child, &log_path).await?),
        None => None,
    };
    let producer = steady.map(|s| {
        let (brokers, topic) = (cfg.kafka.brokers.clone(), topic.clone());
        let gen = crate::setup::gen_config(s.count, s.seed, Encoding::Json, s.tenants);
        let rate = s.rate;
        tokio::spawn(async move {
            let from = started.elapsed();
            let r = tally_producers::produce(
                &tally_producers::connection(&brokers),
                &topic,
                Generator::new(gen),
                Some(rate),
                false,
            )
            .await;
            (r, from, started.elapsed())
        })
    });
    let watcher = steady.filter(|s| s.watch_rollup).map(|_| {
        let ch = tally::sinks::clickhouse::ClickHouseSink::new(&cfg.clickhouse);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let q = ch
                    .client()
                    .query("SELECT toUInt64(sum(requests)) FROM usage_1m");
                if let Ok(c) = q.fetch_one::<u64>().await {
                    seen.push((started.elapsed(), c));
                }
                // Each look scans usage_1m: often enough for the percentiles,
                // rarely enough not to load the ClickHouse being measured.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    });

    let result = wait_for(&pool, &group, &topic, n, started, &mut child, &log_path).await;
    let mut out = ChildRun {
        events: n,
        ready,
        ..ChildRun::default()
    };
    match result {
        Ok((elapsed, first)) => (out.elapsed, out.first_progress) = (elapsed, first),
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            let _ = child.start_kill();
            return Err(e);
        }
    }
    out.cpu = Duration::from_millis(
        crate::procs::cpu_ticks(pid).unwrap_or(0) * 1000 / crate::procs::clk_tck(),
    );
    out.peak_rss_kb = crate::procs::status_kb(pid, "VmHWM").unwrap_or(0);
    out.done_events = scalar(&pool, DONE, &group, &topic).await?;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    out.rss = rss.lock().map(|v| v.clone()).unwrap_or_default();
    if let Some(task) = producer {
        let (r, from, to) = task.await.context("steady producer task")?;
        r.context("steady-state produce")?;
        out.produce_window = Some((from, to));
    }
    if let Some(task) = watcher {
        out.visible = task.await.unwrap_or_default();
    }

    // SIGTERM and wait for the graceful stop (which logs the counters).
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
        Ok(Ok(status)) if !status.success() => {
            tracing::warn!(%status, "tally run exited unsuccessfully; log tail:\n{}", tail(&log_path, 20));
        }
        Ok(_) => {}
        Err(_) => {
            tracing::warn!("tally run did not stop within 60 s of SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }
    out.counters = counters_from_log(&std::fs::read_to_string(&log_path).unwrap_or_default());
    if u64::try_from(out.done_events).ok() != Some(n) {
        eprintln!(
            "bench: WARNING: {label}: done batches hold {} events, expected {n}",
            out.done_events
        );
    }
    pool.close().await;
    Ok(out)
}

/// Waits until tally's consumer has been assigned the topic's partitions (its
/// log's rebalance line; ownership itself is taken at each partition's first
/// message); returns when.
async fn wait_assigned(
    started: Instant,
    child: &mut tokio::process::Child,
    log_path: &Path,
) -> anyhow::Result<Duration> {
    loop {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        if log.contains("rebalance assigned=true") {
            return Ok(started.elapsed());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "tally run exited ({status}) before its partitions were assigned; log tail:\n{}",
                tail(log_path, 20)
            );
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "tally run had no partitions assigned within 60 s; log tail:\n{}",
                tail(log_path, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the offsets of record until they reach `n`; returns (elapsed, first progress).
async fn wait_for(
    pool: &PgPool,
    group: &str,
    topic: &str,
    n: u64,
    started: Instant,
    child: &mut tokio::process::Child,
    log_path: &Path,
) -> anyhow::Result<(Duration, Option<Duration>)> {
    let timeout = crate::setup::deadline(n);
    let target = i64::try_from(n).unwrap_or(i64::MAX);
    let mut first = None;
    let mut last_note = Instant::now();
    loop {
        let at = scalar(pool, OFFSETS, group, topic).await?;
        if at > 0 {
            first.get_or_insert_with(|| started.elapsed());
        }
        if at >= target {
            return Ok((started.elapsed(), first));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "tally run exited ({status}) at offset {at} of {n}; log tail:\n{}",
                tail(log_path, 20)
            );
        }
        if started.elapsed() > timeout {
            bail!(
                "tally run reached offset {at} of {n} within {} s; log tail:\n{}",
                timeout.as_secs(),
                tail(log_path, 20)
            );
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            last_note = Instant::now();
            eprintln!(
                "bench: offsets of record {at}/{n} after {:.0?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_read_from_the_stop_line() {
        let text = "2025 WARN x\n2025  \u{1b}[32m INFO\u{1b}[0m tally::engine::runner: tally run stopped \u{1b}[3mmetrics\u{1b}[0m\u{1b}[2m=\u{1b}[0mtally_messages_consumed_total 5, tally_events_counted_total 5\n";
        assert_eq!(
            super::counters_from_log(text).as_deref(),
            Some("tally_messages_consumed_total 5, tally_events_counted_total 5")
        );
    }
}
