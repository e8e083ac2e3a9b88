//! `tally report` and `tally wait-idle`: what the pipeline wrote, read back from
//! ClickHouse and Postgres, and whether it has caught up with the topic.

use crate::config::Config;
use crate::errors::{classify_ch, pg, StageError};
use crate::sinks::clickhouse::ClickHouseSink;
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;
use sqlx::postgres::PgPool;
use sqlx::Row as _;
use std::time::{Duration, Instant};

#[derive(Row, Deserialize)]
struct SpendRow {
    tenant_id: String,
    provider: String,
    model: String,
    requests: u64,
    tokens: u64,
    total_cost: String,
}

pub async fn report(cfg: &Config, pool: &PgPool) -> Result<String, StageError> {
    let ch = ClickHouseSink::new(&cfg.clickhouse);
    let mut out = String::new();
    out.push_str("== Spend by tenant and model (ClickHouse usage_1d, top 15) ==\n");
    out.push_str(&format!(
        "{:<12} {:<10} {:<18} {:>9} {:>12} {:>16}\n",
        "tenant", "provider", "model", "requests", "tokens", "cost"
    ));
    let sql = format!(
        "SELECT tenant_id, provider, model, sum(requests) AS requests, \
         sum(input_tokens + cached_input_tokens + cache_write_tokens + output_tokens + reasoning_tokens) AS tokens, \
         toString(sum(cost)) AS total_cost FROM {}.usage_1d GROUP BY tenant_id, provider, model \
         ORDER BY sum(cost) DESC, tenant_id, provider, model LIMIT 15",
        cfg.clickhouse.database
    );
    let rows: Vec<SpendRow> = ch
        .client()
        .query(&sql)
        .fetch_all()
        .await
        .map_err(|e| classify_ch("report spend", e))?;
    for r in rows {
        let cost: Decimal = r.total_cost.parse().unwrap_or_default();
        out.push_str(&format!(
            "{:<12} {:<10} {:<18} {:>9} {:>12} {:>16}\n",
            r.tenant_id,
            r.provider,
            r.model,
            r.requests,
            r.tokens,
            cost.round_dp(6)
        ));
    }
    let totals = sqlx::query(
        "SELECT coalesce(sum(requests),0)::bigint, coalesce(sum(cost),0), coalesce(sum(unpriced_requests),0)::bigint FROM tally.spend_daily",
    )
    .fetch_one(pool)
    .await
    .map_err(pg("report totals"))?;
    let (req, cost, unpriced): (i64, Decimal, i64) = (totals.get(0), totals.get(1), totals.get(2));
    out.push_str(&format!(
        "\nPostgres spend_daily: {req} requests, cost {} USD, {unpriced} unpriced requests\n",
        cost.round_dp(6)
    ));

    out.push_str("\n== Budget status (highest use first) ==\n");
    let budgets = sqlx::query(
        "SELECT b.budget_id, b.scope, b.period, s.period_start, s.spent, b.amount, round(100 * s.spent / b.amount, 1) AS pct \
         FROM tally.budget_spend s JOIN tally.budgets b USING (budget_id) ORDER BY s.spent / b.amount DESC LIMIT 12",
    )
    .fetch_all(pool)
    .await
    .map_err(pg("report budgets"))?;
    for b in budgets {
        let (id, scope, period): (String, String, String) = (b.get(0), b.get(1), b.get(2));
        let start: chrono::NaiveDate = b.get(3);
        let (spent, amount, pct): (Decimal, Decimal, Decimal) = (b.get(4), b.get(5), b.get(6));
        out.push_str(&format!(
            "{id:<24} {scope:<6} {period:<5} {start} spent {:>12} of {:>10} ({pct}%)\n",
            spent.round_dp(4),
            amount.normalize()
        ));
    }

    out.push_str(&decisions_and_logs(cfg, &ch, pool).await?);

    out.push_str("\n== Violations raised (by rule) ==\n");
    let vs = sqlx::query(
        "SELECT rule, count(*)::bigint, count(published_at)::bigint FROM tally.violations GROUP BY rule ORDER BY rule",
    )
    .fetch_all(pool)
    .await
    .map_err(pg("report violations"))?;
    for v in vs {
        let (rule, n, published): (String, i64, i64) = (v.get(0), v.get(1), v.get(2));
        out.push_str(&format!(
            "{rule:<22} {n:>6} raised, {published:>6} published to {}\n",
            cfg.kafka.violation_topic
        ));
    }
    let dlq = sqlx::query(
        "SELECT topic || ': ' || error_class, count(*)::bigint FROM tally.dead_letters GROUP BY 1 ORDER BY 2 DESC",
    )
    .fetch_all(pool)
    .await
    .map_err(pg("report dead letters"))?;
    let total: i64 = dlq.iter().map(|r| r.get::<i64, _>(1)).sum();
    out.push_str(&format!(
        "\n== Dead letters: {total} messages (on each source topic's .dlq) ==\n"
    ));
    for r in dlq {
        out.push_str(&format!(
            "{:<24} {:>6}\n",
            r.get::<String, _>(0),
            r.get::<i64, _>(1)
        ));
    }
    Ok(out)
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

#[derive(Row, Deserialize)]
struct DecisionRow {
    policy_id: String,
    decision: String,
    enforcement: String,
    decisions: u64,
}

/// Policy decisions by policy and outcome (ClickHouse) and each tenant's audit
/// log (Postgres: tree size, latest checkpoint).
async fn decisions_and_logs(
    cfg: &Config,
    ch: &ClickHouseSink,
    pool: &PgPool,
) -> Result<String, StageError> {
    let mut out = String::from(
        "\n== Policy decisions by policy and outcome (ClickHouse policy_decisions_1d) ==\n",
    );
    let sql = format!(
        "SELECT policy_id, decision, enforcement, sum(decisions) AS decisions FROM {}.policy_decisions_1d \
         GROUP BY policy_id, decision, enforcement ORDER BY policy_id, decision, enforcement LIMIT 30",
        cfg.clickhouse.database
    );
    let rows: Vec<DecisionRow> = ch
        .client()
        .query(&sql)
        .fetch_all()
        .await
        .map_err(|e| classify_ch("report decisions", e))?;
    out.push_str(&format!(
        "{:<28} {:<8} {:<8} {:>10}\n",
        "policy", "decision", "mode", "decisions"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<28} {:<8} {:<8} {:>10}\n",
            r.policy_id, r.decision, r.enforcement, r.decisions
        ));
    }
    out.push_str("\n== Audit logs (per tenant: leaves in the tree, latest signed checkpoint) ==\n");
    let logs = sqlx::query(
        "SELECT t.tenant_id, t.tree_size, t.next_index, \
           (SELECT c.tree_size FROM tally.audit_checkpoints c WHERE c.tenant_id = t.tenant_id ORDER BY c.checkpoint_id DESC LIMIT 1), \
           (SELECT count(*) FROM tally.audit_checkpoints c WHERE c.tenant_id = t.tenant_id AND c.published_at IS NOT NULL) \
         FROM tally.audit_trees t ORDER BY t.tenant_id LIMIT 20",
    )
    .fetch_all(pool)
    .await
    .map_err(pg("report audit logs"))?;
    for l in logs {
        let (tenant, size, reserved): (String, i64, i64) = (l.get(0), l.get(1), l.get(2));
        let (signed, published): (Option<i64>, i64) = (l.get(3), l.get(4));
        out.push_str(&format!(
            "{tenant:<16} {size:>8} leaves ({} reserved, not committed), checkpoint at {}, {published} checkpoints on {}\n",
            reserved - size,
            signed.map_or_else(|| "-".to_string(), |s| s.to_string()),
            cfg.audit.checkpoint_topic
        ));
    }
    Ok(out)
}
