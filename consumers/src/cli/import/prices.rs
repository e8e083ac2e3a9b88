//! `tally prices import`: price versions from CSV into `tally.prices`.
//!
//! Guarantee: a version, once stored, is never changed (stored costs were
//! computed from it): a row equal to a stored version is unchanged, a row for
//! a stored (provider, model, effective_from) with other prices is an error
//! naming the cell, and a new row adds a version that ends the one in force
//! before it. All rows are checked first; a valid file is one transaction.

use super::{check, Cell, ImportError, Outcome, Problems, Sheet};
use crate::errors::{pg, StageError};
use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The columns of a prices file, in the documented order.
pub const COLUMNS: [&str; 9] = [
    "provider",
    "model",
    "effective_from",
    "currency",
    "input_per_m",
    "cached_input_per_m",
    "cache_write_per_m",
    "output_per_m",
    "reasoning_per_m",
];

/// The five prices per 1M tokens, in column order.
const PRICE_COLUMNS: [&str; 5] = [
    "input_per_m",
    "cached_input_per_m",
    "cache_write_per_m",
    "output_per_m",
    "reasoning_per_m",
];

/// One valid row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceRow {
    pub line: usize,
    pub provider: String,
    pub model: String,
    pub effective_from: DateTime<Utc>,
    pub currency: String,
    pub prices: [Decimal; 5],
}

type Key = (String, String, DateTime<Utc>);

fn when(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Checks every row of the file on its own and against the others.
pub fn validate(sheet: &Sheet) -> Result<Vec<PriceRow>, ImportError> {
    let mut problems = Problems::default();
    let mut rows = Vec::new();
    let mut first_line: BTreeMap<Key, usize> = BTreeMap::new();
    let mut currency: Option<(String, usize)> = None;
    let file = sheet.file.as_str();
    for rec in &sheet.rows {
        let cell = |name| sheet.cell(rec, name);
        let provider = problems.take(file, &cell("provider"), check::ident(&cell("provider")));
        let model = problems.take(file, &cell("model"), check::ident(&cell("model")));
        let effective_from = problems.take(
            file,
            &cell("effective_from"),
            check::instant(&cell("effective_from")),
        );
        let cur = cell("currency");
        let currency_ok = problems.take(file, &cur, currency_code(&cur));
        if let Some(c) = &currency_ok {
            match &currency {
                None => currency = Some((c.clone(), rec.line)),
                Some((first, line)) if first != c => problems.push(cur.problem(
                    file,
                    format!(
                        "{c} differs from {first} on line {line}: every price is in the one book currency"
                    ),
                )),
                Some(_) => {}
            }
        }
        let mut prices = [Decimal::ZERO; 5];
        let mut prices_ok = true;
        for (slot, name) in prices.iter_mut().zip(PRICE_COLUMNS) {
            let c = cell(name);
            match problems.take(file, &c, price(&c)) {
                Some(p) => *slot = p,
                None => prices_ok = false,
            }
        }
        let (Some(provider), Some(model), Some(effective_from), Some(currency_ok), true) =
            (provider, model, effective_from, currency_ok, prices_ok)
        else {
            continue;
        };
        let key = (provider.clone(), model.clone(), effective_from);
        if let Some(line) = first_line.get(&key) {
            problems.push(cell("effective_from").problem(
                file,
                format!(
                    "{provider} {model} effective {} is already on line {line}",
                    when(effective_from)
                ),
            ));
            continue;
        }
        first_line.insert(key, rec.line);
        rows.push(PriceRow {
            line: rec.line,
            provider,
            model,
            effective_from,
            currency: currency_ok,
            prices,
        });
    }
    problems.into_result()?;
    Ok(rows)
}

fn currency_code(c: &Cell<'_>) -> Result<String, String> {
    if c.value.len() == 3 && c.value.chars().all(|ch| ch.is_ascii_uppercase()) {
        Ok(c.value.to_string())
    } else {
        Err(format!(
            "{:?} is not a currency code (three capital letters, e.g. USD)",
            c.value
        ))
    }
}

/// A price per 1M tokens: >= 0 with at most 6 decimals (so every cost is exact at scale 12).
fn price(c: &Cell<'_>) -> Result<Decimal, String> {
    let d = check::decimal(c)?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(format!("{} is negative", c.value));
    }
    if d.scale() > 6 {
        return Err(format!(
            "{} has more than 6 decimals (prices per 1M tokens carry at most 6, so costs stay exact)",
            c.value
        ));
    }
    Ok(d.abs())
}

/// Validates `path` and imports it (rolled back when `dry_run`).
pub async fn import(pool: &PgPool, path: &Path, dry_run: bool) -> Result<Outcome, ImportError> {
    let sheet = Sheet::read(path, &COLUMNS)?;
    let rows = validate(&sheet)?;
    let file = sheet.file.as_str();
    let mut tx = pool.begin().await.map_err(pg("prices import begin"))?;
    // One import at a time; the pipeline's reads are not blocked.
    sqlx::query("LOCK TABLE tally.prices IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .map_err(pg("prices import lock"))?;
    let book: String = sqlx::query_scalar("SELECT currency FROM tally.price_book FOR UPDATE")
        .fetch_one(&mut *tx)
        .await
        .map_err(pg("prices import book currency"))?;
    let book = book.trim().to_string();
    let stored_count: i64 = sqlx::query_scalar("SELECT count(*) FROM tally.prices")
        .fetch_one(&mut *tx)
        .await
        .map_err(pg("prices import count"))?;
    let providers: Vec<String> = rows.iter().map(|r| r.provider.clone()).collect();
    let models: Vec<String> = rows.iter().map(|r| r.model.clone()).collect();
    let stored: BTreeMap<Key, [Decimal; 5]> = sqlx::query(
        "SELECT p.provider, p.model, p.effective_from, p.input_per_m, p.cached_input_per_m, p.cache_write_per_m, \
         p.output_per_m, p.reasoning_per_m FROM tally.prices p \
         JOIN (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[])) AS f(provider, model) USING (provider, model)",
    )
    .bind(&providers)
    .bind(&models)
    .fetch_all(&mut *tx)
    .await
    .map_err(pg("prices import read"))?
    .into_iter()
    .map(|r| {
        (
            (r.get(0), r.get(1), r.get(2)),
            [r.get(3), r.get(4), r.get(5), r.get(6), r.get(7)],
        )
    })
    .collect();

    let mut problems = Problems::default();
    let mut notes = Vec::new();
    // A book with no prices yet takes the file's currency.
    let file_currency = rows.first().map(|r| r.currency.clone());
    if let Some(c) = file_currency.as_ref().filter(|c| **c != book) {
        if stored_count == 0 {
            notes.push(format!(
                "the price book currency changes from {book} to {c} (the book held no prices)"
            ));
        } else if let Some(rec) = sheet.rows.first() {
            problems.push(sheet.cell(rec, "currency").problem(
                file,
                format!(
                    "{c} is not the price book's currency {book} \
                     (every price, cost and total is in the one book currency)"
                ),
            ));
        }
    }
    let mut new_rows = Vec::new();
    let mut unchanged = 0;
    for r in &rows {
        let key = (r.provider.clone(), r.model.clone(), r.effective_from);
        match stored.get(&key) {
            Some(old) if *old == r.prices => unchanged += 1,
            Some(old) => {
                let (i, _) = old
                    .iter()
                    .zip(&r.prices)
                    .enumerate()
                    .find(|(_, (a, b))| a != b)
                    .unwrap_or((0, (&old[0], &r.prices[0])));
                let rec = sheet.rows.iter().find(|x| x.line == r.line);
                let cell = rec.map(|x| sheet.cell(x, PRICE_COLUMNS[i]));
                let message = format!(
                    "{} {} effective {} is stored with {} = {}; a stored version never changes \
                     (costs were computed from it): add a version with a later effective_from",
                    r.provider,
                    r.model,
                    when(r.effective_from),
                    PRICE_COLUMNS[i],
                    old[i].normalize()
                );
                problems.push(match cell {
                    Some(c) => c.problem(file, message),
                    None => format!("{file}: line {}: {message}", r.line),
                });
            }
            None => new_rows.push(r),
        }
    }
    problems.into_result()?;

    // Stored versions that a new one ends: the latest stored one before it.
    let mut superseded = BTreeSet::new();
    for r in &new_rows {
        let before = stored
            .keys()
            .filter(|(p, m, t)| *p == r.provider && *m == r.model && *t < r.effective_from)
            .max_by_key(|(_, _, t)| *t);
        if let Some(k) = before {
            superseded.insert(k.clone());
        }
    }
    let superseded: Vec<String> = superseded
        .into_iter()
        .map(|(p, m, t)| {
            let until = new_rows
                .iter()
                .filter(|r| r.provider == p && r.model == m && r.effective_from > t)
                .map(|r| r.effective_from)
                .min()
                .map(when)
                .unwrap_or_default();
            format!("{p} {m} effective {} now ends at {until}", when(t))
        })
        .collect();
    let now = Utc::now();
    let past = new_rows.iter().filter(|r| r.effective_from <= now).count();
    if past > 0 && stored_count > 0 {
        notes.push(format!(
            "{past} new version(s) take effect in the past: events tally already counted keep \
             the cost they were given; events counted after the next reference refresh use them"
        ));
    }

    if let Some(c) = file_currency.filter(|c| *c != book && stored_count == 0) {
        sqlx::query("UPDATE tally.price_book SET currency = $1")
            .bind(&c)
            .execute(&mut *tx)
            .await
            .map_err(pg("prices import set book currency"))?;
    }
    for r in &new_rows {
        sqlx::query(
            "INSERT INTO tally.prices (provider, model, effective_from, currency, input_per_m, cached_input_per_m, \
             cache_write_per_m, output_per_m, reasoning_per_m) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&r.provider)
        .bind(&r.model)
        .bind(r.effective_from)
        .bind(&r.currency)
        .bind(r.prices[0])
        .bind(r.prices[1])
        .bind(r.prices[2])
        .bind(r.prices[3])
        .bind(r.prices[4])
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            StageError::Fatal(format!(
                "{file}: line {}: postgres refused the row: {e}",
                r.line
            ))
        })?;
    }
    if dry_run {
        tx.rollback().await.map_err(pg("prices import rollback"))?;
    } else {
        tx.commit().await.map_err(pg("prices import commit"))?;
    }
    Ok(Outcome {
        kind: "prices",
        file: file.to_string(),
        rows: rows.len(),
        inserted: new_rows.len(),
        unchanged,
        superseded,
        notes,
        dry_run,
    })
}
