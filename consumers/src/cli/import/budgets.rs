//! `tally budgets import`: budgets and their effective-dated versions from CSV
//! into `tally.budgets` (a budget's identity and first version) and
//! `tally.budget_versions` (later versions; migration 0007).
//!
//! Guarantee: a budget's scope, tenant, team and period never change, and a
//! stored version (budget, effective_from) is never changed: a row equal to it
//! is unchanged, a row with another amount or thresholds is an error naming
//! the cell, and a new row adds a version in force from its first period.
//! All rows are checked first; a valid file is one transaction.

use super::{check, Cell, ImportError, Outcome, Problems, Sheet};
use crate::errors::{pg, StageError};
use chrono::{Datelike, NaiveDate};
use rust_decimal::Decimal;
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The columns of a budgets file, in the documented order.
pub const COLUMNS: [&str; 8] = [
    "budget_id",
    "scope",
    "tenant_id",
    "team_id",
    "period",
    "amount",
    "thresholds_pct",
    "effective_from",
];

/// Thresholds when the cell is empty (the table's default).
const DEFAULT_THRESHOLDS: [i64; 3] = [50, 80, 100];

/// What never changes for a budget id: scope, tenant, team, period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub scope: String,
    pub tenant_id: String,
    pub team_id: Option<String>,
    pub period: String,
}

impl Identity {
    /// The first column that differs from `other`, with both values.
    fn differs(&self, other: &Identity) -> Option<(&'static str, String, String)> {
        let team = |t: &Option<String>| t.clone().unwrap_or_default();
        [
            ("scope", self.scope.clone(), other.scope.clone()),
            ("tenant_id", self.tenant_id.clone(), other.tenant_id.clone()),
            ("team_id", team(&self.team_id), team(&other.team_id)),
            ("period", self.period.clone(), other.period.clone()),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b)
    }
}

/// One valid row: a version of a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRow {
    pub line: usize,
    pub budget_id: String,
    pub identity: Identity,
    pub amount: Decimal,
    /// Sorted, normalized.
    pub thresholds_pct: Vec<Decimal>,
    /// `None`: in force from the beginning.
    pub effective_from: Option<NaiveDate>,
}

/// A stored version: (amount, thresholds).
type Version = (Decimal, Vec<Decimal>);

fn from_text(d: Option<NaiveDate>) -> String {
    d.map_or_else(|| "the beginning".to_string(), |d| d.to_string())
}

fn thresholds(c: &Cell<'_>) -> Result<Vec<Decimal>, String> {
    if c.value.is_empty() {
        return Ok(DEFAULT_THRESHOLDS
            .iter()
            .map(|p| Decimal::from(*p))
            .collect());
    }
    let mut out = Vec::new();
    for part in c.value.split(';') {
        let one = Cell { value: part, ..*c };
        let pct = check::decimal(&one).map_err(|_| {
            format!(
                "{part:?} in {:?} is not a percentage (e.g. 50;80;100)",
                c.value
            )
        })?;
        if pct <= Decimal::ZERO {
            return Err(format!("threshold {part} must be > 0 percent"));
        }
        if out.contains(&pct) {
            return Err(format!("threshold {part} appears twice"));
        }
        out.push(pct);
    }
    out.sort();
    Ok(out)
}

fn one_of(c: &Cell<'_>, allowed: &[&str]) -> Result<String, String> {
    if allowed.contains(&c.value) {
        Ok(c.value.to_string())
    } else {
        Err(format!(
            "{:?} is not one of {}",
            c.value,
            allowed.join(", ")
        ))
    }
}

/// Checks every row of the file on its own and against the others.
pub fn validate(sheet: &Sheet) -> Result<Vec<BudgetRow>, ImportError> {
    let mut problems = Problems::default();
    let mut rows: Vec<BudgetRow> = Vec::new();
    let mut seen: BTreeMap<(String, Option<NaiveDate>), usize> = BTreeMap::new();
    let file = sheet.file.as_str();
    for rec in &sheet.rows {
        let cell = |name| sheet.cell(rec, name);
        let p = &mut problems;
        let budget_id = p.take(file, &cell("budget_id"), check::ident(&cell("budget_id")));
        let scope = p.take(
            file,
            &cell("scope"),
            one_of(&cell("scope"), &["tenant", "team"]),
        );
        let tenant_id = p.take(file, &cell("tenant_id"), check::ident(&cell("tenant_id")));
        let team = cell("team_id");
        let team_id = match scope.as_deref() {
            Some("team") => p.take(file, &team, check::ident(&team)).map(Some),
            Some(_) if !team.value.is_empty() => p.take(
                file,
                &team,
                Err(format!(
                    "{:?}: a tenant-scope budget has no team (leave it empty or use scope team)",
                    team.value
                )),
            ),
            _ => Some(None),
        };
        let period = p.take(
            file,
            &cell("period"),
            one_of(&cell("period"), &["day", "month"]),
        );
        let amount_cell = cell("amount");
        let amount = p.take(
            file,
            &amount_cell,
            check::decimal(&amount_cell).and_then(|a| {
                if a > Decimal::ZERO {
                    Ok(a)
                } else {
                    Err(format!("{} must be > 0", amount_cell.value))
                }
            }),
        );
        let thresholds_pct = p.take(
            file,
            &cell("thresholds_pct"),
            thresholds(&cell("thresholds_pct")),
        );
        let eff = cell("effective_from");
        let effective_from = if eff.value.is_empty() {
            Some(None)
        } else {
            let d = check::date(&eff).and_then(|d| match period.as_deref() {
                Some("month") if d.day() != 1 => Err(format!(
                    "{d} is not the first day of a month (a month budget's versions start with a period)"
                )),
                _ => Ok(d),
            });
            p.take(file, &eff, d).map(Some)
        };
        let (
            Some(budget_id),
            Some(scope),
            Some(tenant_id),
            Some(team_id),
            Some(period),
            Some(amount),
            Some(thresholds_pct),
            Some(effective_from),
        ) = (
            budget_id,
            scope,
            tenant_id,
            team_id,
            period,
            amount,
            thresholds_pct,
            effective_from,
        )
        else {
            continue;
        };
        let identity = Identity {
            scope,
            tenant_id,
            team_id,
            period,
        };
        if let Some(line) = seen.get(&(budget_id.clone(), effective_from)) {
            problems.push(eff.problem(
                file,
                format!(
                    "budget {budget_id} effective from {} is already on line {line}",
                    from_text(effective_from)
                ),
            ));
            continue;
        }
        if let Some(first) = rows.iter().find(|r| r.budget_id == budget_id) {
            if let Some((col, mine, theirs)) = identity.differs(&first.identity) {
                problems.push(cell(col).problem(
                    file,
                    format!(
                        "{mine:?} differs from {theirs:?} on line {} for budget {budget_id}: \
                         a budget's scope, tenant, team and period never change (use another budget_id)",
                        first.line
                    ),
                ));
                continue;
            }
        }
        seen.insert((budget_id.clone(), effective_from), rec.line);
        rows.push(BudgetRow {
            line: rec.line,
            budget_id,
            identity,
            amount,
            thresholds_pct,
            effective_from,
        });
    }
    problems.into_result()?;
    Ok(rows)
}

/// A stored budget: identity, its first version (budgets row) and later ones.
struct Stored {
    identity: Identity,
    base_from: Option<NaiveDate>,
    versions: BTreeMap<Option<NaiveDate>, Version>,
}

fn normalized(mut v: Vec<Decimal>) -> Vec<Decimal> {
    for d in &mut v {
        *d = d.normalize();
    }
    v.sort();
    v
}

async fn load(
    tx: &mut sqlx::PgConnection,
    ids: &[String],
) -> Result<BTreeMap<String, Stored>, StageError> {
    let mut out = BTreeMap::new();
    for r in sqlx::query(
        "SELECT budget_id, scope, tenant_id, team_id, period, amount, thresholds_pct, effective_from \
         FROM tally.budgets WHERE budget_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("budgets import read"))?
    {
        let base_from: Option<NaiveDate> = r.get(7);
        let mut versions = BTreeMap::new();
        versions.insert(base_from, (r.get::<Decimal, _>(5), normalized(r.get(6))));
        out.insert(
            r.get::<String, _>(0),
            Stored {
                identity: Identity {
                    scope: r.get(1),
                    tenant_id: r.get(2),
                    team_id: r.get(3),
                    period: r.get(4),
                },
                base_from,
                versions,
            },
        );
    }
    for r in sqlx::query(
        "SELECT budget_id, effective_from, amount, thresholds_pct FROM tally.budget_versions WHERE budget_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("budgets import read versions"))?
    {
        if let Some(s) = out.get_mut(&r.get::<String, _>(0)) {
            s.versions.insert(
                Some(r.get::<NaiveDate, _>(1)),
                (r.get::<Decimal, _>(2), normalized(r.get(3))),
            );
        }
    }
    Ok(out)
}

/// Validates `path` and imports it (rolled back when `dry_run`).
pub async fn import(pool: &PgPool, path: &Path, dry_run: bool) -> Result<Outcome, ImportError> {
    let sheet = Sheet::read(path, &COLUMNS)?;
    let rows = validate(&sheet)?;
    let file = sheet.file.as_str();
    let mut tx = pool.begin().await.map_err(pg("budgets import begin"))?;
    sqlx::query("LOCK TABLE tally.budgets, tally.budget_versions IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .map_err(pg("budgets import lock"))?;
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.budget_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let stored = load(&mut tx, &ids).await?;

    let mut problems = Problems::default();
    let mut new_rows: Vec<&BudgetRow> = Vec::new();
    let mut unchanged = 0;
    for r in &rows {
        let rec = sheet.rows.iter().find(|x| x.line == r.line);
        let at = |col: &'static str, message: String| match rec {
            Some(x) => sheet.cell(x, col).problem(file, message),
            None => format!("{file}: line {}: {message}", r.line),
        };
        let Some(s) = stored.get(&r.budget_id) else {
            new_rows.push(r);
            continue;
        };
        if let Some((col, mine, theirs)) = r.identity.differs(&s.identity) {
            problems.push(at(
                col,
                format!(
                    "{mine:?}: budget {} is stored with {col} {theirs:?}; a budget's scope, tenant, team \
                     and period never change (use another budget_id)",
                    r.budget_id
                ),
            ));
            continue;
        }
        match s.versions.get(&r.effective_from) {
            None => new_rows.push(r),
            Some((amount, thr)) if *amount == r.amount && *thr == r.thresholds_pct => {
                unchanged += 1
            }
            Some((amount, thr)) => {
                let (col, old) = if *amount != r.amount {
                    ("amount", amount.normalize().to_string())
                } else {
                    (
                        "thresholds_pct",
                        thr.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(";"),
                    )
                };
                problems.push(at(
                    col,
                    format!(
                        "budget {} effective from {} is stored with {col} {old}; a stored version never \
                         changes: add a version with a later effective_from",
                        r.budget_id,
                        from_text(r.effective_from)
                    ),
                ));
            }
        }
    }
    problems.into_result()?;

    // Stored versions that a new one ends: the latest stored one before it.
    let mut superseded: BTreeSet<(String, Option<NaiveDate>)> = BTreeSet::new();
    for r in &new_rows {
        if let Some(s) = stored.get(&r.budget_id) {
            if let Some(from) = s.versions.keys().filter(|f| **f < r.effective_from).max() {
                superseded.insert((r.budget_id.clone(), *from));
            }
        }
    }
    let superseded: Vec<String> = superseded
        .into_iter()
        .map(|(id, from)| {
            let until = new_rows
                .iter()
                .filter(|r| r.budget_id == id && r.effective_from > from)
                .filter_map(|r| r.effective_from)
                .min()
                .map(|d| d.to_string())
                .unwrap_or_default();
            format!(
                "budget {id} effective from {} now ends before {until}",
                from_text(from)
            )
        })
        .collect();

    write(&mut tx, &stored, &new_rows, file).await?;
    let mut notes = Vec::new();
    let tenants: Vec<String> = rows
        .iter()
        .map(|r| r.identity.tenant_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let unknown: Vec<String> = sqlx::query_scalar(
        "SELECT t FROM UNNEST($1::text[]) AS t WHERE NOT EXISTS (SELECT 1 FROM tally.tenants WHERE tenant_id = t) ORDER BY t",
    )
    .bind(&tenants)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("budgets import tenants"))?;
    if !unknown.is_empty() {
        notes.push(format!(
            "{} tenant(s) not in tally.tenants (their events raise unknown_tenant; budgets count them all the same): {}",
            unknown.len(),
            unknown.join(", ")
        ));
    }
    if dry_run {
        tx.rollback().await.map_err(pg("budgets import rollback"))?;
    } else {
        tx.commit().await.map_err(pg("budgets import commit"))?;
    }
    Ok(Outcome {
        kind: "budgets",
        file: file.to_string(),
        rows: rows.len(),
        inserted: new_rows.len(),
        unchanged,
        superseded,
        notes,
        dry_run,
    })
}

/// Writes the new versions: a new budget's earliest version is its budgets
/// row; one earlier than a stored budget's first version takes that row's
/// place (the former first version moves to budget_versions).
async fn write(
    tx: &mut sqlx::PgConnection,
    stored: &BTreeMap<String, Stored>,
    new_rows: &[&BudgetRow],
    file: &str,
) -> Result<(), StageError> {
    let mut by_id: BTreeMap<&str, Vec<&BudgetRow>> = BTreeMap::new();
    for r in new_rows {
        by_id.entry(r.budget_id.as_str()).or_default().push(r);
    }
    let refused = |r: &BudgetRow| {
        let line = r.line;
        move |e: sqlx::Error| {
            StageError::Fatal(format!(
                "{file}: line {line}: postgres refused the row: {e}"
            ))
        }
    };
    for (id, mut list) in by_id {
        list.sort_by_key(|r| r.effective_from);
        let first = list[0];
        let mut versions: Vec<(Option<NaiveDate>, Version, &BudgetRow)> = Vec::new();
        match stored.get(id) {
            None => {
                let i = &first.identity;
                sqlx::query(
                    "INSERT INTO tally.budgets (budget_id, scope, tenant_id, team_id, period, amount, thresholds_pct, effective_from) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(id)
                .bind(&i.scope)
                .bind(&i.tenant_id)
                .bind(&i.team_id)
                .bind(&i.period)
                .bind(first.amount)
                .bind(&first.thresholds_pct)
                .bind(first.effective_from)
                .execute(&mut *tx)
                .await
                .map_err(refused(first))?;
                versions.extend(
                    list[1..]
                        .iter()
                        .map(|r| (r.effective_from, (r.amount, r.thresholds_pct.clone()), *r)),
                );
            }
            Some(s) if first.effective_from < s.base_from => {
                sqlx::query("UPDATE tally.budgets SET amount = $2, thresholds_pct = $3, effective_from = $4 WHERE budget_id = $1")
                    .bind(id)
                    .bind(first.amount)
                    .bind(&first.thresholds_pct)
                    .bind(first.effective_from)
                    .execute(&mut *tx)
                    .await
                    .map_err(refused(first))?;
                if let Some(old) = s.versions.get(&s.base_from) {
                    versions.push((s.base_from, old.clone(), first));
                }
                versions.extend(
                    list[1..]
                        .iter()
                        .map(|r| (r.effective_from, (r.amount, r.thresholds_pct.clone()), *r)),
                );
            }
            Some(_) => {
                versions.extend(
                    list.iter()
                        .map(|r| (r.effective_from, (r.amount, r.thresholds_pct.clone()), *r)),
                );
            }
        }
        for (from, (amount, thr), r) in versions {
            sqlx::query(
                "INSERT INTO tally.budget_versions (budget_id, effective_from, amount, thresholds_pct) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(from)
            .bind(amount)
            .bind(&thr)
            .execute(&mut *tx)
            .await
            .map_err(refused(r))?;
        }
    }
    Ok(())
}
