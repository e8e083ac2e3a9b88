//! Operator commands besides `tally run`: migrate, seed, report, reset-offsets,
//! prices and budgets import, `dlq redrive`, the `tally audit` group, and the
//! arguments of the `tally ingest` server (argument parsing, output, exit codes;
//! the work itself is in the library modules they call).
//!
//! Guarantee: each command is idempotent, read-only, or prints its plan before
//! it changes anything (`reset-offsets` without `--yes`); `dlq redrive` records
//! what it re-produced, so a second run re-produces nothing.

pub mod audit;
pub mod csv;
pub mod dlq;
pub mod gen;
pub mod import;
pub mod ingest;
pub mod migrate;
pub mod report;
pub mod reset;
pub mod seed;
pub mod topics;
