//! The victim repository: chunks that fell out of the bottom tier, waiting
//! for the cleaner.
//!
//! It exists so that an insertion never has to wait for a write-out: the
//! bottom tier's evictee always has somewhere to go. Its capacity is soft:
//! exceeding it triggers back-pressure draining by the inserting thread, but
//! an insertion never fails or blocks on it.
//!
//! Only ever accessed under the stack's movement lock.

use crate::hash::ChunkBuildHasher;
use crate::stats::VictimStats;
use std::collections::{HashMap, VecDeque};

/// One chunk in the repository.
pub(crate) struct VEntry {
    /// The whole chunk.
    pub(crate) data: Box<[u8]>,
    /// Newer than the backing store.
    pub(crate) dirty: bool,
    /// Write generation (see `set::Entry::gen`).
    pub(crate) gen: u64,
    /// Position in the FIFO; lets stale FIFO slots be recognised.
    seq: u64,
}

/// The repository.
pub(crate) struct Victim {
    capacity: usize,
    chunk_size: usize,
    map: HashMap<u64, VEntry, ChunkBuildHasher>,
    /// Arrival order for draining, oldest first. Removals leave stale
    /// `(chunk, seq)` pairs behind (skipped and compacted lazily) so that a
    /// removal is O(1).
    fifo: VecDeque<(u64, u64)>,
    next_seq: u64,
    /// Free chunk buffers, so that spills, rescues, fills and writeback
    /// snapshots recycle memory instead of allocating per move.
    pool: Vec<Box<[u8]>>,
    pool_cap: usize,
    pub(crate) spills: u64,
    pub(crate) rescues: u64,
    pub(crate) drains: u64,
    pub(crate) writebacks: u64,
    pub(crate) drops: u64,
    /// Something spilled since the last cleaner wake-up check.
    pub(crate) spilled: bool,
}

impl Victim {
    /// An empty repository of soft capacity `capacity` chunks.
    pub(crate) fn new(capacity: usize, chunk_size: usize) -> Victim {
        // Bound what sits idle in the pool; the repository's own entries are
        // the bulk of its memory anyway.
        let pool_cap = 8 + capacity.min(256);
        let mut map = HashMap::with_hasher(ChunkBuildHasher::default());
        map.reserve(capacity.min(1 << 16));
        Victim {
            capacity,
            chunk_size,
            map,
            fifo: VecDeque::with_capacity(capacity.min(1 << 16)),
            next_seq: 0,
            pool: Vec::with_capacity(pool_cap),
            pool_cap,
            spills: 0,
            rescues: 0,
            drains: 0,
            writebacks: 0,
            drops: 0,
            spilled: false,
        }
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// More entries than the capacity.
    pub(crate) fn over_capacity(&self) -> bool {
        self.map.len() > self.capacity
    }

    /// Drops clean entries from the front of the drain order while the
    /// repository is over capacity, stopping at the first dirty one (that
    /// needs a writeback, which back-pressure or the cleaner does). Never
    /// for a detached stack, whose "clean" entries may hold writes only
    /// its owner knows about.
    pub(crate) fn drop_clean_excess(&mut self) {
        while self.over_capacity() {
            match self.oldest() {
                Some((c, false)) => {
                    self.discard(c);
                    self.drains += 1;
                    self.drops += 1;
                }
                _ => break,
            }
        }
    }

    /// The entry for `chunk`.
    pub(crate) fn get(&self, chunk: u64) -> Option<&VEntry> {
        self.map.get(&chunk)
    }

    /// The entry for `chunk`, mutably.
    pub(crate) fn get_mut(&mut self, chunk: u64) -> Option<&mut VEntry> {
        self.map.get_mut(&chunk)
    }

    /// A chunk-sized buffer from the pool (allocated if the pool is empty).
    pub(crate) fn take_buf(&mut self) -> Box<[u8]> {
        self.pool
            .pop()
            .unwrap_or_else(|| vec![0u8; self.chunk_size].into_boxed_slice())
    }

    /// Returns a buffer to the pool.
    pub(crate) fn recycle(&mut self, buf: Box<[u8]>) {
        if self.pool.len() < self.pool_cap && buf.len() == self.chunk_size {
            self.pool.push(buf);
        }
    }

    /// Adds a chunk that fell out of the bottom tier (or was made homeless by
    /// a tier I/O error). The caller guarantees it is not already here: a
    /// chunk lives in exactly one place.
    pub(crate) fn push(&mut self, chunk: u64, data: &[u8], dirty: bool, gen: u64) {
        let mut buf = self.take_buf();
        buf.copy_from_slice(data);
        let seq = self.next_seq;
        self.next_seq += 1;
        let old = self.map.insert(
            chunk,
            VEntry {
                data: buf,
                dirty,
                gen,
                seq,
            },
        );
        debug_assert!(
            old.is_none(),
            "chunk {chunk} was already in the victim repository"
        );
        self.fifo.push_back((chunk, seq));
        self.spills += 1;
        self.spilled = true;
    }

    /// Removes and returns `chunk`'s entry.
    pub(crate) fn take(&mut self, chunk: u64) -> Option<VEntry> {
        let e = self.map.remove(&chunk)?;
        self.maybe_compact();
        Some(e)
    }

    /// Removes `chunk` and recycles its buffer.
    pub(crate) fn discard(&mut self, chunk: u64) -> bool {
        match self.take(chunk) {
            Some(e) => {
                self.recycle(e.data);
                true
            }
            None => false,
        }
    }

    /// Sends `chunk` to the back of the drain order (after a failed writeback,
    /// so one bad chunk doesn't stall draining of the rest).
    pub(crate) fn requeue(&mut self, chunk: u64) {
        let seq = self.next_seq;
        if let Some(e) = self.map.get_mut(&chunk) {
            self.next_seq += 1;
            e.seq = seq;
            self.fifo.push_back((chunk, seq));
            self.maybe_compact();
        }
    }

    fn is_live(&self, chunk: u64, seq: u64) -> bool {
        self.map.get(&chunk).is_some_and(|e| e.seq == seq)
    }

    /// The oldest entry: `(chunk, dirty)`.
    pub(crate) fn oldest(&mut self) -> Option<(u64, bool)> {
        while let Some(&(chunk, seq)) = self.fifo.front() {
            if let Some(e) = self.map.get(&chunk).filter(|e| e.seq == seq) {
                return Some((chunk, e.dirty));
            }
            self.fifo.pop_front();
        }
        None
    }

    /// Live entries oldest first: `(chunk, dirty)`.
    pub(crate) fn iter_oldest(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.fifo.iter().filter_map(move |&(chunk, seq)| {
            self.map
                .get(&chunk)
                .filter(|e| e.seq == seq)
                .map(|e| (chunk, e.dirty))
        })
    }

    /// All chunks held, in no particular order.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = (u64, &VEntry)> + '_ {
        self.map.iter().map(|(&c, e)| (c, e))
    }

    /// Drops stale FIFO slots once they outnumber live ones, so repeated
    /// rescue/re-spill cycles can't grow the FIFO without bound.
    fn maybe_compact(&mut self) {
        if self.fifo.len() > 2 * self.map.len() + 32 {
            let fifo = std::mem::take(&mut self.fifo);
            self.fifo = fifo
                .into_iter()
                .filter(|&(c, s)| self.is_live(c, s))
                .collect();
        }
    }

    /// Counters and occupancy (errors are kept by the stack).
    pub(crate) fn stats(&self) -> VictimStats {
        VictimStats {
            capacity: self.capacity,
            len: self.len(),
            dirty: self.map.values().filter(|e| e.dirty).count(),
            spills: self.spills,
            rescues: self.rescues,
            drains: self.drains,
            writebacks: self.writebacks,
            drops: self.drops,
            errors: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_order_and_stale_slots() {
        let mut v = Victim::new(4, 512);
        let d = vec![7u8; 512];
        for c in 0..4 {
            v.push(c, &d, c % 2 == 1, c);
        }
        assert_eq!(v.oldest(), Some((0, false)));
        assert!(v.discard(0));
        assert_eq!(v.oldest(), Some((1, true)));
        v.requeue(1);
        assert_eq!(
            v.iter_oldest().collect::<Vec<_>>(),
            vec![(2, false), (3, true), (1, true)]
        );
        let e = v.take(2).unwrap();
        assert_eq!(&e.data[..], &d[..]);
        assert_eq!(v.len(), 2);
        assert!(!v.over_capacity());
        for c in 10..20 {
            v.push(c, &d, false, 0);
            v.discard(c);
        }
        // Compaction keeps the FIFO bounded by the live entries.
        assert!(v.fifo.len() <= 2 * v.len() + 33);
        assert_eq!(
            v.iter_oldest().collect::<Vec<_>>(),
            vec![(3, true), (1, true)]
        );
    }
}
