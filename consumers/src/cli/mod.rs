//! Operator commands besides `tally run`: migrate, seed, report, reset-offsets.
//!
//! Guarantee: each command is idempotent or prints its plan before it changes
//! anything (`reset-offsets` without `--yes`).

pub mod migrate;
pub mod report;
pub mod reset;
pub mod seed;
