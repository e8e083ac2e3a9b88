//! The usage stream (`llm.usage.v1`): exact decimal cost from the versioned price
//! book, tenant/team/project enrichment, minute/hour/day rollups, spend, quotas
//! and budgets.
//!
//! Guarantee: cost, rollups and rules are pure functions of the events and the
//! batch's reference snapshot, so a replay derives exactly what its first attempt did.

pub mod commit;
pub mod cost;
pub mod enrich;
pub mod rollup;
pub mod rows;
pub mod rules;
pub mod stream;

pub use stream::UsageStream;
