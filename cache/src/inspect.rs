//! Looking at the stack without changing it: configuration, statistics,
//! dirty count, residency of one chunk, and an invariant checker for tests.

use crate::backing::Backing;
use crate::config::CacheConfig;
use crate::error::CacheError;
use crate::stack::{find_in_tiers, CacheStack};
use crate::stats::StackStats;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Where a cached chunk currently is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// In the tier at this index (0 = top).
    Tier(usize),
    /// In the victim repository.
    Victim,
}

/// A cached chunk's place and state, as reported by [`CacheStack::peek`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Residency {
    /// Where it is.
    pub location: Location,
    /// Whether it is newer than the backing store.
    pub dirty: bool,
}

impl<B: Backing> CacheStack<B> {
    /// The current configuration (reflecting every reconfiguration so far).
    pub fn config(&self) -> CacheConfig {
        let layout = self.layout.read();
        CacheConfig {
            chunk_size: self.chunk_size,
            tiers: layout.tiers.iter().map(|t| t.cfg.clone()).collect(),
            victim_capacity: self.victim_capacity,
            admission: self.admission,
            prefault: self.prefault,
        }
    }

    /// A statistics snapshot. Takes each set lock briefly, so it is meant for
    /// monitoring rates, not for a hot loop.
    pub fn stats(&self) -> StackStats {
        let layout = self.layout.read();
        let mv = self.movement.lock();
        let mut victim = mv.victim.stats();
        victim.errors = self.victim_errors.load(Ordering::Relaxed);
        StackStats {
            chunk_size: self.chunk_size,
            tiers: layout
                .tiers
                .iter()
                .enumerate()
                .map(|(i, t)| t.stats(i))
                .collect(),
            victim,
            fills: self.fills.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            writebacks: self.writebacks.load(Ordering::Relaxed),
            io_uring_fallbacks: crate::disk::io_uring_fallbacks(),
        }
    }

    /// Number of dirty chunks in all tiers and the victim repository.
    pub fn dirty_count(&self) -> usize {
        self.dirty_chunks().len()
    }

    /// Copies a cached chunk into `buf` (len == chunk_size) without touching
    /// LRU order, counters or the chunk's position; `None` if not cached.
    pub fn peek(&self, chunk: u64, buf: &mut [u8]) -> Result<Option<Residency>, CacheError> {
        self.check_whole(chunk, buf.len())?;
        let layout = self.layout.read();
        let mv = self.movement.lock();
        if let Some((t, s, w)) = find_in_tiers(&layout.tiers, chunk, false) {
            let tier = &layout.tiers[t];
            let set = tier.sets[s].lock();
            tier.load(&set, s, w, buf)?;
            return Ok(Some(Residency {
                location: Location::Tier(t),
                dirty: set.entries[w].dirty,
            }));
        }
        Ok(mv.victim.get(chunk).map(|ve| {
            buf.copy_from_slice(&ve.data);
            Residency {
                location: Location::Victim,
                dirty: ve.dirty,
            }
        }))
    }

    /// Checks the structural invariants (meant for tests): every chunk is in
    /// at most one place, every entry sits in the set its tier's hash
    /// assigns it, and empty entries are never dirty.
    pub fn check_invariants(&self) -> Result<(), String> {
        let layout = self.layout.read();
        let mv = self.movement.lock();
        let mut seen: HashMap<u64, String> = HashMap::new();
        let mut note = |chunk: u64, place: String| match seen.insert(chunk, place.clone()) {
            Some(prev) => Err(format!("chunk {chunk} is in both {prev} and {place}")),
            None => Ok(()),
        };
        for (t, tier) in layout.tiers.iter().enumerate() {
            for (s, set) in tier.sets.iter().enumerate() {
                let set = set.lock();
                for (w, e) in set.entries.iter().enumerate() {
                    if e.is_vacant() {
                        if e.dirty {
                            return Err(format!("tier {t} set {s} way {w}: empty but dirty"));
                        }
                        continue;
                    }
                    if tier.group(e.tag) != s {
                        return Err(format!(
                            "tier {t}: chunk {} in set {s}, hash says {}",
                            e.tag,
                            tier.group(e.tag)
                        ));
                    }
                    note(e.tag, format!("tier {t} set {s} way {w}"))?;
                }
            }
        }
        for (chunk, _) in mv.victim.chunks() {
            note(chunk, "the victim repository".to_string())?;
        }
        Ok(())
    }
}
