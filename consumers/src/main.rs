//! The `tally` command: migrate, seed, run, ingest, gen, report, reset-offsets,
//! wait-idle, prices and budgets import (`tally::cli::import`), dlq redrive
//! (`tally::cli::dlq`), audit (`tally::cli::audit`). The benchmark is its own
//! binary, `tally-bench` (bench/).

use anyhow::bail;
use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use tally::config::Config;
use tally_producers::cli::{GenOptions, StreamChoice, Topics};
use tally_producers::{demo_world, Encoding};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Exactly-once audit and cost pipeline for LLM platforms"
)]
struct Cli {
    /// TOML config file (overrides the embedded defaults; TALLY__SECTION__KEY overrides both).
    #[arg(long, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply Postgres migrations and ClickHouse DDL, create the Kafka topics (idempotent).
    Migrate(tally::cli::migrate::MigrateArgs),
    /// Write a generated world's tenants, teams, prices and budgets to Postgres.
    Seed {
        #[arg(long, default_value_t = 60)]
        tenants: usize,
        /// Scale budgets and per-minute quotas (sized for 200k events over 2 h) to a smaller run, e.g. 0.3.
        #[arg(long, default_value = "1")]
        scale: rust_decimal::Decimal,
    },
    /// Run the pipeline until SIGTERM/SIGINT.
    Run,
    /// Serve Open Policy Agent's decision-log upload API (POST ingest.path): every
    /// event to policy.topic, 200 only once Kafka acknowledged all. SIGTERM drains.
    Ingest(tally::cli::ingest::IngestArgs),
    /// Produce generated traffic: usage (default), policy decisions, audit events or all.
    Gen(GenArgs),
    /// Print spend, budgets, decisions, audit logs, violations and dead letters
    /// (filtered by --from/--to/--tenant; table, json or csv).
    Report(tally::cli::report::ReportArgs),
    /// The price book: `tally prices import FILE.csv` (docs/operations.md).
    Prices {
        #[command(subcommand)]
        command: tally::cli::import::PricesCommand,
    },
    /// Budgets: `tally budgets import FILE.csv` (docs/operations.md).
    Budgets {
        #[command(subcommand)]
        command: tally::cli::import::BudgetsCommand,
    },
    /// Move the offsets of record of a topic (e.g. after it was deleted and created
    /// again), abandoning the partitions' pending batches. Without --yes: prints the plan only.
    ResetOffsets {
        #[arg(long)]
        topic: String,
        /// Only this partition (default: every partition of the topic).
        #[arg(long)]
        partition: Option<i32>,
        /// earliest (first offset on the broker), latest (the end) or an offset.
        #[arg(long)]
        to: tally::cli::reset::ResetTo,
        /// Apply the plan (stop every tally instance of the group first).
        #[arg(long)]
        yes: bool,
    },
    /// Wait until the pipeline has caught up with the usage topic.
    WaitIdle {
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Dead-letter topics: re-drive letters of chosen classes once their cause is fixed.
    Dlq {
        #[command(subcommand)]
        command: tally::cli::dlq::DlqCommand,
    },
    /// The tamper-evident audit log: signing keys, verification, offline proofs
    /// (docs/audit-log.md). Exit codes: 0 ok, 1 error, 2 usage, 3 tampered, 4 not covered yet.
    Audit {
        #[command(subcommand)]
        command: tally::cli::audit::AuditCommand,
    },
}

/// The flags of `tally gen`.
#[derive(clap::Args)]
struct GenArgs {
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Messages per second (unlimited when absent).
    #[arg(long)]
    rate: Option<u64>,
    /// json, avro (single-object), confluent or mixed (json + avro).
    #[arg(long, default_value = "mixed")]
    encoding: Encoding,
    #[arg(long, default_value_t = 0.02)]
    duplicates: f64,
    #[arg(long, default_value_t = 0.01)]
    late: f64,
    #[arg(long, default_value_t = 0.0)]
    malformed: f64,
    /// Random seed (default: from the clock, so every run sends new event ids).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 60)]
    tenants: usize,
    /// Topic (default: the stream's, kafka.usage_topic, policy.topic or audit.topic).
    #[arg(long)]
    topic: Option<String>,
    /// usage, policy, audit or all (one after the other, --count messages each).
    #[arg(long, default_value = "usage")]
    stream: StreamChoice,
    /// Policy stream: share of decisions sent as OPA decision-log events.
    #[arg(long, default_value_t = 0.3)]
    opa_share: f64,
}

impl GenArgs {
    /// The generator options, the seed drawn from the clock when not given.
    fn options(self) -> GenOptions {
        let clock = || {
            u64::try_from(Utc::now().timestamp_nanos_opt().unwrap_or_default()).unwrap_or_default()
        };
        GenOptions {
            seed: self.seed.unwrap_or_else(clock),
            stream: self.stream,
            count: self.count,
            rate: self.rate,
            encoding: self.encoding,
            duplicates: self.duplicates,
            late: self.late,
            malformed: self.malformed,
            tenants: self.tenants,
            opa_share: self.opa_share,
            topic: self.topic,
            price_change_at: demo_price_change_at(),
            // Filled in from the registry for --encoding confluent.
            confluent_schema_ids: Default::default(),
        }
    }
}

/// The demo world's price change: the start of the previous hour, so the
/// default generated span (the two hours before the current hour) crosses it.
fn demo_price_change_at() -> DateTime<Utc> {
    let hour = Utc::now()
        .duration_trunc(ChronoDuration::hours(1))
        .unwrap_or_else(|_| Utc::now());
    hour - ChronoDuration::hours(1)
}

fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Loads the configuration itself, and only where needed (verify-proof and keygen
    // run offline); exits with its own codes.
    if let Command::Audit { command } = cli.command {
        let _logging = tally::telemetry::init(None);
        std::process::exit(tally::cli::audit::run(command, cli.config.as_deref()).await);
    }
    if let Command::Dlq {
        command: tally::cli::dlq::DlqCommand::Redrive(args),
    } = &cli.command
    {
        if let Err(e) = tally::cli::dlq::options(args) {
            eprintln!("tally dlq redrive: {e}");
            std::process::exit(2);
        }
    }
    if let Err(e) = tally::engine::failpoint::check_env() {
        eprintln!("tally: {e}");
        std::process::exit(2);
    }
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tally: configuration error: {e}");
            std::process::exit(2);
        }
    };
    // The log, and for `tally run` the traces (`[tracing]`, off by default).
    let traces = matches!(cli.command, Command::Run).then_some(&cfg.tracing);
    let telemetry = match tally::telemetry::init(traces) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tally: {e}");
            std::process::exit(2);
        }
    };
    let result = dispatch(cli.command, cfg).await;
    telemetry.shutdown().await;
    if let Err(e) = result {
        eprintln!("tally: {e:#}");
        std::process::exit(1);
    }
}

async fn dispatch(command: Command, cfg: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => tally::cli::migrate::run(&cfg, &args).await?,
        Command::Seed { tenants, scale } => {
            if scale <= rust_decimal::Decimal::ZERO {
                bail!("--scale must be > 0");
            }
            let pool = tally::sinks::postgres::connect_pg(&cfg).await?;
            let mut world = demo_world(tenants, demo_price_change_at());
            for b in &mut world.budgets {
                b.amount = (b.amount * scale)
                    .round_dp(6)
                    .max(rust_decimal::Decimal::new(1, 2));
            }
            let scaled = |q: i64| {
                use rust_decimal::prelude::ToPrimitive;
                (rust_decimal::Decimal::from(q) * scale)
                    .round()
                    .to_i64()
                    .unwrap_or(q)
                    .max(1)
            };
            for t in &mut world.tenants {
                t.requests_per_minute = scaled(t.requests_per_minute);
                t.tokens_per_minute = scaled(t.tokens_per_minute);
            }
            tally::cli::seed::seed(&pool, &world).await?;
            println!(
                "seeded {} tenants, {} prices, {} budgets",
                world.tenants.len(),
                world.prices.len(),
                world.budgets.len()
            );
        }
        Command::Run => {
            let shutdown = shutdown_on_signals();
            tally::engine::runner::run(cfg, shutdown).await?;
        }
        Command::Ingest(args) => {
            let shutdown = shutdown_on_signals();
            tally::cli::ingest::run(&args, cfg, shutdown).await?;
        }
        Command::Dlq { command } => print!("{}", tally::cli::dlq::run(&cfg, &command).await?),
        Command::Gen(args) => {
            let mut opts = args.options();
            let topics = Topics {
                usage: cfg.kafka.usage_topic.clone(),
                policy: cfg.policy.topic.clone(),
                audit: cfg.audit.topic.clone(),
            };
            if opts.encoding == Encoding::Confluent {
                opts.check()?;
                opts.confluent_schema_ids =
                    tally::cli::gen::confluent_schema_ids(&cfg, &topics, &opts).await?;
            }
            for (topic, report) in tally_producers::cli::run(
                &tally::sinks::kafka_client::KafkaClient::new(&cfg.kafka).config(),
                &topics,
                &opts,
            )
            .await?
            {
                println!(
                    "gen: sent {} messages to {topic} ({} new events, {} duplicates, {} malformed) in {:.1} s, seed {}",
                    report.sent,
                    report.good,
                    report.duplicates,
                    report.malformed,
                    report.elapsed.as_secs_f64(),
                    opts.seed
                );
            }
        }
        Command::Report(args) => print!("{}", tally::cli::report::run(&cfg, &args).await?),
        Command::Prices { command } => {
            print!("{}", tally::cli::import::run_prices(&cfg, command).await?)
        }
        Command::Budgets { command } => {
            print!("{}", tally::cli::import::run_budgets(&cfg, command).await?)
        }
        Command::ResetOffsets {
            topic,
            partition,
            to,
            yes,
        } => {
            let args = tally::cli::reset::ResetArgs {
                topic,
                partition,
                to,
                yes,
            };
            print!("{}", tally::cli::reset::run(&cfg, &args).await?);
        }
        Command::WaitIdle { timeout } => {
            let pool = tally::sinks::postgres::connect_pg(&cfg).await?;
            if !tally::cli::report::wait_idle(&cfg, &pool, Duration::from_secs(timeout)).await? {
                bail!("the pipeline did not catch up within {timeout} s");
            }
            println!("caught up");
        }
        Command::Audit { .. } => unreachable!("handled before the configuration is loaded"),
    }
    Ok(())
}
