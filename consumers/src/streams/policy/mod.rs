//! The policy-decision stream (`policy.decision.v1`), pure parts: the OPA decision-log
//! mapping ([`opa`]), violation rules ([`rules`]) and rollups ([`rollup`]).
//!
//! Guarantee: everything here is a deterministic function of the decisions (and the
//! counts the commit passes in), so a replayed batch derives the same rows, the same
//! rollups and the same violation ids.

pub mod opa;
pub mod rollup;
pub mod rows;
pub mod rules;
pub mod stream;

pub use stream::PolicyStream;

#[cfg(test)]
mod opa_tests;

use tally_schemas::PolicyDecision;

/// Dedup key of a policy decision within its tenant: its `decision_id`.
///
/// Policy engines re-send decisions (OPA retries a whole chunk after a failed upload),
/// and the decision id is the one id they keep across re-sends; the claim therefore
/// keys `(tenant_id, decision_id)`. For OPA events `event_id` is derived from
/// `decision_id` ([`opa::event_id`]), so the two agree. A second event with a
/// decision id already claimed is a duplicate (same content) or a dedup conflict
/// (other content, dead-lettered), never a second decision.
pub fn dedup_key(d: &PolicyDecision) -> &str {
    &d.decision_id
}
