//! Local access: the seed's Driver talking to the Block Table.

use bytes::Bytes;
use canopy_proto::Perm;

/// Names a local request so its completion can be matched to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalId(pub u64);

/// A request from this node's own user (the ublk device, a test, a lock client).
#[derive(Clone, Debug)]
pub enum LocalOp {
    /// Read a whole chunk.
    Read {
        /// Chunk number.
        chunk: u64,
    },
    /// Write `data` at `offset` inside a chunk.
    Write {
        /// Chunk number.
        chunk: u64,
        /// Byte offset inside the chunk.
        offset: u32,
        /// The bytes to write.
        data: Bytes,
        /// Acknowledge only once the root has it durably, whatever the mode (FUA).
        force_sync: bool,
    },
    /// Take (`Read` shared, `Write` exclusive) or release (`No`) a lock on a
    /// chunk. While held, an INVALIDATE from the parent waits for the release,
    /// which makes LOCK a distributed lock service on a dataless volume.
    /// If the parent is lost while the lock is held, the root forgets the
    /// grant (another node may take the lock): the lock's next operation
    /// (normally its release) fails once with `NoPermission` to say so.
    Lock {
        /// Chunk (lock) number.
        chunk: u64,
        /// What to hold afterwards.
        perm: Perm,
    },
    /// Make every write to `chunk` acknowledged to the local user before this
    /// request durable at the root (the root has fdatasynced its origin), as
    /// a block device's FLUSH needs in async and semi-sync mode. It sends a
    /// FLUSH with FORCE_SYNC up the tree, carrying our copy if dirty and
    /// otherwise as a barrier that makes every node on the way push what it
    /// holds. The permission held is kept. Answered `Done`; an error if the
    /// parent is unreachable, or (once) if the parent was lost while such
    /// writes were not yet durable.
    Sync {
        /// Chunk number.
        chunk: u64,
    },
}

impl LocalOp {
    /// The chunk the request is about.
    pub fn chunk(&self) -> u64 {
        match self {
            LocalOp::Read { chunk }
            | LocalOp::Write { chunk, .. }
            | LocalOp::Lock { chunk, .. }
            | LocalOp::Sync { chunk } => *chunk,
        }
    }
}

/// A local request's successful result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalReply {
    /// The chunk's contents (for Read).
    Data(Bytes),
    /// Written with the durability the mode promises, lock state changed,
    /// or synced.
    Done,
}
