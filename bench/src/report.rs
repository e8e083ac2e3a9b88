//! The figures of one run, printed and written to BENCHMARKS.md.
//!
//! Guarantee: every number shown is one this run measured (rates, ratios,
//! CPU-seconds per million per process, RSS, latency quantiles), with the
//! load average at the time; nothing is carried over from earlier runs
//! except the hand-written analysis kept below the figures.

use crate::child::ChildRun;
use crate::engine::EngineRun;
use crate::setup::Raw;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

pub type Cpu = BTreeMap<&'static str, Duration>;

/// One measured phase: what it measured, the CPU of each process during it,
/// and the load average when it ended.
#[derive(Debug, Clone, Default)]
pub struct Phase<T> {
    pub run: T,
    pub cpu: Cpu,
    pub load: String,
    /// `procs::cpu_probe_ns` right after the phase: how fast this machine's
    /// CPU was then (the host's other guests make it vary between runs).
    pub probe_ns: f64,
}

#[derive(Debug, Default)]
pub struct Figures {
    pub count: u64,
    pub mean_bytes_json: u64,
    pub mean_bytes_avro: u64,
    pub produce_json: Duration,
    pub produce_avro: Duration,
    pub raw: Option<Phase<Raw>>,
    pub engine: Option<Phase<EngineRun>>,
    pub tally_json: Option<Phase<ChildRun>>,
    pub tally_avro: Option<Phase<ChildRun>>,
    /// One per steady rate: (rate, linger ms, tally's run, the broker floor's run:
    /// a bare consumer at the same rate).
    pub steady: Vec<(u64, u64, Phase<ChildRun>, ChildRun)>,
    /// (tenants seeded, distinct tenants in the events, rate, run)
    pub tenants: Option<(usize, u64, u64, Phase<ChildRun>)>,
}

// rates for display, not money
#[allow(clippy::float_arithmetic)]
pub fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

// rates for display, not money
#[allow(clippy::float_arithmetic)]
fn per_million(d: Duration, events: u64) -> f64 {
    d.as_secs_f64() * 1_000_000.0 / events.max(1) as f64
}

// display only
#[allow(clippy::float_arithmetic)]
fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The load average now (1, 5, 15 min).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// Produce-to-visible latency quantiles (p50, p99) of a steady run: event i is
/// taken as produced at `from + i / rate` (the producer's schedule) and as
/// visible at the first rollup sample counting more than i requests.
// display only
#[allow(clippy::float_arithmetic)]
pub fn latency(run: &ChildRun, rate: u64) -> Option<(Duration, Duration)> {
    let (from, _) = run.produce_window?;
    if run.visible.is_empty() || rate == 0 {
        return None;
    }
    let mut lat = Vec::with_capacity(usize::try_from(run.events).unwrap_or(0));
    let mut s = 0;
    for i in 0..run.events {
        while s < run.visible.len() && run.visible[s].1 <= i {
            s += 1;
        }
        let Some((seen, _)) = run.visible.get(s) else {
            break;
        };
        let produced = from + Duration::from_secs_f64(i as f64 / rate as f64);
        lat.push(seen.saturating_sub(produced));
    }
    if lat.is_empty() {
        return None;
    }
    lat.sort();
    let q = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
    Some((q(50), q(99)))
}

// display only
#[allow(clippy::float_arithmetic)]
fn quantiles(q: Option<(Duration, Duration)>) -> String {
    q.map_or("-".into(), |(a, b)| {
        format!(
            "{:.0} ms / {:.0} ms",
            a.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3
        )
    })
}

/// RSS over a run in quarters: the max RSS (MB) of each quarter of the samples.
fn rss_quarters(run: &ChildRun) -> String {
    if run.rss.is_empty() {
        return "-".into();
    }
    let n = run.rss.len();
    (0..4)
        .map(|q| {
            let part = &run.rss[n * q / 4..(n * (q + 1) / 4).max(n * q / 4 + 1).min(n)];
            format!(
                "{:.0}",
                mb(part.iter().map(|(_, kb)| *kb).max().unwrap_or(0))
            )
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn cpu_cells(cpu: &Cpu, tally: Option<Duration>, events: u64) -> String {
    let cell = |d: Option<&Duration>| {
        d.map_or("-".to_string(), |d| {
            format!("{:.1}", per_million(*d, events))
        })
    };
    format!(
        "{} | {} | {} | {} | {}",
        cell(tally.as_ref()),
        cell(cpu.get("broker")),
        cell(cpu.get("broker_saves")),
        cell(cpu.get("clickhouse")),
        cell(cpu.get("postgres"))
    )
}

// display only
#[allow(clippy::float_arithmetic)]
pub fn render(f: &Figures) -> String {
    let mut s = String::new();
    let n = f.count;
    let _ = writeln!(s, "| run | events/s | time s | tally CPU-s/1M | broker | of which snapshot saves | ClickHouse | Postgres | load (1 5 15) | CPU probe ns |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    let line = |s: &mut String,
                name: &str,
                d: Duration,
                cpu: &Cpu,
                tally: Option<Duration>,
                load: &str,
                probe: f64| {
        let _ = writeln!(
            s,
            "| {name} | {:.0} | {:.2} | {} | {load} | {probe:.2} |",
            per_sec(n, d),
            d.as_secs_f64(),
            cpu_cells(cpu, tally, n),
        );
    };
    if let Some(p) = &f.raw {
        line(
            &mut s,
            "raw consume (bare rdkafka consumer, JSON topic)",
            p.run.elapsed,
            &p.cpu,
            None,
            &p.load,
            p.probe_ns,
        );
    }
    if let Some(p) = &f.engine {
        line(
            &mut s,
            "ClickHouse Kafka engine (raw + 1m/1h/1d views)",
            p.run.elapsed,
            &p.cpu,
            None,
            &p.load,
            p.probe_ns,
        );
    }
    if let Some(p) = &f.tally_json {
        line(
            &mut s,
            "tally end to end, JSON",
            p.run.elapsed,
            &p.cpu,
            Some(p.run.cpu),
            &p.load,
            p.probe_ns,
        );
    }
    if let Some(p) = &f.tally_avro {
        line(
            &mut s,
            "tally end to end, Avro",
            p.run.elapsed,
            &p.cpu,
            Some(p.run.cpu),
            &p.load,
            p.probe_ns,
        );
    }
    let _ = writeln!(s);
    let rate = |p: &Option<Phase<ChildRun>>| p.as_ref().map(|p| per_sec(n, p.run.elapsed));
    let (tj, ta) = (rate(&f.tally_json), rate(&f.tally_avro));
    let raw = f.raw.as_ref().map(|p| per_sec(n, p.run.elapsed));
    let eng = f.engine.as_ref().map(|p| per_sec(n, p.run.elapsed));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", a / b.max(1e-9)),
        _ => "-".into(),
    };
    let _ = writeln!(s, "| figure | value |\n|---|---|");
    let _ = writeln!(s, "| events (N), 4 partitions | {n} |");
    let _ = writeln!(
        s,
        "| mean message bytes JSON / Avro | {} / {} |",
        f.mean_bytes_json, f.mean_bytes_avro
    );
    let _ = writeln!(
        s,
        "| produce JSON / Avro, events/s | {:.0} / {:.0} |",
        per_sec(n, f.produce_json),
        per_sec(n, f.produce_avro)
    );
    let _ = writeln!(s, "| ratio tally/engine (JSON) | {} |", ratio(tj, eng));
    let _ = writeln!(s, "| ratio tally/engine (Avro) | {} |", ratio(ta, eng));
    let _ = writeln!(s, "| ratio tally/raw (JSON) | {} |", ratio(tj, raw));
    if let Some(p) = &f.engine {
        let _ = writeln!(
            s,
            "| engine: first rows after / 1m rollup rows | {:.2} s / {} |",
            p.run.first.unwrap_or_default().as_secs_f64(),
            p.run.rollup_1m_rows
        );
    }
    for (name, p) in [("JSON", &f.tally_json), ("Avro", &f.tally_avro)] {
        if let Some(p) = p {
            let _ = writeln!(
                s,
                "| tally {name}: first commit after / done events / peak RSS MB (backlog drain) | {:.2} s / {} / {:.0} |",
                p.run.first_progress.unwrap_or_default().as_secs_f64(),
                p.run.done_events,
                mb(p.run.peak_rss_kb)
            );
        }
    }
    for (rate, linger, p, floor) in &f.steady {
        let lat = latency(&p.run, *rate);
        let _ = writeln!(
            s,
            "| steady state at {rate}/s: offered load | {} events, from {:.2} s after tally's start, when its consumer had its partitions (load {}; CPU probe {:.2} ns) |",
            p.run.events,
            p.run.ready.unwrap_or_default().as_secs_f64(),
            p.load,
            p.probe_ns
        );
        let _ = writeln!(
            s,
            "| steady state at {rate}/s: peak RSS MB (VmHWM) / by quarter | {:.0} / {} |",
            mb(p.run.peak_rss_kb),
            rss_quarters(&p.run)
        );
        let _ = writeln!(
            s,
            "| steady state at {rate}/s: CPU-s/1M tally, broker (of which snapshot saves), ClickHouse, Postgres | {} |",
            cpu_cells(&p.cpu, Some(p.run.cpu), p.run.events)
        );
        let _ = writeln!(
            s,
            "| steady state at {rate}/s: produce-to-visible in usage_1m p50 / p99 (batch linger {linger} ms) | {} |",
            quantiles(lat)
        );
        let _ = writeln!(
            s,
            "| steady state at {rate}/s, broker floor: produce-to-consumed by a bare consumer p50 / p99 | {} |",
            quantiles(latency(floor, *rate))
        );
    }
    if let Some((tenants, seen, rate, p)) = &f.tenants {
        let _ = writeln!(s, "| many tenants: {tenants} seeded, {seen} distinct in {} events at {rate}/s: peak RSS MB / by quarter | {:.0} / {} |", p.run.events, mb(p.run.peak_rss_kb), rss_quarters(&p.run));
    }
    for (name, p) in [("JSON", &f.tally_json), ("Avro", &f.tally_avro)] {
        if let Some(c) = p.as_ref().and_then(|p| p.run.counters.as_ref()) {
            let _ = writeln!(s, "\ntally counters ({name}): {c}");
        }
    }
    s
}

/// Stage seconds of a run's counters as a table.
pub fn stages(counters: &str) -> String {
    let mut s = String::from("| stage | seconds |\n|---|---|\n");
    for part in counters.split(", ") {
        if let Some((stage, secs)) = stage_seconds(part) {
            let _ = writeln!(s, "| {stage} | {secs} |");
        }
    }
    s
}

/// A stage's total seconds from one series of tally's stop line, e.g.
/// `tally_stage_duration_seconds_sum{stream="usage",stage="claim"} 13.4`.
fn stage_seconds(part: &str) -> Option<(&str, &str)> {
    let rest = part.strip_prefix("tally_stage_duration_seconds_sum{")?;
    let (labels, secs) = rest.split_once("} ")?;
    let stage = labels
        .split(',')
        .find_map(|l| l.strip_prefix("stage=\""))?
        .strip_suffix('"')?;
    Some((stage, secs))
}

// display only
#[allow(clippy::float_arithmetic)]
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{cpus} CPUs (nproc), {:.1} GB RAM, {model}",
        mb(mem_kb) / 1024.0
    )
}

/// BENCHMARKS.md: the figures, how they were taken, and the analysis.
pub fn markdown(f: &Figures, table: &str, analysis: &str) -> String {
    let mut s = String::new();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let _ = writeln!(s, "# tally benchmarks\n");
    let _ = writeln!(
        s,
        "Produced by `make bench` (`tally-bench --count {}`, {profile} build).\n",
        f.count
    );
    let _ = writeln!(
        s,
        "- date: {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(s, "- machine: {}", machine());
    let _ = writeln!(s, "- on the same machine: a private noida-db (Kafka protocol) and a private ClickHouse 18.16 started for the run, the shared Postgres 15, and other users' builds (see the load column)");
    let _ = writeln!(s, "- N = {} usage events, 4 partitions, no duplicates, late or poison messages; one JSON topic read by the bare consumer, the Kafka engine and tally, and the same events in Avro single-object encoding on a second topic\n", f.count);
    let _ = writeln!(s, "## Figures\n");
    s.push_str(table);
    let _ = writeln!(s, "\n## How they are taken\n");
    let _ = writeln!(s, "- events/s: N over the time from the start of a run (consumer creation, engine DDL, `tally run` spawn: startup and group join included) until every event is where the run puts it: counted by the bare consumer; `count()` of the engine's raw table; tally's offsets of record in Postgres reaching N (they move only in a batch's final commit, after its ClickHouse inserts).");
    let _ = writeln!(s, "- CPU-s per 1M: utime+stime deltas from /proc/<pid>/stat over the run, per process: tally (the child), the private broker and ClickHouse (by pid), Postgres (sum over every `postgres` process: shared with other users of this machine, so an upper bound). \"of which snapshot saves\": the broker's `autosave` thread alone (/proc/<pid>/task/<tid>/stat), where noida-db serializes its whole state after any second with a write request; a Kafka broker has no such cost.");
    let _ = writeln!(s, "- CPU probe ns: nanoseconds per step of a fixed integer loop, timed right after each run (`procs::cpu_probe_ns`). This machine is a VM: the same loop took 30% longer at some moments than at others on an idle machine, and every CPU-seconds figure moves with it; compare runs at a similar probe.");
    let _ = writeln!(s, "- Topics: each encoding's topic is produced just before the runs that read it and deleted (with tally's dead-letter and violation topics) after them, so the broker's snapshots (see \"of which snapshot saves\") hold one run's data, not every run's.");
    let _ = writeln!(s, "- The Kafka engine (`sql/bench/kafka_engine.sql`) dedups nothing, prices nothing, dead-letters nothing, keeps no spend/quota/budget state and raises no violations; a crash between its block insert and its offset commit writes the block again. tally does all of that with every guarantee on (claims in `seen_events`, fenced ClickHouse inserts, one Postgres commit per batch).");
    let _ = writeln!(s, "- Steady state: events produced at a fixed rate while tally consumes, at half of tally's JSON drain rate and at a quarter of it (or at each `--steady-rate`); latency = when the 1m rollup's request count first covers an event minus its scheduled produce time (sampled every ~50 ms, each look a scan of usage_1m); production starts once tally's consumer has its partitions, so its startup is not in the percentiles. The count covers event i once any i+1 events are visible, so this is the latency of the whole stream taken in order: a stall of one partition out of four shows as about a quarter of its length. Broker floor: the same producer, rate and count on a fresh topic read by a bare consumer (no processing, no writes), production starting once it has its partitions; latency = when it has consumed more than i messages minus event i's scheduled time: what every consumer of this broker pays on this machine. noida-db answers a fetch with the whole backlog, so drain RSS reflects that reply; the steady-state RSS does not.");
    let _ = writeln!(s, "\n## Where tally's time goes\n");
    if let Some(c) = f.tally_json.as_ref().and_then(|p| p.run.counters.as_ref()) {
        let _ = writeln!(
            s,
            "Stage seconds, JSON drain (summed over the batches running at once: one per partition, at most `pipeline.max_batches_in_flight`):\n"
        );
        s.push_str(&stages(c));
    }
    s.push_str(analysis);
    s
}

#[cfg(test)]
mod stage_tests {
    #[test]
    fn stage_seconds_are_read_from_the_histogram_sums() {
        let line = "tally_stage_duration_seconds_sum{stream=\"usage\",stage=\"claim\"} 13.4, \
                    tally_stage_duration_seconds_count{stream=\"usage\",stage=\"claim\"} 3";
        let t = super::stages(line);
        assert!(t.contains("| claim | 13.4 |"), "{t}");
        assert!(!t.contains("| claim | 3 |"), "{t}");
    }
}

#[cfg(test)]
mod latency_tests {
    use super::latency;
    use crate::child::ChildRun;
    use std::time::Duration;

    /// A run whose events are scheduled at `rate`/s from 1 s and become visible
    /// `delay(i)` after their schedule, sampled every 10 ms (as the watcher does).
    fn run(rate: u64, events: u64, delay: impl Fn(u64) -> Duration) -> ChildRun {
        let from = Duration::from_secs(1);
        let at = |i: u64| from + Duration::from_micros(i * 1_000_000 / rate) + delay(i);
        let end = at(events - 1) + Duration::from_millis(20);
        let mut visible = Vec::new();
        let mut t = from;
        while t <= end {
            let count = (0..events).filter(|&i| at(i) <= t).count() as u64;
            visible.push((t, count));
            t += Duration::from_millis(10);
        }
        ChildRun {
            events,
            produce_window: Some((from, end)),
            visible,
            ..ChildRun::default()
        }
    }

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn a_constant_delay_is_every_quantile() {
        let (p50, p99) = latency(&run(1000, 2000, |_| Duration::from_millis(200)), 1000).unwrap();
        assert!((200..=210).contains(&ms(p50)), "p50 {p50:?}");
        assert!((200..=210).contains(&ms(p99)), "p99 {p99:?}");
    }

    /// A stall of 300 ms at event 1000 of a FIFO pipeline (every later event
    /// waits for it, the next 200 at 1,000/s) moves the p99, not the p50.
    #[test]
    fn a_stall_shows_in_the_p99_only() {
        let delay = |i: u64| {
            let normal = Duration::from_millis(100);
            if i < 1000 {
                normal
            } else {
                // released at event 1000's schedule + 300 ms
                let behind =
                    Duration::from_millis(1000 + 300).saturating_sub(Duration::from_millis(i));
                normal.max(behind)
            }
        };
        let (p50, p99) = latency(&run(1000, 2000, delay), 1000).unwrap();
        assert!((100..=110).contains(&ms(p50)), "p50 {p50:?}");
        assert!((280..=310).contains(&ms(p99)), "p99 {p99:?}");
    }

    #[test]
    fn no_samples_no_quantiles() {
        let r = ChildRun {
            events: 10,
            produce_window: Some((Duration::ZERO, Duration::ZERO)),
            ..ChildRun::default()
        };
        assert_eq!(latency(&r, 100), None);
    }
}
