//! What a node is told at start.

use canopy_proto::ConnectFlags;

use crate::Millis;

/// Where the node sits in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds the authoritative copy in its Origin; has no parent.
    Root,
    /// Has a parent; may serve children and local I/O.
    Child,
}

/// When a write is acknowledged (DRBD's protocols A, B and C).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// Once the volume root holds it durably (protocol C).
    #[default]
    Sync,
    /// Once the parent holds it (protocol B). The writer then owes a FORWARD
    /// if it drops the chunk before it has gone further.
    SemiSync,
    /// Once the local node holds WRITE and has applied it (protocol A); the
    /// sync daemon sends it up later.
    Async,
}

impl WriteMode {
    /// The CONNECT_FLAGS option that asks a parent for this mode.
    pub fn connect_flag(self) -> ConnectFlags {
        match self {
            WriteMode::Sync => ConnectFlags::SYNC_WRITE,
            WriteMode::SemiSync => ConnectFlags::SEMI_SYNC_WRITE,
            WriteMode::Async => ConnectFlags::ASYNC_WRITE,
        }
    }

    /// The mode a CONNECT_FLAGS value asks for; sync when it names none,
    /// because the safe default is the one that loses nothing.
    pub fn from_connect_flags(f: ConnectFlags) -> WriteMode {
        if f.contains(ConnectFlags::ASYNC_WRITE) {
            WriteMode::Async
        } else if f.contains(ConnectFlags::SEMI_SYNC_WRITE) {
            WriteMode::SemiSync
        } else {
            WriteMode::Sync
        }
    }
}

/// A node's settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Root or child.
    pub role: Role,
    /// The volume's name, sent in CONNECT.
    pub volume_name: String,
    /// The volume id this node gives its children (seed example 1: a proxy
    /// may give its own).
    pub child_volume_id: u32,
    /// Lifetime of a grant made by the root.
    pub grant_ttl_ms: u32,
    /// The global TTL a parent gives its children; they heartbeat at a third of it.
    pub hb_ttl_ms: u32,
    /// How often the sync daemon sends dirty chunks up (async writes).
    pub sync_interval_ms: Millis,
    /// Chunks the memory tier of a child's cache stack holds. What the
    /// stack pushes out of its tiers goes to the victim repository (an
    /// eighth as much again); beyond that, chunks are given back to the
    /// parent, oldest victim first.
    pub capacity_chunks: usize,
    /// The same limit in bytes: when set, `capacity_chunks` is recomputed
    /// from it once the parent announces the chunk size (at least one chunk).
    pub capacity_bytes: Option<u64>,
    /// Disk tiers below the memory tier: a cache file and its size in
    /// bytes each, in order. The files are created when the node learns
    /// the chunk size and removed when it stops.
    pub cache_disk: Vec<(std::path::PathBuf, u64)>,
    /// Commit the memory tier's RAM when the stack is built, on the first
    /// CONNECT ([`canopy_cache::CacheConfig::prefault`]): for a host that
    /// dedicates the memory to this node. Off by default.
    pub cache_prefault: bool,
    /// How this node's own local writes are acknowledged.
    pub write_mode: WriteMode,
    /// Send CONNECT only when a child or local request needs the volume
    /// (a proxy, as in seed example 1), not as soon as the link is up.
    pub connect_lazily: bool,
    /// Emit [`crate::Action::Publish`] and [`crate::Action::Revoke`] so the
    /// driver can serve repeat local reads without the node (a ublk leaf's
    /// cache hits). Off by default: a driver that does not serve them need
    /// not see them.
    pub publish_reads: bool,
    /// The volume's global identity (a hash of its verifying key, see
    /// `canopy-keys`) when it was created with keys. CONNECT carries it
    /// both ways in `KEY`: a child and a parent whose identities differ,
    /// or of which only one has one, refuse each other (BAD_VERIFIER), so
    /// a keyed volume never talks to a peer that would send unsealed data.
    pub volume_key: Option<[u8; 32]>,
    /// Set on an untrusted relay (issue 4), which holds only the volume's
    /// verifying key: the bytes it stores and forwards for a chunk are a
    /// sealed record this many bytes longer than the chunk, which it can
    /// neither open nor write. It acknowledges no write itself: each goes
    /// to its parent first, and dirty data a child gives back goes up
    /// before anything else is served on the chunk (see `node.rs`).
    pub relay: Option<usize>,
    /// Send a full-chunk PUT again, flagged RECOVERY_OP, when its answer
    /// was lost with the parent, instead of failing its write (`retry.rs`).
    /// Only for a driver whose links make a re-send exactly-once (write
    /// cookies on a volume with keys): otherwise a write applied before
    /// the loss could land again over a newer one. Off by default.
    pub retry_writes: bool,
    /// Bytes to read ahead of a local reader whose reads follow one
    /// another (a child node): see [`crate::Node::local`]. 0: off (the
    /// default here; `canopy-peerd` sets its own).
    pub read_ahead_bytes: u64,
}

impl NodeConfig {
    /// Defaults from seed 001's examples: TTL 1200 s, HB_TTL 30 s.
    pub fn new(role: Role, volume_name: &str, child_volume_id: u32) -> Self {
        NodeConfig {
            role,
            volume_name: volume_name.to_string(),
            child_volume_id,
            grant_ttl_ms: 1_200_000,
            hb_ttl_ms: 30_000,
            sync_interval_ms: 5_000,
            capacity_chunks: 4096,
            capacity_bytes: None,
            cache_disk: Vec::new(),
            cache_prefault: false,
            write_mode: WriteMode::Sync,
            connect_lazily: false,
            publish_reads: false,
            volume_key: None,
            relay: None,
            retry_writes: false,
            read_ahead_bytes: 0,
        }
    }
}
