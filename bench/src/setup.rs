//! What every run starts from: fresh topics, freshly emptied databases, the
//! generated events, and the bare consumer that sets the ceiling.
//!
//! Guarantee: each measured pipeline reads the same bytes (one topic per
//! encoding, produced once) into its own empty databases, so no run sees
//! another's state and tally's dedup never meets an earlier run's keys.

use anyhow::{bail, Context};
use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tally::config::Config;
use tally_producers::{demo_world, Encoding, GenConfig};

/// The database (Postgres and ClickHouse) tally's runs write to.
pub const DB: &str = "tally_bench";

/// The demo world's price change: the start of the previous hour (as `tally gen`).
pub fn price_change_at() -> DateTime<Utc> {
    let hour = Utc::now()
        .duration_trunc(ChronoDuration::hours(1))
        .unwrap_or_else(|_| Utc::now());
    hour - ChronoDuration::hours(1)
}

/// `count` good usage events of `tenants` tenants (no duplicates, late or poison).
pub fn gen_config(count: u64, seed: u64, encoding: Encoding, tenants: usize) -> GenConfig {
    let change = price_change_at();
    let mut g = GenConfig::new(demo_world(tenants, change), count, seed);
    g.encoding = encoding;
    g.duplicates = 0.0;
    g.late = 0.0;
    g.malformed = 0.0;
    g.start = change - ChronoDuration::hours(1);
    g.span = ChronoDuration::hours(2);
    g
}

/// A copy of `cfg` pointed at `topic` (and its DLQ / violation topics) and `group`.
pub fn scoped(cfg: &Config, topic: &str, group: &str) -> Config {
    let mut c = cfg.clone();
    c.kafka.usage_topic = topic.to_string();
    c.kafka.dlq_topic = format!("{topic}.dlq");
    c.kafka.violation_topic = format!("{topic}.violations");
    c.kafka.group_id = group.to_string();
    c.kafka.usage_partitions = 4;
    c
}

pub async fn create_topics(cfg: &Config) -> anyhow::Result<()> {
    let mut attempts = 0;
    loop {
        match tally::cli::migrate::topics(cfg).await {
            Ok(_) => return Ok(()),
            Err(tally::errors::StageError::Retryable(m)) if attempts < 10 => {
                attempts += 1;
                tracing::warn!(error = %m, "kafka not ready; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Deletes a finished run's topics (its usage topic, dead letters and
/// violations). noida-db snapshots its whole state after any second with a
/// write, so the data of earlier runs would otherwise make every later run pay
/// for serializing it again; a Kafka broker's cost does not grow with other
/// topics. Waits until the broker no longer lists them.
pub async fn delete_topics(cfg: &Config) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .create()
        .context("kafka admin client")?;
    let topics = [
        cfg.kafka.usage_topic.as_str(),
        cfg.kafka.dlq_topic.as_str(),
        cfg.kafka.violation_topic.as_str(),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.delete_topics(&topics, &opts).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((t, e)) => bail!("deleting topic {t}: {e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .context("kafka metadata")?;
        if !md.topics().iter().any(|t| topics.contains(&t.name())) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topics {topics:?} still listed 30 s after their deletion");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Empties `tally_bench` in Postgres and ClickHouse, migrates and seeds it with
/// a world of `tenants` tenants; returns `cfg` pointed at it.
pub async fn fresh_databases(cfg: &Config, tenants: usize) -> anyhow::Result<Config> {
    let admin = tally::sinks::postgres::connect_pg(cfg).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {DB}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut out = cfg.clone();
    let (head, _) = cfg
        .postgres
        .url
        .rsplit_once('/')
        .context("postgres.url has no database part")?;
    out.postgres.url = format!("{head}/{DB}");
    out.clickhouse.database = DB.into();
    clickhouse_admin(cfg)
        .execute(&format!("DROP DATABASE IF EXISTS {DB}"))
        .await?;
    let pool = tally::sinks::postgres::connect_pg(&out).await?;
    tally::cli::migrate::postgres(&pool).await?;
    tally::cli::migrate::clickhouse(&out).await?;
    seed(&pool, tenants).await?;
    pool.close().await;
    Ok(out)
}

/// Tenants seeded one statement at a time (`tally seed`); the rest in bulk.
const SEED_ONE_BY_ONE: usize = 60;

/// Seeds the demo world of `tenants` tenants: its first 60 tenants (with prices,
/// budgets and grants) through `tally seed`, the others (tenants, teams,
/// projects) with one bulk insert per table.
async fn seed(pool: &sqlx::PgPool, tenants: usize) -> anyhow::Result<()> {
    let world = demo_world(tenants, price_change_at());
    let mut head = world.clone();
    head.tenants.truncate(SEED_ONE_BY_ONE);
    let kept: std::collections::HashSet<&str> =
        head.tenants.iter().map(|t| t.tenant_id.as_str()).collect();
    head.budgets.retain(|b| kept.contains(b.tenant_id.as_str()));
    drop(kept);
    tally::cli::seed::seed(pool, &head).await?;
    let rest = world.tenants.get(SEED_ONE_BY_ONE..).unwrap_or_default();
    if rest.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = rest.iter().map(|t| t.tenant_id.as_str()).collect();
    let names: Vec<&str> = rest.iter().map(|t| t.name.as_str()).collect();
    let rpm: Vec<i64> = rest.iter().map(|t| t.requests_per_minute).collect();
    let tpm: Vec<i64> = rest.iter().map(|t| t.tokens_per_minute).collect();
    sqlx::query(
        "INSERT INTO tally.tenants (tenant_id, name, requests_per_minute, tokens_per_minute) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) ON CONFLICT DO NOTHING",
    )
    .bind(&ids)
    .bind(&names)
    .bind(&rpm)
    .bind(&tpm)
    .execute(pool)
    .await
    .context("bulk tenants")?;
    for (table, pick) in [
        (
            "teams",
            (|t| &t.teams) as fn(&tally_producers::world::TenantSpec) -> &Vec<String>,
        ),
        ("projects", |t| &t.projects),
    ] {
        let (ts, xs): (Vec<&str>, Vec<&str>) = rest
            .iter()
            .flat_map(|t| {
                pick(t)
                    .iter()
                    .map(move |x| (t.tenant_id.as_str(), x.as_str()))
            })
            .unzip();
        let col = &table[..table.len() - 1];
        sqlx::query(&format!(
            "INSERT INTO tally.{table} (tenant_id, {col}_id, name) \
             SELECT t, x, x FROM UNNEST($1::text[], $2::text[]) AS u(t, x) ON CONFLICT DO NOTHING"
        ))
        .bind(&ts)
        .bind(&xs)
        .execute(pool)
        .await
        .with_context(|| format!("bulk {table}"))?;
    }
    Ok(())
}

/// A ClickHouse handle on the `default` database.
pub fn clickhouse_admin(cfg: &Config) -> tally::sinks::clickhouse::ClickHouseSink {
    let mut ch = cfg.clickhouse.clone();
    ch.database = "default".into();
    tally::sinks::clickhouse::ClickHouseSink::new(&ch)
}

/// Generous deadline for consuming `n` events (2 min + 1 s per 2000 events).
pub fn deadline(n: u64) -> Duration {
    Duration::from_secs(120 + n / 2000)
}

/// What the bare consumer saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw {
    pub elapsed: Duration,
    pub first: Option<Duration>,
    pub bytes: u64,
}

/// A consumer of `topic` in a fresh `group` that reads from the beginning,
/// commits nothing and takes noida-db's one-reply fetches.
pub fn bare_consumer(brokers: &str, topic: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("receive.message.max.bytes", "2147483647")
        .create()
        .with_context(|| format!("creating a consumer of {topic}"))?;
    consumer
        .subscribe(&[topic])
        .with_context(|| format!("subscribing to {topic}"))?;
    Ok(consumer)
}

/// Reads `topic` from the beginning with a bare consumer until `n` messages
/// arrived, counting messages and bytes and nothing else.
pub fn raw_consume(brokers: &str, topic: &str, group: &str, n: u64) -> anyhow::Result<Raw> {
    let started = Instant::now();
    let timeout = deadline(n);
    let consumer = bare_consumer(brokers, topic, group)?;
    let (mut msgs, mut raw) = (0u64, Raw::default());
    while msgs < n {
        if started.elapsed() > timeout {
            bail!(
                "raw consumer got {msgs} of {n} messages within {} s",
                timeout.as_secs()
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                raw.first.get_or_insert_with(|| started.elapsed());
                msgs += 1;
                let len = m.payload_len() + m.key().map_or(0, <[u8]>::len);
                raw.bytes += u64::try_from(len).unwrap_or(0);
            }
            Some(Err(e)) => tracing::warn!(error = %e, "raw consumer error"),
            None => {}
        }
    }
    raw.elapsed = started.elapsed();
    Ok(raw)
}

/// `TALLY_REPO`, or the nearest ancestor of the current directory holding a
/// workspace `Cargo.toml`.
pub fn repo_root() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TALLY_REPO").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let cwd = std::env::current_dir()?;
    for dir in cwd.ancestors() {
        let manifest = dir.join("Cargo.toml");
        if std::fs::read_to_string(&manifest).is_ok_and(|t| t.contains("[workspace]")) {
            return Ok(dir.to_path_buf());
        }
    }
    bail!(
        "no workspace Cargo.toml above {}; set TALLY_REPO",
        cwd.display()
    )
}
