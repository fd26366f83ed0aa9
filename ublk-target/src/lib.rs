//! canopy's local block device: `/dev/ublkbN` served through libublk from
//! canopy's stacked cache over a standalone origin (the seed's "Driver"
//! node, in its embedded single-node form).
//!
//! Layout:
//! - [`volume`]: block requests mapped onto cache chunks; no ublk in it, so
//!   it is tested on hosts without the driver.
//! - [`spec`]: what a volume is made of, saved for `recover`.
//! - [`device`]: the libublk daemon (queues, signals, recovery).
//! - [`leaf`]: block requests as chunk requests to a node of a canopy tree.
//! - [`leaf_device`]: the libublk daemon for such a leaf (`add --parent`).
//! - [`control`]: the control socket for stats and live reconfiguration.
//! - [`namespace`]: the daemon's private mount namespace.
//! - [`nbd`]: the volume exported over NBD (`--export-nbd`), for now
//!   instead of the device (`--no-device`).
#![warn(missing_docs)]

pub mod addconfig;
pub mod control;
pub mod device;
pub mod leaf;
pub mod leaf_device;
pub mod namespace;
pub mod nbd;
pub mod spec;
pub mod volume;
