//! The audit-event stream (`audit.event.v1`), pure parts: violation rules ([`rules`]).
//!
//! Guarantee: the rules are deterministic functions of the stored events, the grants
//! and the counts the commit passes in, so a replayed batch derives the same violation
//! ids. Pseudonyms, canonical leaves and the Merkle log are `crate::audit` (the
//! audit-log branch); this stream reuses them rather than keeping its own.

pub mod rules;
