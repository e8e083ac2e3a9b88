//! C2SP checkpoints (c2sp.org/tlog-checkpoint) of a tenant's audit tree, signed as notes.
//!
//! Guarantee: [`open_checkpoint`] yields a checkpoint only from a well-formed signed note
//! that a known key verifies and whose body is exactly `origin\nsize\nbase64(root)\n`
//! (plus optional non-empty extension lines), with the size in canonical decimal and the
//! root canonical base64 of 32 bytes; [`to_text`](Checkpoint::to_text) and
//! [`from_text`](Checkpoint::from_text) are inverse, so the signed bytes are reproducible.
//! [`verify_extends`] accepts a newer checkpoint only with a valid consistency proof
//! from the older one of the same origin.

use super::merkle::Hash;
use super::note::{self, Note, NoteError, NoteSigner, NoteVerifier};
use super::proof::{verify_consistency, ProofError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// Why a checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Note(#[from] NoteError),
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    #[error("checkpoint origin {got:?} is not the expected {want:?}")]
    OriginMismatch { want: String, got: String },
    #[error("checkpoints are not consistent: {0}")]
    Inconsistent(ProofError),
}

/// The tree head of one log: origin, size, root, and (discouraged) extension lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    pub extensions: Vec<String>,
}

/// A line of the body: non-empty, no control characters (so no newline).
fn valid_line(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(char::is_control)
}

/// The origin of a tenant's log: `<log name>/<tenant>`, where the tenant id is
/// percent-encoded (every byte outside `A-Z a-z 0-9 - . _ ~` becomes `%XX`, uppercase
/// hex), so an origin has no spaces, `+` or `/` inside the tenant part.
pub fn origin_for(log_name: &str, tenant_id: &str) -> String {
    let mut o = String::with_capacity(log_name.len() + 1 + tenant_id.len());
    o.push_str(log_name);
    o.push('/');
    for b in tenant_id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

impl Checkpoint {
    /// A checkpoint without extension lines.
    pub fn new(origin: &str, size: u64, root: Hash) -> Result<Self, CheckpointError> {
        if !valid_line(origin) {
            return Err(CheckpointError::Malformed(
                "origin is empty or has a control character",
            ));
        }
        Ok(Self {
            origin: origin.to_string(),
            size,
            root,
            extensions: Vec::new(),
        })
    }

    /// The note text: `origin\nsize\nbase64(root)\n` then one line per extension.
    pub fn to_text(&self) -> String {
        let mut t = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for e in &self.extensions {
            t.push_str(e);
            t.push('\n');
        }
        t
    }

    /// Parse a note text (strict; see the module guarantee).
    pub fn from_text(text: &str) -> Result<Self, CheckpointError> {
        let body = text.strip_suffix('\n').ok_or(CheckpointError::Malformed(
            "text does not end with a newline",
        ))?;
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(CheckpointError::Malformed("fewer than three lines"));
        };
        if !valid_line(origin) {
            return Err(CheckpointError::Malformed(
                "origin is empty or has a control character",
            ));
        }
        let size = parse_decimal(size).ok_or(CheckpointError::Malformed("tree size"))?;
        let root = parse_hash(root).ok_or(CheckpointError::Malformed("root hash"))?;
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if !extensions.iter().all(|e| valid_line(e)) {
            return Err(CheckpointError::Malformed("empty extension line"));
        }
        Ok(Self {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }

    /// The signed note of this checkpoint.
    pub fn sign(&self, signer: &NoteSigner) -> Result<String, CheckpointError> {
        Ok(note::sign(&self.to_text(), &[signer])?)
    }
}

/// ASCII decimal with no leading zeros (except `0` itself) that fits a u64.
pub(crate) fn parse_decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// Canonical standard base64 of exactly 32 bytes.
pub(crate) fn parse_hash(s: &str) -> Option<Hash> {
    let raw = B64.decode(s).ok()?;
    let h: Hash = raw.try_into().ok()?;
    (B64.encode(h) == s).then_some(h)
}

/// Parse a signed checkpoint, verify it against the known keys, and (when given) check
/// its origin. Returns the checkpoint and the verified note (for its signatures).
pub fn open_checkpoint(
    msg: &[u8],
    known: &[NoteVerifier],
    origin: Option<&str>,
) -> Result<(Checkpoint, Note), CheckpointError> {
    let note = note::open(msg, known)?;
    let cp = Checkpoint::from_text(&note.text)?;
    if let Some(want) = origin {
        if cp.origin != want {
            return Err(CheckpointError::OriginMismatch {
                want: want.to_string(),
                got: cp.origin,
            });
        }
    }
    Ok((cp, note))
}

/// Check that `new` extends `old` (same origin, size not smaller, valid consistency
/// proof between their roots).
pub fn verify_extends(
    old: &Checkpoint,
    new: &Checkpoint,
    proof: &[Hash],
) -> Result<(), CheckpointError> {
    if old.origin != new.origin {
        return Err(CheckpointError::OriginMismatch {
            want: old.origin.clone(),
            got: new.origin.clone(),
        });
    }
    verify_consistency(old.size, new.size, proof, &old.root, &new.root)
        .map_err(CheckpointError::Inconsistent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::{consistency_proof, leaf_hash, root, EMPTY_ROOT};

    fn signer() -> NoteSigner {
        NoteSigner::new("tally.example/audit", &[7; 32]).unwrap()
    }

    #[test]
    fn text_is_the_c2sp_layout() {
        let cp = Checkpoint::new("tally.example/audit/acme", 0, EMPTY_ROOT).unwrap();
        assert_eq!(
            cp.to_text(),
            "tally.example/audit/acme\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
        );
        assert_eq!(Checkpoint::from_text(&cp.to_text()).unwrap(), cp);
        let mut ext = cp.clone();
        ext.extensions.push("ext line".into());
        assert_eq!(Checkpoint::from_text(&ext.to_text()).unwrap(), ext);
    }

    #[test]
    fn origins_escape_the_tenant() {
        assert_eq!(
            origin_for("tally.example/audit", "acme-1"),
            "tally.example/audit/acme-1"
        );
        assert_eq!(origin_for("l", "a b/c+é"), "l/a%20b%2Fc%2B%C3%A9");
        assert!(Checkpoint::new("", 1, EMPTY_ROOT).is_err());
        assert!(Checkpoint::new("a\nb", 1, EMPTY_ROOT).is_err());
    }

    #[test]
    fn malformed_bodies_are_rejected() {
        let r = B64.encode([1u8; 32]);
        for bad in [
            format!("o\n1\n{r}"),
            "o\n1\n".to_string(),
            format!("\n1\n{r}\n"),
            format!("o\n01\n{r}\n"),
            format!("o\n+1\n{r}\n"),
            format!("o\n-1\n{r}\n"),
            format!("o\n18446744073709551616\n{r}\n"),
            format!("o\n1 \n{r}\n"),
            "o\n1\nAAAA\n".to_string(),
            format!("o\n1\n{}\n", &r[..r.len() - 1]),
            format!("o\n1\n{}\n", r.replace('=', "")),
            format!("o\n1\n{r}\n\n"),
            format!("o\n1\n{r}\next\n\n"),
        ] {
            assert!(Checkpoint::from_text(&bad).is_err(), "{bad:?}");
        }
        // Non-canonical base64 (trailing bits set) is refused.
        let mut noncanon = r.clone().into_bytes();
        let at = noncanon.len() - 2;
        assert_eq!(noncanon[at], b'E'); // [1; 32] ends in "AQE=": 000100, pad bits 00
        noncanon[at] = b'F'; // 000101: same data bits, nonzero pad bits
        assert!(parse_hash(std::str::from_utf8(&noncanon).unwrap()).is_none());
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn signed_checkpoints_open_only_with_the_right_key_and_origin() {
        let s = signer();
        let leaves: Vec<_> = (0u8..5).map(|i| leaf_hash(&[i])).collect();
        let cp = Checkpoint::new("tally.example/audit/acme", 5, root(&leaves)).unwrap();
        let signed = cp.sign(&s).unwrap();
        assert!(signed.starts_with(&cp.to_text()));
        let (got, note) =
            open_checkpoint(signed.as_bytes(), &[s.verifier()], Some(&cp.origin)).unwrap();
        assert_eq!(got, cp);
        assert_eq!(note.signatures.len(), 1);
        let other = NoteSigner::new("tally.example/audit", &[8; 32]).unwrap();
        assert_eq!(
            open_checkpoint(signed.as_bytes(), &[other.verifier()], None).unwrap_err(),
            CheckpointError::Note(NoteError::NoKnownSignature)
        );
        assert!(matches!(
            open_checkpoint(
                signed.as_bytes(),
                &[s.verifier()],
                Some("tally.example/audit/evil")
            ),
            Err(CheckpointError::OriginMismatch { .. })
        ));
        // Re-signed by another key with the same name: refused (replaced checkpoint).
        let forged = cp.sign(&other).unwrap();
        assert!(open_checkpoint(forged.as_bytes(), &[s.verifier()], None).is_err());
        // A signed note whose body is not a checkpoint.
        let junk = note::sign("hello\n", &[&s]).unwrap();
        assert!(matches!(
            open_checkpoint(junk.as_bytes(), &[s.verifier()], None),
            Err(CheckpointError::Malformed(_))
        ));
    }

    #[test]
    fn extends_needs_a_consistency_proof() {
        let leaves: Vec<_> = (0u8..9).map(|i| leaf_hash(&[i])).collect();
        let o = "tally.example/audit/acme";
        let old = Checkpoint::new(o, 3, root(&leaves[..3])).unwrap();
        let new = Checkpoint::new(o, 9, root(&leaves)).unwrap();
        let p = consistency_proof(&leaves, 3).unwrap();
        assert_eq!(verify_extends(&old, &new, &p), Ok(()));
        assert!(verify_extends(&new, &old, &p).is_err());
        let mut forked = leaves.clone();
        forked[1] = leaf_hash(b"forged");
        let fork = Checkpoint::new(o, 9, root(&forked)).unwrap();
        let pf = consistency_proof(&forked, 3).unwrap();
        assert!(matches!(
            verify_extends(&old, &fork, &pf),
            Err(CheckpointError::Inconsistent(_))
        ));
        let elsewhere = Checkpoint::new("tally.example/audit/other", 9, root(&leaves)).unwrap();
        assert!(verify_extends(&old, &elsewhere, &p).is_err());
    }
}
