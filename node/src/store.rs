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
}

impl Store {
    /// Build the stack for `chunk_size`-byte chunks: `mem_bytes` of memory
    /// tier and the given disk tiers (file, bytes). Any bytes held so far
    /// are dropped (there are none before the first CONNECT, and none after
    /// a parent loss voided every chunk). A stack already built for this
    /// chunk size is kept.
    ///
    /// `overhead`: a relay's records are that many bytes longer than a
    /// chunk (0 on a trusted node).
    pub(crate) fn build(
        &mut self,
        chunk_size: u32,
        mem_bytes: u64,
        disks: &[(PathBuf, u64)],
        overhead: usize,
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
        let cs = chunk_size as usize;
        let config = stack_layout(cs, mem_bytes, disks, 1)
            .map_err(|e| CacheError::InvalidConfig(e.to_string()))?;
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
        if let Some(stack) = &self.stack {
            let cs = stack.chunk_size();
            if data.len() == cs + self.overhead {
                match stack.insert(chunk, &data[..cs]) {
                    Ok(()) => {
                        self.loose.remove(&chunk);
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

    /// Drop the chunk's bytes.
    pub(crate) fn remove(&mut self, chunk: u64) {
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
    /// the disk tiers cannot be made (a daemon checks its paths at start,
    /// so this is a disk failing meanwhile), memory alone is better than
    /// refusing the volume; that is logged as an error.
    pub(crate) fn build_store(&mut self) {
        let cs = self.chunk_size;
        if self.is_root() || cs == 0 {
            return;
        }
        let mem = (self.cfg.capacity_chunks as u64).saturating_mul(u64::from(cs));
        let disks = self.cfg.cache_disk.clone();
        let overhead = self.cfg.relay.unwrap_or(0);
        if let Err(e) = self.store.build(cs, mem, &disks, overhead) {
            tracing::error!(error = %e, "cannot build the cache stack as configured");
            if disks.is_empty() {
                return;
            }
            if let Err(e) = self.store.build(cs, mem, &[], overhead) {
                tracing::error!(error = %e, "cannot build a memory-only cache stack either");
            } else {
                tracing::error!("serving with the memory tier only");
            }
        }
    }

    /// Statistics of the node's cache stack (a child with a data volume).
    pub fn cache_stats(&self) -> Option<StackStats> {
        self.store.stats()
    }
}
