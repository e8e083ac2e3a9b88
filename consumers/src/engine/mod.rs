//! The exactly-once engine, written once for every stream: a partition's batches
//! walk dead letters, claim, ClickHouse, one Postgres commit (see `pipeline.rs`).
//!
//! Guarantee: given a [`stream::Stream`] whose functions are deterministic in
//! their inputs, every event of an owned partition is counted exactly once in
//! ClickHouse and Postgres, whatever crashes, restarts or rebalances.

pub mod batch;
pub mod breaker;
pub mod claim;
pub mod decode;
pub mod dlq;
pub mod failpoint;
pub mod fairness;
pub mod fingerprint;
pub mod health;
pub mod ledger;
pub mod offsets_reset;
pub mod ownership;
pub mod pipeline;
pub mod rebalance;
pub mod reference;
pub mod registry_client;
pub mod relay;
pub mod relay_watch;
pub mod retry;
pub mod runner;
pub mod stream;
pub mod trace;
pub mod violation_wire;
