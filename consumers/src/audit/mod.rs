//! The tamper-evident audit log: pure core (no I/O). Specification: `docs/audit-log.md`.
//!
//! Guarantee: every stored audit event is a leaf of its tenant's append-only RFC 6962 /
//! RFC 9162 Merkle tree, hashed from a documented canonical encoding of exactly the
//! stored row; tree heads are C2SP checkpoints signed as Ed25519 signed notes; inclusion
//! and consistency proofs verify (and tampered ones are rejected) with nothing but the
//! public key, the conformance vectors of `shared/vectors/merkle-rfc6962` included.
//!
//! - [`merkle`]: leaf/node hashing, tree heads, the append-only [`merkle::CompactRange`]
//!   (O(log n) stored state per tenant), inclusion and consistency proof generation.
//! - [`proof`]: proof verification over untrusted bytes.
//! - [`leaf`]: the canonical leaf encoding of a stored audit row.
//! - [`pseudonym`]: keyed HMAC-SHA256 pseudonyms with key versions.
//! - [`note`], [`checkpoint`]: C2SP signed notes and tlog checkpoints.
//! - [`tlog_proof`]: offline event proofs in the C2SP tlog-proof layout.
//! - [`verify`]: streaming verification of a tenant's rows against its checkpoints.
//! - [`stream_proof`]: inclusion proofs computed in one pass over the leaves.

pub mod checkpoint;
pub mod leaf;
pub mod merkle;
pub mod note;
pub mod proof;
pub mod pseudonym;
pub mod stream_proof;
pub mod tlog_proof;
pub mod verify;

#[cfg(test)]
mod spec_example;
#[cfg(test)]
mod throughput;
#[cfg(test)]
mod vectors;

pub use merkle::{Hash, EMPTY_ROOT};
