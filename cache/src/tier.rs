//! One tier of the stack: an array of independently locked sets and the
//! storage their data lives in.

use crate::config::{Medium, TierConfig};
use crate::disk::DiskFile;
use crate::error::CacheError;
use crate::hash::{describe, GroupHash};
use crate::set::Set;
use crate::slab;
use crate::stats::TierStats;
use parking_lot::Mutex;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Source bytes of a write: caller data, or zeros (a partial `zero`), so
/// that zeroing needs no buffer of zeros allocated per call.
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    Data(&'a [u8]),
    Zeros(usize),
}

/// Zeros for writing a zero range to a disk tier without allocating.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl Src<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Src::Data(d) => d.len(),
            Src::Zeros(n) => *n,
        }
    }

    /// Copies the source into `dst` (same length).
    pub(crate) fn apply(&self, dst: &mut [u8]) {
        match self {
            Src::Data(d) => dst.copy_from_slice(d),
            Src::Zeros(_) => dst.fill(0),
        }
    }
}

/// Where a tier's chunk bytes live.
enum Storage {
    /// In each set's `data`.
    Memory,
    /// In a file; sets hold only metadata.
    Disk(DiskFile),
}

/// One set-associative tier.
pub(crate) struct Tier {
    pub(crate) cfg: TierConfig,
    hash: GroupHash,
    pub(crate) sets: Box<[Mutex<Set>]>,
    storage: Storage,
    chunk_size: usize,
    /// Movement counters. Only touched on the slow path (under the stack's
    /// movement lock), so atomics here add no hit-path contention; hits and
    /// misses live in the sets instead.
    pub(crate) promotions: AtomicU64,
    pub(crate) demotions: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) io_errors: AtomicU64,
    /// Reads the admission filter served without caching their chunk
    /// (only ever counted on the top tier).
    pub(crate) refused: AtomicU64,
}

impl Tier {
    /// Builds an empty tier. A disk tier's file is created at `file_path`
    /// (normally the configured path; a rebuild uses a temporary name and
    /// renames it afterwards).
    pub(crate) fn build(
        cfg: &TierConfig,
        chunk_size: usize,
        file_path: Option<&Path>,
        prefault: bool,
    ) -> Result<Tier, CacheError> {
        cfg.validate(chunk_size)?;
        let (storage, slot_bytes) = match &cfg.medium {
            Medium::Memory => (Storage::Memory, chunk_size),
            Medium::Disk { path } => {
                let path = file_path.unwrap_or(path);
                // validate() checked that this product fits in a usize.
                let len = (cfg.groups * cfg.ways * chunk_size) as u64;
                (Storage::Disk(DiskFile::create(path, len)?), 0)
            }
        };
        // One mapping for the whole tier rather than an allocation per
        // set, so that it can be backed by huge pages (see `slab.rs`).
        let sets = slab::regions(slot_bytes, cfg.ways, cfg.groups, prefault)?
            .into_iter()
            .map(|data| Mutex::new(Set::new(cfg.ways, data)))
            .collect();
        Ok(Tier {
            cfg: cfg.clone(),
            hash: GroupHash::new(&cfg.hash, cfg.groups),
            sets,
            storage,
            chunk_size,
            promotions: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            io_errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// The set `chunk` maps to in this tier.
    #[inline]
    pub(crate) fn group(&self, chunk: u64) -> usize {
        self.hash.group(chunk)
    }

    /// The disk file, for disk tiers.
    pub(crate) fn disk_mut(&mut self) -> Option<&mut DiskFile> {
        match &mut self.storage {
            Storage::Disk(f) => Some(f),
            Storage::Memory => None,
        }
    }

    /// Whether this is a disk tier on a block device.
    pub(crate) fn disk_is_block_device(&self) -> bool {
        matches!(&self.storage, Storage::Disk(f) if f.is_block_device())
    }

    /// Carries `old`'s counters over into this (rebuilt) tier: movement
    /// counters directly, hits and misses summed into set 0.
    pub(crate) fn inherit_counters(&mut self, old: &Tier) {
        for (mine, theirs) in [
            (&self.promotions, &old.promotions),
            (&self.demotions, &old.demotions),
            (&self.evictions, &old.evictions),
            (&self.io_errors, &old.io_errors),
            (&self.refused, &old.refused),
        ] {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let (mut hits, mut misses) = (0, 0);
        for set in old.sets.iter() {
            let set = set.lock();
            hits += set.hits;
            misses += set.misses;
        }
        if let Some(first) = self.sets.first() {
            let mut first = first.lock();
            first.hits += hits;
            first.misses += misses;
        }
    }

    /// Byte offset of `(set_idx, way)` plus `within` in the tier file.
    #[inline]
    fn file_offset(&self, set_idx: usize, way: usize, within: usize) -> u64 {
        ((set_idx * self.cfg.ways + way) * self.chunk_size + within) as u64
    }

    /// Copies `out.len()` bytes at `off` of the chunk in `(set_idx, way)`.
    /// The caller holds the set's lock (`set`).
    #[inline]
    pub(crate) fn read_range(
        &self,
        set: &Set,
        set_idx: usize,
        way: usize,
        off: usize,
        out: &mut [u8],
    ) -> io::Result<()> {
        match &self.storage {
            Storage::Memory => {
                out.copy_from_slice(&set.data.way(way)[off..off + out.len()]);
                Ok(())
            }
            Storage::Disk(f) => f.read_exact_at(out, self.file_offset(set_idx, way, off)),
        }
    }

    /// Writes `src` at `off` of the chunk in `(set_idx, way)`.
    #[inline]
    pub(crate) fn write_range(
        &self,
        set: &mut Set,
        set_idx: usize,
        way: usize,
        off: usize,
        src: Src<'_>,
    ) -> io::Result<()> {
        match &self.storage {
            Storage::Memory => {
                src.apply(&mut set.data.way_mut(way)[off..off + src.len()]);
                Ok(())
            }
            Storage::Disk(f) => {
                let base = self.file_offset(set_idx, way, off);
                match src {
                    Src::Data(d) => f.write_all_at(d, base),
                    Src::Zeros(n) => {
                        let mut done = 0;
                        while done < n {
                            let step = (n - done).min(ZEROS.len());
                            f.write_all_at(&ZEROS[..step], base + done as u64)?;
                            done += step;
                        }
                        Ok(())
                    }
                }
            }
        }
    }

    /// Moves one way's chunk bytes out into `out` (a whole chunk).
    pub(crate) fn load(
        &self,
        set: &Set,
        set_idx: usize,
        way: usize,
        out: &mut [u8],
    ) -> io::Result<()> {
        self.read_range(set, set_idx, way, 0, out)
    }

    /// Stores a whole chunk into a way.
    pub(crate) fn store(
        &self,
        set: &mut Set,
        set_idx: usize,
        way: usize,
        data: &[u8],
    ) -> io::Result<()> {
        self.write_range(set, set_idx, way, 0, Src::Data(data))
    }

    /// Counts one failed tier I/O.
    pub(crate) fn note_io_error(&self) {
        self.io_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Snapshot of this tier's statistics (locks each set briefly).
    pub(crate) fn stats(&self, index: usize) -> TierStats {
        let mut s = TierStats {
            index,
            medium: match self.cfg.medium {
                Medium::Memory => "memory".to_string(),
                Medium::Disk { .. } => "disk".to_string(),
            },
            groups: self.cfg.groups,
            ways: self.cfg.ways,
            hash: describe(&self.cfg.hash),
            promotions: self.promotions.load(Ordering::Relaxed),
            demotions: self.demotions.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            io_errors: self.io_errors.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            ..TierStats::default()
        };
        for set in self.sets.iter() {
            let set = set.lock();
            s.occupied += set.occupied();
            s.dirty += set.dirty();
            s.hits += set.hits;
            s.misses += set.misses;
        }
        s
    }
}
