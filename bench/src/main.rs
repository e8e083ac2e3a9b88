//! `tally-bench`: one run, one freshly produced topic of N JSON usage events
//! (the same bytes for everyone), measured as a bare consumer (the ceiling),
//! ClickHouse's own Kafka engine, tally end to end, tally again on the same
//! events in Avro, then steady states at half and a quarter of tally's rate
//! (each beside a bare consumer at the same rate: the broker's latency floor)
//! and a run with many tenants. `make bench` starts private broker and
//! ClickHouse instances for it (deploy/local/bench.sh).
//!
//! Guarantee: figures are measured in this run and printed as measured, never
//! asserted; every pipeline starts from empty databases and fresh groups.

mod child;
mod engine;
mod floor;
mod procs;
mod report;
mod setup;

use anyhow::{bail, Context};
use clap::Parser;
use procs::{Roles, Who};
use report::{Figures, Phase};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tally::config::Config;
use tally_producers::{Encoding, Generator};

/// The hand-written analysis kept under the figures in BENCHMARKS.md.
const ANALYSIS: &str = include_str!("../analysis.md");

#[derive(Parser)]
#[command(
    name = "tally-bench",
    about = "tally against ClickHouse's Kafka engine and a bare consumer; writes BENCHMARKS.md"
)]
struct Args {
    /// TOML config file (as `tally --config`; TALLY__SECTION__KEY overrides).
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Events per topic.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Skip the Kafka engine (it needs a ClickHouse configured for it: see bench.sh).
    #[arg(long)]
    no_engine: bool,
    /// Skip the Avro run.
    #[arg(long)]
    no_avro: bool,
    /// Steady state: seconds of production at each steady rate (0 skips it).
    #[arg(long, default_value_t = 20)]
    steady_secs: u64,
    /// Steady state: events per second offered, one run each (comma-separated;
    /// default: half and a quarter of tally's JSON drain rate, the second to
    /// see latency below saturation).
    #[arg(long, value_delimiter = ',')]
    steady_rate: Vec<u64>,
    /// Many-tenants run: tenants (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    tenants: usize,
    /// Many-tenants run: seconds of production.
    #[arg(long, default_value_t = 60)]
    tenants_secs: u64,
    /// Many-tenants run: events per second offered (default: a quarter of
    /// tally's JSON drain rate, a rate this machine serves in steady state, so
    /// that RSS shows memory per tenant rather than a growing backlog).
    #[arg(long)]
    tenants_rate: Option<u64>,
    /// Where to write the figures (default: BENCHMARKS.md at the repository root).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Who is measured besides tally: the broker and ClickHouse by pid when
/// bench.sh started them (TALLY_BENCH_BROKER_PID, TALLY_BENCH_CLICKHOUSE_PID),
/// else every process of that name; Postgres is every `postgres` process.
/// Also, within the broker's figure, its `autosave` thread: noida-db
/// re-serializes its whole state (every message of every topic, as JSON) after
/// any second with a write request (produce, offset commit, group join), a
/// cost of that test broker that a Kafka broker does not have.
fn roles() -> Roles {
    let by_pid = |var: &str, comm: &'static str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .map_or(Who::Comm(comm), |p| Who::Pids(vec![p]))
    };
    let broker = by_pid("TALLY_BENCH_BROKER_PID", "noida-db");
    let saves = match &broker {
        Who::Pids(p) if p.len() == 1 => Who::Threads(p[0], "autosave"),
        _ => Who::Pids(Vec::new()),
    };
    Roles(vec![
        ("broker", broker),
        ("broker_saves", saves),
        (
            "clickhouse",
            by_pid("TALLY_BENCH_CLICKHOUSE_PID", "clickhouse-serv"),
        ),
        ("postgres", Who::Comm("postgres")),
    ])
}

/// Runs `f` and measures every role's CPU over it.
async fn measured<T, F: Future<Output = anyhow::Result<T>>>(
    roles: &Roles,
    f: F,
) -> anyhow::Result<Phase<T>> {
    let tck = procs::clk_tck();
    let before = roles.snapshot();
    let run = f.await?;
    let after = roles.snapshot();
    Ok(Phase {
        run,
        cpu: procs::cpu_seconds(&before, &after, tck),
        load: report::loadavg(),
        probe_ns: procs::cpu_probe_ns(),
    })
}

/// Produces `count` events of `seed` to `topic`; returns the time taken.
async fn produce(
    cfg: &Config,
    topic: &str,
    count: u64,
    seed: u64,
    encoding: Encoding,
) -> anyhow::Result<Duration> {
    let gen = Generator::new(setup::gen_config(count, seed, encoding, 60));
    let r = tally_producers::produce(
        &tally_producers::connection(&cfg.kafka.brokers),
        topic,
        gen,
        None,
        true,
    )
    .await
    .with_context(|| format!("producing to {topic}"))?;
    if r.good != count {
        bail!(
            "produced {} good events to {topic}, expected {count}",
            r.good
        );
    }
    Ok(r.elapsed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.count == 0 {
        bail!("--count must be > 0");
    }
    let base = Config::load(args.config.as_deref())?;
    let cfg_file = args.config.as_deref();
    let roles = roles();
    let ts = chrono::Utc::now().timestamp();
    let seed = u64::try_from(ts).unwrap_or(0);
    let n = args.count;
    let mut fig = Figures {
        count: n,
        ..Figures::default()
    };

    // The same events on two topics: JSON (everyone) and Avro (tally's second
    // run). Each topic is produced just before the runs that read it and deleted
    // after them, so noida-db's snapshots hold one run's data, not every run's.
    let json = setup::scoped(
        &base,
        &format!("bench.json.{ts}"),
        &format!("bench-json-{ts}"),
    );
    let avro = setup::scoped(
        &base,
        &format!("bench.avro.{ts}"),
        &format!("bench-avro-{ts}"),
    );
    setup::create_topics(&json).await?;
    eprintln!(
        "bench: producing {n} JSON events to {}",
        json.kafka.usage_topic
    );
    fig.produce_json = produce(&base, &json.kafka.usage_topic, n, seed, Encoding::Json).await?;

    eprintln!("bench: raw consume");
    let (brokers, topic) = (base.kafka.brokers.clone(), json.kafka.usage_topic.clone());
    let raw = measured(&roles, async move {
        tokio::task::spawn_blocking(move || {
            setup::raw_consume(&brokers, &topic, &format!("bench-raw-{ts}"), n)
        })
        .await?
    })
    .await?;
    fig.mean_bytes_json = raw.run.bytes / n;
    fig.raw = Some(raw);

    if !args.no_engine {
        eprintln!("bench: ClickHouse Kafka engine");
        let group = format!("bench-engine-{ts}");
        fig.engine = Some(
            measured(
                &roles,
                engine::run(&base, &json.kafka.usage_topic, &group, n),
            )
            .await?,
        );
    }

    eprintln!("bench: tally, JSON");
    let db = setup::fresh_databases(&base, 60).await?;
    let run_cfg = setup::scoped(&db, &json.kafka.usage_topic, &json.kafka.group_id);
    fig.tally_json = Some(
        measured(
            &roles,
            child::run(&run_cfg, cfg_file, n, &format!("{ts}-json"), None),
        )
        .await?,
    );
    setup::delete_topics(&json).await?;
    if !args.no_avro {
        setup::create_topics(&avro).await?;
        eprintln!(
            "bench: producing the same events in Avro to {}",
            avro.kafka.usage_topic
        );
        fig.produce_avro = produce(&base, &avro.kafka.usage_topic, n, seed, Encoding::Avro).await?;
        let (brokers, topic) = (base.kafka.brokers.clone(), avro.kafka.usage_topic.clone());
        let r = tokio::task::spawn_blocking(move || {
            setup::raw_consume(&brokers, &topic, &format!("bench-raw-avro-{ts}"), n)
        })
        .await??;
        fig.mean_bytes_avro = r.bytes / n;

        eprintln!("bench: tally, Avro");
        let db = setup::fresh_databases(&base, 60).await?;
        let run_cfg = setup::scoped(&db, &avro.kafka.usage_topic, &avro.kafka.group_id);
        fig.tally_avro = Some(
            measured(
                &roles,
                child::run(&run_cfg, cfg_file, n, &format!("{ts}-avro"), None),
            )
            .await?,
        );
        setup::delete_topics(&avro).await?;
    }
    let max_rate = fig
        .tally_json
        .as_ref()
        .map_or(10_000.0, |p| report::per_sec(n, p.run.elapsed));
    // whole events per second
    #[allow(
        clippy::float_arithmetic,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let (half, quarter) = (
        ((max_rate / 2.0) as u64).max(1),
        ((max_rate / 4.0) as u64).max(1),
    );
    let rates = if args.steady_secs == 0 {
        Vec::new()
    } else if args.steady_rate.is_empty() {
        vec![half, quarter]
    } else {
        args.steady_rate.clone()
    };

    for rate in rates {
        let count = rate * args.steady_secs;
        eprintln!(
            "bench: broker floor: a bare consumer at {rate}/s for {} s",
            args.steady_secs
        );
        let c = setup::scoped(
            &base,
            &format!("bench.floor.{ts}.{rate}"),
            &format!("bench-floor-{ts}-{rate}"),
        );
        setup::create_topics(&c).await?;
        let floor = floor::run(&c, rate, count, seed ^ 3).await?;
        setup::delete_topics(&c).await?;

        eprintln!("bench: steady state at {rate}/s for {} s", args.steady_secs);
        let db = setup::fresh_databases(&base, 60).await?;
        let c = setup::scoped(
            &db,
            &format!("bench.steady.{ts}.{rate}"),
            &format!("bench-steady-{ts}-{rate}"),
        );
        setup::create_topics(&c).await?;
        let steady = child::Steady {
            rate,
            count,
            seed: seed ^ 1,
            tenants: 60,
            watch_rollup: true,
        };
        let p = measured(
            &roles,
            child::run(
                &c,
                cfg_file,
                steady.count,
                &format!("{ts}-steady-{rate}"),
                Some(&steady),
            ),
        )
        .await?;
        setup::delete_topics(&c).await?;
        fig.steady
            .push((rate, base.pipeline.batch_linger_ms, p, floor));
    }
    if args.tenants > 0 && args.tenants_secs > 0 {
        let rate = args.tenants_rate.unwrap_or(quarter);
        eprintln!(
            "bench: {} tenants at {rate}/s for {} s (seeding the tenants first)",
            args.tenants, args.tenants_secs
        );
        let db = setup::fresh_databases(&base, args.tenants).await?;
        let c = setup::scoped(
            &db,
            &format!("bench.tenants.{ts}"),
            &format!("bench-tenants-{ts}"),
        );
        setup::create_topics(&c).await?;
        let steady = child::Steady {
            rate,
            count: rate * args.tenants_secs,
            seed: seed ^ 2,
            tenants: args.tenants,
            watch_rollup: false,
        };
        let p = measured(
            &roles,
            child::run(
                &c,
                cfg_file,
                steady.count,
                &format!("{ts}-tenants"),
                Some(&steady),
            ),
        )
        .await?;
        let ch = tally::sinks::clickhouse::ClickHouseSink::new(&c.clickhouse);
        let seen = ch
            .client()
            .query("SELECT toUInt64(uniqExact(tenant_id)) FROM usage_events")
            .fetch_one::<u64>()
            .await
            .unwrap_or(0);
        fig.tenants = Some((args.tenants, seen, rate, p));
    }

    let table = report::render(&fig);
    println!("{table}");
    let path = match args.out {
        Some(p) => p,
        None => setup::repo_root()?.join("BENCHMARKS.md"),
    };
    std::fs::write(&path, report::markdown(&fig, &table, ANALYSIS))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
