//! Verification of RFC 9162 inclusion and consistency proofs over untrusted bytes (pure).
//!
//! Guarantee: a proof is accepted only if it recomputes the claimed root(s) with exactly
//! the hashes it carries for exactly the claimed tree size(s): a wrong size or index, a
//! missing, extra, reordered or modified hash, a malformed (non-32-byte) hash or root,
//! or a consistency "proof" from the empty tree that carries anything is rejected. Every
//! case of `shared/vectors/merkle-rfc6962` passes (see `vectors.rs`).

use super::merkle::{node_hash, Hash, EMPTY_ROOT, HASH_LEN};

/// Why a proof was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("old tree size {old} is larger than new tree size {new}")]
    SizesReversed { old: u64, new: u64 },
    #[error("a hash is {0} bytes, not 32")]
    MalformedHash(usize),
    #[error("the proof has {got} hashes, the tree sizes need a different number")]
    WrongLength { got: usize },
    #[error("the proof for equal tree sizes must be empty")]
    NonEmptyProof,
    #[error("the recomputed root does not match the claimed root")]
    RootMismatch,
    #[error("the recomputed old root does not match the claimed old root")]
    OldRootMismatch,
}

fn as_hash(bytes: &[u8]) -> Result<Hash, ProofError> {
    <[u8; HASH_LEN]>::try_from(bytes).map_err(|_| ProofError::MalformedHash(bytes.len()))
}

/// The root an inclusion proof leads to (RFC 9162 2.1.3.2 steps 1-6), without comparing.
pub fn root_from_inclusion_proof<P: AsRef<[u8]>>(
    index: u64,
    size: u64,
    leaf: &[u8],
    proof: &[P],
) -> Result<Hash, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut r = as_hash(leaf)?;
    let (mut f, mut s) = (index, size - 1);
    for p in proof {
        if s == 0 {
            return Err(ProofError::WrongLength { got: proof.len() });
        }
        let p = as_hash(p.as_ref())?;
        if f & 1 == 1 || f == s {
            r = node_hash(&p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, &p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength { got: proof.len() });
    }
    Ok(r)
}

/// Verify that `leaf` (a leaf hash) is at `index` in the tree of `size` leaves whose
/// root is `root`.
pub fn verify_inclusion<P: AsRef<[u8]>>(
    index: u64,
    size: u64,
    leaf: &[u8],
    proof: &[P],
    root: &[u8],
) -> Result<(), ProofError> {
    let computed = root_from_inclusion_proof(index, size, leaf, proof)?;
    let root = as_hash(root)?;
    if computed == root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// Verify that the tree of `old_size` leaves with root `old_root` is a prefix of the tree
/// of `new_size` leaves with root `new_root` (RFC 9162 2.1.4.2).
///
/// Edge cases, as the conformance vectors require: equal sizes need an empty proof and
/// equal roots (compared byte for byte; at size 0 both must be the empty-tree root);
/// from size 0 only the empty-tree root with an empty proof and a well-formed new root
/// is accepted (every tree extends the empty tree; there is nothing to prove).
pub fn verify_consistency<P: AsRef<[u8]>>(
    old_size: u64,
    new_size: u64,
    proof: &[P],
    old_root: &[u8],
    new_root: &[u8],
) -> Result<(), ProofError> {
    if new_size < old_size {
        return Err(ProofError::SizesReversed {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == new_size || old_size == 0 {
        if !proof.is_empty() {
            return Err(ProofError::NonEmptyProof);
        }
        if old_size == 0 {
            if old_root != EMPTY_ROOT {
                return Err(ProofError::OldRootMismatch);
            }
            as_hash(new_root)?;
            if new_size == 0 && new_root != EMPTY_ROOT {
                return Err(ProofError::RootMismatch);
            }
            return Ok(());
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    let (old, new) = roots_from_consistency_proof(old_size, new_size, proof, old_root)?;
    if old != as_hash(old_root)? {
        return Err(ProofError::OldRootMismatch);
    }
    if new != as_hash(new_root)? {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The (old, new) roots a consistency proof for 0 < old_size < new_size leads to.
/// `old_root` is used only as the proof's first node when `old_size` is a power of two.
fn roots_from_consistency_proof<P: AsRef<[u8]>>(
    old_size: u64,
    new_size: u64,
    proof: &[P],
    old_root: &[u8],
) -> Result<(Hash, Hash), ProofError> {
    debug_assert!(0 < old_size && old_size < new_size);
    let wrong_length = || ProofError::WrongLength { got: proof.len() };
    let mut hashes = proof.iter().map(|p| as_hash(p.as_ref()));
    // An old tree that is a perfect subtree is its own first node: prepend its root.
    let first = if old_size.is_power_of_two() {
        as_hash(old_root)?
    } else {
        hashes.next().ok_or_else(wrong_length)??
    };
    if proof.is_empty() {
        return Err(wrong_length());
    }
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (first, first);
    for c in hashes {
        let c = c?;
        if s == 0 {
            return Err(wrong_length());
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(&c, &fr);
            sr = node_hash(&c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, &c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(wrong_length());
    }
    Ok((fr, sr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::{consistency_proof, inclusion_proof, leaf_hash, root};
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n as u32).map(|i| leaf_hash(&i.to_le_bytes())).collect()
    }

    #[test]
    fn single_leaf_tree_needs_an_empty_proof() {
        let l = leaves(1);
        let none: [Hash; 0] = [];
        assert_eq!(verify_inclusion(0, 1, &l[0], &none, &l[0]), Ok(()));
        assert!(verify_inclusion(0, 1, &l[0], &[l[0]], &l[0]).is_err());
        assert!(verify_inclusion(0, 0, &l[0], &none, &EMPTY_ROOT).is_err());
    }

    #[test]
    fn consistency_from_the_empty_tree() {
        let l = leaves(3);
        let none: [Hash; 0] = [];
        assert_eq!(
            verify_consistency(0, 3, &none, &EMPTY_ROOT, &root(&l)),
            Ok(())
        );
        assert_eq!(
            verify_consistency(0, 0, &none, &EMPTY_ROOT, &EMPTY_ROOT),
            Ok(())
        );
        assert!(verify_consistency(0, 3, &[l[0]], &EMPTY_ROOT, &root(&l)).is_err());
        assert!(verify_consistency(0, 3, &none, &l[0], &root(&l)).is_err());
    }

    proptest! {
        /// Every generated inclusion proof verifies, and any change to the index, the
        /// size, one bit of one hash, or the number of hashes is rejected.
        #[test]
        fn inclusion_proofs_verify_and_tampering_is_rejected(
            n in 1usize..200, i in 0usize..200, bit in 0usize..256, extra in 1u64..5,
        ) {
            let l = leaves(n);
            let i = (i % n) as u64;
            let r = root(&l);
            let p = inclusion_proof(&l, i).unwrap();
            prop_assert_eq!(verify_inclusion(i, n as u64, &l[i as usize], &p, &r), Ok(()));
            prop_assert!(verify_inclusion(i, n as u64, &l[(i as usize + 1) % n], &p, &r).is_err() || n == 1);
            prop_assert!(verify_inclusion(i + extra, n as u64, &l[i as usize], &p, &r).is_err());
            // A proof binds the size only through its shape (the root binds the rest, and
            // a checkpoint signs root and size together): a size whose proof has another
            // length must be rejected.
            let other_shape = inclusion_proof(&leaves(n + extra as usize), i).unwrap().len() != p.len();
            if other_shape {
                prop_assert!(verify_inclusion(i, n as u64 + extra, &l[i as usize], &p, &r).is_err());
            }
            if !p.is_empty() {
                let mut bad = p.clone();
                let k = bit / 8 % bad.len();
                bad[k][bit % 32] ^= 1 << (bit % 8);
                prop_assert!(verify_inclusion(i, n as u64, &l[i as usize], &bad, &r).is_err());
                prop_assert!(verify_inclusion(i, n as u64, &l[i as usize], &p[..p.len() - 1], &r).is_err());
            }
            let mut longer = p.clone();
            longer.push(r);
            prop_assert!(verify_inclusion(i, n as u64, &l[i as usize], &longer, &r).is_err());
        }

        /// Every generated consistency proof verifies; a changed old size, modified bit,
        /// truncated or extended proof, or a root from another tree is rejected.
        #[test]
        fn consistency_proofs_verify_and_tampering_is_rejected(
            n in 1usize..200, m in 1usize..200, bit in 0usize..256,
        ) {
            let l = leaves(n);
            let m = 1 + (m - 1) % n;
            let (r1, r2) = (root(&l[..m]), root(&l));
            let p = consistency_proof(&l, m as u64).unwrap();
            prop_assert_eq!(verify_consistency(m as u64, n as u64, &p, &r1, &r2), Ok(()));
            if m < n {
                let other = root(&leaves(n + 1)[1..]);
                prop_assert!(verify_consistency(m as u64, n as u64, &p, &r1, &other).is_err());
                prop_assert!(verify_consistency(m as u64, n as u64, &p, &r2, &r2).is_err());
                if consistency_proof(&l, m as u64 + 1).unwrap().len() != p.len() {
                    prop_assert!(verify_consistency(m as u64 + 1, n as u64, &p, &r1, &r2).is_err());
                }
                prop_assert!(!p.is_empty());
                let mut bad = p.clone();
                let k = bit / 8 % bad.len();
                bad[k][bit % 32] ^= 1 << (bit % 8);
                prop_assert!(verify_consistency(m as u64, n as u64, &bad, &r1, &r2).is_err());
                prop_assert!(verify_consistency(m as u64, n as u64, &p[..p.len() - 1], &r1, &r2).is_err());
                let mut longer = p.clone();
                longer.push(r1);
                prop_assert!(verify_consistency(m as u64, n as u64, &longer, &r1, &r2).is_err());
            }
        }
    }
}
