//! Where a node keeps chunk contents: the stacked cache (seed 001, "Cache
//! Implementation"), detached from any backing store.
//!
//! The Block Table row says *whether* the node has a chunk's contents
//! (`Entry::has_data`) and what they mean (permission, dirty); the bytes
//! live here. A child node's bytes live in a [`CacheStack::detached`]: a
//! memory tier, optional disk tiers with their own hash functions, and a
//! victim repository that only the node drains, because a chunk may leave
//! only after its permission went back to the parent or its writes went up
//! in a FLUSH ([`crate::Node`]'s `maybe_evict`).
//!
//! Bytes the stack cannot hold are kept *loose*, in a map: the root's
//! transient copies of what its origin holds (the origin is its store), a
//! dataless lock volume's empty chunks, and a chunk a disk tier refused
//! (an I/O error), which is then first in line to be given back.
//!
//! A relay's bytes are sealed records, a fixed number of bytes longer than
//! a chunk (`NodeConfig::relay`). The stack's slots are a power of two, so
//! a record's first `chunk_size` bytes (ciphertext) go into the stack and
//! the rest (tag, nonce, signature, version) into `tails`, in memory:
//! about a hundred bytes a chunk rather than a second slot.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use canopy_cache::layout::stack_layout;
use canopy_cache::{CacheError, CacheStack, Detached, StackStats};

/// A disk tier as configured: its file and its size in bytes.
type DiskTier = (PathBuf, u64);

/// Victims looked at beyond the excess in one cleaner pass.
const VICTIM_SCAN: usize = 64;

/// The chunk store. See the module docs.
#[derive(Default)]
pub(crate) struct Store {
    stack: Option<CacheStack<Detached>>,
    /// Deterministic order (the simulation replays seeds): a BTreeMap.
    loose: BTreeMap<u64, Bytes>,
    /// A relay's record tails, for the chunks in the stack (see the module
    /// docs); empty on a trusted node.
    tails: HashMap<u64, Bytes>,
    /// How much longer than a chunk a relay's records are.
    overhead: usize,
    /// The bytes of the last [`Store::put`], as they came. A chunk that
    /// arrives for a waiting read is stored and then read straight back
    /// to answer it; that read copied the chunk out of its tier into a new,
    /// zeroed buffer (an allocation, a memset and a copy of every cold
    /// chunk: 5% of a leaf's CPU in B2's profile), which these bytes make
    /// unnecessary. Always equal to what the stack holds for the chunk:
    /// every way bytes change or leave goes through `put`, `remove`,
    /// `take` or `build`, which replace or clear it. The node drops it
    /// once its actions are drained ([`Store::forget_last`]), so a
    /// received buffer is not kept alive past the event that brought it.
    last: Option<(u64, Bytes)>,
}

impl Store {
    /// Build the stack for `chunk_size`-byte chunks: `mem_bytes` of memory
    /// tier and the given disk tiers (file, bytes). Any bytes held so far
    /// are dropped (there are none before the first CONNECT, and none after
    /// a parent loss voided every chunk). A stack already built for this
    /// chunk size is kept.
    ///
    /// `overhead`: a relay's records are that many bytes longer than a
    /// chunk (0 on a trusted node). `prefault`: commit the memory tier now
    /// ([`canopy_cache::CacheConfig::prefault`]).
    pub(crate) fn build(
        &mut self,
        chunk_size: u32,
        mem_bytes: u64,
        disks: &[DiskTier],
        overhead: usize,
        prefault: bool,
    ) -> Result<(), CacheError> {
        self.overhead = overhead;
        if let Some(s) = &self.stack {
            if s.chunk_size() == chunk_size as usize {
                return Ok(());
            }
        }
        self.stack = None;
        self.loose.clear();
        self.tails.clear();
        self.last = None;
        let cs = chunk_size as usize;
        let mut config = stack_layout(cs, mem_bytes, disks, 1)
            .map_err(|e| CacheError::InvalidConfig(e.to_string()))?;
        config.prefault = prefault;
        self.stack = Some(CacheStack::detached(config)?);
        Ok(())
    }

    /// The chunk's bytes. `promote`: this is an access (a read served, a
    /// grant made), which moves the chunk up the stack as any hit does;
    /// otherwise (a FLUSH, an INVALIDATE answer, `inspect`) it stays put.
    /// `None` if the store does not have it, or a tier's I/O error lost it
    /// (logged and counted; the chunk is dropped).
    pub(crate) fn get(&self, chunk: u64, promote: bool) -> Option<Bytes> {
        if let Some(d) = self.loose.get(&chunk) {
            return Some(d.clone());
        }
        // Just stored, so at the top of its set already: a promotion
        // would change nothing.
        if let Some((c, d)) = &self.last {
            if *c == chunk {
                return Some(d.clone());
            }
        }
        let stack = self.stack.as_ref()?;
        let mut buf = self.chunk_buf(stack.chunk_size());
        let found = if promote {
            stack.lookup(chunk, &mut buf)
        } else {
            stack.peek(chunk, &mut buf).map(|r| r.is_some())
        };
        match found {
            Ok(true) => Some(self.with_tail(chunk, buf)),
            Ok(false) => None,
            Err(e) => {
                // Counted by the tier (`io_errors` in the stack's stats).
                tracing::error!(chunk, error = %e, "cache tier lost a chunk");
                stack.remove(chunk);
                None
            }
        }
    }

    /// The chunk's bytes without changing anything (for `inspect`).
    pub(crate) fn peek(&self, chunk: u64) -> Option<Bytes> {
        if let Some(d) = self.loose.get(&chunk) {
            return Some(d.clone());
        }
        let stack = self.stack.as_ref()?;
        let mut buf = self.chunk_buf(stack.chunk_size());
        match stack.peek(chunk, &mut buf) {
            Ok(Some(_)) => Some(self.with_tail(chunk, buf)),
            _ => None,
        }
    }

    /// A zeroed buffer of `cs` bytes with room for a relay's record tail,
    /// so that [`Store::with_tail`] appends it in place: growing the buffer
    /// there instead cost a relay a second allocation and copy of every
    /// chunk it served (issue 5, B4's profile).
    fn chunk_buf(&self, cs: usize) -> BytesMut {
        let mut buf = BytesMut::with_capacity(cs + self.overhead);
        buf.resize(cs, 0);
        buf
    }

    /// A chunk's bytes from the stack, with its record tail on a relay.
    fn with_tail(&self, chunk: u64, mut buf: BytesMut) -> Bytes {
        if let Some(t) = self.tails.get(&chunk) {
            buf.extend_from_slice(t);
        }
        buf.freeze()
    }

    /// Store `data` as the chunk's bytes, replacing what was there.
    pub(crate) fn put(&mut self, chunk: u64, data: Bytes) {
        self.last = None;
        if let Some(stack) = &self.stack {
            let cs = stack.chunk_size();
            if data.len() == cs + self.overhead {
                match stack.insert(chunk, &data[..cs]) {
                    Ok(()) => {
                        self.loose.remove(&chunk);
                        self.last = Some((chunk, data.clone()));
                        if self.overhead > 0 {
                            // A copy of the few bytes, not a slice: a slice
                            // would keep the whole received record alive
                            // beside the tier's copy of it, doubling a
                            // relay's memory and making every record a
                            // fresh allocation (issue 5, B4's profile).
                            self.tails
                                .insert(chunk, Bytes::copy_from_slice(&data[cs..]));
                        }
                        return;
                    }
                    Err(e) => {
                        // Kept loose instead, so nothing is lost; it is
                        // given back first.
                        tracing::warn!(chunk, error = %e, "cache tier refused a chunk");
                        stack.remove(chunk);
                    }
                }
            }
        }
        self.loose.insert(chunk, data);
    }

    /// Whether `data` are the bytes of the last `put`, as it came (not a
    /// copy out of the stack).
    pub(crate) fn is_last(&self, chunk: u64, data: &Bytes) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(c, d)| *c == chunk && d.as_ptr() == data.as_ptr())
    }

    /// Forget the bytes of the last `put` (see [`Store`]'s `last`): the
    /// stack still has them.
    pub(crate) fn forget_last(&mut self) {
        self.last = None;
    }

    /// Drop the chunk's bytes.
    pub(crate) fn remove(&mut self, chunk: u64) {
        self.forget(chunk);
        self.tails.remove(&chunk);
        if self.loose.remove(&chunk).is_none() {
            if let Some(stack) = &self.stack {
                stack.remove(chunk);
            }
        }
    }

    /// Remove and return the chunk's bytes (from wherever they are, without
    /// promoting anything in their place).
    pub(crate) fn take(&mut self, chunk: u64) -> Option<Bytes> {
        self.forget(chunk);
        if let Some(d) = self.loose.remove(&chunk) {
            return Some(d);
        }
        let stack = self.stack.as_ref()?;
        if let Some(b) = stack.take_victim(chunk) {
            let mut v = Vec::from(b);
            if let Some(t) = self.tails.remove(&chunk) {
                v.extend_from_slice(&t);
            }
            return Some(Bytes::from(v));
        }
        let d = self.get(chunk, false)?;
        self.remove(chunk);
        Some(d)
    }

    /// Clear `last` if it is `chunk`'s.
    fn forget(&mut self, chunk: u64) {
        if self.last.as_ref().is_some_and(|(c, _)| *c == chunk) {
            self.last = None;
        }
    }

    /// What should leave: how many chunks beyond capacity, and the
    /// candidates in the order to try them. With a stack: loose chunks
    /// (a tier refused them), then the victim repository oldest first.
    /// Without one (a dataless volume, whose chunks are empty): loose
    /// chunks beyond `capacity`, lowest-numbered first.
    pub(crate) fn overflow(&self, capacity: usize) -> (usize, Vec<u64>) {
        let excess = match &self.stack {
            Some(stack) => self.loose.len() + stack.victim_excess(),
            None => self.loose.len().saturating_sub(capacity),
        };
        if excess == 0 {
            return (0, Vec::new());
        }
        let mut v: Vec<u64> = self.loose.keys().copied().collect();
        if let Some(stack) = &self.stack {
            // Bounded, as this runs after every request: when the oldest
            // victims cannot leave yet (children hold them), only a few
            // more than the excess are tried, not the whole repository.
            v.extend(stack.victims(excess + VICTIM_SCAN));
        }
        (excess, v)
    }

    /// The stack's statistics.
    pub(crate) fn stats(&self) -> Option<StackStats> {
        self.stack.as_ref().map(CacheStack::stats)
    }
}

impl crate::Node {
    /// Build the child's stack once the parent announced the chunk size:
    /// `capacity_chunks` of memory tier and the configured disk tiers. If
    /// that fails, less is better than refusing the volume: the same
    /// tiers with the memory committed as chunks arrive (the host could
    /// not commit it all now), then the memory tier alone (a disk failing
    /// since the daemon checked its paths at start), committed if that
    /// works. Each failure, and the fallback that serves, is logged as an
    /// error.
    pub(crate) fn build_store(&mut self) {
        let cs = self.chunk_size;
        if self.is_root() || cs == 0 {
            return;
        }
        let mem = (self.cfg.capacity_chunks as u64).saturating_mul(u64::from(cs));
        let disks = self.cfg.cache_disk.clone();
        let overhead = self.cfg.relay.unwrap_or(0);
        let prefault = self.cfg.cache_prefault;
        let none: &[DiskTier] = &[];
        let tries: [(&[DiskTier], bool); 4] = [
            (&disks, prefault),
            (&disks, false),
            (none, prefault),
            (none, false),
        ];
        let mut tried: Vec<(usize, bool)> = Vec::new();
        for (d, p) in tries {
            // A try the same as one before it would fail the same way.
            if tried.contains(&(d.len(), p)) {
                continue;
            }
            tried.push((d.len(), p));
            match self.store.build(cs, mem, d, overhead, p) {
                Ok(()) if tried.len() == 1 => return,
                Ok(()) => {
                    tracing::error!(
                        memory_committed_now = p,
                        disk_tiers = d.len(),
                        "serving with less cache than configured"
                    );
                    return;
                }
                Err(e) => tracing::error!(
                    error = %e,
                    memory_committed_now = p,
                    disk_tiers = d.len(),
                    "cannot build the cache stack"
                ),
            }
        }
    }

    /// Statistics of the node's cache stack (a child with a data volume).
    pub fn cache_stats(&self) -> Option<StackStats> {
        self.store.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: usize = 4096;

    fn store() -> Store {
        let mut s = Store::default();
        s.build(CS as u32, 16 * CS as u64, &[], 0, false).unwrap();
        s
    }

    fn chunk(b: u8) -> Bytes {
        Bytes::from(vec![b; CS])
    }

    #[test]
    fn a_chunk_just_stored_is_read_back_without_a_copy() {
        let mut s = store();
        let d = chunk(1);
        s.put(7, d.clone());
        let got = s.get(7, true).unwrap();
        assert_eq!(got, d);
        assert_eq!(got.as_ptr(), d.as_ptr(), "served from the stored bytes");
        assert!(s.is_last(7, &got));
        assert!(!s.is_last(8, &got));
        // Once forgotten, the stack's copy answers, with the same bytes.
        s.forget_last();
        let again = s.get(7, true).unwrap();
        assert_eq!(again, d);
        assert_ne!(again.as_ptr(), d.as_ptr());
        assert!(!s.is_last(7, &again));
    }

    #[test]
    fn the_last_stored_bytes_never_outlive_a_change() {
        let mut s = store();
        s.put(7, chunk(1));
        s.put(7, chunk(2));
        assert_eq!(s.get(7, false).unwrap(), chunk(2));
        s.put(8, chunk(3));
        assert_eq!(s.get(7, false).unwrap(), chunk(2));
        s.remove(8);
        assert!(s.get(8, false).is_none());
        s.put(9, chunk(4));
        assert_eq!(s.take(9).unwrap(), chunk(4));
        assert!(s.get(9, false).is_none());
        s.put(10, chunk(5));
        s.build(2 * CS as u32, 16 * CS as u64, &[], 0, true)
            .unwrap();
        assert!(s.get(10, false).is_none());
    }
}
