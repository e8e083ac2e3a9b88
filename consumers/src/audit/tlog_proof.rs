//! Offline inclusion proofs in the C2SP tlog-proof layout (c2sp.org/tlog-proof@v1).
//!
//! Guarantee: [`verify_event_proof`] accepts a proof file only if, using nothing but the
//! log's public key, the embedded checkpoint verifies, its origin is the one of the
//! tenant named in the embedded leaf, the leaf's own index is the proof's index, and the
//! inclusion hashes lead from the hash of the embedded leaf bytes to the checkpoint's
//! root at the checkpoint's size. [`TlogProof::parse`] is strict and inverts
//! [`TlogProof::to_text`].

use super::checkpoint::CheckpointError;
use super::checkpoint::{open_checkpoint, origin_for, parse_decimal, parse_hash, Checkpoint};
use super::leaf::{AuditLeaf, LeafDecodeError};
use super::merkle::{leaf_hash, Hash};
use super::note::NoteVerifier;
use super::proof::{verify_inclusion, ProofError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// First line of every proof.
pub const TLOG_PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";
/// An inclusion proof in a tree of at most 2^64 leaves has at most 64 hashes.
const MAX_PROOF_HASHES: usize = 64;

/// Why a proof file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlogProofError {
    #[error("malformed proof: {0}")]
    Malformed(&'static str),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("inclusion proof: {0}")]
    Inclusion(#[from] ProofError),
    #[error("the proof carries no leaf (no extra line)")]
    MissingLeaf,
    #[error("embedded leaf: {0}")]
    Leaf(#[from] LeafDecodeError),
    #[error("the leaf says index {leaf}, the proof says {proof}")]
    IndexMismatch { leaf: u64, proof: u64 },
}

/// A parsed proof: optional extra data, the leaf index, the inclusion hashes (sibling
/// first), and the signed checkpoint note, verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlogProof {
    pub extra: Option<Vec<u8>>,
    pub index: u64,
    pub hashes: Vec<Hash>,
    pub checkpoint: String,
}

/// Split off the next line (without its newline); `None` if there is no newline.
fn next_line<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let (line, tail) = rest.split_once('\n')?;
    *rest = tail;
    Some(line)
}

impl TlogProof {
    /// The proof file text.
    pub fn to_text(&self) -> String {
        let mut t = format!("{TLOG_PROOF_HEADER}\n");
        if let Some(extra) = &self.extra {
            t.push_str(&format!("extra {}\n", B64.encode(extra)));
        }
        t.push_str(&format!("index {}\n", self.index));
        for h in &self.hashes {
            t.push_str(&B64.encode(h));
            t.push('\n');
        }
        t.push('\n');
        t.push_str(&self.checkpoint);
        t
    }

    /// Parse a proof file (strict layout; the checkpoint is checked by `verify`).
    pub fn parse(bytes: &[u8]) -> Result<Self, TlogProofError> {
        let malformed = TlogProofError::Malformed;
        let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8"))?;
        let mut rest = text;
        if next_line(&mut rest) != Some(TLOG_PROOF_HEADER) {
            return Err(malformed("first line is not c2sp.org/tlog-proof@v1"));
        }
        let mut line = next_line(&mut rest).ok_or(malformed("no index line"))?;
        let mut extra = None;
        if let Some(b64) = line.strip_prefix("extra ") {
            let raw = B64
                .decode(b64)
                .map_err(|_| malformed("extra is not base64"))?;
            if B64.encode(&raw) != b64 {
                return Err(malformed("extra is not canonical base64"));
            }
            extra = Some(raw);
            line = next_line(&mut rest).ok_or(malformed("no index line"))?;
        }
        let index = line
            .strip_prefix("index ")
            .and_then(parse_decimal)
            .ok_or(malformed("bad index line"))?;
        let mut hashes = Vec::new();
        loop {
            let line =
                next_line(&mut rest).ok_or(malformed("no blank line before the checkpoint"))?;
            if line.is_empty() {
                break;
            }
            if hashes.len() == MAX_PROOF_HASHES {
                return Err(malformed("more than 64 proof hashes"));
            }
            hashes.push(parse_hash(line).ok_or(malformed("proof hash is not base64 of 32 bytes"))?);
        }
        if rest.is_empty() {
            return Err(malformed("no checkpoint"));
        }
        Ok(Self {
            extra,
            index,
            hashes,
            checkpoint: rest.to_string(),
        })
    }

    /// Verify that the entry with leaf hash `leaf` is at `index` in the checkpointed tree;
    /// returns the verified checkpoint.
    pub fn verify(
        &self,
        leaf: &Hash,
        known: &[NoteVerifier],
        origin: Option<&str>,
    ) -> Result<Checkpoint, TlogProofError> {
        let (cp, _) = open_checkpoint(self.checkpoint.as_bytes(), known, origin)?;
        verify_inclusion(self.index, cp.size, leaf, &self.hashes, &cp.root)?;
        Ok(cp)
    }
}

/// The offline proof of one audit event: the canonical leaf bytes travel as the extra
/// data, so the proof is checkable with nothing but the public key.
pub fn event_proof(leaf: &AuditLeaf, hashes: Vec<Hash>, signed_checkpoint: String) -> TlogProof {
    TlogProof {
        extra: Some(leaf.encode()),
        index: leaf.leaf_index,
        hashes,
        checkpoint: signed_checkpoint,
    }
}

/// What a verified event proof proves: this stored row is in this signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedEvent {
    pub leaf: AuditLeaf,
    pub checkpoint: Checkpoint,
}

/// Verify an event proof file with the log's public key only. The checkpoint's origin
/// must be `origin_for(key name, tenant of the leaf)`.
pub fn verify_event_proof(
    bytes: &[u8],
    key: &NoteVerifier,
) -> Result<VerifiedEvent, TlogProofError> {
    let proof = TlogProof::parse(bytes)?;
    let raw = proof.extra.as_deref().ok_or(TlogProofError::MissingLeaf)?;
    let leaf = AuditLeaf::decode(raw)?;
    if leaf.leaf_index != proof.index {
        return Err(TlogProofError::IndexMismatch {
            leaf: leaf.leaf_index,
            proof: proof.index,
        });
    }
    let origin = origin_for(key.name(), &leaf.tenant_id);
    let checkpoint = proof.verify(&leaf_hash(raw), std::slice::from_ref(key), Some(&origin))?;
    Ok(VerifiedEvent { leaf, checkpoint })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::leaf::tests::example;
    use crate::audit::merkle::{inclusion_proof, root};
    use crate::audit::note::NoteSigner;

    /// A tenant log of 11 events with the documented example at index 5, its signed
    /// checkpoint, and the offline proof of the example.
    pub(crate) fn fixture() -> (NoteSigner, Vec<AuditLeaf>, String) {
        let signer = NoteSigner::new("tally.example/audit", &[7; 32]).unwrap();
        let leaves: Vec<AuditLeaf> = (0..11u64)
            .map(|i| AuditLeaf {
                leaf_index: i,
                action: format!("action-{i}"),
                ..example()
            })
            .map(|l| if l.leaf_index == 5 { example() } else { l })
            .collect();
        let hashes: Vec<Hash> = leaves.iter().map(AuditLeaf::leaf_hash).collect();
        let origin = origin_for(signer.name(), "acme");
        let cp = Checkpoint::new(&origin, 11, root(&hashes)).unwrap();
        let signed = cp.sign(&signer).unwrap();
        let proof = event_proof(&leaves[5], inclusion_proof(&hashes, 5).unwrap(), signed);
        (signer, leaves, proof.to_text())
    }

    #[test]
    fn layout_round_trips() {
        let (_, _, text) = fixture();
        assert!(text.starts_with("c2sp.org/tlog-proof@v1\nextra AQ"));
        assert!(text.contains("\nindex 5\n"));
        let p = TlogProof::parse(text.as_bytes()).unwrap();
        assert_eq!(p.hashes.len(), 4);
        assert_eq!(p.to_text(), text);
        let plain = TlogProof { extra: None, ..p };
        assert_eq!(TlogProof::parse(plain.to_text().as_bytes()).unwrap(), plain);
    }

    #[test]
    fn verifies_with_the_public_key_alone() {
        let (signer, _, text) = fixture();
        let v = verify_event_proof(text.as_bytes(), &signer.verifier()).unwrap();
        assert_eq!(v.leaf, example());
        assert_eq!(v.checkpoint.size, 11);
        assert_eq!(v.checkpoint.origin, "tally.example/audit/acme");
    }

    #[test]
    fn tampered_proofs_are_rejected() {
        let (signer, leaves, text) = fixture();
        let key = signer.verifier();
        let p = TlogProof::parse(text.as_bytes()).unwrap();
        let check = |p: &TlogProof| verify_event_proof(p.to_text().as_bytes(), &key);

        let mut other_leaf = p.clone();
        other_leaf.extra = Some(
            AuditLeaf {
                details: "{}".into(),
                ..example()
            }
            .encode(),
        );
        assert!(matches!(
            check(&other_leaf),
            Err(TlogProofError::Inclusion(_))
        ));

        let mut moved = p.clone();
        moved.index = 4;
        assert!(matches!(
            check(&moved),
            Err(TlogProofError::IndexMismatch { .. })
        ));

        let mut neighbour = p.clone();
        neighbour.extra = Some(leaves[4].encode());
        neighbour.index = 4;
        assert!(matches!(
            check(&neighbour),
            Err(TlogProofError::Inclusion(_))
        ));

        let mut bit = p.clone();
        bit.hashes[2][0] ^= 0x80;
        assert!(matches!(check(&bit), Err(TlogProofError::Inclusion(_))));

        let mut short = p.clone();
        short.hashes.pop();
        assert!(check(&short).is_err());

        let mut no_leaf = p.clone();
        no_leaf.extra = None;
        assert_eq!(check(&no_leaf), Err(TlogProofError::MissingLeaf));

        let mut other_tenant = p.clone();
        other_tenant.extra = Some(
            AuditLeaf {
                tenant_id: "evil".into(),
                ..example()
            }
            .encode(),
        );
        assert!(matches!(
            check(&other_tenant),
            Err(TlogProofError::Checkpoint(
                CheckpointError::OriginMismatch { .. }
            ))
        ));

        let impostor = NoteSigner::new("tally.example/audit", &[9; 32]).unwrap();
        assert!(matches!(
            verify_event_proof(text.as_bytes(), &impostor.verifier()),
            Err(TlogProofError::Checkpoint(_))
        ));
        let mut bigger = p.clone();
        bigger.checkpoint = bigger.checkpoint.replacen("\n11\n", "\n12\n", 1);
        assert!(matches!(check(&bigger), Err(TlogProofError::Checkpoint(_))));
    }

    #[test]
    fn malformed_files_are_rejected() {
        let (_, _, text) = fixture();
        let cases = [
            text.replacen("c2sp.org/tlog-proof@v1", "c2sp.org/tlog-proof@v2", 1),
            text.replacen("index 5", "index 05", 1),
            text.replacen("index 5", "index  5", 1),
            text.replacen("index 5", "idx 5", 1),
            text.replacen("extra AQ", "extra *Q", 1),
            text.replacen("\n\n", "\n", 1),
            text.split("\n\n").next().unwrap().to_string() + "\n\n",
            text.replacen("=\n", "\n", 1),
        ];
        for bad in cases {
            assert!(TlogProof::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
