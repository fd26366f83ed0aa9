//! canopy's origin store: the authoritative copy of a volume, in a regular
//! file or a block device, as a [`canopy_cache::Backing`].
//!
//! Both the embedded device (`canopy-ublk`) and the tree's root
//! (`canopy-peerd root`) keep their data here, so it is a crate of its own
//! rather than part of either.
//!
//! - [`store`]: [`OriginStore`], O_DIRECT where the filesystem allows it.
//! - [`size`]: size strings (`64M`, `1G`) for command lines and configs.
#![warn(missing_docs)]

pub mod size;
pub mod store;

pub use store::{
    check_chunk_size, check_volume_size, DirectChunk, OriginError, OriginStats, OriginStore,
};
