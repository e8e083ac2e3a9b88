//! What a stream supplies to the exactly-once engine: decode, identity, prepare,
//! ClickHouse rows and the effects of the final Postgres commit.
//!
//! Guarantee (the contract a stream keeps, on which the engine's rests): every
//! function is deterministic in its inputs (the events, the batch's reference
//! snapshot, the rows earlier batches committed), `prepare` is idempotent per
//! batch id, `write_clickhouse` writes through `ClickHouseSink::write_table` (so
//! each part is fenced and checked on replay), and `commit` touches Postgres only
//! through the transaction it is given. A replayed batch then decides exactly
//! what its first attempt decided.

use crate::engine::ledger::Ledger;
use crate::engine::ownership::Fence;
use crate::errors::StageError;
use crate::sinks::clickhouse::{ClickHouseSink, WriteOutcome};
use crate::streams::usage::enrich::Reference;
use chrono::{DateTime, Utc};
use std::future::Future;
use tally_schemas::{ComplianceViolation, Decoder};
use uuid::Uuid;

/// What identifies an event for dedup: the tenant-scoped key a re-send repeats,
/// the event time the look-back is measured on, and a fingerprint of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub key: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub fingerprint: i64,
}

/// A decode failure: the dead-letter class and a specific reason.
pub type Rejection = (&'static str, String);

/// What the engine tells a stream about the batch being prepared or committed.
pub struct BatchCtx<'a> {
    pub partition: i32,
    pub batch_id: i64,
    /// Ownership epoch the batch runs under (steps that write Postgres check it).
    pub epoch: i64,
    pub reference: &'a Reference,
    pub ledger: &'a Ledger,
    /// When the commit runs (violations' `detected_at`).
    pub now: DateTime<Utc>,
}

/// An owned event of the batch, in offset order, with its dedup key.
pub struct Owned<E> {
    pub event: E,
    pub offset: i64,
    pub key: Uuid,
}

pub trait Stream: Send + Sync + Sized + 'static {
    /// A decoded, validated event.
    type Event: tally_schemas::Event + crate::engine::trace::Evidence + Send + Sync + 'static;
    /// An event made ready to store (enriched, pseudonymised, placed).
    type Record: Send + Sync + 'static;

    /// `usage`, `policy` or `audit`: log field and metric label.
    const NAME: &'static str;

    /// The violation rules the stream raises (the `rule` label's values).
    const RULES: &'static [&'static str] = &[];

    /// Dead-letter classes `parse` returns besides the schema codecs' own.
    const PARSE_CLASSES: &'static [&'static str] = &[];

    /// Parses one payload (the default: the schema codecs, any wire format).
    fn parse(&self, decoder: &Decoder, payload: &[u8]) -> Result<Self::Event, Rejection> {
        decoder
            .decode::<Self::Event>(payload)
            .map_err(|e| (e.class(), e.to_string()))
    }

    /// When the event happened (checked against the dedup clock and cutoff).
    fn occurred_at(&self, e: &Self::Event) -> DateTime<Utc>;

    fn identity(&self, e: &Self::Event) -> Identity;

    /// The dead-letter reason of an event whose key was counted with other content.
    fn conflict_message(&self, e: &Self::Event, in_batch: bool) -> String;

    /// Turns the owned events into records (pure, no I/O).
    fn enrich(&self, ctx: &BatchCtx<'_>, events: Vec<Owned<Self::Event>>) -> Vec<Self::Record>;

    /// Reads or reserves what the records need before they are written (usage:
    /// per-minute counts for over-quota flags; audit: leaf indexes). Retried
    /// while Postgres is down, so it must be idempotent for a batch id.
    fn prepare(
        &self,
        _ctx: &BatchCtx<'_>,
        _records: &mut [Self::Record],
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// Writes the batch's rows (`verify_first`: an earlier attempt may have landed).
    fn write_clickhouse(
        &self,
        ch: &ClickHouseSink,
        batch_id: u64,
        records: &[Self::Record],
        verify_first: bool,
        fence: &Fence,
    ) -> impl Future<Output = Result<WriteOutcome, StageError>> + Send;

    /// The stream's effects inside the batch's single commit transaction;
    /// returns the violations to put in the outbox.
    fn commit(
        &self,
        tx: &mut sqlx::PgConnection,
        ctx: &BatchCtx<'_>,
        records: &[Self::Record],
    ) -> impl Future<Output = Result<Vec<ComplianceViolation>, StageError>> + Send;
}

/// Namespaces of the dedup keys: a usage event and an audit event that share an
/// id never suppress each other.
pub mod key_space {
    use uuid::Uuid;
    pub const USAGE: Uuid = Uuid::from_u128(0x7a11_de00_0000_4000_8000_0000_0000_0001);
    pub const POLICY: Uuid = Uuid::from_u128(0x7a11_de00_0000_4000_8000_0000_0000_0002);
    pub const AUDIT: Uuid = Uuid::from_u128(0x7a11_de00_0000_4000_8000_0000_0000_0003);
}

/// The tenant-scoped dedup key in `space`: UUID v5 of (tenant length, tenant, id).
pub fn scoped_key(space: &Uuid, tenant_id: &str, id: &[u8]) -> Uuid {
    let mut b = Vec::with_capacity(tenant_id.len() + 4 + id.len());
    b.extend_from_slice(&(tenant_id.len() as u32).to_be_bytes());
    b.extend_from_slice(tenant_id.as_bytes());
    b.extend_from_slice(id);
    Uuid::new_v5(space, &b)
}

/// Fingerprint of an event's content (every field, whatever the encoding it
/// arrived in): see `engine::fingerprint`.
pub use crate::engine::fingerprint::fingerprint;
