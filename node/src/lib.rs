//! A canopy peer as a sans-IO state machine (seed 001, Fig. 8).
//!
//! [`Node`] holds the Block Table, the Server module (requests from
//! children), the Client module (requests to the parent, INVALIDATE from it,
//! HEARTBEAT) and, at the root, the Origin. It does no networking and reads no
//! clock: the driver feeds it messages, local I/O requests and the current time
//! in milliseconds, then drains [`Action`]s (messages to send, local requests
//! completed) and asks [`Node::poll_timeout`] when to call back. The same code
//! therefore runs under the tokio driver and under the deterministic
//! simulation in `tests/sim.rs`.
//!
//! Coherence in one paragraph: every chunk has, at each node, the permission
//! the node holds from its parent (`held`) and the permissions it has handed to
//! each child. A request that conflicts with a child's permission makes the node
//! INVALIDATE that child and wait for every reply before it grants; a request
//! that needs more than `held` goes to the parent first. Per chunk, one request
//! is served at a time; an INVALIDATE from the parent jumps the queue, because
//! the parent may be holding our own pending request behind it.
#![warn(missing_docs)]

mod client;
mod config;
mod durable;
mod entry;
mod inflight;
mod local;
mod node;
mod retry;
mod server;
mod store;
mod timers;
mod version;
mod view;

pub use config::{NodeConfig, Role, WriteMode};

/// XIDs at and above this are never the node's: the transport uses them for
/// requests of its own on a link (GET_COOKIES on a volume with keys), and
/// takes their replies before they reach the node.
pub const LINK_XIDS: u32 = 0xFFFF_0000;
pub use entry::ChunkView;
pub use local::{LocalId, LocalOp, LocalReply};
pub use node::{Action, Node, NodeStats};

/// Milliseconds on the driver's monotonic clock.
pub type Millis = u64;

/// A child connection, numbered by the driver.
pub type ChildId = u64;
