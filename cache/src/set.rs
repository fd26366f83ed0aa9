//! One group (set) of a tier: entry metadata, LRU stamps, and, for memory
//! tiers, the bytes of every way.

use crate::sketch::{Sketch, MAX_FREQ};
use crate::slab::Region;

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
    /// How often the chunk was used lately (0..=15, halved when its set
    /// ages): the admission filter's measure of what a newcomer would
    /// displace. Counted here rather than in the set's sketch so that a
    /// hit only touches the entry it already matched.
    pub(crate) freq: u8,
}

impl Entry {
    /// An empty way.
    pub(crate) const VACANT: Entry = Entry {
        tag: EMPTY,
        gen: 0,
        lru: 0,
        dirty: false,
        freq: 0,
    };

    /// A chunk about to be placed (the LRU stamp is set on placement).
    pub(crate) fn new(tag: u64, dirty: bool, gen: u64) -> Entry {
        Entry {
            tag,
            gen,
            lru: 0,
            dirty,
            freq: 0,
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
///
/// `repr(C)` keeps what every lookup reads (the tag array's pointer, the
/// entries', the data's) first, next to the mutex word, and the sketch,
/// read only on a miss, last.
#[repr(C)]
pub(crate) struct Set {
    /// Each way's tag (a copy of `entries[w].tag`), so that a lookup scans
    /// one cache line of tags (8 ways) rather than four of entries. Kept in
    /// step by `place` and `vacate`, the only places a tag changes.
    tags: Box<[u64]>,
    /// One per way. Change a tag only through `place` and `vacate`.
    pub(crate) entries: Box<[Entry]>,
    /// Memory tiers: one chunk's bytes per way, this set's slots in the
    /// tier's mapping (see `slab.rs`). Disk tiers: empty (the data is in
    /// the tier's file).
    pub(crate) data: Region,
    /// Source of LRU stamps. Set-local so that recency bookkeeping never
    /// touches a shared cache line.
    clock: u64,
    /// Lookups that found their chunk in this set.
    pub(crate) hits: u64,
    /// Lookups that did not.
    pub(crate) misses: u64,
    /// Accesses counted (hits, and misses into the sketch) since this set
    /// last aged.
    ticks: u32,
    /// Accesses between agings: ten per way, Caffeine's sample size scaled
    /// to one set.
    period: u32,
    /// The admission filter's counts of accesses to chunks *not* in this
    /// set (see `sketch.rs`); only the top tier's, and only with admission
    /// on, are ever counted.
    pub(crate) sketch: Sketch,
}

impl Set {
    /// An empty set of `ways` ways whose bytes (if any) are `data`.
    pub(crate) fn new(ways: usize, data: Region) -> Set {
        Set {
            tags: vec![EMPTY; ways].into_boxed_slice(),
            entries: vec![Entry::VACANT; ways].into_boxed_slice(),
            data,
            clock: 0,
            hits: 0,
            misses: 0,
            sketch: Sketch::default(),
            ticks: 0,
            period: (ways.min(u32::MAX as usize / 10) as u32 * 10).max(10),
        }
    }

    /// A lookup found its chunk in `way`: recency, frequency, counters.
    /// Everything it touches is this set's, under the lock the caller holds.
    #[inline]
    pub(crate) fn record_hit(&mut self, way: usize) {
        self.touch(way);
        self.hits += 1;
        let e = &mut self.entries[way];
        e.freq = (e.freq + 1).min(MAX_FREQ);
        self.tick();
    }

    /// A lookup of `chunk` missed this set. With `count`, the access goes
    /// into the sketch (the top tier with admission on).
    #[inline]
    pub(crate) fn record_miss(&mut self, chunk: u64, count: bool) {
        self.misses += 1;
        if count {
            self.sketch.increment(chunk);
            self.tick();
        }
    }

    /// Whether `chunk`, absent, should be let in (TinyLFU's rule): yes if
    /// a way is free, else only if it was used more often lately than the
    /// chunk it would displace (the LRU way). Ties keep the resident: a
    /// run of chunks seen once each (a scan) then cannot flush a set.
    #[inline]
    pub(crate) fn admits(&self, chunk: u64) -> bool {
        let way = self.replacement_way();
        let victim = &self.entries[way];
        victim.is_vacant() || self.sketch.estimate(chunk) > victim.freq
    }

    /// Ages the set every `period` counted accesses.
    #[inline]
    fn tick(&mut self) {
        self.ticks += 1;
        if self.ticks >= self.period {
            self.age();
        }
    }

    /// Halves every frequency, in the sketch and in the entries, so that
    /// what was popular long ago gives way to what is popular now.
    pub(crate) fn age(&mut self) {
        self.ticks = 0;
        self.sketch.halve();
        for e in self.entries.iter_mut() {
            e.freq >>= 1;
        }
    }

    /// The way holding `tag`, if any.
    #[inline]
    pub(crate) fn find(&self, tag: u64) -> Option<usize> {
        let way = self.tags.iter().position(|&t| t == tag);
        debug_assert!(
            self.tags
                .iter()
                .zip(self.entries.iter())
                .all(|(&t, e)| t == e.tag),
            "a tag changed without place or vacate"
        );
        way
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
        if let Some(w) = self.tags.iter().position(|&t| t == EMPTY) {
            return w;
        }
        let mut best = 0;
        for (w, e) in self.entries.iter().enumerate() {
            if e.lru < self.entries[best].lru {
                best = w;
            }
        }
        best
    }

    /// Puts `entry` into `way` as the most recently used.
    pub(crate) fn place(&mut self, way: usize, entry: Entry) {
        self.tags[way] = entry.tag;
        self.entries[way] = entry;
        self.touch(way);
    }

    /// Empties `way`.
    pub(crate) fn vacate(&mut self, way: usize) {
        self.tags[way] = EMPTY;
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
        let mut s = Set::new(3, Region::empty());
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
        let s = Set::new(4, Region::empty());
        assert_eq!(s.find(0), None);
        assert_eq!(s.find(EMPTY - 1), None);
    }
}
