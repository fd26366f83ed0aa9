//! The Block Table's row for one chunk.

use std::collections::VecDeque;

use bytes::Bytes;
use canopy_proto::Perm;

use crate::local::LocalId;
use crate::{ChildId, Millis};

/// Who asked.
#[derive(Debug, Clone)]
pub(crate) enum Requester {
    /// A child, answered by an OK_REPLY or ERR_REPLY to `xid`.
    Child {
        child: ChildId,
        xid: u32,
        hops_left: u8,
        originator: std::net::Ipv6Addr,
    },
    /// This node's own user.
    Local(LocalId),
}

/// What is asked.
#[derive(Debug, Clone)]
pub(crate) enum Req {
    /// Child GET (`lock` false) or upgrading LOCK: hand out `want`.
    Grant { want: Perm, lock: bool },
    /// Child PUT: store `data`, then hand out `want`. `version` is the
    /// lowest version the data may take (`version.rs`).
    Put {
        data: Bytes,
        want: Perm,
        sync: bool,
        version: u64,
    },
    /// After a child's FLUSH, or for a local `Sync`: send our copy up before
    /// replying. `sync`: to the root (everything the child sent, or the
    /// local user wrote, must be durable there); otherwise one level (a
    /// proxy passing on a chunk its writer gave up, keeping `keep`, as in
    /// seed example 4).
    PassUp { sync: bool, keep: Perm },
    /// Child FORWARD: send our copy one level up.
    Forward,
    /// Local read.
    Read,
    /// Local write of `data` at `offset`.
    Write {
        offset: u32,
        data: Bytes,
        sync: bool,
        semi: bool,
    },
    /// Local lock (pin) at `perm`.
    Lock { perm: Perm },
}

/// A request waiting its turn on a chunk, with its progress.
#[derive(Debug)]
pub(crate) struct Pending {
    pub from: Requester,
    pub req: Req,
    /// Its data is in our copy (or at the root) already.
    pub applied: bool,
    /// Its data has gone as far up as its mode needs.
    pub propagated: bool,
}

/// What the outstanding request to the parent for this chunk was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpKind {
    /// GET or LOCK for more permission; the head request is served after.
    Acquire,
    /// PUT carrying the head request's data, with the permission it needs.
    Put,
    /// FLUSH carrying data (or a sync barrier) for the head request.
    Flush,
}

/// One row of the Block Table.
#[derive(Debug, Default)]
pub(crate) struct Entry {
    /// Permission held from the parent (the root always holds WRITE).
    pub held: Perm,
    /// When `held` stops being usable (child nodes only).
    pub expiry: Option<Millis>,
    /// The node's store has the chunk's contents (`store.rs`), valid while
    /// `held >= Read` and no child holds WRITE. At the root, a copy of what
    /// the origin holds, kept only while a request on the row or a
    /// read-ahead PUSH needs it (see [`crate::Node::origin_loaded`]).
    pub has_data: bool,
    /// `data` is newer than the parent's copy.
    pub dirty: bool,
    /// The version of the contents this node holds or was granted (0:
    /// unknown). Learned from the parent with every grant, PUSH and PUT
    /// reply, raised by every write applied here. Not used at the root,
    /// whose versions outlive its rows (`Node::version_of`).
    pub version: u64,
    /// The last write went only as far as the parent (semi-sync): dropping
    /// the chunk needs a FORWARD first.
    pub forward_duty: bool,
    /// Permissions handed to children.
    pub children: Vec<(ChildId, Perm)>,
    /// The outstanding request to the parent: its XID and kind.
    pub up: Option<(u32, UpKind)>,
    /// Children we sent INVALIDATE to and await.
    pub recall: Vec<(ChildId, u32)>,
    /// INVALIDATEs from the parent not yet answered: (xid, target).
    pub parent_inval: VecDeque<(u32, Perm)>,
    /// Requests in arrival order.
    pub queue: VecDeque<Pending>,
    /// Accessed since the sync daemon's last pass.
    pub recently_used: bool,
    /// Dirty at the sync daemon's last pass already: due this pass.
    pub sync_aged: bool,
    /// A local lock holds this permission: INVALIDATEs wait for its release.
    pub pinned: Perm,
    /// Root only: an [`crate::Action::OriginRead`] for this chunk is in
    /// flight, so no second one is issued and the row is kept until it ends.
    pub loading: bool,
    /// Root only: the origin was written (or a write failed) while the read
    /// was in flight, so what it returns may predate that write and is
    /// thrown away.
    pub load_stale: bool,
    /// Root only: the read just completed with this error; set while the
    /// row is re-run so the request waiting for it fails, then cleared.
    pub load_error: Option<canopy_proto::Status>,
    /// Root only: an [`crate::Action::OriginWrite`] of this chunk is in
    /// flight. The row keeps its bytes (the newest) until it completes, and
    /// nothing reads them meanwhile: a failed write drops them.
    pub writing: bool,
    /// Root only: newer contents to write once the write in flight ends.
    pub write_next: Option<Bytes>,
    /// Root only: children to PUSH this chunk to (read-ahead) once its
    /// origin read completes.
    pub push_waiters: Vec<ChildId>,
    /// The PUT in flight for the head request, kept to send again if its
    /// answer is lost with the parent (`retry.rs`).
    pub sent_put: Option<crate::retry::SentPut>,
}

impl Entry {
    /// The permission recorded for `child`.
    pub fn child_perm(&self, child: ChildId) -> Perm {
        self.children
            .iter()
            .find(|(c, _)| *c == child)
            .map_or(Perm::No, |(_, p)| *p)
    }

    /// Record `perm` for `child` (No removes it).
    pub fn set_child(&mut self, child: ChildId, perm: Perm) {
        self.children.retain(|(c, _)| *c != child);
        if perm != Perm::No {
            self.children.push((child, perm));
        }
    }

    /// Whether any child holds WRITE.
    pub fn child_writer(&self) -> Option<ChildId> {
        self.children
            .iter()
            .find(|(_, p)| *p == Perm::Write)
            .map(|(c, _)| *c)
    }

    /// Nothing refers to this row: it can leave the table.
    pub fn is_idle(&self) -> bool {
        self.held == Perm::No
            && !self.has_data
            && self.children.is_empty()
            && self.up.is_none()
            && self.recall.is_empty()
            && self.parent_inval.is_empty()
            && self.queue.is_empty()
            && self.pinned == Perm::No
            && !self.loading
            && !self.writing
            && self.push_waiters.is_empty()
    }

    /// Busy with a transaction: not a candidate for eviction or the sync daemon.
    pub fn is_busy(&self) -> bool {
        self.up.is_some()
            || !self.recall.is_empty()
            || !self.parent_inval.is_empty()
            || !self.queue.is_empty()
    }
}

/// A read-only view of a chunk's row, for tests, the simulation and `stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkView {
    /// Permission held from the parent.
    pub held: Perm,
    /// Whether that permission is usable now (not expired).
    pub usable: bool,
    /// The contents this node has.
    pub data: Option<Bytes>,
    /// Newer than the parent's copy.
    pub dirty: bool,
    /// The version of those contents (see `Node::version_of`).
    pub version: u64,
    /// Permissions handed to children.
    pub children: Vec<(ChildId, Perm)>,
}
