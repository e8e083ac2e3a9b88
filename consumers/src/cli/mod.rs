//! Operator commands besides `tally run`: migrate, seed, report, reset-offsets,
//! prices and budgets import, and the `tally audit` group (argument parsing,
//! output, exit codes; the work itself is in the library modules they call).
//!
//! Guarantee: each command is idempotent, read-only, or prints its plan before
//! it changes anything (`reset-offsets` without `--yes`).

pub mod audit;
pub mod csv;
pub mod import;
pub mod migrate;
pub mod report;
pub mod reset;
pub mod seed;
pub mod topics;
