//! `tally-producers`: the traffic side of tally. [`world`] describes the
//! reference data of a demo/test world (tenants, prices, budgets), [`gen`]
//! turns it into a deterministic stream of usage events, duplicates and
//! poison messages, and [`produce`] sends such a stream to Kafka.

pub mod gen;
pub mod malformed;
pub mod produce;
pub mod world;

pub use gen::{Encoding, GenConfig, GenKind, GenMessage, Generator};
pub use produce::{produce, ProduceReport};
pub use world::{demo_world, BudgetPeriod, BudgetScope, BudgetSpec, PriceSpec, TenantSpec, World};
