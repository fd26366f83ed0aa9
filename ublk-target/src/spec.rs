//! The volume specification: everything needed to serve a volume again.
//!
//! It is stored in libublk's per-device JSON (`/run/ublksrvd/N.json`, the
//! `target_data` field) when the device starts, so that
//! `canopy-ublk recover --id N` can rebuild the same volume after the daemon
//! was killed, without the operator repeating the flags.

use std::path::PathBuf;

use canopy_cache::CacheConfig;
use serde::{Deserialize, Serialize};

use crate::volume::CacheMode;

/// How to serve one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Marks JSON written by canopy, so a foreign ublk device is not
    /// mistaken for one of ours by `list` or `recover`.
    pub canopy: u32,
    /// The origin file or block device.
    pub origin: PathBuf,
    /// Write mode.
    pub mode: CacheMode,
    /// The cache stack, chunk size included.
    pub cache: CacheConfig,
}

/// Version tag written into [`VolumeSpec::canopy`].
pub const SPEC_VERSION: u32 = 1;

pub use canopy_cache::layout::{
    disk_tier_hash, tier_geometry, LayoutError, DEFAULT_MIX_KEY, DEFAULT_WAYS,
};

/// The embedded volume's layout: [`canopy_cache::layout::stack_layout`] with
/// a victim repository of at least 16 chunks, enough to absorb bursts of
/// demotions while the cleaner writes back.
///
/// The admission filter is on ([`CacheConfig::admission`]): a scan (a
/// backup, `dd`, fsck) or a one-off read is served from the origin rather
/// than pushing the volume's hot chunks out.
pub fn cache_layout(
    chunk_size: usize,
    cache_mem: u64,
    cache_disk: &[(PathBuf, u64)],
) -> Result<CacheConfig, LayoutError> {
    let mut config = canopy_cache::layout::stack_layout(chunk_size, cache_mem, cache_disk, 16)?;
    // Safe here: the origin holds every chunk that is not dirty in the
    // cache, and only such chunks' reads are ever refused (served from the
    // origin instead of cached). A tree node's detached stack never uses it.
    config.admission = true;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_json() {
        let spec = VolumeSpec {
            canopy: SPEC_VERSION,
            origin: PathBuf::from("/srv/vol.img"),
            mode: CacheMode::Writeback,
            cache: cache_layout(64 << 10, 8 << 20, &[]).expect("layout"),
        };
        let json = serde_json::to_value(&spec).expect("to json");
        let back: VolumeSpec = serde_json::from_value(json).expect("from json");
        assert_eq!(back, spec);
    }
}
