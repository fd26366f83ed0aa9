//! Stack configurations from sizes in bytes, as operators give them
//! (`--cache-mem 64M --cache-disk /var/cache/canopy/v.cache:10G`). Shared by
//! the embedded ublk volume and the tree's nodes, so both build their
//! stacks the same way.

use std::path::PathBuf;

use crate::config::{CacheConfig, HashKind, Medium, TierConfig};

/// Ways per set for tiers sized from the command line: 8 keeps the serial
/// tag scan within one or two cache lines while making conflict misses rare.
pub const DEFAULT_WAYS: usize = 8;

/// Why a cache layout was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A tier too small to hold even one chunk.
    #[error("cache tier of {size} bytes is smaller than one {chunk}-byte chunk")]
    TierTooSmall {
        /// Bytes asked for.
        size: u64,
        /// The chunk size.
        chunk: usize,
    },
    /// No tier at all.
    #[error("the cache needs at least one tier: give --cache-mem or --cache-disk")]
    NoTiers,
}

/// Geometry for a tier of `size` bytes: as many slots as fit, in sets of
/// [`DEFAULT_WAYS`] (fewer ways only when the tier holds fewer chunks).
pub fn tier_geometry(size: u64, chunk_size: usize) -> Result<(usize, usize), LayoutError> {
    let slots = (size / chunk_size as u64) as usize;
    if slots == 0 {
        return Err(LayoutError::TierTooSmall {
            size,
            chunk: chunk_size,
        });
    }
    let ways = DEFAULT_WAYS.min(slots);
    Ok((slots / ways, ways))
}

/// The key of `mix` when none is given: the 64-bit golden ratio, a common
/// choice for multiplicative hashing.
pub const DEFAULT_MIX_KEY: u64 = 0x9e37_79b9_7f4a_7c15;

/// A distinct hash key per disk tier, so tiers that share a medium still
/// scatter the same addresses differently (seed 001's reason for stacking
/// tiers with different hash functions).
pub fn disk_tier_hash(index: usize) -> HashKind {
    HashKind::Mix {
        key: DEFAULT_MIX_KEY ^ (index as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
    }
}

/// Build a stack configuration from sizes in bytes: a memory tier on top
/// (low-order-bits hash, as the seed describes), then each disk tier with
/// its own keyed hash. The victim repository holds an eighth of the top
/// tier, at least `min_victims` chunks.
pub fn stack_layout(
    chunk_size: usize,
    cache_mem: u64,
    cache_disk: &[(PathBuf, u64)],
    min_victims: usize,
) -> Result<CacheConfig, LayoutError> {
    let mut tiers = Vec::new();
    if cache_mem > 0 {
        let (groups, ways) = tier_geometry(cache_mem, chunk_size)?;
        tiers.push(TierConfig {
            medium: Medium::Memory,
            groups,
            ways,
            hash: HashKind::Modulo,
        });
    }
    for (i, (path, size)) in cache_disk.iter().enumerate() {
        let (groups, ways) = tier_geometry(*size, chunk_size)?;
        tiers.push(TierConfig {
            medium: Medium::Disk { path: path.clone() },
            groups,
            ways,
            hash: disk_tier_hash(i),
        });
    }
    let top = tiers.first().ok_or(LayoutError::NoTiers)?;
    let victim_capacity = (top.groups * top.ways / 8).max(min_victims).max(1);
    Ok(CacheConfig {
        chunk_size,
        tiers,
        victim_capacity,
        // Opt-in: the embedded volume turns it on (canopy-ublk's
        // `cache_layout`); a tree node's detached stack must not refuse.
        admission: false,
        prefault: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_from_sizes() {
        let cfg = stack_layout(
            64 << 10,
            64 << 20,
            &[(PathBuf::from("/tmp/t1"), 256 << 20)],
            16,
        )
        .expect("layout");
        assert_eq!(cfg.tiers.len(), 2);
        assert_eq!(cfg.tiers[0].groups * cfg.tiers[0].ways, 1024);
        assert_eq!(cfg.tiers[0].hash, HashKind::Modulo);
        assert_eq!(cfg.tiers[1].groups * cfg.tiers[1].ways, 4096);
        assert!(matches!(cfg.tiers[1].hash, HashKind::Mix { .. }));
        assert_eq!(cfg.victim_capacity, 128);
    }

    #[test]
    fn tiny_and_empty_layouts_are_refused() {
        assert_eq!(
            stack_layout(64 << 10, 4096, &[], 16),
            Err(LayoutError::TierTooSmall {
                size: 4096,
                chunk: 64 << 10
            })
        );
        assert_eq!(
            stack_layout(64 << 10, 0, &[], 16),
            Err(LayoutError::NoTiers)
        );
    }

    #[test]
    fn small_tier_gets_fewer_ways() {
        assert_eq!(tier_geometry(3 * 4096, 4096), Ok((1, 3)));
        assert_eq!(tier_geometry(100 * 4096, 4096), Ok((12, 8)));
    }

    #[test]
    fn tiny_node_caches_keep_a_small_repository() {
        let cfg = stack_layout(512, 2 * 512, &[], 1).expect("layout");
        assert_eq!(cfg.victim_capacity, 1);
        assert_eq!(cfg.tiers[0].groups * cfg.tiers[0].ways, 2);
    }
}
