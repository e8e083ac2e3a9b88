//! `tally prices import FILE.csv` and `tally budgets import FILE.csv`: reference
//! data from CSV files (columns in docs/operations.md, examples in
//! examples/reference/).
//!
//! Guarantee: every row is checked (syntax, values, and against what is
//! stored) before anything is written, and every problem is reported with its
//! file, line and column; a file with any problem writes nothing. A valid file
//! is written in one transaction. Stored versions are never changed: importing
//! the same file again changes nothing, and a row with a later effective date
//! adds a version that supersedes the one in force before it.

pub mod budgets;
pub mod prices;

use crate::cli::csv;
use crate::errors::StageError;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// `tally prices ...`
#[derive(clap::Subcommand, Debug)]
pub enum PricesCommand {
    /// Add price versions from a CSV file (validated first; one transaction; idempotent).
    Import(ImportArgs),
}

/// `tally budgets ...`
#[derive(clap::Subcommand, Debug)]
pub enum BudgetsCommand {
    /// Add budgets and budget versions from a CSV file (validated first; one transaction; idempotent).
    Import(ImportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The CSV file (header row first; columns in docs/operations.md).
    pub file: PathBuf,
    /// Validate against the database and print what would change, then roll back.
    #[arg(long)]
    pub dry_run: bool,
}

/// Why an import wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: cannot read: {message}")]
    Read { file: String, message: String },
    #[error("{}", invalid_message(.0))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Store(#[from] StageError),
}

fn invalid_message(problems: &[String]) -> String {
    const SHOWN: usize = 100;
    let mut out = format!(
        "{} problem{} found, nothing was written:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems.iter().take(SHOWN) {
        out.push_str("\n  ");
        out.push_str(p);
    }
    if problems.len() > SHOWN {
        out.push_str(&format!("\n  ... and {} more", problems.len() - SHOWN));
    }
    out
}

/// What an import did (or, with `--dry-run`, would have done).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub kind: &'static str,
    pub file: String,
    pub rows: usize,
    pub inserted: usize,
    pub unchanged: usize,
    /// Stored versions that an inserted one now ends, described.
    pub superseded: Vec<String>,
    pub notes: Vec<String>,
    pub dry_run: bool,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} import {}: {} rows valid; inserted {}, unchanged {}, superseded {}{}",
            self.kind,
            self.file,
            self.rows,
            self.inserted,
            self.unchanged,
            self.superseded.len(),
            if self.dry_run {
                " (dry run: rolled back, nothing written)"
            } else {
                ""
            }
        )?;
        for s in &self.superseded {
            writeln!(f, "superseded: {s}")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// A CSV file with a checked header: every column of `columns` present once,
/// no other column.
pub struct Sheet {
    pub file: String,
    index: HashMap<&'static str, usize>,
    pub rows: Vec<csv::Record>,
}

/// One cell and where it is, for error messages.
#[derive(Clone, Copy)]
pub struct Cell<'a> {
    pub value: &'a str,
    pub line: usize,
    pub name: &'static str,
    pub column: usize,
}

impl Cell<'_> {
    /// "line L, column NAME (C): message"
    pub fn problem(&self, file: &str, message: impl fmt::Display) -> String {
        format!(
            "{file}: line {}, column {} ({}): {message}",
            self.line, self.name, self.column
        )
    }
}

impl Sheet {
    /// Reads and parses `path`; header problems are returned as `Invalid`.
    pub fn read(path: &Path, columns: &[&'static str]) -> Result<Sheet, ImportError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ImportError::Read {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let records = csv::parse(&text).map_err(|e| {
            ImportError::Invalid(vec![format!(
                "{file}: line {}, column {}: {}",
                e.line, e.column, e.message
            )])
        })?;
        let mut records = records.into_iter();
        let Some(header) = records.next() else {
            return Err(ImportError::Invalid(vec![format!(
                "{file}: empty file: expected a header row with the columns {}",
                columns.join(",")
            )]));
        };
        let mut problems = Vec::new();
        let mut index = HashMap::new();
        for (i, name) in header.fields.iter().enumerate() {
            match columns.iter().find(|c| **c == name.trim()) {
                Some(c) if index.contains_key(c) => problems.push(format!(
                    "{file}: line {}, column {}: column {c} appears twice",
                    header.line,
                    i + 1
                )),
                Some(c) => {
                    index.insert(*c, i);
                }
                None => problems.push(format!(
                    "{file}: line {}, column {}: unknown column {name:?} (expected {})",
                    header.line,
                    i + 1,
                    columns.join(",")
                )),
            }
        }
        for c in columns.iter().filter(|c| !index.contains_key(*c)) {
            problems.push(format!(
                "{file}: line {}: the header lacks the column {c}",
                header.line
            ));
        }
        let rows: Vec<csv::Record> = records.collect();
        for r in &rows {
            if r.fields.len() != header.fields.len() {
                problems.push(format!(
                    "{file}: line {}: {} fields, but the header has {}",
                    r.line,
                    r.fields.len(),
                    header.fields.len()
                ));
            }
        }
        if !problems.is_empty() {
            return Err(ImportError::Invalid(problems));
        }
        Ok(Sheet { file, index, rows })
    }

    /// The cell of column `name` in `row` (the header was checked, so it exists).
    pub fn cell<'a>(&self, row: &'a csv::Record, name: &'static str) -> Cell<'a> {
        let i = self.index.get(name).copied().unwrap_or(usize::MAX);
        Cell {
            value: row.fields.get(i).map(String::as_str).unwrap_or(""),
            line: row.line,
            name,
            column: i.saturating_add(1),
        }
    }
}

/// Cell checks shared by both imports; each returns the problem's message.
pub mod check {
    use super::*;

    /// A non-empty identifier without surrounding whitespace.
    pub fn ident(c: &Cell<'_>) -> Result<String, String> {
        if c.value.is_empty() {
            return Err("must not be empty".into());
        }
        if c.value.trim() != c.value {
            return Err(format!("{:?} has leading or trailing whitespace", c.value));
        }
        Ok(c.value.to_string())
    }

    /// An exact decimal (no exponent, no thousands separators), normalized.
    pub fn decimal(c: &Cell<'_>) -> Result<Decimal, String> {
        let v = c.value;
        let plain = !v.is_empty()
            && v.chars()
                .all(|ch| ch.is_ascii_digit() || ch == '.' || ch == '-')
            && v.chars().filter(|ch| *ch == '.').count() <= 1;
        match Decimal::from_str(v) {
            Ok(d) if plain => Ok(d.normalize()),
            _ => Err(format!(
                "{v:?} is not a decimal number (digits with an optional '.', e.g. 2.5)"
            )),
        }
    }

    /// A date `YYYY-MM-DD`.
    pub fn date(c: &Cell<'_>) -> Result<NaiveDate, String> {
        NaiveDate::parse_from_str(c.value, "%Y-%m-%d")
            .ok()
            .filter(|_| c.value.len() == 10)
            .ok_or_else(|| format!("{:?} is not a date YYYY-MM-DD", c.value))
    }

    /// An instant: `YYYY-MM-DD` (00:00 UTC) or RFC 3339 with an offset, to the microsecond.
    pub fn instant(c: &Cell<'_>) -> Result<DateTime<Utc>, String> {
        if let Ok(d) = date(c) {
            return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
        }
        let t = DateTime::parse_from_rfc3339(c.value)
            .map_err(|_| {
                format!(
                    "{:?} is neither a date YYYY-MM-DD nor an RFC 3339 time such as 2025-01-01T00:00:00Z",
                    c.value
                )
            })?
            .with_timezone(&Utc);
        if t.timestamp_subsec_nanos() % 1000 != 0 {
            return Err(format!(
                "{:?} is more precise than a microsecond (what Postgres stores)",
                c.value
            ));
        }
        Ok(t)
    }
}

/// Collects the problems of a file, in line order.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Keeps `r`'s value, or records its problem at `cell`.
    pub fn take<T>(&mut self, file: &str, cell: &Cell<'_>, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(m) => {
                self.0.push(cell.problem(file, m));
                None
            }
        }
    }

    pub fn push(&mut self, p: String) {
        self.0.push(p);
    }

    pub fn into_result(self) -> Result<(), ImportError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ImportError::Invalid(self.0))
        }
    }
}

/// `tally prices import` / `tally budgets import`: runs the import and prints
/// its outcome; the error lists every problem.
pub async fn run_prices(
    cfg: &crate::config::Config,
    cmd: PricesCommand,
) -> Result<Outcome, ImportError> {
    let PricesCommand::Import(args) = cmd;
    let pool = crate::sinks::postgres::connect_pg(cfg).await?;
    prices::import(&pool, &args.file, args.dry_run).await
}

pub async fn run_budgets(
    cfg: &crate::config::Config,
    cmd: BudgetsCommand,
) -> Result<Outcome, ImportError> {
    let BudgetsCommand::Import(args) = cmd;
    let pool = crate::sinks::postgres::connect_pg(cfg).await?;
    budgets::import(&pool, &args.file, args.dry_run).await
}
