//! The canonical leaf encoding of a stored audit event (pure). Specified in
//! `docs/audit-log.md` ("Leaf encoding"); `scripts/audit_leaf.py` recomputes it.
//!
//! Guarantee: the leaf bytes are a fixed-order, length-prefixed encoding of exactly the
//! stored columns of one `audit_events` row (after pseudonymisation and size limits), so
//! the encoding is injective (two rows that differ in any column give different bytes),
//! `decode(encode(x)) == x`, and anyone can recompute every leaf hash from the stored rows
//! with the documented rules alone. Nothing that is not stored is hashed, so erasing a
//! pseudonymisation key never breaks verification.

use super::merkle::{self, Hash};
use super::pseudonym::PseudonymKey;
use tally_schemas::{ActorType, AuditEvent};
use uuid::Uuid;

/// First byte of every leaf: the version of this encoding.
pub const LEAF_FORMAT_V1: u8 = 0x01;

/// One stored audit event, column for column, as the leaf encodes it. Absent optional
/// values are stored, and hashed, as the empty string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLeaf {
    pub tenant_id: String,
    /// Position of the event in its tenant's tree (0-based, assigned once).
    pub leaf_index: u64,
    pub event_id: Uuid,
    /// `occurred_at` in microseconds since 1970-01-01T00:00:00Z.
    pub occurred_at_us: i64,
    pub team_id: String,
    pub project_id: String,
    /// Pseudonym of `user_id` (or empty).
    pub user_id: String,
    pub source: String,
    pub actor_type: String,
    /// Pseudonym when `actor_type` is `user`, else as sent.
    pub actor_id: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub outcome: String,
    /// Pseudonym of `ip` (or empty).
    pub ip: String,
    pub user_agent: String,
    pub details: String,
    pub personal_data: bool,
    /// Version of the key that made this row's pseudonyms.
    pub pseudonym_key_version: u32,
}

/// Why leaf bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeafDecodeError {
    #[error("unknown leaf format version {0:#04x}")]
    Version(u8),
    #[error("leaf ends inside field {0}")]
    Truncated(&'static str),
    #[error("field {0} is not UTF-8")]
    Utf8(&'static str),
    #[error("personal_data byte is {0}, not 0 or 1")]
    Bool(u8),
    #[error("{0} bytes after the last field")]
    Trailing(usize),
}

/// Size limits applied before storing (and hashing) free-text fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLimits {
    pub max_user_agent_bytes: usize,
    pub max_details_bytes: usize,
}

impl Default for FieldLimits {
    fn default() -> Self {
        Self {
            max_user_agent_bytes: 1024,
            max_details_bytes: 64 * 1024,
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl AuditLeaf {
    /// The row to store for `ev` at `leaf_index`: `user_id`, `ip` and the `actor_id` of
    /// users replaced by keyed pseudonyms, `user_agent` and `details` cut to the limits,
    /// absent values as empty strings. Only what this returns may be stored.
    pub fn from_event(
        ev: &AuditEvent,
        leaf_index: u64,
        key: &PseudonymKey,
        limits: FieldLimits,
    ) -> Self {
        let pseudo =
            |v: &Option<String>| v.as_deref().map(|s| key.pseudonym(s)).unwrap_or_default();
        let actor_id = if ev.actor_type == ActorType::User {
            key.pseudonym(&ev.actor_id)
        } else {
            ev.actor_id.clone()
        };
        Self {
            tenant_id: ev.tenant_id.clone(),
            leaf_index,
            event_id: ev.event_id,
            occurred_at_us: ev.occurred_at.timestamp_micros(),
            team_id: ev.team_id.clone().unwrap_or_default(),
            project_id: ev.project_id.clone().unwrap_or_default(),
            user_id: pseudo(&ev.user_id),
            source: ev.source.clone(),
            actor_type: ev.actor_type.as_str().to_string(),
            actor_id,
            action: ev.action.clone(),
            resource_type: ev.resource_type.clone(),
            resource_id: ev.resource_id.clone(),
            outcome: ev.outcome.as_str().to_string(),
            ip: pseudo(&ev.ip),
            user_agent: truncate_utf8(
                ev.user_agent.as_deref().unwrap_or(""),
                limits.max_user_agent_bytes,
            )
            .to_string(),
            details: truncate_utf8(&ev.details, limits.max_details_bytes).to_string(),
            personal_data: ev.personal_data,
            pseudonym_key_version: key.version(),
        }
    }

    /// The string fields in encoding order (between `occurred_at_us` and `personal_data`).
    fn strings(&self) -> [&str; 13] {
        [
            &self.team_id,
            &self.project_id,
            &self.user_id,
            &self.source,
            &self.actor_type,
            &self.actor_id,
            &self.action,
            &self.resource_type,
            &self.resource_id,
            &self.outcome,
            &self.ip,
            &self.user_agent,
            &self.details,
        ]
    }

    /// Length of [`AuditLeaf::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let strings: usize = self.strings().iter().map(|s| 4 + s.len()).sum();
        1 + (4 + self.tenant_id.len()) + 8 + 16 + 8 + strings + 1 + 4
    }

    /// Append the canonical leaf bytes to `out`.
    ///
    /// Layout (all integers big-endian; `str` = u32 byte length, then the UTF-8 bytes):
    /// `0x01` | tenant_id str | leaf_index u64 | event_id 16 bytes | occurred_at_us i64 |
    /// team_id, project_id, user_id, source, actor_type, actor_id, action, resource_type,
    /// resource_id, outcome, ip, user_agent, details (13 str) | personal_data u8 (0/1) |
    /// pseudonym_key_version u32.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(LEAF_FORMAT_V1);
        put_str(out, &self.tenant_id);
        out.extend_from_slice(&self.leaf_index.to_be_bytes());
        out.extend_from_slice(self.event_id.as_bytes());
        out.extend_from_slice(&self.occurred_at_us.to_be_bytes());
        for s in self.strings() {
            put_str(out, s);
        }
        out.push(u8::from(self.personal_data));
        out.extend_from_slice(&self.pseudonym_key_version.to_be_bytes());
    }

    /// The canonical leaf bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// The RFC 6962 leaf hash of the canonical bytes: SHA-256(0x00 || encode()).
    pub fn leaf_hash(&self) -> Hash {
        merkle::leaf_hash(&self.encode())
    }

    /// Parse canonical leaf bytes (strict: known version, no trailing bytes).
    pub fn decode(bytes: &[u8]) -> Result<Self, LeafDecodeError> {
        let mut r = Reader { buf: bytes };
        let version = r.take::<1>("version")?[0];
        if version != LEAF_FORMAT_V1 {
            return Err(LeafDecodeError::Version(version));
        }
        let tenant_id = r.string("tenant_id")?;
        let leaf_index = u64::from_be_bytes(r.take("leaf_index")?);
        let event_id = Uuid::from_bytes(r.take("event_id")?);
        let occurred_at_us = i64::from_be_bytes(r.take("occurred_at_us")?);
        let leaf = Self {
            tenant_id,
            leaf_index,
            event_id,
            occurred_at_us,
            team_id: r.string("team_id")?,
            project_id: r.string("project_id")?,
            user_id: r.string("user_id")?,
            source: r.string("source")?,
            actor_type: r.string("actor_type")?,
            actor_id: r.string("actor_id")?,
            action: r.string("action")?,
            resource_type: r.string("resource_type")?,
            resource_id: r.string("resource_id")?,
            outcome: r.string("outcome")?,
            ip: r.string("ip")?,
            user_agent: r.string("user_agent")?,
            details: r.string("details")?,
            personal_data: match r.take::<1>("personal_data")?[0] {
                0 => false,
                1 => true,
                b => return Err(LeafDecodeError::Bool(b)),
            },
            pseudonym_key_version: u32::from_be_bytes(r.take("pseudonym_key_version")?),
        };
        if !r.buf.is_empty() {
            return Err(LeafDecodeError::Trailing(r.buf.len()));
        }
        Ok(leaf)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).expect("a stored field is under 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], LeafDecodeError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(LeafDecodeError::Truncated(field))?;
        self.buf = rest;
        Ok(*head)
    }

    fn string(&mut self, field: &'static str) -> Result<String, LeafDecodeError> {
        let len = u32::from_be_bytes(self.take(field)?) as usize;
        if self.buf.len() < len {
            return Err(LeafDecodeError::Truncated(field));
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        String::from_utf8(s.to_vec()).map_err(|_| LeafDecodeError::Utf8(field))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The worked example of `docs/audit-log.md`. Pseudonyms are made with the key of 32
    /// bytes 0x6b ("k"), version 1: "alice" for user_id and actor_id, "192.0.2.10" for ip.
    pub(crate) fn example() -> AuditLeaf {
        AuditLeaf {
            tenant_id: "acme".into(),
            leaf_index: 5,
            event_id: Uuid::parse_str("0190a6f2-7c3e-7b1a-9d2e-3f4a5b6c7d8e").unwrap(),
            occurred_at_us: 1_718_000_000_123_456,
            team_id: "team-7".into(),
            project_id: "".into(),
            user_id: "6664a42048c6d6d7fe3657e39b14155c099246385212db085614c81f5b9c938d".into(),
            source: "console".into(),
            actor_type: "user".into(),
            actor_id: "6664a42048c6d6d7fe3657e39b14155c099246385212db085614c81f5b9c938d".into(),
            action: "export".into(),
            resource_type: "dataset".into(),
            resource_id: "ds-42".into(),
            outcome: "success".into(),
            ip: "7793a0d938654b3e748a304996315a4888d3c149f622c20a75151fc7b04310b3".into(),
            user_agent: "curl/8.5".into(),
            details: "{\"rows\":120,\"note\":\"é\"}".into(),
            personal_data: true,
            pseudonym_key_version: 1,
        }
    }

    #[test]
    fn example_layout_is_as_documented() {
        let bytes = example().encode();
        assert_eq!(bytes.len(), example().encoded_len());
        assert_eq!(bytes[0], 0x01);
        assert_eq!(&bytes[1..5], &[0, 0, 0, 4]);
        assert_eq!(&bytes[5..9], b"acme");
        assert_eq!(&bytes[9..17], &5u64.to_be_bytes());
        assert_eq!(
            &bytes[17..33],
            &[
                0x01, 0x90, 0xa6, 0xf2, 0x7c, 0x3e, 0x7b, 0x1a, 0x9d, 0x2e, 0x3f, 0x4a, 0x5b, 0x6c,
                0x7d, 0x8e
            ]
        );
        assert_eq!(&bytes[33..41], &1_718_000_000_123_456i64.to_be_bytes());
        assert_eq!(&bytes[bytes.len() - 5..], &[1, 0, 0, 0, 1]);
        assert_eq!(AuditLeaf::decode(&bytes).unwrap(), example());
    }

    #[test]
    fn decode_is_strict() {
        let bytes = example().encode();
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(AuditLeaf::decode(&v2), Err(LeafDecodeError::Version(2)));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            AuditLeaf::decode(&trailing),
            Err(LeafDecodeError::Trailing(1))
        );
        for cut in 0..bytes.len() {
            assert!(AuditLeaf::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_bool = bytes.clone();
        let at = bad_bool.len() - 5;
        bad_bool[at] = 2;
        assert_eq!(AuditLeaf::decode(&bad_bool), Err(LeafDecodeError::Bool(2)));
        let mut bad_utf8 = bytes;
        bad_utf8[5] = 0xff; // first byte of "acme"
        assert_eq!(
            AuditLeaf::decode(&bad_utf8),
            Err(LeafDecodeError::Utf8("tenant_id"))
        );
    }

    #[test]
    fn from_event_pseudonymises_and_limits() {
        use chrono::TimeZone;
        let key = PseudonymKey::new(3, &[b'k'; 32]).unwrap();
        let ev = AuditEvent {
            event_id: Uuid::nil(),
            occurred_at: chrono::Utc.timestamp_micros(1_700_000_000_000_001).unwrap(),
            tenant_id: "t".into(),
            team_id: None,
            project_id: Some("p".into()),
            user_id: Some("alice".into()),
            source: "s".into(),
            tags: Default::default(),
            actor_type: ActorType::User,
            actor_id: "alice".into(),
            action: "read".into(),
            resource_type: "doc".into(),
            resource_id: "d1".into(),
            outcome: tally_schemas::Outcome::Denied,
            ip: Some("10.0.0.1".into()),
            user_agent: Some("ééé".into()),
            details: "{}".into(),
            personal_data: true,
        };
        let limits = FieldLimits {
            max_user_agent_bytes: 5,
            max_details_bytes: 10,
        };
        let leaf = AuditLeaf::from_event(&ev, 9, &key, limits);
        assert_eq!(leaf.user_id, key.pseudonym("alice"));
        assert_eq!(leaf.actor_id, key.pseudonym("alice"));
        assert_eq!(leaf.ip, key.pseudonym("10.0.0.1"));
        assert!(!leaf.encode().windows(5).any(|w| w == b"alice"));
        assert_eq!(leaf.user_agent, "éé");
        assert_eq!(leaf.team_id, "");
        assert_eq!(leaf.outcome, "denied");
        assert_eq!(leaf.occurred_at_us, 1_700_000_000_000_001);
        assert_eq!(leaf.pseudonym_key_version, 3);
        assert_eq!(leaf.leaf_index, 9);
        let service = AuditEvent {
            actor_type: ActorType::Service,
            actor_id: "svc-a".into(),
            ..ev
        };
        assert_eq!(
            AuditLeaf::from_event(&service, 0, &key, limits).actor_id,
            "svc-a"
        );
    }

    pub(crate) fn arb_leaf() -> impl Strategy<Value = AuditLeaf> {
        let s = || ".{0,12}";
        (
            (
                s(),
                any::<u64>(),
                any::<u128>(),
                any::<i64>(),
                s(),
                s(),
                s(),
                s(),
            ),
            (s(), s(), s(), s(), s(), s(), s(), s()),
            (s(), any::<bool>(), any::<u32>()),
        )
            .prop_map(
                |(
                    (t, li, id, at, team, proj, user, src),
                    (aty, aid, act, rty, rid, out, ip, ua),
                    (det, pd, kv),
                )| {
                    AuditLeaf {
                        tenant_id: t,
                        leaf_index: li,
                        event_id: Uuid::from_u128(id),
                        occurred_at_us: at,
                        team_id: team,
                        project_id: proj,
                        user_id: user,
                        source: src,
                        actor_type: aty,
                        actor_id: aid,
                        action: act,
                        resource_type: rty,
                        resource_id: rid,
                        outcome: out,
                        ip,
                        user_agent: ua,
                        details: det,
                        personal_data: pd,
                        pseudonym_key_version: kv,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(leaf in arb_leaf()) {
            let bytes = leaf.encode();
            prop_assert_eq!(bytes.len(), leaf.encoded_len());
            prop_assert_eq!(AuditLeaf::decode(&bytes).unwrap(), leaf);
        }

        /// Injective: rows that differ give different bytes (so different leaf hashes),
        /// even when one field's text moves into its neighbour.
        #[test]
        fn different_rows_encode_differently(a in arb_leaf(), b in arb_leaf()) {
            prop_assert_eq!(a == b, a.encode() == b.encode());
        }

        #[test]
        fn shifting_text_between_fields_changes_the_leaf(mut leaf in arb_leaf(), q in ".{1,4}") {
            // Same concatenation action || resource_type, different boundary.
            let mut moved = leaf.clone();
            moved.resource_type = format!("{q}{}", leaf.resource_type);
            leaf.action = format!("{}{q}", leaf.action);
            prop_assert_ne!(leaf.leaf_hash(), moved.leaf_hash());
        }
    }
}
