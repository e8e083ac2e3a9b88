//! tally: an exactly-once audit and cost pipeline for LLM platforms.
//!
//! The data path and the exactly-once state machine are described in
//! `docs/architecture.md`; [`pipeline`] implements the state machine.

pub mod audit;
pub mod batch;
pub mod bench;
pub mod breaker;
pub mod claim;
pub mod cli;
pub mod cli_reset;
pub mod config;
pub mod cost;
pub mod decode;
pub mod dlq;
pub mod enrich;
pub mod errors;
pub mod failpoint;
pub mod fairness;
pub mod health;
pub mod ledger;
pub mod metrics;
pub mod migrate;
pub mod offsets_reset;
pub mod ownership;
pub mod pipeline;
pub mod rebalance;
pub mod reference;
pub mod registry_client;
pub mod relay;
pub mod relay_watch;
pub mod report;
pub mod retry;
pub mod rollup;
pub mod rules;
pub mod runner;
pub mod seed;
pub mod sink_clickhouse;
pub mod streams;
