//! Hash maps and sets for per-batch work (rollup keys, dedup key sets, tenant
//! lookups) with foldhash instead of SipHash.
//!
//! Guarantee: only the speed changes: the hasher is seeded at random per
//! process (so keys chosen by producers cannot be aimed at collisions known in
//! advance), nothing hashed here is stored or compared across processes, and
//! every result that leaves a map is sorted or looked up, never iterated in
//! hash order into output.

/// A `HashMap` with foldhash's seeded fast hasher.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A `HashSet` with foldhash's seeded fast hasher.
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
