//! Inclusion proofs computed in one pass over a tree's leaf hashes (pure), so
//! `tally audit prove` never holds a tenant's leaves.
//!
//! Guarantee: an [`InclusionBuilder`] for (`index`, `size`) fed the leaf hashes
//! 0..`size` in order returns exactly `merkle::inclusion_proof(leaves, index)`
//! (RFC 9162 2.1.3.1, sibling first) while keeping at most 64 compact ranges of
//! O(log n) hashes each; fed any other number of hashes it returns an error.

use super::merkle::{split_point, CompactRange, Hash};

/// Why no proof was produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamProofError {
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("{fed} leaf hashes were fed for a tree of {size}")]
    WrongCount { fed: u64, size: u64 },
}

/// The leaf ranges `lo..hi` whose subtree roots are the proof of `index` in a tree of
/// `size`, in proof order (the leaf's sibling first).
pub fn proof_ranges(index: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut lo, mut hi) = (0, size);
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if index - lo < k {
            out.push((lo + k, hi));
            hi = lo + k;
        } else {
            out.push((lo, lo + k));
            lo += k;
        }
    }
    out.reverse();
    out
}

/// Accumulates the subtree roots of an inclusion proof from leaf hashes fed in order.
#[derive(Debug)]
pub struct InclusionBuilder {
    size: u64,
    /// (range, its compact range), in proof order.
    parts: Vec<((u64, u64), CompactRange)>,
    fed: u64,
}

impl InclusionBuilder {
    pub fn new(index: u64, size: u64) -> Result<Self, StreamProofError> {
        if index >= size {
            return Err(StreamProofError::IndexOutOfRange { index, size });
        }
        Ok(Self {
            size,
            parts: proof_ranges(index, size)
                .into_iter()
                .map(|r| (r, CompactRange::new()))
                .collect(),
            fed: 0,
        })
    }

    /// Feed the hash of the next leaf (leaf `fed`).
    pub fn push(&mut self, leaf: Hash) {
        let at = self.fed;
        self.fed += 1;
        if let Some((_, range)) = self
            .parts
            .iter_mut()
            .find(|((lo, hi), _)| (*lo..*hi).contains(&at))
        {
            range.push_leaf_hash(leaf);
        }
    }

    /// Number of leaf hashes fed so far.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// The proof, once exactly `size` leaf hashes were fed.
    pub fn finish(self) -> Result<Vec<Hash>, StreamProofError> {
        if self.fed != self.size {
            return Err(StreamProofError::WrongCount {
                fed: self.fed,
                size: self.size,
            });
        }
        Ok(self.parts.iter().map(|(_, r)| r.root()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::{inclusion_proof, leaf_hash, root};
    use crate::audit::proof::verify_inclusion;

    #[test]
    fn equals_the_proof_from_all_leaves() {
        let leaves: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for size in 1..=leaves.len() as u64 {
            let tree = &leaves[..size as usize];
            for index in 0..size {
                let mut b = InclusionBuilder::new(index, size).unwrap();
                for h in tree {
                    b.push(*h);
                }
                let proof = b.finish().unwrap();
                assert_eq!(
                    proof,
                    inclusion_proof(tree, index).unwrap(),
                    "{index}/{size}"
                );
                verify_inclusion(index, size, &tree[index as usize], &proof, &root(tree)).unwrap();
            }
        }
    }

    #[test]
    fn needs_exactly_the_tree_size() {
        assert_eq!(
            InclusionBuilder::new(3, 3).unwrap_err(),
            StreamProofError::IndexOutOfRange { index: 3, size: 3 }
        );
        let mut b = InclusionBuilder::new(0, 3).unwrap();
        b.push([0; 32]);
        b.push([1; 32]);
        assert_eq!(b.fed(), 2);
        assert_eq!(
            b.finish().unwrap_err(),
            StreamProofError::WrongCount { fed: 2, size: 3 }
        );
        assert!(proof_ranges(0, 1).is_empty());
        assert_eq!(proof_ranges(5, 11), vec![(4, 5), (6, 8), (0, 4), (8, 11)]);
    }
}
