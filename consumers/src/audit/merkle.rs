//! RFC 6962 / RFC 9162 Merkle tree hashing, the append-only compact range, and proof
//! generation (pure, no I/O).
//!
//! Guarantee: `leaf_hash`, `node_hash` and `root` compute exactly the Merkle Tree Hash of
//! RFC 9162 section 2.1.1 (leaf = SHA-256(0x00 || d), node = SHA-256(0x01 || l || r), the
//! empty tree = SHA-256 of nothing, split at the largest power of two below n, no
//! duplicated odd leaves); a [`CompactRange`] extended leaf by leaf from any saved state
//! has the same root as the tree rebuilt from all leaves; generated inclusion and
//! consistency proofs are the RFC 9162 sections 2.1.3.1 / 2.1.4.1 proofs.

use sha2::{Digest, Sha256};

/// A SHA-256 hash: a leaf hash, an interior node or a tree root.
pub type Hash = [u8; 32];

/// Length in bytes of every hash in the tree.
pub const HASH_LEN: usize = 32;

/// The root of the empty tree: SHA-256 of the empty string.
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Leaf hash: SHA-256(0x00 || data).
#[inline]
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// Interior node hash: SHA-256(0x01 || left || right).
#[inline]
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0u8; 1 + 2 * HASH_LEN];
    buf[0] = 0x01;
    buf[1..1 + HASH_LEN].copy_from_slice(left);
    buf[1 + HASH_LEN..].copy_from_slice(right);
    Sha256::digest(buf).into()
}

/// The largest power of two strictly smaller than `n` (n >= 2): RFC 9162's split point.
#[inline]
pub fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Merkle Tree Hash of a list of leaf hashes (any length, 0 included).
pub fn root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return EMPTY_ROOT;
    }
    subtree_root(leaves)
}

/// MTH of a non-empty slice, without recursion into perfect halves' bookkeeping:
/// a compact range over the slice gives the same value in O(n) hashes.
fn subtree_root(leaves: &[Hash]) -> Hash {
    let mut range = CompactRange::new();
    for h in leaves {
        range.push_leaf_hash(*h);
    }
    range.root()
}

/// Error of proof generation: the requested index or size is not in the tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProveError {
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("consistency proof needs 0 < old size ({old}) <= new size ({new})")]
    BadSizes { old: u64, new: u64 },
}

/// Inclusion proof (RFC 9162 2.1.3.1) for the leaf at `index` in the tree made of
/// `leaves`, ordered from the leaf's sibling up to the root's child.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, ProveError> {
    let size = leaves.len() as u64;
    if index >= size {
        return Err(ProveError::IndexOutOfRange { index, size });
    }
    let mut proof = Vec::new();
    path(index as usize, leaves, &mut proof);
    Ok(proof)
}

fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
    let n = d.len();
    if n <= 1 {
        return;
    }
    let k = split_point(n as u64) as usize;
    if m < k {
        path(m, &d[..k], out);
        out.push(subtree_root(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(subtree_root(&d[..k]));
    }
}

/// Consistency proof (RFC 9162 2.1.4.1) that the tree of the first `old_size` leaves is
/// a prefix of the tree made of `leaves`. Equal sizes give the empty proof.
pub fn consistency_proof(leaves: &[Hash], old_size: u64) -> Result<Vec<Hash>, ProveError> {
    let new = leaves.len() as u64;
    if old_size == 0 || old_size > new {
        return Err(ProveError::BadSizes { old: old_size, new });
    }
    let mut proof = Vec::new();
    subproof(old_size as usize, leaves, true, &mut proof);
    Ok(proof)
}

fn subproof(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        if !complete {
            out.push(subtree_root(d));
        }
        return;
    }
    let k = split_point(n as u64) as usize;
    if m <= k {
        subproof(m, &d[..k], complete, out);
        out.push(subtree_root(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(subtree_root(&d[..k]));
    }
}

/// The append-only right edge of a tree: the roots of its perfect subtrees, one per set
/// bit of the size, largest (leftmost) first. O(log n) hashes let a tenant's tree be
/// extended from stored state without reading its leaves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompactRange {
    size: u64,
    hashes: Vec<Hash>,
}

/// Error restoring a [`CompactRange`] from stored parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompactRangeError {
    #[error("a tree of size {size} has {expected} edge hashes, got {got}")]
    HashCount {
        size: u64,
        expected: u32,
        got: usize,
    },
    #[error("edge hashes are {0} bytes, not a multiple of 32")]
    ByteLength(usize),
}

impl CompactRange {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Restore from a stored size and its edge hashes (largest subtree first).
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Result<Self, CompactRangeError> {
        let expected = size.count_ones();
        if hashes.len() != expected as usize {
            return Err(CompactRangeError::HashCount {
                size,
                expected,
                got: hashes.len(),
            });
        }
        Ok(Self { size, hashes })
    }

    /// Restore from a stored size and the concatenation of its edge hashes
    /// (the form [`CompactRange::to_bytes`] writes, e.g. a Postgres BYTEA).
    pub fn from_bytes(size: u64, bytes: &[u8]) -> Result<Self, CompactRangeError> {
        if !bytes.len().is_multiple_of(HASH_LEN) {
            return Err(CompactRangeError::ByteLength(bytes.len()));
        }
        let hashes = bytes
            .chunks_exact(HASH_LEN)
            .map(|c| {
                let mut h = [0u8; HASH_LEN];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Self::from_parts(size, hashes)
    }

    /// The edge hashes concatenated, largest subtree first (32 bytes each).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.hashes.concat()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The perfect-subtree roots, largest first.
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    /// Append one leaf given its bytes; returns its leaf hash.
    pub fn push(&mut self, data: &[u8]) -> Hash {
        let h = leaf_hash(data);
        self.push_leaf_hash(h);
        h
    }

    /// Append one leaf given its leaf hash.
    pub fn push_leaf_hash(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut n = self.size;
        // Each trailing set bit is a perfect subtree of the same height as `h`: merge.
        while n & 1 == 1 {
            let left = self.hashes.pop().expect("one edge hash per set bit");
            h = node_hash(&left, &h);
            n >>= 1;
        }
        self.hashes.push(h);
        self.size += 1;
    }

    /// The Merkle Tree Hash of the leaves appended so far.
    pub fn root(&self) -> Hash {
        let mut it = self.hashes.iter().rev();
        let Some(last) = it.next() else {
            return EMPTY_ROOT;
        };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 9162's recursive definition, written out literally as the oracle.
    fn mth_reference(d: &[Hash]) -> Hash {
        match d.len() {
            0 => EMPTY_ROOT,
            1 => d[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&mth_reference(&d[..k]), &mth_reference(&d[k..]))
            }
        }
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n as u32).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        assert_eq!(EMPTY_ROOT, <[u8; 32]>::from(Sha256::digest(b"")));
        assert_eq!(root(&[]), EMPTY_ROOT);
        assert_eq!(CompactRange::new().root(), EMPTY_ROOT);
    }

    #[test]
    fn split_point_is_largest_power_of_two_below() {
        for (n, k) in [
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 4),
            (8, 4),
            (9, 8),
            (1 << 40, 1 << 39),
        ] {
            assert_eq!(split_point(n), k, "n={n}");
        }
        assert_eq!(split_point(u64::MAX), 1 << 63);
    }

    #[test]
    fn compact_range_round_trips_through_bytes() {
        let mut r = CompactRange::new();
        for h in leaves(13) {
            r.push_leaf_hash(h);
        }
        assert_eq!(r.hashes().len(), 3); // 13 = 0b1101
        let back = CompactRange::from_bytes(r.size(), &r.to_bytes()).unwrap();
        assert_eq!(back, r);
        assert!(CompactRange::from_bytes(13, &r.to_bytes()[..64]).is_err());
        assert!(CompactRange::from_bytes(13, &[0u8; 33]).is_err());
        assert!(CompactRange::from_parts(12, r.hashes().to_vec()).is_err());
    }

    #[test]
    fn proof_generation_rejects_out_of_range() {
        let l = leaves(5);
        assert!(inclusion_proof(&l, 5).is_err());
        assert!(inclusion_proof(&[], 0).is_err());
        assert!(consistency_proof(&l, 0).is_err());
        assert!(consistency_proof(&l, 6).is_err());
        assert_eq!(consistency_proof(&l, 5).unwrap(), Vec::<Hash>::new());
        assert_eq!(inclusion_proof(&l[..1], 0).unwrap(), Vec::<Hash>::new());
    }

    proptest! {
        #[test]
        fn root_matches_the_recursive_definition(n in 0usize..300) {
            let l = leaves(n);
            prop_assert_eq!(root(&l), mth_reference(&l));
        }

        /// Extending a tree restored from its stored edge gives the root of the full tree:
        /// a restart in the middle of a tenant's log never changes its hashes.
        #[test]
        fn compact_range_resumes_from_stored_state(n in 0usize..300, cut in 0usize..300) {
            let l = leaves(n);
            let cut = cut.min(n);
            let mut first = CompactRange::new();
            for h in &l[..cut] {
                first.push_leaf_hash(*h);
            }
            prop_assert_eq!(first.root(), mth_reference(&l[..cut]));
            let mut resumed = CompactRange::from_bytes(first.size(), &first.to_bytes()).unwrap();
            for h in &l[cut..] {
                resumed.push_leaf_hash(*h);
            }
            prop_assert_eq!(resumed.size(), n as u64);
            prop_assert_eq!(resumed.hashes().len(), (n as u64).count_ones() as usize);
            prop_assert_eq!(resumed.root(), mth_reference(&l));
        }

        #[test]
        fn proofs_have_logarithmic_length(n in 1usize..300, i in 0usize..300, m in 1usize..300) {
            let l = leaves(n);
            let bound = 64 - (n as u64 - 1).leading_zeros() as usize; // ceil(log2 n)
            let p = inclusion_proof(&l, (i % n) as u64).unwrap();
            prop_assert!(p.len() <= bound);
            let m = 1 + (m - 1) % n;
            let c = consistency_proof(&l, m as u64).unwrap();
            prop_assert!(c.len() <= bound + 1);
        }
    }
}
