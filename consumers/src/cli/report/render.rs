//! The report rendered as a table (people), one JSON document or CSV (one
//! section per file); the shapes are documented in docs/operations.md.
//!
//! Guarantee: JSON and CSV carry every money value exactly, as a decimal
//! string (never a float), under field names that do not change; a section
//! that was not asked for or does not apply is `null` in JSON, never left out.

use super::data::{Report, SpendTotals};
use crate::cli::csv;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// The report's sections, as `--section` names them (and the JSON keys).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Spend,
    Budgets,
    Decisions,
    Audit,
    Violations,
    Dlq,
}

fn money(d: Decimal) -> String {
    d.normalize().to_string()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// One JSON document: `filters`, `currency`, every section, `notes`.
pub fn json(r: &Report) -> String {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    let doc = json!({
        "report_version": 1,
        "filters": {
            "from": time(r.filters.from),
            "to": time(r.filters.to),
            "tenant": r.filters.tenant,
        },
        "currency": r.currency,
        "spend": r.spend.as_ref().map(|rows| rows.iter().map(|s| json!({
            "tenant_id": s.tenant_id,
            "provider": s.provider,
            "model": s.model,
            "requests": s.requests,
            "tokens": s.tokens,
            "cost": money(s.cost),
            "unpriced_requests": s.unpriced_requests,
        })).collect::<Vec<_>>()),
        "spend_totals": r.spend_totals.as_ref().map(|t| json!({
            "requests": t.requests,
            "cost": money(t.cost),
            "unpriced_requests": t.unpriced_requests,
            "postgres": t.postgres.as_ref().map(|(req, cost, unpriced)| json!({
                "requests": req,
                "cost": money(*cost),
                "unpriced_requests": unpriced,
            })),
        })),
        "budgets": r.budgets.as_ref().map(|rows| rows.iter().map(|b| json!({
            "budget_id": b.budget_id,
            "scope": b.scope,
            "tenant_id": b.tenant_id,
            "team_id": b.team_id,
            "period": b.period,
            "period_start": b.period_start.to_string(),
            "period_end": b.period_end.to_string(),
            "spent": money(b.spent),
            "amount": b.amount.map(money),
            "used_pct": b.used_pct.map(money),
        })).collect::<Vec<_>>()),
        "decisions": r.decisions.as_ref().map(|rows| rows.iter().map(|d| json!({
            "policy_id": d.policy_id,
            "decision": d.decision,
            "enforcement": d.enforcement,
            "decisions": d.decisions,
        })).collect::<Vec<_>>()),
        "audit": r.audit.as_ref().map(|rows| rows.iter().map(|a| json!({
            "tenant_id": a.tenant_id,
            "events": a.events,
            "tree_size": a.tree_size,
            "checkpoint_tree_size": a.checkpoint_tree_size,
            "checkpoints_published": a.checkpoints_published,
            "pending_leaves": a.pending_leaves,
        })).collect::<Vec<_>>()),
        "violations": r.violations.as_ref().map(|rows| rows.iter().map(|v| json!({
            "rule": v.rule,
            "raised": v.raised,
            "published": v.published,
        })).collect::<Vec<_>>()),
        "dlq": r.dlq.as_ref().map(|rows| rows.iter().map(|d| json!({
            "topic": d.topic,
            "error_class": d.error_class,
            "messages": d.messages,
        })).collect::<Vec<_>>()),
        "notes": r.notes,
    });
    let mut out = serde_json::to_string_pretty(&doc).unwrap_or_else(|_| Value::Null.to_string());
    out.push('\n');
    out
}

/// The header and rows of one section (`None`: the section is not in `r`).
pub fn csv(r: &Report, section: Section) -> Option<String> {
    let (header, rows): (&[&str], Vec<Vec<String>>) = match section {
        Section::Spend => (
            &[
                "tenant_id",
                "provider",
                "model",
                "requests",
                "tokens",
                "cost",
                "unpriced_requests",
            ],
            r.spend
                .as_ref()?
                .iter()
                .map(|s| {
                    vec![
                        s.tenant_id.clone(),
                        s.provider.clone(),
                        s.model.clone(),
                        s.requests.to_string(),
                        s.tokens.to_string(),
                        money(s.cost),
                        s.unpriced_requests.to_string(),
                    ]
                })
                .collect(),
        ),
        Section::Budgets => (
            &[
                "budget_id",
                "scope",
                "tenant_id",
                "team_id",
                "period",
                "period_start",
                "period_end",
                "spent",
                "amount",
                "used_pct",
            ],
            r.budgets
                .as_ref()?
                .iter()
                .map(|b| {
                    vec![
                        b.budget_id.clone(),
                        b.scope.clone(),
                        b.tenant_id.clone(),
                        opt(&b.team_id),
                        b.period.clone(),
                        b.period_start.to_string(),
                        b.period_end.to_string(),
                        money(b.spent),
                        opt(&b.amount.map(money)),
                        opt(&b.used_pct.map(money)),
                    ]
                })
                .collect(),
        ),
        Section::Decisions => (
            &["policy_id", "decision", "enforcement", "decisions"],
            r.decisions
                .as_ref()?
                .iter()
                .map(|d| {
                    vec![
                        d.policy_id.clone(),
                        d.decision.clone(),
                        d.enforcement.clone(),
                        d.decisions.to_string(),
                    ]
                })
                .collect(),
        ),
        Section::Audit => (
            &[
                "tenant_id",
                "events",
                "tree_size",
                "checkpoint_tree_size",
                "checkpoints_published",
                "pending_leaves",
            ],
            r.audit
                .as_ref()?
                .iter()
                .map(|a| {
                    vec![
                        a.tenant_id.clone(),
                        a.events.to_string(),
                        a.tree_size.to_string(),
                        opt(&a.checkpoint_tree_size),
                        a.checkpoints_published.to_string(),
                        a.pending_leaves.to_string(),
                    ]
                })
                .collect(),
        ),
        Section::Violations => (
            &["rule", "raised", "published"],
            r.violations
                .as_ref()?
                .iter()
                .map(|v| {
                    vec![
                        v.rule.clone(),
                        v.raised.to_string(),
                        v.published.to_string(),
                    ]
                })
                .collect(),
        ),
        Section::Dlq => (
            &["topic", "error_class", "messages"],
            r.dlq
                .as_ref()?
                .iter()
                .map(|d| {
                    vec![
                        d.topic.clone(),
                        d.error_class.clone(),
                        d.messages.to_string(),
                    ]
                })
                .collect(),
        ),
    };
    let mut out = csv::row(header);
    for row in rows {
        out.push_str(&csv::row(&row));
    }
    Some(out)
}

fn limited<T>(rows: &[T], limit: Option<usize>) -> (&[T], usize) {
    let n = limit.unwrap_or(usize::MAX).min(rows.len());
    (&rows[..n], rows.len() - n)
}

fn more(out: &mut String, hidden: usize) {
    if hidden > 0 {
        out.push_str(&format!("... {hidden} more rows (--limit)\n"));
    }
}

/// For people: every section asked for, `limit` rows each; costs rounded to
/// 6 decimals (JSON and CSV carry them exactly).
pub fn table(r: &Report, limit: Option<usize>, violation_topic: &str) -> String {
    let mut out = String::new();
    let f = &r.filters;
    let bound = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(
            || "-".to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    };
    let range = if f.from.is_none() && f.to.is_none() {
        "all time".to_string()
    } else {
        format!("from {} to {} (exclusive)", bound(f.from), bound(f.to))
    };
    out.push_str(&format!(
        "tally report: {range}, tenant {}; money in {}\n",
        f.tenant.as_deref().unwrap_or("(all)"),
        r.currency
    ));
    if let Some(rows) = &r.spend {
        out.push_str("\n== Spend by tenant and model (ClickHouse spend_hourly) ==\n");
        out.push_str(&format!(
            "{:<12} {:<10} {:<18} {:>9} {:>12} {:>16} {:>9}\n",
            "tenant", "provider", "model", "requests", "tokens", "cost", "unpriced"
        ));
        let (shown, hidden) = limited(rows, limit);
        for s in shown {
            out.push_str(&format!(
                "{:<12} {:<10} {:<18} {:>9} {:>12} {:>16} {:>9}\n",
                s.tenant_id,
                s.provider,
                s.model,
                s.requests,
                s.tokens,
                format!("{:.6}", s.cost.round_dp(6)),
                s.unpriced_requests
            ));
        }
        more(&mut out, hidden);
    }
    if let Some(SpendTotals {
        requests,
        cost,
        unpriced_requests,
        postgres,
    }) = &r.spend_totals
    {
        out.push_str(&format!(
            "\nClickHouse total: {requests} requests, cost {:.6} {}, {unpriced_requests} unpriced requests\n",
            cost.round_dp(6),
            r.currency
        ));
        match postgres {
            Some((req, cost, unpriced)) => out.push_str(&format!(
                "Postgres spend_daily: {req} requests, cost {:.6} {}, {unpriced} unpriced requests\n",
                cost.round_dp(6),
                r.currency
            )),
            None => out.push_str(
                "Postgres spend_daily: not compared (kept per day; the range is not whole days)\n",
            ),
        }
    }
    if let Some(rows) = &r.budgets {
        out.push_str("\n== Budget periods in the range (highest use first) ==\n");
        let (shown, hidden) = limited(rows, limit);
        for b in shown {
            out.push_str(&format!(
                "{:<24} {:<6} {:<5} {} spent {:>12} of {:>10} ({}%)\n",
                b.budget_id,
                b.scope,
                b.period,
                b.period_start,
                b.spent.round_dp(4),
                opt(&b.amount),
                opt(&b.used_pct)
            ));
        }
        more(&mut out, hidden);
    }
    if let Some(rows) = &r.decisions {
        out.push_str(
            "\n== Policy decisions by policy and outcome (ClickHouse policy_decisions_hourly) ==\n",
        );
        out.push_str(&format!(
            "{:<28} {:<8} {:<8} {:>10}\n",
            "policy", "decision", "mode", "decisions"
        ));
        let (shown, hidden) = limited(rows, limit);
        for d in shown {
            out.push_str(&format!(
                "{:<28} {:<8} {:<8} {:>10}\n",
                d.policy_id, d.decision, d.enforcement, d.decisions
            ));
        }
        more(&mut out, hidden);
    }
    if let Some(rows) = &r.audit {
        out.push_str(
            "\n== Audit logs (events in the range; leaves and latest signed checkpoint now) ==\n",
        );
        let (shown, hidden) = limited(rows, limit);
        for a in shown {
            out.push_str(&format!(
                "{:<16} {:>8} events, {:>8} leaves ({} reserved, not committed), checkpoint at {}, {} checkpoints published\n",
                a.tenant_id,
                a.events,
                a.tree_size,
                a.pending_leaves,
                a.checkpoint_tree_size.map_or_else(|| "-".to_string(), |s| s.to_string()),
                a.checkpoints_published
            ));
        }
        more(&mut out, hidden);
    }
    if let Some(rows) = &r.violations {
        out.push_str("\n== Violations raised (by rule) ==\n");
        for v in rows {
            out.push_str(&format!(
                "{:<22} {:>6} raised, {:>6} published to {violation_topic}\n",
                v.rule, v.raised, v.published
            ));
        }
    }
    if let Some(rows) = &r.dlq {
        let total: i64 = rows.iter().map(|d| d.messages).sum();
        out.push_str(&format!(
            "\n== Dead letters: {total} messages (on each source topic's .dlq) ==\n"
        ));
        let (shown, hidden) = limited(rows, limit);
        for d in shown {
            out.push_str(&format!(
                "{:<40} {:>6}\n",
                format!("{}: {}", d.topic, d.error_class),
                d.messages
            ));
        }
        more(&mut out, hidden);
    }
    for n in &r.notes {
        out.push_str(&format!("\nnote: {n}\n"));
    }
    out
}
