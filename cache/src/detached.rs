//! A stack whose owner decides what leaves it: canopy-node's chunk store.
//!
//! A tree node cannot fill a miss by calling a backing store: its "backing"
//! is a parent across the network, reached through the node's own protocol.
//! And it cannot drop a chunk silently: a chunk holds a permission granted by
//! the parent (READ, which should be given back) and maybe writes the parent
//! has not seen yet (which must go up in a FLUSH before the bytes are
//! dropped). So a *detached* stack keeps the tiers, their hash functions,
//! promotion, demotion and the victim repository, but:
//!
//! * a lookup that misses reports [`CacheError::NotCached`] (through
//!   [`CacheStack::lookup`], as `Ok(false)`) instead of filling;
//! * nothing drains the victim repository by itself (no back-pressure, no
//!   cleaner): the owner lists what is over capacity
//!   ([`CacheStack::victims`], [`CacheStack::victim_excess`]) and takes each chunk out once
//!   it has given its permission back ([`CacheStack::take_victim`]), or
//!   leaves it there (over the soft capacity) while it cannot.

use crate::backing::Backing;
use crate::config::CacheConfig;
use crate::error::CacheError;
use crate::stack::CacheStack;
use std::io;
use std::sync::Arc;

/// The backing of a detached stack: there is none, and every call says so.
/// A detached stack never calls it (misses are reported, victims are taken
/// by the owner); `flush` and `write_through` fail with `Unsupported`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Detached;

fn no_backing() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "a detached cache has no backing store",
    )
}

impl Backing for Detached {
    fn read_chunk(&self, _chunk: u64, _buf: &mut [u8]) -> io::Result<()> {
        Err(no_backing())
    }
    fn write_chunk(&self, _chunk: u64, _data: &[u8]) -> io::Result<()> {
        Err(no_backing())
    }
    fn sync(&self) -> io::Result<()> {
        Err(no_backing())
    }
    fn zero_chunk(&self, _chunk: u64) -> io::Result<()> {
        Err(no_backing())
    }
}

impl CacheStack<Detached> {
    /// A stack whose owner fills it ([`insert`](Self::insert)) and drains
    /// its victim repository ([`take_victim`](Self::take_victim)).
    pub fn detached(config: CacheConfig) -> Result<Self, CacheError> {
        let mut stack = CacheStack::new(config, Arc::new(Detached))?;
        stack.owner_drains = true;
        // The node counts on every chunk it inserts being there (with the
        // permission its Block Table records), and a detached stack never
        // fills; no chunk may be refused, and counting would be wasted.
        stack.admission = false;
        Ok(stack)
    }

    /// Copies the whole chunk into `buf` (len == chunk size) if it is
    /// cached, promoting it as any access does; `Ok(false)` if it is not.
    /// An error is a tier's I/O error: the chunk stays where it was.
    pub fn lookup(&self, chunk: u64, buf: &mut [u8]) -> Result<bool, CacheError> {
        self.check_whole(chunk, buf.len())?;
        match self.read(chunk, 0, buf) {
            Ok(()) => Ok(true),
            Err(CacheError::NotCached { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Stores the whole chunk `data` (len == chunk size), replacing what was
    /// cached. The entry is marked clean: whether the bytes are newer than
    /// the parent's is the owner's knowledge, not the cache's.
    pub fn insert(&self, chunk: u64, data: &[u8]) -> Result<(), CacheError> {
        self.check_whole(chunk, data.len())?;
        // Whole-chunk, so no fill is attempted; `dirty: false` keeps the
        // cache's own dirty bit (meaningless here) off.
        self.write_src(chunk, 0, crate::tier::Src::Data(data), false, false)
    }

    /// Drops `chunk` wherever it is; whether it was cached.
    pub fn remove(&self, chunk: u64) -> bool {
        chunk != crate::set::EMPTY && self.discard_cached(chunk)
    }

    /// Up to `max` chunks of the victim repository, oldest first (the
    /// owner may skip over-capacity ones it cannot give back yet, and take
    /// later ones instead).
    pub fn victims(&self, max: usize) -> Vec<u64> {
        let _layout = self.layout.read();
        let mv = self.movement.lock();
        mv.victim.iter_oldest().map(|(c, _)| c).take(max).collect()
    }

    /// How many chunks the victim repository holds beyond its capacity.
    pub fn victim_excess(&self) -> usize {
        let _layout = self.layout.read();
        let mv = self.movement.lock();
        mv.victim.len().saturating_sub(self.victim_capacity)
    }

    /// Takes `chunk` out of the victim repository and hands its bytes over;
    /// `None` if it is not there (still in a tier, or not cached).
    pub fn take_victim(&self, chunk: u64) -> Option<Box<[u8]>> {
        let _layout = self.layout.read();
        let mut mv = self.movement.lock();
        let e = mv.victim.take(chunk)?;
        mv.victim.drains += 1;
        mv.victim.drops += 1;
        Some(e.data)
    }
}
