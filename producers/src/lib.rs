//! `tally-producers`: the traffic side of tally. [`world`] describes the
//! reference data of a demo/test world (tenants, prices, budgets); [`gen`],
//! [`gen_policy`] and [`gen_audit`] turn it into deterministic streams of usage
//! events, policy decisions (native and OPA decision logs) and audit events,
//! with duplicates and poison messages; [`oracle`] derives from such a stream
//! what the pipeline must store; [`produce`] sends a stream to Kafka and
//! [`cli`] is `tally gen`.

pub mod cli;
pub mod common;
pub mod gen;
pub mod gen_audit;
pub mod gen_policy;
pub mod malformed;
pub mod opa;
pub mod oracle;
pub mod produce;
pub mod world;

pub use common::{Outgoing, StreamConfig, StreamMessage, Wire};
pub use gen::{Encoding, GenConfig, GenKind, GenMessage, Generator};
pub use gen_audit::{
    audit_grants, tenant_actors, Actor, AuditGenConfig, AuditGenerator, AuditMessage,
    PRIVILEGED_ACTIONS,
};
pub use gen_policy::{PolicyGenConfig, PolicyGenerator, PolicyMessage};
pub use produce::{connection, produce, ProduceReport};
pub use world::{demo_world, BudgetPeriod, BudgetScope, BudgetSpec, PriceSpec, TenantSpec, World};
