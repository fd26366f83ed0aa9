//! Configuration types: the stack's shape and the live reconfiguration ops.

use crate::error::CacheError;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::PathBuf;

/// Smallest accepted chunk size. Only tests use chunks this small (they
/// keep simulated volumes tiny); real volumes use 4 KiB or more.
pub const MIN_CHUNK_SIZE: usize = 16;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: usize = 1 << 20;
/// The chunk size canopy uses unless told otherwise.
pub const DEFAULT_CHUNK_SIZE: usize = 64 * 1024;

/// How a tier maps a chunk number to one of its groups (sets).
///
/// Each tier has its own function so that chunks which collide in one tier
/// are spread over different sets in the next: a chunk demoted because its
/// top-tier set was crowded lands among different neighbours below.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashKind {
    /// The seed's low-order bits: `chunk % groups`. Cheap, and keeps
    /// sequential chunks in distinct sets.
    Modulo,
    /// Keyed 64-bit mixing (splitmix64 finaliser of `chunk ^ key`), then
    /// `% groups`. Different keys give unrelated placements.
    Mix {
        /// The key XORed into the chunk number before mixing.
        key: u64,
    },
}

/// Where a tier keeps its chunk data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Medium {
    /// Preallocated RAM, `groups * ways * chunk_size` bytes.
    Memory,
    /// A file (or block device): slot `i` lives at byte offset `i * chunk_size`.
    /// A regular file is created/truncated when the tier is built and removed
    /// when the tier is dropped; a block device is used as is.
    Disk {
        /// The file or block device to use.
        path: PathBuf,
    },
}

/// One set-associative tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierConfig {
    /// Where the data lives.
    pub medium: Medium,
    /// Number of groups (sets); at least 1.
    pub groups: usize,
    /// Entries per group; at least 1.
    pub ways: usize,
    /// This tier's group-selection function.
    pub hash: HashKind,
}

/// The whole stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Bytes per chunk: a power of two in `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
    pub chunk_size: usize,
    /// Tiers, top (fastest, searched first) first. At least one.
    pub tiers: Vec<TierConfig>,
    /// Soft bound on the victim repository, in chunks.
    pub victim_capacity: usize,
    /// The top tier's admission filter (TinyLFU): a read that misses
    /// everywhere caches its chunk only if the chunk was used more often
    /// lately than the one it would displace; otherwise it is served from
    /// the backing store and not cached. Scans and one-off reads then stop
    /// pushing hot chunks out. Only clean chunks are ever refused (writes,
    /// dirty chunks, promotions and rescues always get in), so it is safe
    /// wherever the backing store holds every chunk that isn't dirty in
    /// the cache. A detached stack ignores it: its owner relies on what it
    /// inserts being there. Off when absent from a saved configuration.
    #[serde(default)]
    pub admission: bool,
    /// Commit the memory tiers' RAM when they are built, instead of page
    /// by page as chunks first arrive (see `slab.rs`): for a host that
    /// dedicates the memory to the cache. Building then takes about as
    /// long as zeroing the tiers (a fraction of a second per GiB on bare
    /// metal, more in a VM), reads never wait on the kernel zeroing a
    /// page, and a host short of the memory shows at the build (an error,
    /// or the OOM killer then) rather than under load later. Off when
    /// absent from a saved configuration.
    #[serde(default)]
    pub prefault: bool,
}

/// A live change to the stack's shape, applied by
/// [`CacheStack::reconfigure`](crate::CacheStack::reconfigure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reconfig {
    /// Insert a new, empty tier at position `index` (0 = top).
    AddTier {
        /// Position of the new tier; `0..=tiers.len()`.
        index: usize,
        /// Its configuration.
        tier: TierConfig,
    },
    /// Remove a tier; its entries cascade down (dirty ones end up in lower
    /// tiers or the victim repository, never lost). The last tier can't be removed.
    RemoveTier {
        /// The tier to remove.
        index: usize,
    },
    /// Replace a tier's hash function; its entries are re-inserted.
    Rehash {
        /// The tier to rebuild.
        index: usize,
        /// The new hash function.
        hash: HashKind,
    },
    /// Change a tier's geometry; its entries are re-inserted.
    Resize {
        /// The tier to rebuild.
        index: usize,
        /// New number of groups (at least 1).
        groups: usize,
        /// New number of ways (at least 1).
        ways: usize,
    },
}

impl TierConfig {
    /// Checks this tier against the rules for a stack with `chunk_size`.
    pub fn validate(&self, chunk_size: usize) -> Result<(), CacheError> {
        if self.groups == 0 {
            return Err(CacheError::InvalidConfig(
                "a tier needs at least 1 group".into(),
            ));
        }
        if self.ways == 0 {
            return Err(CacheError::InvalidConfig(
                "a tier needs at least 1 way".into(),
            ));
        }
        // The byte size must be addressable both as a memory allocation and
        // as a file offset; reject before trying to allocate it.
        let bytes = self
            .groups
            .checked_mul(self.ways)
            .and_then(|slots| slots.checked_mul(chunk_size))
            .filter(|&b| b <= isize::MAX as usize);
        if bytes.is_none() {
            return Err(CacheError::InvalidConfig(format!(
                "tier of {} groups x {} ways x {} bytes is too large",
                self.groups, self.ways, chunk_size
            )));
        }
        if let Medium::Disk { path } = &self.medium {
            if path.as_os_str().is_empty() {
                return Err(CacheError::InvalidConfig(
                    "disk tier with an empty path".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a chunk size.
pub(crate) fn validate_chunk_size(chunk_size: usize) -> Result<(), CacheError> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(CacheError::InvalidConfig(format!(
            "chunk size {chunk_size} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        )));
    }
    Ok(())
}

/// Two disk tiers on one file would overwrite each other's slots.
pub(crate) fn check_unique_paths<'a>(
    tiers: impl IntoIterator<Item = &'a TierConfig>,
) -> Result<(), CacheError> {
    let mut seen = HashSet::new();
    for t in tiers {
        if let Medium::Disk { path } = &t.medium {
            if !seen.insert(path) {
                return Err(CacheError::InvalidConfig(format!(
                    "two disk tiers share the path {}",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

impl CacheConfig {
    /// Checks the whole configuration: chunk size, at least one tier, every
    /// tier valid, no two disk tiers on one path.
    pub fn validate(&self) -> Result<(), CacheError> {
        validate_chunk_size(self.chunk_size)?;
        if self.tiers.is_empty() {
            return Err(CacheError::InvalidConfig(
                "at least one tier is required".into(),
            ));
        }
        for t in &self.tiers {
            t.validate(self.chunk_size)?;
        }
        check_unique_paths(&self.tiers)
    }
}
