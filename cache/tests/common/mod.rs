//! Shared test support: an in-memory backing store that logs what the cache
//! does to it, and a tiny deterministic RNG.
#![allow(dead_code)]

use canopy_cache::Backing;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// In-memory backing store. `visible` is what reads return; `durable` is
/// the state as of the last `sync`.
pub struct MemBacking {
    pub chunk_size: usize,
    pub visible: Mutex<HashMap<u64, Vec<u8>>>,
    pub durable: Mutex<HashMap<u64, Vec<u8>>>,
    /// Every `write_chunk` call, in order.
    pub write_log: Mutex<Vec<u64>>,
    pub reads: AtomicU64,
    pub syncs: AtomicU64,
    pub zeroes: AtomicU64,
    /// Make `write_chunk` fail.
    pub fail_writes: AtomicBool,
    /// Chunks with a call in progress, to catch overlapping calls for one chunk.
    inflight: Mutex<HashSet<u64>>,
    pub overlaps: AtomicU64,
    /// Spin this many iterations inside each call, to widen race windows.
    pub delay_spins: AtomicU64,
}

impl MemBacking {
    pub fn new(chunk_size: usize) -> Self {
        MemBacking {
            chunk_size,
            visible: Mutex::new(HashMap::new()),
            durable: Mutex::new(HashMap::new()),
            write_log: Mutex::new(Vec::new()),
            reads: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
            fail_writes: AtomicBool::new(false),
            inflight: Mutex::new(HashSet::new()),
            overlaps: AtomicU64::new(0),
            delay_spins: AtomicU64::new(0),
        }
    }

    /// Current (visible) content of a chunk.
    pub fn get(&self, chunk: u64) -> Vec<u8> {
        self.visible
            .lock()
            .get(&chunk)
            .cloned()
            .unwrap_or_else(|| vec![0; self.chunk_size])
    }

    /// Content as of the last sync.
    pub fn get_durable(&self, chunk: u64) -> Vec<u8> {
        self.durable
            .lock()
            .get(&chunk)
            .cloned()
            .unwrap_or_else(|| vec![0; self.chunk_size])
    }

    fn enter(&self, chunk: u64) {
        if !self.inflight.lock().insert(chunk) {
            self.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        let spins = self.delay_spins.load(Ordering::Relaxed);
        for _ in 0..spins {
            std::hint::spin_loop();
        }
    }

    fn leave(&self, chunk: u64) {
        self.inflight.lock().remove(&chunk);
    }
}

impl Backing for MemBacking {
    fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> io::Result<()> {
        self.enter(chunk);
        self.reads.fetch_add(1, Ordering::Relaxed);
        buf.copy_from_slice(&self.get(chunk));
        self.leave(chunk);
        Ok(())
    }

    fn write_chunk(&self, chunk: u64, data: &[u8]) -> io::Result<()> {
        self.enter(chunk);
        let res = if self.fail_writes.load(Ordering::Relaxed) {
            Err(io::Error::other("injected write failure"))
        } else {
            assert_eq!(data.len(), self.chunk_size);
            self.visible.lock().insert(chunk, data.to_vec());
            self.write_log.lock().push(chunk);
            Ok(())
        };
        self.leave(chunk);
        res
    }

    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        // Hold `durable` while copying so two concurrent syncs can't store
        // their snapshots out of order (durability never goes backwards).
        let mut durable = self.durable.lock();
        *durable = self.visible.lock().clone();
        Ok(())
    }

    fn zero_chunk(&self, chunk: u64) -> io::Result<()> {
        self.enter(chunk);
        self.zeroes.fetch_add(1, Ordering::Relaxed);
        self.visible.lock().remove(&chunk);
        self.leave(chunk);
        Ok(())
    }
}

/// xorshift64*: deterministic, dependency-free randomness for the stress test.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Deterministic fill pattern for writes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}
