//! The audit-event stream (`audit.event.v1`): pseudonymised storage, violation
//! rules ([`rules`]) and the per-tenant tamper-evident log ([`log`], built on the
//! pure primitives of `crate::audit`).
//!
//! Guarantee: the rules are deterministic functions of the stored events, the grants
//! and the counts the commit passes in, so a replayed batch derives the same violation
//! ids; leaf positions are decided once per batch and survive replays.

pub mod checkpointer;
pub mod log;
pub mod rules;
pub mod store;
pub mod stream;

pub use stream::AuditStream;
