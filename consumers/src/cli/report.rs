//! `tally report` and `tally wait-idle`: what the pipeline wrote, read back from
//! ClickHouse (through the analyst views) and Postgres, filtered by time range
//! and tenant, as a table, JSON or CSV; and whether it has caught up.
//!
//! Guarantee: read-only; every section applies the same filters (or says why it
//! cannot), and JSON and CSV carry money exactly (docs/operations.md).

pub mod data;
pub mod render;

use crate::config::Config;
use crate::errors::{pg, StageError};
use crate::sinks::clickhouse::ClickHouseSink;
use chrono::{DateTime, NaiveDate, Timelike, Utc};
pub use data::{Filters, Report};
pub use render::Section;
use sqlx::postgres::PgPool;
use std::time::{Duration, Instant};

/// The output format of `tally report`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Csv,
}

/// The flags of `tally report`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// Start of the range, inclusive: YYYY-MM-DD or an RFC 3339 time on a whole hour (UTC).
    #[arg(long, value_parser = parse_bound)]
    pub from: Option<DateTime<Utc>>,
    /// End of the range, exclusive: YYYY-MM-DD or an RFC 3339 time on a whole hour (UTC).
    #[arg(long, value_parser = parse_bound)]
    pub to: Option<DateTime<Utc>>,
    /// Only this tenant (dead letters carry no tenant: that section is then left out).
    #[arg(long)]
    pub tenant: Option<String>,
    /// table (for people), json (one document) or csv (one section: needs --section).
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Only this section (spend, budgets, decisions, audit, violations, dlq).
    #[arg(long, value_enum)]
    pub section: Option<Section>,
    /// Table format: at most this many rows per section.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// A range bound: a date (midnight UTC) or an RFC 3339 time on a whole hour
/// (the report reads hourly rollups, so anything finer would be inexact).
pub fn parse_bound(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let t = DateTime::parse_from_rfc3339(s)
        .map_err(|_| format!("{s:?} is neither a date YYYY-MM-DD nor an RFC 3339 time such as 2025-01-01T10:00:00Z"))?
        .with_timezone(&Utc);
    if t.minute() != 0 || t.second() != 0 || t.nanosecond() != 0 {
        return Err(format!(
            "{s:?} is not on a whole hour: the report reads hourly rollups, so it takes whole hours (UTC)"
        ));
    }
    Ok(t)
}

impl ReportArgs {
    /// The filters, after checking the flags against each other.
    pub fn filters(&self) -> Result<Filters, String> {
        if let (Some(f), Some(t)) = (self.from, self.to) {
            if f >= t {
                return Err(format!(
                    "--from {f} must be before --to {t} (the range is [from, to))"
                ));
            }
        }
        if self.format == Format::Csv && self.section.is_none() {
            return Err("--format csv writes one section: add --section spend|budgets|decisions|audit|violations|dlq".into());
        }
        if self.tenant.is_some() && self.format == Format::Csv && self.section == Some(Section::Dlq)
        {
            return Err("--section dlq cannot be filtered by --tenant: dead letters carry no tenant (a poison message may have none)".into());
        }
        if self.tenant.as_deref().is_some_and(str::is_empty) {
            return Err("--tenant must not be empty".into());
        }
        Ok(Filters {
            from: self.from,
            to: self.to,
            tenant: self.tenant.clone(),
        })
    }
}

/// Reads every section `section` asks for (all when `None`).
pub async fn collect(
    cfg: &Config,
    pool: &PgPool,
    filters: &Filters,
    section: Option<Section>,
) -> Result<Report, StageError> {
    let ch = ClickHouseSink::new(&cfg.clickhouse);
    let want = |s: Section| section.is_none_or(|x| x == s);
    let mut r = Report {
        filters: filters.clone(),
        currency: data::currency(pool).await?,
        ..Report::default()
    };
    if want(Section::Spend) {
        let rows = data::spend(cfg, &ch, filters).await?;
        let totals = data::spend_totals(pool, filters, &rows).await?;
        if totals.postgres.is_none() {
            r.notes.push(
                "spend_totals.postgres is null: Postgres keeps spend per day and the range is not whole days".into(),
            );
        }
        r.spend_totals = Some(totals);
        r.spend = Some(rows);
    }
    if want(Section::Budgets) {
        r.budgets = Some(data::budgets(pool, filters).await?);
    }
    if want(Section::Decisions) {
        r.decisions = Some(data::decisions(cfg, &ch, filters).await?);
    }
    if want(Section::Audit) {
        r.audit = Some(data::audit(cfg, &ch, pool, filters).await?);
    }
    if want(Section::Violations) {
        r.violations = Some(data::violations(pool, filters).await?);
    }
    if want(Section::Dlq) {
        if filters.tenant.is_some() {
            r.notes.push(
                "dlq is null: dead letters carry no tenant (a poison message may have none), so --tenant cannot select them".into(),
            );
        } else {
            r.dlq = Some(data::dlq(pool, filters).await?);
        }
    }
    Ok(r)
}

/// `tally report`: the rendered report (usage errors are `Err(message)` before anything is read).
pub async fn run(cfg: &Config, args: &ReportArgs) -> anyhow::Result<String> {
    let filters = args.filters().map_err(anyhow::Error::msg)?;
    let pool = crate::sinks::postgres::connect_pg(cfg).await?;
    let report = collect(cfg, &pool, &filters, args.section).await?;
    Ok(match args.format {
        Format::Table => render::table(&report, args.limit, &cfg.kafka.violation_topic),
        Format::Json => render::json(&report),
        Format::Csv => args
            .section
            .and_then(|s| render::csv(&report, s))
            .unwrap_or_default(),
    })
}

/// Waits until the offsets of record reach the topic's end, no batch is
/// pending and the outbox is empty. Returns false on timeout.
pub async fn wait_idle(cfg: &Config, pool: &PgPool, timeout: Duration) -> Result<bool, StageError> {
    let deadline = Instant::now() + timeout;
    let mut stable = 0;
    let inputs: Vec<(String, &str)> = [
        (cfg.streams.usage, "usage", &cfg.kafka.usage_topic),
        (cfg.streams.policy, "policy", &cfg.policy.topic),
        (cfg.streams.audit, "audit", &cfg.audit.topic),
    ]
    .into_iter()
    .filter(|(on, _, _)| *on)
    .map(|(_, s, t)| (cfg.group_for(s), t.as_str()))
    .collect();
    while Instant::now() < deadline {
        let mut caught_up = true;
        for (group, topic) in &inputs {
            caught_up &= topic_caught_up(cfg, pool, group, topic).await?;
        }
        let busy: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM tally.batches WHERE state = 'pending') + \
             (SELECT count(*) FROM tally.violations WHERE published_at IS NULL) + \
             (SELECT count(*) FROM tally.audit_leaves) + \
             (SELECT count(*) FROM tally.audit_checkpoints WHERE published_at IS NULL)",
        )
        .fetch_one(pool)
        .await
        .map_err(pg("wait busy"))?;
        if caught_up && busy == 0 {
            stable += 1;
            if stable >= 2 {
                return Ok(true);
            }
        } else {
            stable = 0;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(false)
}

/// Whether the offsets of record of `group` reach the end of every partition of `topic`.
async fn topic_caught_up(
    cfg: &Config,
    pool: &PgPool,
    group: &str,
    topic: &str,
) -> Result<bool, StageError> {
    let ends = crate::engine::relay::end_offsets(
        &crate::sinks::kafka_client::KafkaClient::new(&cfg.kafka),
        topic,
    )
    .await?;
    let offsets: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM tally.consumer_offsets WHERE group_id = $1 AND topic = $2",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(pool)
    .await
    .map_err(pg("wait offsets"))?;
    Ok(ends.iter().enumerate().all(|(p, end)| {
        *end == 0
            || offsets
                .iter()
                .any(|(q, n)| usize::try_from(*q).ok() == Some(p) && n >= end)
    }))
}
