//! tally: an exactly-once audit and cost pipeline for LLM platforms.
//!
//! The data path, in folders: [`engine`] (the exactly-once state machine every
//! stream runs on: ownership, claims and dedup, dead letters, the single Postgres
//! commit, offsets of record, the outbox relay, health), [`streams`] (what makes
//! usage, policy decisions and audit events different: decode, enrich, rows,
//! rules, commit effects), [`sinks`] (ClickHouse), [`audit`] (the Merkle log's
//! pure primitives), [`ingest`] (OPA's decision-log upload API, `tally ingest`)
//! and [`cli`] (the operator commands, among them [`redrive`]: `tally dlq redrive`). `docs/architecture.md`
//! describes the state machine and the guarantee.

pub mod audit;
pub mod cli;
pub mod config;
pub mod engine;
pub mod errors;
pub mod fasthash;
pub mod ingest;
pub mod metrics;
pub mod redrive;
pub mod sinks;
pub mod streams;
pub mod telemetry;
