//! Sinks: the stores a batch writes before its Postgres commit.
//!
//! Guarantee: a write is fenced by the partition's ownership epoch and, when an
//! earlier attempt's outcome is unknown, checked part by part first, so a batch's
//! rows land exactly once.

pub mod clickhouse;
pub mod https;
pub mod kafka_client;
pub mod postgres;
