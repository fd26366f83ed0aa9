//! canopy's peer daemon as a library: configuration, the tokio driver around
//! the sans-IO [`canopy_node::Node`], the protocol trace and the leaf's line
//! protocol. The `canopy-peerd` binary is a thin CLI over these, and the
//! integration tests run whole trees in one process through them.
#![warn(missing_docs)]

pub mod alloc;
pub mod config;
pub mod cookie;
pub mod driver;
pub mod errline;
pub mod ledger;
pub mod lines;
mod origin_read;
pub mod seal;
pub mod setup;
pub mod trace;
pub mod view;

pub use config::{PeerConfig, PeerRole};
pub use driver::{DriverError, NodeHandle, Peer, PeerStats, Readiness, RequestError};
pub use setup::{start_peer, start_peer_with_view, SetupError};
pub use view::ReadView;
