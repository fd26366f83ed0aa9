//! canopy's stacked software cache.
//!
//! Each canopy node caches fixed-size *chunks* (4 KiB..1 MiB, a power of
//! two, 64 KiB by default) of the shared block volume in a [`CacheStack`]:
//! a stack of set-associative tiers over a [`Backing`] store, after the
//! "stacked cache" of the *Cache Implementation* patent (Fig. 10).
//!
//! # Tiers and hashing
//!
//! A tier ([`TierConfig`]) is `groups` sets of `ways` entries each. Every
//! entry has a tag (the chunk number, or an empty marker `u64::MAX` that
//! matches no chunk, which is why chunk `u64::MAX` is refused), a dirty bit,
//! a write generation and an LRU stamp. A tier lives in memory (one
//! anonymous mapping of `groups * ways * chunk_size` bytes, 2 MiB aligned
//! and advised for transparent huge pages, each set owning its `ways`
//! chunk-sized slots in it; committed as chunks arrive) or on disk (a file, slot `i` at
//! byte `i * chunk_size`, only metadata in memory; I/O through a per-thread
//! `io_uring`, falling back to `pread`/`pwrite` if a ring can't be set up).
//!
//! Every tier has its *own* hash function ([`HashKind`]) choosing the set:
//! `Modulo` (the chunk's low-order bits) or `Mix` (a keyed 64-bit mix). With
//! different functions per tier, chunks that crowd one set of the top tier
//! are scattered over different sets below, so a hot set's overflow doesn't
//! crowd a single set again one level down.
//!
//! # Lookup, promotion, demotion, the victim repository
//!
//! A lookup tries the top tier, then each tier below, then the victim
//! repository. A hit below the top *promotes* the chunk: it is taken out of
//! its tier and inserted at the top. Inserting at the top puts the chunk in
//! its set's empty way or evicts the set's least recently used entry, which
//! is *demoted* into the next tier (into the set that tier's hash picks),
//! evicting that set's LRU entry in turn, and so on. What falls out of the
//! bottom tier *spills* into the **victim repository**, a bounded pool of
//! whole chunks in memory that exists so an insertion never waits for a
//! write-out. A lookup that finds its chunk there *rescues* it to the top.
//! A chunk lives in exactly one place at any time (one tier way, or the
//! repository).
//!
//! Writes are write-back: a write lands in the cache and marks the chunk
//! dirty. A **cleaner** ([`CacheStack::spawn_cleaner`], or
//! [`CacheStack::clean_victims`] by hand) drains the repository: dirty
//! chunks are written to the backing store, then dropped; clean ones are
//! just dropped. If an insertion pushes the repository over its capacity
//! the inserting thread drains it back down itself (*back-pressure*),
//! skipping chunks whose lock it can't take at once, so the capacity is
//! soft rather than a reason to block. [`CacheStack::flush`] writes back
//! every dirty chunk wherever it is and syncs the backing store.
//!
//! Tiers can be added, removed, rehashed and resized live
//! ([`CacheStack::reconfigure`]). A tier that is removed or rebuilt pushes
//! its entries through the normal demotion cascade (a rebuilt tier
//! re-inserts them into its new shape first), so dirty data always ends up
//! in some tier or the victim repository, never lost.
//!
//! # Admission
//!
//! With [`CacheConfig::admission`] on, the top tier has a TinyLFU
//! admission filter: a read that misses everywhere caches its chunk only if
//! the chunk was used more often lately than the top-tier way it would
//! displace, and is otherwise served straight from the backing store. Scans
//! and one-off reads then stop pushing hot chunks out. Only clean reads are
//! ever refused (writes, promotions and rescues always get in), and
//! detached stacks ignore the setting. Frequencies live in each set, under
//! the lock every access to the set already takes, so counting adds no
//! shared state to the hit path.
//!
//! # Detached stacks
//!
//! A tree node's stack has no backing store it could call: a miss is asked
//! of the parent over the network, and a chunk leaving the stack must first
//! give its permission back (or FLUSH its writes). [`CacheStack::detached`]
//! builds a stack that reports misses instead of filling them and never
//! drains its victim repository by itself: the owner takes victims out
//! ([`CacheStack::take_victim`]) once it has dealt with them.
//!
//! # Concurrency
//!
//! * **Layout lock** (`RwLock` over the tier list): every I/O takes it
//!   shared; a reconfiguration takes it exclusive, so I/O pauses briefly
//!   while the stack changes shape and then continues on the new shape.
//! * **Set locks**: each set is its own `Mutex`, holding the entry metadata,
//!   the bytes of a memory tier and the set's hit/miss counters. A
//!   *top-tier hit* (read or write) is: shared layout lock, one set lock, tag
//!   match, copy (or modify in place: dirty, generation + 1), LRU stamp.
//!   Nothing else: no allocation, no shared counter, no global mutex; two
//!   hits contend only if they hit the same set.
//! * **Movement lock**: a single `Mutex` serialises every move between
//!   places (promotion, demotion cascade, spill, rescue, victim drop) and
//!   owns the victim repository and the staging buffers the moves copy
//!   through (so moves don't allocate). Tags change only under it, so a
//!   thread that missed the top tier and searches under it can't miss a
//!   chunk that is in transit. Only the slow path pays for it.
//! * **Chunk locks**: a striped array of 1024 mutexes keyed by a hash of the
//!   chunk number. Held by anything that exchanges a chunk with the backing
//!   store: fill on miss (and any insertion of an absent chunk), writeback,
//!   whole-chunk zero. This keeps one chunk's writebacks in order (an older
//!   snapshot can't land after a newer one) and keeps a fill from caching
//!   bytes that a concurrent writeback is replacing. Backing I/O itself runs
//!   with only the chunk lock held.
//! * **Writeback protocol**: snapshot the bytes and generation under the
//!   movement lock, write without it, then mark the chunk clean only if its
//!   generation is unchanged, wherever the chunk has moved to meanwhile; a
//!   write that raced the writeback keeps the chunk dirty.
//! * **Lock order**: chunk lock → layout lock → movement lock → one set lock
//!   at a time. Nobody blocks on a chunk lock while holding any other lock
//!   (back-pressure, which runs with the movement lock held while choosing,
//!   only `try_lock`s chunk locks); the cleaner and `flush` hold one chunk
//!   lock at a time and may block on it.
//!
//! # Statistics
//!
//! [`CacheStack::stats`] sums per-set hit/miss counters (kept under the set
//! locks the hit path holds anyway) and per-tier movement counters (touched
//! only on the slow path).
#![warn(missing_docs)]

mod backing;
mod cleaner;
mod config;
mod detached;
mod disk;
mod error;
mod hash;
mod inspect;
pub mod layout;
mod reconfig;
mod set;
mod sketch;
mod slab;
mod stack;
mod stats;
mod stripe;
mod tier;
mod victim;
mod writeback;

pub use backing::Backing;
pub use cleaner::CleanerHandle;
pub use config::{
    CacheConfig, HashKind, Medium, Reconfig, TierConfig, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
};
pub use detached::Detached;
pub use disk::io_uring_fallbacks;
pub use error::CacheError;
pub use inspect::{Location, Residency};
pub use stack::CacheStack;
pub use stats::{StackStats, TierStats, VictimStats};
