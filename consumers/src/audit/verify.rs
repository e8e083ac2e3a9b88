//! Streaming verification of one tenant's stored audit rows against its checkpoints
//! (pure; `tally audit verify` feeds it rows in `leaf_index` order).
//!
//! Guarantee: [`TreeVerifier::finish`] returns `Intact` only if the rows are exactly the
//! leaves 0..n of the tenant (no gap, duplicate, reordering or foreign tenant), every
//! given reference leaf hash matches the recomputed one, and the tree over the first
//! `size` recomputed leaves has the checkpoint's root for every checkpoint given (so the
//! latest and any trusted older checkpoint agree with the rows and with each other).
//! Otherwise it names the first bad leaf index (exact for index anomalies, reference
//! mismatches and truncation; for a root mismatch, the range between the last matching
//! and the first failing checkpoint). It keeps O(log n) hashes, not the rows.

use super::checkpoint::Checkpoint;
use super::leaf::AuditLeaf;
use super::merkle::{CompactRange, Hash, EMPTY_ROOT};

/// What is wrong with a tenant's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tamper {
    /// The row with index `first_bad` is missing (the next row has `found`).
    Missing { found: u64 },
    /// A row repeats or goes back to index `first_bad` (a forged or moved row).
    Duplicate,
    /// A row of another tenant is in this tenant's log at `first_bad`.
    ForeignTenant { tenant: String },
    /// The recomputed leaf hash differs from the reference copy at `first_bad`.
    LeafMismatch,
    /// The tree over the first `checkpoint_size` leaves does not have the signed root;
    /// the bad leaf is in `first_bad..checkpoint_size`.
    RootMismatch { checkpoint_size: u64 },
    /// Rows from `first_bad` on are missing: a checkpoint signed `signed_size` leaves.
    Truncated { signed_size: u64 },
    /// Two checkpoints sign different roots for the same size (the log forked).
    ForkedCheckpoints { size: u64 },
}

/// The outcome for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// All checks passed. `size` rows, of which the first `signed_size` are covered by
    /// the largest checkpoint (later rows are not signed yet).
    Intact {
        size: u64,
        root: Hash,
        signed_size: u64,
    },
    /// Tampering detected; `first_bad` is the first leaf index that is wrong.
    Tampered { first_bad: u64, tamper: Tamper },
}

/// Verifies one tenant's rows, fed in `leaf_index` order.
#[derive(Debug)]
pub struct TreeVerifier {
    tenant: String,
    range: CompactRange,
    /// (size, root), ascending by size, de-duplicated.
    checkpoints: Vec<(u64, Hash)>,
    next_checkpoint: usize,
    last_good: u64,
    found: Option<(u64, Tamper)>,
}

impl TreeVerifier {
    /// Start verifying `tenant` against verified checkpoints (any order, any number).
    pub fn new(tenant: &str, checkpoints: &[Checkpoint]) -> Self {
        let mut cps: Vec<(u64, Hash)> = checkpoints.iter().map(|c| (c.size, c.root)).collect();
        cps.sort();
        cps.dedup();
        let mut found = None;
        if let Some(w) = cps.windows(2).find(|w| w[0].0 == w[1].0) {
            found = Some((w[0].0, Tamper::ForkedCheckpoints { size: w[0].0 }));
        }
        let mut v = Self {
            tenant: tenant.to_string(),
            range: CompactRange::new(),
            checkpoints: cps,
            next_checkpoint: 0,
            last_good: 0,
            found,
        };
        v.check_checkpoints();
        v
    }

    /// Number of rows accepted so far.
    pub fn size(&self) -> u64 {
        self.range.size()
    }

    /// Whether tampering has been found (further rows are ignored).
    pub fn is_tampered(&self) -> bool {
        self.found.is_some()
    }

    /// Feed the next stored row; `reference` is an independent copy of its leaf hash,
    /// when one is kept.
    pub fn push(&mut self, leaf: &AuditLeaf, reference: Option<&Hash>) {
        let hash = leaf.leaf_hash();
        self.push_hashed(leaf, hash, reference);
    }

    /// [`push`](Self::push) with the leaf hash already computed (e.g. in parallel).
    pub fn push_hashed(&mut self, leaf: &AuditLeaf, hash: Hash, reference: Option<&Hash>) {
        if self.found.is_some() {
            return;
        }
        let want = self.range.size();
        let tamper = if leaf.leaf_index > want {
            Some((
                want,
                Tamper::Missing {
                    found: leaf.leaf_index,
                },
            ))
        } else if leaf.leaf_index < want {
            Some((leaf.leaf_index, Tamper::Duplicate))
        } else if leaf.tenant_id != self.tenant {
            Some((
                want,
                Tamper::ForeignTenant {
                    tenant: leaf.tenant_id.clone(),
                },
            ))
        } else if reference.is_some_and(|r| *r != hash) {
            Some((want, Tamper::LeafMismatch))
        } else {
            None
        };
        if let Some(t) = tamper {
            self.found = Some(t);
            return;
        }
        self.range.push_leaf_hash(hash);
        self.check_checkpoints();
    }

    /// Compare the root at every checkpoint size reached.
    fn check_checkpoints(&mut self) {
        while self.found.is_none() {
            let Some(&(size, root)) = self.checkpoints.get(self.next_checkpoint) else {
                return;
            };
            if size != self.range.size() {
                return;
            }
            if self.range.root() == root {
                self.last_good = size;
            } else {
                self.found = Some((
                    self.last_good,
                    Tamper::RootMismatch {
                        checkpoint_size: size,
                    },
                ));
            }
            self.next_checkpoint += 1;
        }
    }

    /// The verdict once every row has been fed.
    pub fn finish(self) -> Verdict {
        if let Some((first_bad, tamper)) = self.found {
            return Verdict::Tampered { first_bad, tamper };
        }
        if let Some(&(signed_size, _)) = self.checkpoints.last() {
            if signed_size > self.range.size() {
                return Verdict::Tampered {
                    first_bad: self.range.size(),
                    tamper: Tamper::Truncated { signed_size },
                };
            }
        }
        let signed_size = self.checkpoints.last().map_or(0, |c| c.0);
        let root = if self.range.size() == 0 {
            EMPTY_ROOT
        } else {
            self.range.root()
        };
        Verdict::Intact {
            size: self.range.size(),
            root,
            signed_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::leaf::tests::example;
    use crate::audit::merkle::root;

    fn log(n: u64) -> Vec<AuditLeaf> {
        (0..n)
            .map(|i| AuditLeaf {
                leaf_index: i,
                resource_id: format!("r{i}"),
                ..example()
            })
            .collect()
    }

    fn checkpoint(rows: &[AuditLeaf], size: u64) -> Checkpoint {
        let hashes: Vec<Hash> = rows[..size as usize]
            .iter()
            .map(AuditLeaf::leaf_hash)
            .collect();
        Checkpoint::new("o/acme", size, root(&hashes)).unwrap()
    }

    fn run(rows: &[AuditLeaf], cps: &[Checkpoint]) -> Verdict {
        let mut v = TreeVerifier::new("acme", cps);
        for r in rows {
            v.push(r, None);
        }
        v.finish()
    }

    #[test]
    fn intact_log_passes_every_checkpoint() {
        let rows = log(20);
        let cps = [
            checkpoint(&rows, 20),
            checkpoint(&rows, 7),
            checkpoint(&rows, 1),
        ];
        let hashes: Vec<Hash> = rows.iter().map(AuditLeaf::leaf_hash).collect();
        assert_eq!(
            run(&rows, &cps),
            Verdict::Intact {
                size: 20,
                root: root(&hashes),
                signed_size: 20
            }
        );
        assert_eq!(
            run(&rows, &cps[1..]),
            Verdict::Intact {
                size: 20,
                root: root(&hashes),
                signed_size: 7
            }
        );
        assert_eq!(
            run(&[], &[Checkpoint::new("o/acme", 0, EMPTY_ROOT).unwrap()]),
            Verdict::Intact {
                size: 0,
                root: EMPTY_ROOT,
                signed_size: 0
            }
        );
    }

    #[test]
    fn each_tampering_is_named_with_its_first_bad_index() {
        let rows = log(20);
        let cps = [
            checkpoint(&rows, 5),
            checkpoint(&rows, 12),
            checkpoint(&rows, 20),
        ];
        let tampered = |first_bad, tamper| Verdict::Tampered { first_bad, tamper };

        let mut edited = rows.clone();
        edited[9].details.push(' '); // one byte of one field
        assert_eq!(
            run(&edited, &cps),
            tampered(
                5,
                Tamper::RootMismatch {
                    checkpoint_size: 12
                }
            )
        );
        let refs: Vec<Hash> = rows.iter().map(AuditLeaf::leaf_hash).collect();
        let mut v = TreeVerifier::new("acme", &cps);
        for (r, h) in edited.iter().zip(&refs) {
            v.push(r, Some(h));
        }
        assert_eq!(v.finish(), tampered(9, Tamper::LeafMismatch));

        let mut deleted = rows.clone();
        deleted.remove(9);
        assert_eq!(
            run(&deleted, &cps),
            tampered(9, Tamper::Missing { found: 10 })
        );

        let mut forged = rows.clone();
        forged.insert(
            10,
            AuditLeaf {
                action: "forged".into(),
                ..rows[9].clone()
            },
        );
        assert_eq!(run(&forged, &cps), tampered(9, Tamper::Duplicate));

        let mut swapped = rows.clone();
        swapped.swap(3, 4); // rows keep their own leaf_index: read in order, 4 before 3
        assert_eq!(
            run(&swapped, &cps),
            tampered(3, Tamper::Missing { found: 4 })
        );
        let mut renumbered = rows.clone();
        renumbered.swap(3, 4);
        renumbered[3].leaf_index = 3; // swapped positions, indices rewritten to match
        renumbered[4].leaf_index = 4;
        assert_eq!(
            run(&renumbered, &cps),
            tampered(0, Tamper::RootMismatch { checkpoint_size: 5 })
        );

        assert_eq!(
            run(&rows[..15], &cps),
            tampered(15, Tamper::Truncated { signed_size: 20 })
        );

        let mut foreign = rows.clone();
        foreign[2].tenant_id = "other".into();
        assert_eq!(
            run(&foreign, &cps),
            tampered(
                2,
                Tamper::ForeignTenant {
                    tenant: "other".into()
                }
            )
        );

        let mut fork = cps.to_vec();
        fork.push(checkpoint(&edited, 12));
        assert_eq!(
            run(&rows, &fork),
            tampered(12, Tamper::ForkedCheckpoints { size: 12 })
        );

        // Unsigned rows appended after the last checkpoint are not tampering.
        let more = log(25);
        let v = run(&more, &cps[..2]);
        assert!(
            matches!(
                v,
                Verdict::Intact {
                    size: 25,
                    signed_size: 12,
                    ..
                }
            ),
            "{v:?}"
        );
    }
}
