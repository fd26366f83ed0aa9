//! Statistics snapshots returned by [`CacheStack::stats`](crate::CacheStack::stats).

use serde::{Deserialize, Serialize};

/// One tier's counters and occupancy.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TierStats {
    /// Position in the stack (0 = top).
    pub index: usize,
    /// `"memory"` or `"disk"`.
    pub medium: String,
    /// Number of groups (sets).
    pub groups: usize,
    /// Ways per group.
    pub ways: usize,
    /// The hash function, e.g. `"modulo"` or `"mix(key=0x2a)"`.
    pub hash: String,
    /// Occupied entries.
    pub occupied: usize,
    /// Dirty entries.
    pub dirty: usize,
    /// Lookups that found their chunk in this tier.
    pub hits: u64,
    /// Lookups that searched this tier and did not find their chunk.
    pub misses: u64,
    /// Chunks promoted from this tier to the top.
    pub promotions: u64,
    /// Chunks received from the tier above.
    pub demotions: u64,
    /// Chunks pushed out of this tier.
    pub evictions: u64,
    /// Failed reads/writes of this tier's file (the affected chunks were
    /// moved to the victim repository instead of being lost).
    #[serde(default)]
    pub io_errors: u64,
    /// Reads whose chunk the admission filter kept out of this (the top)
    /// tier: served from the backing store, not cached, because the chunk
    /// was used less often lately than the one it would have displaced.
    #[serde(default)]
    pub refused: u64,
}

/// The victim repository's state and counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VictimStats {
    /// Soft capacity in chunks.
    pub capacity: usize,
    /// Entries held now.
    pub len: usize,
    /// Dirty entries held now.
    pub dirty: usize,
    /// Chunks that fell out of the bottom tier into the repository.
    pub spills: u64,
    /// Chunks found here by a lookup and promoted back to the top.
    pub rescues: u64,
    /// Entries removed by the cleaner or by back-pressure (`writebacks`
    /// that were then dropped, plus `drops`).
    pub drains: u64,
    /// Dirty entries written back by the cleaner or by back-pressure.
    pub writebacks: u64,
    /// Clean entries dropped without needing a writeback.
    pub drops: u64,
    /// Failed writebacks while draining (retried later).
    pub errors: u64,
}

/// The whole stack's statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StackStats {
    /// Bytes per chunk.
    pub chunk_size: usize,
    /// Per tier, top first.
    pub tiers: Vec<TierStats>,
    /// The victim repository.
    pub victim: VictimStats,
    /// Chunks read from the backing store on a miss.
    pub fills: u64,
    /// Completed `flush` calls.
    pub flushes: u64,
    /// All chunk writebacks to the backing store (flush, FUA, cleaner, back-pressure).
    #[serde(default)]
    pub writebacks: u64,
    /// Threads (process-wide) that fell back from io_uring to pread/pwrite
    /// for disk-tier I/O.
    #[serde(default)]
    pub io_uring_fallbacks: u64,
}
