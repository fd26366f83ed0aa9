//! One group (set) of a tier: entry metadata, LRU stamps, and, for memory
//! tiers, the bytes of every way.

/// Tag value of an empty entry. It matches no chunk because the public API
/// refuses chunk number `u64::MAX`.
pub(crate) const EMPTY: u64 = u64::MAX;

/// Metadata of one way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The chunk held here, or [`EMPTY`].
    pub(crate) tag: u64,
    /// Bumped on every write to the chunk; a writeback marks the chunk clean
    /// only if it is unchanged since the writeback's snapshot. Travels with
    /// the chunk through promotions, demotions and the victim repository.
    pub(crate) gen: u64,
    /// Set-local recency stamp; larger is more recent.
    pub(crate) lru: u64,
    /// Newer than the backing store.
    pub(crate) dirty: bool,
}

impl Entry {
    /// An empty way.
    pub(crate) const VACANT: Entry = Entry {
        tag: EMPTY,
        gen: 0,
        lru: 0,
        dirty: false,
    };

    /// A chunk about to be placed (the LRU stamp is set on placement).
    pub(crate) fn new(tag: u64, dirty: bool, gen: u64) -> Entry {
        Entry {
            tag,
            gen,
            lru: 0,
            dirty,
        }
    }

    /// Whether this way holds nothing.
    #[inline]
    pub(crate) fn is_vacant(&self) -> bool {
        self.tag == EMPTY
    }
}

/// One set. Lives inside its own `Mutex`, so everything here (including the
/// hit counters) is updated under a lock the accessor already holds; no
/// shared atomics on the hit path.
pub(crate) struct Set {
    /// One per way.
    pub(crate) entries: Box<[Entry]>,
    /// Memory tiers: `ways * chunk_size` bytes, way `w` at `w * chunk_size`.
    /// Disk tiers: empty (the data is in the tier's file).
    pub(crate) data: Box<[u8]>,
    /// Source of LRU stamps. Set-local so that recency bookkeeping never
    /// touches a shared cache line.
    clock: u64,
    /// Lookups that found their chunk in this set.
    pub(crate) hits: u64,
    /// Lookups that did not.
    pub(crate) misses: u64,
}

impl Set {
    /// An empty set of `ways` ways holding `data_bytes` bytes of data.
    pub(crate) fn new(ways: usize, data_bytes: usize) -> Set {
        Set {
            entries: vec![Entry::VACANT; ways].into_boxed_slice(),
            data: vec![0u8; data_bytes].into_boxed_slice(),
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// The way holding `tag`, if any.
    #[inline]
    pub(crate) fn find(&self, tag: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.tag == tag)
    }

    /// Marks `way` most recently used.
    #[inline]
    pub(crate) fn touch(&mut self, way: usize) {
        self.clock += 1;
        self.entries[way].lru = self.clock;
    }

    /// The way a new chunk should go into: the first vacant one, else the
    /// least recently used (whose chunk must then be moved out first).
    pub(crate) fn replacement_way(&self) -> usize {
        let mut best = 0;
        for (w, e) in self.entries.iter().enumerate() {
            if e.is_vacant() {
                return w;
            }
            if e.lru < self.entries[best].lru {
                best = w;
            }
        }
        best
    }

    /// Puts `entry` into `way` as the most recently used.
    pub(crate) fn place(&mut self, way: usize, entry: Entry) {
        self.entries[way] = entry;
        self.touch(way);
    }

    /// Empties `way`.
    pub(crate) fn vacate(&mut self, way: usize) {
        self.entries[way] = Entry::VACANT;
    }

    /// Occupied ways.
    pub(crate) fn occupied(&self) -> usize {
        self.entries.iter().filter(|e| !e.is_vacant()).count()
    }

    /// Dirty ways.
    pub(crate) fn dirty(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| !e.is_vacant() && e.dirty)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_vacant_ways_first_then_evicts_lru() {
        let mut s = Set::new(3, 0);
        for (i, tag) in [10u64, 11, 12].into_iter().enumerate() {
            let w = s.replacement_way();
            assert_eq!(w, i, "vacant ways are used in order");
            s.place(w, Entry::new(tag, false, 0));
        }
        // All full: the LRU is the first placed.
        assert_eq!(s.entries[s.replacement_way()].tag, 10);
        // Touching 10 makes 11 the LRU.
        let w10 = s.find(10).unwrap();
        s.touch(w10);
        assert_eq!(s.entries[s.replacement_way()].tag, 11);
        // Touch 11 and 12 in turn: 10 is LRU again.
        for t in [11, 12] {
            let w = s.find(t).unwrap();
            s.touch(w);
        }
        assert_eq!(s.entries[s.replacement_way()].tag, 10);
        // Replace 10 by 13; 13 is now MRU and 11 the LRU.
        let w = s.replacement_way();
        s.place(w, Entry::new(13, true, 1));
        assert_eq!(s.find(10), None);
        assert_eq!(s.entries[s.replacement_way()].tag, 11);
        assert_eq!(s.occupied(), 3);
        assert_eq!(s.dirty(), 1);
        // A vacated way is preferred over any LRU victim.
        let w12 = s.find(12).unwrap();
        s.vacate(w12);
        assert_eq!(s.replacement_way(), w12);
        assert_eq!(s.occupied(), 2);
    }

    #[test]
    fn find_ignores_vacant() {
        let s = Set::new(4, 0);
        assert_eq!(s.find(0), None);
        assert_eq!(s.find(EMPTY - 1), None);
    }
}
