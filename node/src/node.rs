//! The node: its tables, its outputs, and the per-chunk engine that serves
//! requests one at a time.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use canopy_cache::Backing;
use canopy_proto::{Flags, IoOp, Message, Opcode, Perm, Status};

use crate::config::{NodeConfig, Role, WriteMode};
use crate::durable::{Durability, Durable};
use crate::entry::{ChunkView, Entry, Pending, Req, Requester, UpKind};
use crate::inflight::InFlight;
use crate::local::{LocalId, LocalReply};
use crate::store::Store;
use crate::version::Incoming;
use crate::{ChildId, Millis};

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a message to the parent.
    ToParent(Message),
    /// Send a message to a child.
    ToChild(ChildId, Message),
    /// Close a child's connection (it broke the protocol or went silent).
    CloseChild(ChildId),
    /// A local request finished.
    LocalDone(LocalId, Result<LocalReply, Status>),
    /// The parent missed its heartbeats: drop the connection and dial again
    /// (then call [`Node::parent_up`]).
    ResetParent,
    /// Root only: read `chunk` from the origin ([`Node::origin`]) and hand
    /// the result to [`Node::origin_loaded`]. The read may run on another
    /// thread and complete in any order; the node keeps serving other
    /// chunks meanwhile and issues at most one read per chunk at a time. A
    /// caller without threads can answer at once with
    /// [`Node::serve_origin_read`].
    OriginRead {
        /// Chunk number.
        chunk: u64,
    },
    /// With [`crate::NodeConfig::publish_reads`]: local reads of `chunk`
    /// may be served from `data`, without the node, until `expiry` (node
    /// time; `None`: no limit) or a [`Action::Revoke`] for it, which the
    /// driver must apply before performing any later action.
    Publish {
        /// Chunk number.
        chunk: u64,
        /// Its contents.
        data: Bytes,
        /// When the grant behind it runs out.
        expiry: Option<Millis>,
    },
    /// Stop serving `chunk` from its published copy.
    Revoke {
        /// Chunk number.
        chunk: u64,
    },
    /// Root only: fdatasync the origin ([`Node::origin`]) and hand the
    /// result to [`Node::origin_synced`]. At most one is in flight; it may
    /// run on another thread while the node serves on. A caller without
    /// threads can answer at once with [`Node::serve_origin_sync`].
    OriginSync,
    /// Root only: write `data` as `chunk`'s contents to the origin and hand
    /// the result to [`Node::origin_written`]. At most one per chunk is in
    /// flight; writes of different chunks may run on other threads and
    /// complete in any order. A caller without threads can answer at once
    /// with [`Node::serve_origin_write`].
    OriginWrite {
        /// Chunk number.
        chunk: u64,
        /// Its new contents (a whole chunk).
        data: Bytes,
    },
}

/// Counters, for `stats` and the simulation's checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeStats {
    /// IO_REQUESTs received from children.
    pub child_requests: u64,
    /// Requests sent to the parent.
    pub parent_requests: u64,
    /// INVALIDATEs sent to children.
    pub invalidates_sent: u64,
    /// INVALIDATEs received from the parent.
    pub invalidates_received: u64,
    /// Local requests completed.
    pub local_done: u64,
    /// Chunks given back to the parent to stay under capacity.
    pub evictions: u64,
    /// FLUSHes sent by the sync daemon.
    pub sync_flushes: u64,
    /// PUSHes sent to children.
    pub pushes_sent: u64,
    /// Chunks read ahead of a local reader (see [`Node::local`]).
    #[serde(default)]
    pub read_ahead: u64,
    /// ERR_REPLYs sent.
    pub errors_sent: u64,
    /// Dirty chunks lost: dropped because the parent was lost, or given
    /// up in a FLUSH the parent refused (async writes).
    pub lost_dirty: u64,
    /// Local locks that were held when the parent was lost (each reported
    /// to the lock's next operation).
    #[serde(default)]
    pub locks_lost: u64,
    /// fdatasyncs of the origin issued (root): fewer than the sync writes
    /// when several share one.
    #[serde(default)]
    pub origin_syncs: u64,
    /// Writes that arrived with a version below the chunk's current one
    /// (see `version.rs`): after failed writes, or a replay.
    #[serde(default)]
    pub stale_versions: u64,
    /// Children dropped for missing their HEARTBEATs (3 × HB_TTL silent).
    #[serde(default)]
    pub children_silent: u64,
    /// PUTs sent again after their answer was lost with the parent, or
    /// after IN_RECOVERY (`NodeConfig::retry_writes`).
    #[serde(default)]
    pub puts_resent: u64,
}

/// What an XID we sent stands for.
#[derive(Debug, Clone)]
pub(crate) enum Outstanding {
    Connect,
    Heartbeat {
        sent: Millis,
    },
    Up {
        chunk: u64,
        sent: Millis,
    },
    Invalidate {
        chunk: u64,
        child: ChildId,
        target: Perm,
    },
    /// A release, sync-daemon FLUSH, FORWARD or PUSH that nothing waits
    /// for. `carried`: it held our dirty copy, so a refusal matters.
    Release {
        chunk: u64,
        carried: bool,
    },
}

/// State of the link to the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Upstream {
    /// The root has no parent.
    None,
    /// No transport, or not yet asked to connect.
    Down,
    /// Transport up; CONNECT not yet sent.
    Idle,
    /// CONNECT sent.
    Connecting,
    /// CONNECT answered.
    Connected {
        volume_id: u32,
        hb_ttl_ms: u32,
        /// The parent counts as failed after this.
        deadline: Millis,
    },
}

/// A connected child.
#[derive(Debug, Clone)]
pub(crate) struct ChildConn {
    pub mode: WriteMode,
    pub last_heard: Millis,
}

/// A canopy peer for one volume. See the crate docs.
pub struct Node {
    pub(crate) cfg: NodeConfig,
    /// Shared so that a driver can read it off the node's thread
    /// ([`Action::OriginRead`]).
    pub(crate) origin: Option<Arc<dyn Backing>>,
    /// Chunk size in bytes; 0 for a dataless (lock-only) volume.
    pub(crate) chunk_size: u32,
    pub(crate) volume_size: u64,
    pub(crate) table: HashMap<u64, Entry>,
    pub(crate) actions: VecDeque<Action>,
    pub(crate) next_xid: u32,
    pub(crate) outstanding: InFlight,
    pub(crate) upstream: Upstream,
    /// Child CONNECTs waiting for our own CONNECT to be answered.
    pub(crate) waiting_connect: Vec<(ChildId, Message)>,
    /// Local requests waiting for the parent connection.
    pub(crate) waiting_local: Vec<(LocalId, crate::LocalOp)>,
    pub(crate) children: HashMap<ChildId, ChildConn>,
    /// The chunks' contents (the stacked cache at a child).
    pub(crate) store: Store,
    /// The root's writes not yet durable, and its fdatasync in flight.
    pub(crate) durability: Durability,
    /// The root's chunk versions (`version.rs`).
    pub(crate) root_versions: crate::version::RootVersions,
    pub(crate) dirty: BTreeSet<u64>,
    /// Chunks with a local write acknowledged but not yet known durable at
    /// the root (see [`Node::unsynced_chunks`]). Kept apart from the rows
    /// because the data may have left this node (sync daemon, eviction,
    /// INVALIDATE) and still sit non-durably further up.
    pub(crate) unsynced: BTreeSet<u64>,
    /// Unsynced chunks whose data may have been lost with a parent: the next
    /// `Sync` on each reports the loss instead of claiming durability.
    pub(crate) unsynced_lost: BTreeSet<u64>,
    /// Chunks whose local lock was held when the parent was lost: the
    /// next lock operation on each fails once with NO_PERMISSION, so the
    /// lock's user learns that its critical section was not protected.
    pub(crate) locks_lost: BTreeSet<u64>,
    /// Chunks with a published copy (see `view.rs`).
    pub(crate) published: BTreeSet<u64>,
    pub(crate) next_heartbeat: Option<Millis>,
    pub(crate) next_sync: Option<Millis>,
    pub(crate) stats: NodeStats,
    /// Chunks to send ahead of a sequential reader with PUSH.
    pub(crate) push_ahead: u32,
    /// Chunks whose PUT waits to be sent again (`retry.rs`).
    pub(crate) resend: BTreeSet<u64>,
    /// Read-ahead requests queued and not answered yet (`timers.rs`).
    pub(crate) reading_ahead: usize,
}

impl Node {
    /// A root over `origin`, which holds `volume_size` bytes in chunks of
    /// `chunk_size` (0 and no origin for a dataless lock volume).
    pub fn new_root(
        cfg: NodeConfig,
        origin: Option<Box<dyn Backing>>,
        chunk_size: u32,
        volume_size: u64,
    ) -> Self {
        let mut n = Node::empty(cfg);
        n.cfg.role = Role::Root;
        n.origin = origin.map(Arc::from);
        n.chunk_size = chunk_size;
        n.volume_size = volume_size;
        n.upstream = Upstream::None;
        n
    }

    /// The root's origin, for a driver that serves [`Action::OriginRead`],
    /// [`Action::OriginWrite`] and [`Action::OriginSync`] on other threads.
    /// The node does no I/O on it itself, except in the `serve_origin_*`
    /// helpers a thread-less driver may call; it asks through those actions,
    /// at most one write per chunk at a time.
    pub fn origin(&self) -> Option<Arc<dyn Backing>> {
        self.origin.clone()
    }

    /// A child node; it learns the volume's geometry from its parent.
    pub fn new_child(cfg: NodeConfig) -> Self {
        let mut n = Node::empty(cfg);
        n.cfg.role = Role::Child;
        n.upstream = Upstream::Down;
        n
    }

    fn empty(cfg: NodeConfig) -> Self {
        Node {
            cfg,
            origin: None,
            chunk_size: 0,
            volume_size: 0,
            table: HashMap::new(),
            actions: VecDeque::new(),
            next_xid: 1,
            outstanding: InFlight::default(),
            upstream: Upstream::Down,
            waiting_connect: Vec::new(),
            waiting_local: Vec::new(),
            children: HashMap::new(),
            store: Store::default(),
            durability: Durability::default(),
            root_versions: Default::default(),
            dirty: BTreeSet::new(),
            unsynced: BTreeSet::new(),
            unsynced_lost: BTreeSet::new(),
            locks_lost: BTreeSet::new(),
            published: BTreeSet::new(),
            next_heartbeat: None,
            next_sync: None,
            stats: NodeStats::default(),
            push_ahead: 0,
            resend: BTreeSet::new(),
            reading_ahead: 0,
        }
    }

    /// Send up to `n` following chunks with PUSH after a READ grant, for
    /// sequential readers.
    pub fn set_push_ahead(&mut self, n: u32) {
        self.push_ahead = n;
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        let a = self.actions.pop_front();
        if a.is_none() {
            // The event that stored a chunk has been served: the stack's
            // copy is enough from here on (see `Store`'s `last`).
            self.store.forget_last();
        }
        a
    }

    /// The counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Chunk size in bytes (0 until a child has connected, or for a lock volume).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Whether this node is an untrusted relay (`NodeConfig::relay`).
    pub fn is_relay(&self) -> bool {
        self.cfg.relay.is_some()
    }

    /// The length of a chunk's bytes as this node stores and forwards
    /// them: the chunk, or at a relay its sealed record.
    pub(crate) fn data_len(&self) -> usize {
        self.chunk_size as usize + self.cfg.relay.unwrap_or(0)
    }

    /// Volume size in bytes (0 until a child has connected).
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Whether this node can serve local requests (the root always; a child
    /// once its CONNECT is answered).
    pub fn is_ready(&self) -> bool {
        matches!(self.upstream, Upstream::None | Upstream::Connected { .. })
    }

    /// Whether this node is the root.
    pub fn is_root(&self) -> bool {
        self.cfg.role == Role::Root
    }

    /// This node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The Block Table row for `chunk`, as of `now`.
    pub fn inspect(&self, chunk: u64, now: Millis) -> ChunkView {
        match self.table.get(&chunk) {
            Some(e) => ChunkView {
                held: self.held(e),
                usable: self.usable(e, now) > Perm::No,
                data: if e.has_data {
                    self.store.peek(chunk)
                } else {
                    None
                },
                dirty: e.dirty,
                version: self.version_of(chunk),
                children: e.children.clone(),
            },
            None => ChunkView {
                held: if self.is_root() {
                    Perm::Write
                } else {
                    Perm::No
                },
                usable: self.is_root(),
                data: None,
                dirty: false,
                version: self.version_of(chunk),
                children: Vec::new(),
            },
        }
    }

    /// Chunks with a row in the Block Table.
    pub fn chunks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.table.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Number of chunks in the volume (lock volumes: every u64 is a lock).
    pub(crate) fn num_chunks(&self) -> u64 {
        if self.chunk_size == 0 {
            u64::MAX
        } else {
            self.volume_size.div_ceil(u64::from(self.chunk_size))
        }
    }

    pub(crate) fn alloc_xid(&mut self, what: Outstanding) -> u32 {
        let xid = self.next_xid;
        // XIDs from LINK_XIDS up are the transport's own (GET_COOKIES).
        let next = self.next_xid.wrapping_add(1);
        self.next_xid = if next == 0 || next >= crate::LINK_XIDS {
            1
        } else {
            next
        };
        self.outstanding.insert(xid, what);
        xid
    }

    pub(crate) fn held(&self, e: &Entry) -> Perm {
        if self.is_root() {
            Perm::Write
        } else {
            e.held
        }
    }

    /// The permission we may act on now: `held`, unless its TTL ran out.
    pub(crate) fn usable(&self, e: &Entry, now: Millis) -> Perm {
        if self.is_root() {
            return Perm::Write;
        }
        match e.expiry {
            Some(x) if x > now => e.held,
            _ => Perm::No,
        }
    }

    /// Remaining TTL to give a child for a grant made now.
    pub(crate) fn ttl_for_child(&self, e: &Entry, now: Millis) -> u32 {
        if self.is_root() {
            return self.cfg.grant_ttl_ms;
        }
        let left = e.expiry.unwrap_or(now).saturating_sub(now);
        u32::try_from(left).unwrap_or(u32::MAX)
    }

    pub(crate) fn parent_volume_id(&self) -> Option<u32> {
        match self.upstream {
            Upstream::Connected { volume_id, .. } => Some(volume_id),
            _ => None,
        }
    }

    pub(crate) fn send_parent(&mut self, m: Message) {
        self.actions.push_back(Action::ToParent(m));
    }

    pub(crate) fn send_child(&mut self, child: ChildId, m: Message) {
        if m.header.opcode == Opcode::ErrReply {
            self.stats.errors_sent += 1;
        }
        self.actions.push_back(Action::ToChild(child, m));
    }

    pub(crate) fn local_done(&mut self, id: LocalId, r: Result<LocalReply, Status>) {
        if id == crate::timers::READ_AHEAD {
            // Nobody waits for a read-ahead: the chunk is in the cache (or,
            // if it failed, a reader asks again).
            self.reading_ahead = self.reading_ahead.saturating_sub(1);
            return;
        }
        self.stats.local_done += 1;
        self.actions.push_back(Action::LocalDone(id, r));
    }

    /// A local or child access: the sync daemon leaves the chunk's
    /// permission alone this pass. (Recency for eviction is the stack's:
    /// every read it serves promotes the chunk.)
    pub(crate) fn touch(&mut self, chunk: u64) {
        if let Some(e) = self.table.get_mut(&chunk) {
            e.recently_used = true;
        }
    }

    /// The chunk's bytes if this node has them. `promote`: this is an
    /// access (a read or grant served), which moves the chunk up the stack;
    /// a FLUSH or an INVALIDATE answer reads without promoting. If a cache
    /// tier lost them (an I/O error), the row learns it here.
    pub(crate) fn chunk_bytes(&mut self, chunk: u64, promote: bool) -> Option<Bytes> {
        if !self.table.get(&chunk).is_some_and(|e| e.has_data) {
            return None;
        }
        let d = self.store.get(chunk, promote);
        if d.is_none() {
            self.bytes_lost(chunk);
        }
        d
    }

    /// A cache tier failed and the chunk's bytes are gone. A clean copy is
    /// fetched again when next needed; a dirty one was the only copy of
    /// acknowledged writes: counted, and reported by the next `Sync`.
    fn bytes_lost(&mut self, chunk: u64) {
        let Some(e) = self.table.get_mut(&chunk) else {
            return;
        };
        e.has_data = false;
        if e.dirty {
            tracing::error!(chunk, "a cache tier lost unflushed writes");
            self.stats.lost_dirty += 1;
            if self.unsynced.contains(&chunk) {
                self.unsynced_lost.insert(chunk);
            }
            self.clear_dirty(chunk);
        } else {
            tracing::warn!(
                chunk,
                "a cache tier lost a clean chunk; it is fetched again"
            );
        }
        self.revoke(chunk);
    }

    /// Store `data` as the chunk's bytes (the row must exist).
    pub(crate) fn set_bytes(&mut self, chunk: u64, data: Bytes) {
        if let Some(e) = self.table.get_mut(&chunk) {
            e.has_data = true;
            self.store.put(chunk, data);
        }
    }

    /// Drop the chunk's bytes (not its permission).
    pub(crate) fn drop_bytes(&mut self, chunk: u64) {
        if let Some(e) = self.table.get_mut(&chunk) {
            if std::mem::take(&mut e.has_data) {
                self.store.remove(chunk);
            }
        }
    }

    /// The chunk's current contents: our copy (at the root, what
    /// [`Node::origin_data`] loaded).
    pub(crate) fn read_data(&mut self, chunk: u64) -> Result<Bytes, Status> {
        if let Some(d) = self.chunk_bytes(chunk, true) {
            return Ok(d);
        }
        if self.is_root() && self.chunk_size == 0 {
            return Ok(Bytes::new());
        }
        // A child with a usable grant always has data, and the root loads
        // it before any step that reads it; reaching here is a bug in the
        // table, answered as an I/O error rather than a panic.
        tracing::error!(chunk, "no data for a held chunk");
        Err(Status::IoError)
    }

    /// Before a step reads the chunk's contents at the root: whether they
    /// are loaded. If not, an [`Action::OriginRead`] is issued (once per
    /// chunk while it is in flight) and the step must wait; it is re-run
    /// when [`Node::origin_loaded`] brings the data. Always ready at a
    /// child (its copy comes with its grant) and on a dataless volume.
    pub(crate) fn origin_data(&mut self, chunk: u64) -> Loaded {
        if !self.is_root() || self.chunk_size == 0 {
            return Loaded::Ready;
        }
        let has_origin = self.origin.is_some();
        let Some(e) = self.table.get_mut(&chunk) else {
            // Every caller has the row; without one, read_data reports it.
            return Loaded::Ready;
        };
        if e.writing {
            // Re-run by `origin_written`. Until the origin has the bytes
            // nobody reads them: a failed write drops them.
            return Loaded::Wait;
        }
        if e.has_data {
            return Loaded::Ready;
        }
        if let Some(s) = e.load_error.take() {
            return Loaded::Failed(s);
        }
        if !has_origin {
            tracing::error!(chunk, "root without an origin cannot read");
            return Loaded::Failed(Status::IoError);
        }
        if !e.loading {
            e.loading = true;
            e.load_stale = false;
            self.actions.push_back(Action::OriginRead { chunk });
        }
        Loaded::Wait
    }

    /// The origin read of `chunk` that [`Action::OriginRead`] asked for
    /// completed (root only): keep the data while requests need it and
    /// serve what waited for it. A completion for a chunk with no read in
    /// flight is ignored, as is data of the wrong size (counted as an I/O
    /// error). If the origin was written while the read was in flight, the
    /// result is discarded and the chunk read again if still needed.
    pub fn origin_loaded(&mut self, chunk: u64, result: Result<Bytes, Status>, now: Millis) {
        let size = self.chunk_size as usize;
        let Some(e) = self.table.get_mut(&chunk) else {
            tracing::debug!(chunk, "origin read completed for no row");
            return;
        };
        if !e.loading {
            tracing::debug!(chunk, "origin read completed but none was in flight");
            return;
        }
        e.loading = false;
        if std::mem::take(&mut e.load_stale) {
            tracing::debug!(chunk, "origin read overtaken by a write; discarded");
        } else {
            match result {
                // Data already here would have come from a write made
                // while reading, which marks the read stale; keep it anyway.
                Ok(d) if d.len() == size => {
                    if !e.has_data {
                        self.set_bytes(chunk, d);
                    }
                }
                Ok(d) => {
                    tracing::error!(
                        chunk,
                        len = d.len(),
                        "origin read returned a wrong-sized chunk"
                    );
                    e.load_error = Some(Status::IoError);
                }
                Err(s) => {
                    tracing::error!(chunk, status = %s, "origin read failed");
                    e.load_error = Some(s);
                }
            }
        }
        self.serve_push_waiters(chunk, now);
        self.run(chunk, now);
        // The error was for the requests waiting now; a later one retries.
        if let Some(e) = self.table.get_mut(&chunk) {
            e.load_error = None;
        }
        self.forget_if_idle(chunk);
    }

    /// Serve an [`Action::OriginRead`] synchronously, on the caller's
    /// thread, from the node's own origin: for tests and drivers without
    /// threads. Same as reading [`Node::origin`] and calling
    /// [`Node::origin_loaded`].
    pub fn serve_origin_read(&mut self, chunk: u64, now: Millis) {
        let size = self.chunk_size as usize;
        let result = match self.origin.as_ref() {
            Some(origin) => {
                let mut buf = BytesMut::zeroed(size);
                match origin.read_chunk(chunk, &mut buf) {
                    Ok(()) => Ok(buf.freeze()),
                    Err(e) => {
                        tracing::error!(chunk, error = %e, "origin read failed");
                        Err(Status::IoError)
                    }
                }
            }
            None => Err(Status::IoError),
        };
        self.origin_loaded(chunk, result, now);
    }

    /// Read-ahead PUSHes that waited for `chunk`'s origin read, if it is
    /// still free to hand out (nothing queued or recalled on it, no writer,
    /// and the child does not hold it yet). Best effort: a failed read
    /// pushes nothing.
    fn serve_push_waiters(&mut self, chunk: u64, now: Millis) {
        let Some(e) = self.table.get_mut(&chunk) else {
            return;
        };
        let waiters = std::mem::take(&mut e.push_waiters);
        let Some(data) = self.chunk_bytes(chunk, false) else {
            return;
        };
        for child in waiters {
            let Some(e) = self.table.get(&chunk) else {
                return;
            };
            let free = e.queue.is_empty()
                && e.recall.is_empty()
                && e.child_perm(child) == Perm::No
                && e.child_writer().is_none();
            if free && self.children.contains_key(&child) {
                self.send_push(child, chunk, data.clone(), now);
            }
        }
    }

    /// At the root, loaded contents nobody waits for are dropped: the
    /// origin is the copy, and keeping every chunk read would hold a whole
    /// cold read in memory.
    fn drop_unneeded_origin_data(&mut self, chunk: u64) {
        if !self.is_root() {
            return;
        }
        if self
            .table
            .get(&chunk)
            .is_some_and(|e| e.queue.is_empty() && !e.loading && !e.writing)
        {
            self.drop_bytes(chunk);
        }
    }

    /// Store `data` as the chunk's newest contents at this node: the root
    /// writes its origin, a child marks its copy dirty.
    ///
    /// At the root neither the write nor its fdatasync runs on the node's
    /// thread: the write is an [`Action::OriginWrite`] (the row keeps the
    /// bytes and reads of the chunk wait until it completes, see
    /// [`Node::origin_written`]), and a request that needs the chunk
    /// durable waits in [`Node::await_durable`]. Requests on other chunks
    /// are served meanwhile. An origin read of the chunk still in flight is
    /// marked stale, since it may return the contents from before this
    /// write.
    ///
    /// `version` is what the writer said of the data's version; the chunk's
    /// new version is assigned here (`version.rs`).
    pub(crate) fn store_data(
        &mut self,
        chunk: u64,
        data: Bytes,
        version: Incoming,
    ) -> Result<(), Status> {
        self.bump_version(chunk, version);
        if self.is_root() {
            if self.origin.is_none() {
                return Ok(());
            }
            let Some(e) = self.table.get_mut(&chunk) else {
                return Ok(());
            };
            if e.loading {
                e.load_stale = true;
            }
            // One write per chunk in flight, so they land in order; a newer
            // one waits (replacing any that waited before it: whole chunks).
            let issue = !e.writing;
            if issue {
                e.writing = true;
            } else {
                e.write_next = Some(data.clone());
            }
            self.set_bytes(chunk, data.clone());
            self.durability_writing(chunk);
            if issue {
                self.actions.push_back(Action::OriginWrite { chunk, data });
            }
            return Ok(());
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            e.dirty = true;
            self.dirty.insert(chunk);
            self.set_bytes(chunk, data);
        }
        Ok(())
    }

    pub(crate) fn clear_dirty(&mut self, chunk: u64) {
        if let Some(e) = self.table.get_mut(&chunk) {
            e.dirty = false;
            e.sync_aged = false;
        }
        self.dirty.remove(&chunk);
    }

    /// Drop our copy and permission (answering the parent or giving back).
    pub(crate) fn drop_copy(&mut self, chunk: u64) {
        self.revoke(chunk);
        self.drop_bytes(chunk);
        if let Some(e) = self.table.get_mut(&chunk) {
            e.held = Perm::No;
            e.dirty = false;
            e.sync_aged = false;
            e.expiry = None;
            e.forward_duty = false;
            e.version = 0;
        }
        self.dirty.remove(&chunk);
    }

    /// Queue a request on its chunk's row and serve what can be served.
    pub(crate) fn enqueue(&mut self, chunk: u64, from: Requester, req: Req, now: Millis) {
        let e = self.table.entry(chunk).or_default();
        e.queue.push_back(Pending {
            from,
            req,
            applied: false,
            propagated: false,
        });
        self.touch(chunk);
        self.run(chunk, now);
        self.maybe_evict(now);
        self.arm_sync(now);
    }

    /// Serve what can be served on `chunk`; stop at the first wait.
    pub(crate) fn run(&mut self, chunk: u64, now: Millis) {
        // Bounded: every pass either returns or pops something.
        loop {
            let Some(e) = self.table.get(&chunk) else {
                return;
            };
            if !e.recall.is_empty() {
                return;
            }
            if let Some(&(xid, target)) = e.parent_inval.front() {
                if !self.answer_parent_invalidate(chunk, xid, target) {
                    return;
                }
                continue;
            }
            if e.up.is_some() {
                return;
            }
            if e.queue.is_empty() {
                self.drop_unneeded_origin_data(chunk);
                self.forget_if_idle(chunk);
                return;
            }
            match self.step(chunk, now) {
                Step::Wait => return,
                Step::Done => {
                    if let Some(e) = self.table.get_mut(&chunk) {
                        e.queue.pop_front();
                    }
                }
            }
        }
    }

    pub(crate) fn forget_if_idle(&mut self, chunk: u64) {
        if self.table.get(&chunk).is_some_and(Entry::is_idle) {
            self.table.remove(&chunk);
        }
    }

    /// Children (other than `except`) whose permission is above `target`.
    fn conflicts(e: &Entry, except: Option<ChildId>, target: Perm) -> Vec<ChildId> {
        e.children
            .iter()
            .filter(|(c, p)| Some(*c) != except && *p > target)
            .map(|(c, _)| *c)
            .collect()
    }

    /// INVALIDATE every child in `victims` down to `target`.
    pub(crate) fn start_recall(&mut self, chunk: u64, victims: Vec<ChildId>, target: Perm) {
        let mut sent = Vec::with_capacity(victims.len());
        for child in victims {
            let xid = self.alloc_xid(Outstanding::Invalidate {
                chunk,
                child,
                target,
            });
            let mut m = Message::new(Opcode::Invalidate, xid);
            m.params.volume_id = Some(self.cfg.child_volume_id);
            m.params.block_num = Some(chunk);
            m.params.permissions = Some(target);
            self.stats.invalidates_sent += 1;
            self.send_child(child, m);
            sent.push((child, xid));
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            e.recall.extend(sent);
        }
    }

    /// Handle the parent's INVALIDATE at the head; false if it must wait.
    fn answer_parent_invalidate(&mut self, chunk: u64, xid: u32, target: Perm) -> bool {
        // Revoked when it arrived; again here, since nothing may read the
        // old copy once the answer is out.
        self.revoke(chunk);
        let Some(e) = self.table.get_mut(&chunk) else {
            return true;
        };
        // A sync node whose answer carries data not yet at the root keeps
        // nothing, and neither do its children: the data is in flight in
        // the answer, and if the link breaks first it is lost while a
        // reader here could have seen it (the simulation's seed 8220).
        // Readers ask the parent again, which serves it only once its own
        // origin has it.
        let target = if self.cfg.write_mode == WriteMode::Sync
            && e.dirty
            && e.held == Perm::Write
            && target > Perm::No
        {
            if let Some(front) = e.parent_inval.front_mut() {
                front.1 = Perm::No;
            }
            Perm::No
        } else {
            target
        };
        let e = &*e;
        // A local lock holds the chunk: the lock's owner releases first.
        if e.pinned > target {
            return false;
        }
        let victims = Self::conflicts(e, None, target);
        if !victims.is_empty() {
            self.start_recall(chunk, victims, target);
            return false;
        }
        let keep = e.held.min(target);
        let carry = e.dirty && e.held == Perm::Write;
        let mut reply = Message::new(Opcode::OkReply, xid);
        reply.params.permissions = Some(keep);
        if carry {
            reply.params.data = self.chunk_bytes(chunk, false);
            reply.params.version = Some(self.version_of(chunk));
        }
        if let Some(v) = self.parent_volume_id() {
            reply.params.volume_id = Some(v);
            reply.params.block_num = Some(chunk);
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            e.parent_inval.pop_front();
        }
        self.clear_dirty(chunk);
        if keep == Perm::No {
            self.drop_copy(chunk);
        } else if let Some(e) = self.table.get_mut(&chunk) {
            e.held = keep;
        }
        if carry {
            self.relay_sent_up(chunk);
        }
        self.send_parent(reply);
        true
    }

    /// A relay sent a writer's record up: it keeps the permission but not
    /// the bytes. It holds no grant signed for that version (grants come
    /// down; the record went up), so a child it served them to would refuse
    /// them; the next request fetches the chunk, with one, from the parent.
    pub(crate) fn relay_sent_up(&mut self, chunk: u64) {
        if self.is_relay() {
            self.drop_bytes(chunk);
        }
    }

    /// One step of the head request.
    fn step(&mut self, chunk: u64, now: Millis) -> Step {
        let Some(e) = self.table.get(&chunk) else {
            return Step::Done;
        };
        let Some(head) = e.queue.front() else {
            return Step::Done;
        };
        let from = head.from.clone();
        let req = head.req.clone();
        let (applied, propagated) = (head.applied, head.propagated);
        let requester = match from {
            Requester::Child { child, .. } => Some(child),
            Requester::Local(_) => None,
        };

        // Requests that need no permission of ours.
        match &req {
            Req::PassUp { sync, keep } => {
                return self.step_pass_up(chunk, &from, *sync, *keep, propagated)
            }
            Req::Forward => return self.step_forward(chunk, &from, propagated),
            _ => {}
        }

        let need = match &req {
            Req::Grant { want, .. } => *want,
            Req::Put { .. } | Req::Write { .. } => Perm::Write,
            Req::Read => Perm::Read,
            Req::Lock { perm } => *perm,
            Req::PassUp { .. } | Req::Forward => Perm::No,
        };

        // A write whose data already went as far as it must is never
        // applied again. Children with the old contents are recalled first,
        // so nobody reads them after the reply. That holds even if we no
        // longer hold WRITE: an INVALIDATE that took it recalled them only
        // down to its own target, and a PUT answered with READ (our parent
        // was invalidated to READ while the write went up) recalled nobody,
        // so children may still hold READ on what this write replaced. With
        // nothing held, no child holds anything and this is a no-op.
        if applied && propagated {
            let target = recall_target(need);
            let victims = Self::conflicts(e, requester, target);
            if !victims.is_empty() {
                self.start_recall(chunk, victims, target);
                return Step::Wait;
            }
            return self.finish_write(chunk, &from, &req, now);
        }

        // Bytes evicted under a permission kept for children that still
        // read the chunk (see `maybe_evict`) are fetched again first.
        let bytes_gone = !self.is_root()
            && self.chunk_size > 0
            && !e.has_data
            && need >= Perm::Read
            && !matches!(req, Req::Lock { .. });
        // A relay holds dirty data only briefly (a child's FLUSH or
        // INVALIDATE answer on its way up), and sends it up before anything
        // else is served on the chunk, a write included: it can vouch for
        // nothing, and a PUT passing it up could otherwise take the version
        // of the copy it holds (the simulation's seed 417).
        if self.is_relay() && e.dirty && e.held == Perm::Write {
            let keep = e.held;
            return if self.flush_up(chunk, true, keep, now) {
                Step::Wait
            } else {
                Step::Done
            };
        }
        // A relay never applies a PUT itself, even holding WRITE: only the
        // trusted node that does can give it a version (its record was
        // sealed under a floor), and the reply brings that version back.
        let relay_put = self.is_relay() && matches!(req, Req::Put { .. });
        if self.usable(e, now) < need || bytes_gone || relay_put {
            // A write that may go up with its data (a sync PUT) waits until
            // no child holds WRITE: that child's copy is newer than ours, so
            // the write must land after it, with a version above its (the
            // simulation's seed 19 had both take the same version).
            if let (Req::Put { .. } | Req::Write { .. }, Some(writer)) = (&req, e.child_writer()) {
                if Some(writer) != requester {
                    self.start_recall(chunk, vec![writer], Perm::No);
                    return Step::Wait;
                }
            }
            return self.acquire(chunk, &req, need, now);
        }

        let target = recall_target(need);
        let victims = Self::conflicts(e, requester, target);
        if !victims.is_empty() {
            self.start_recall(chunk, victims, target);
            return Step::Wait;
        }
        // A local lock held by our own user also conflicts with a child.
        if requester.is_some() && e.pinned > target {
            return Step::Wait;
        }
        // A sync node hands out no data that is not at the root yet (a
        // child's sync write on its way up, or a failed one's data returned
        // in an INVALIDATE answer): it sends it up with FORCE_SYNC first.
        // Otherwise a reader could see a write that a parent failure then
        // loses, and a later reader the older value (found by the
        // simulation breaking proxy links, seed 7664).
        let serves_data = matches!(req, Req::Read | Req::Grant { lock: false, .. });
        if serves_data
            && self.cfg.write_mode == WriteMode::Sync
            && !self.is_root()
            && e.dirty
            && e.held == Perm::Write
        {
            let keep = e.held;
            return if self.flush_up(chunk, true, keep, now) {
                Step::Wait
            } else {
                Step::Done
            };
        }

        match req {
            Req::Grant { want, lock } => {
                // GET always carries data; an upgrading LOCK only if the child
                // lost its copy while the request waited.
                let with_data = !lock
                    || requester.is_some_and(|c| {
                        self.table
                            .get(&chunk)
                            .is_some_and(|e| e.child_perm(c) == Perm::No)
                    });
                if with_data {
                    if let Some(step) = self.wait_for_data(chunk, &from) {
                        return step;
                    }
                }
                self.grant_child(chunk, &from, want, with_data, now);
                Step::Done
            }
            Req::Read => {
                if let Some(step) = self.wait_for_data(chunk, &from) {
                    return step;
                }
                let r = self.read_data(chunk);
                if let Ok(d) = &r {
                    self.publish(chunk, d, now);
                }
                let r = r.map(LocalReply::Data);
                if let Requester::Local(id) = from {
                    self.local_done(id, r);
                }
                Step::Done
            }
            Req::Lock { perm } => {
                if let Some(e) = self.table.get_mut(&chunk) {
                    e.pinned = perm;
                }
                if let Requester::Local(id) = from {
                    self.local_done(id, Ok(LocalReply::Done));
                }
                Step::Done
            }
            Req::Put { .. } | Req::Write { .. } => self.apply_write(chunk, &from, &req, now),
            Req::PassUp { .. } | Req::Forward => Step::Done,
        }
    }

    /// The head request needs the chunk's contents: None when they are
    /// here, otherwise what the step does (wait for the origin read, or
    /// fail the request with its error).
    fn wait_for_data(&mut self, chunk: u64, from: &Requester) -> Option<Step> {
        match self.origin_data(chunk) {
            Loaded::Ready => None,
            Loaded::Wait => Some(Step::Wait),
            Loaded::Failed(s) => {
                self.answer(from, Err(s));
                Some(Step::Done)
            }
        }
    }

    /// Ask the parent for `need` on behalf of the head request.
    fn acquire(&mut self, chunk: u64, req: &Req, need: Perm, now: Millis) -> Step {
        let Some(volume_id) = self.parent_volume_id() else {
            // Not connected: the request fails rather than waiting forever.
            self.fail_head(chunk, Status::ParentUnavailable);
            return Step::Done;
        };
        let Some(e) = self.table.get(&chunk) else {
            return Step::Done;
        };
        // An expired grant's copy may be stale, unless it is dirty: then it
        // is the newest there is.
        let has_data = e.has_data && (self.usable(e, now) >= Perm::Read || e.dirty);
        let full = self.chunk_size as usize;
        // A PUT's data takes a version above any this node knows of the
        // chunk (our copy may be dirty, newer than the root's): otherwise
        // the root could give it the version our older copy has.
        let mut floor = e.version.saturating_add(1);
        let relay = self.is_relay();
        let (op, kind, data, sync) = match req {
            Req::Put {
                data,
                sync,
                version,
                ..
            } if *sync || relay => {
                // A relay cannot re-seal, so the record goes up with the
                // version its writer sealed it under.
                floor = if relay { *version } else { floor.max(*version) };
                (IoOp::Put, UpKind::Put, Some(data.clone()), *sync)
            }
            Req::Write {
                offset: 0,
                data,
                sync,
                semi,
            } if data.len() == full && (*sync || *semi) => {
                (IoOp::Put, UpKind::Put, Some(data.clone()), *sync)
            }
            _ if need == Perm::Write && has_data && e.held >= Perm::Read => {
                (IoOp::Lock, UpKind::Acquire, None, false)
            }
            _ => (IoOp::Get, UpKind::Acquire, None, false),
        };
        let hops = match e.queue.front() {
            Some(Pending {
                from:
                    Requester::Child {
                        hops_left,
                        originator,
                        ..
                    },
                ..
            }) => Some((hops_left.saturating_sub(1), *originator)),
            _ => None,
        };
        let xid = self.alloc_xid(Outstanding::Up { chunk, sent: now });
        let mut m = Message::new(Opcode::IoRequest, xid);
        if sync {
            m.header.flags = m.header.flags.with(Flags::FORCE_SYNC);
        }
        if let Some((hops_left, originator)) = hops {
            m.header.hops_left = hops_left;
            m.header.originator = originator;
        }
        m.params.io_op = Some(op);
        m.params.volume_id = Some(volume_id);
        m.params.block_num = Some(chunk);
        m.params.permissions = Some(need);
        if data.is_some() {
            m.params.version = Some(floor);
        }
        m.params.data = data;
        if let Some(e) = self.table.get_mut(&chunk) {
            e.up = Some((xid, kind));
        }
        if kind == UpKind::Put {
            self.keep_put(chunk, &m);
        }
        self.stats.parent_requests += 1;
        self.send_parent(m);
        Step::Wait
    }

    fn grant_child(
        &mut self,
        chunk: u64,
        from: &Requester,
        want: Perm,
        with_data: bool,
        now: Millis,
    ) {
        let Requester::Child { child, xid, .. } = *from else {
            return;
        };
        let data = if with_data {
            match self.read_data(chunk) {
                Ok(d) => Some(d),
                Err(s) => {
                    self.send_child(child, Message::err_reply(xid, s));
                    return;
                }
            }
        } else {
            None
        };
        let Some(e) = self.table.get(&chunk) else {
            return;
        };
        // A grant renews, never lowers: a child that re-asks after its TTL ran
        // out may still have a subtree holding what it was given.
        let want = want.max(e.child_perm(child));
        self.record_grant(chunk, child, want);
        let ttl = self
            .table
            .get(&chunk)
            .map_or(0, |e| self.ttl_for_child(e, now));
        let mut m = Message::new(Opcode::OkReply, xid);
        m.params.volume_id = Some(self.cfg.child_volume_id);
        m.params.block_num = Some(chunk);
        m.params.permissions = Some(want);
        m.params.ttl_ms = Some(ttl);
        m.params.version = Some(self.version_of(chunk));
        // A child node adopted its parent's HB_TTL on CONNECT; it passes the
        // same value on, unreduced (seed example 1).
        m.params.hb_ttl_ms = Some(self.cfg.hb_ttl_ms);
        if self.chunk_size > 0 {
            m.params.data = data;
        }
        self.send_child(child, m);
        if want == Perm::Read {
            self.push_following(child, chunk, now);
        }
    }

    /// Read-ahead: PUSH the next chunks to a child that just read this one.
    /// At the root a chunk not loaded yet is pushed once its origin read
    /// completes (see [`Node::origin_loaded`]).
    fn push_following(&mut self, child: ChildId, chunk: u64, now: Millis) {
        for k in 1..=u64::from(self.push_ahead) {
            let Some(next) = chunk.checked_add(k) else {
                break;
            };
            if next >= self.num_chunks() || self.chunk_size == 0 {
                break;
            }
            let e = self.table.entry(next).or_default();
            // A chunk being written is not pushed: read-ahead is a hint,
            // and its bytes are not read until the origin has them.
            if e.is_busy()
                || e.writing
                || e.child_perm(child) != Perm::No
                || e.child_writer().is_some()
            {
                continue;
            }
            let e = &self.table[&next];
            if self.usable(e, now) < Perm::Read {
                self.forget_if_idle(next);
                continue;
            }
            match self.origin_data(next) {
                Loaded::Ready => {
                    if let Ok(data) = self.read_data(next) {
                        self.send_push(child, next, data, now);
                    }
                }
                Loaded::Wait => {
                    if let Some(e) = self.table.get_mut(&next) {
                        if !e.push_waiters.contains(&child) {
                            e.push_waiters.push(child);
                        }
                    }
                }
                Loaded::Failed(_) => self.forget_if_idle(next),
            }
        }
    }

    /// Record that `child` holds `perm` on `chunk`, unless its connection
    /// is gone: `child_gone` leaves a request already in progress to
    /// finish, and its grant goes nowhere. Recorded, it would outlive the
    /// connection, and every later conflicting request would INVALIDATE a
    /// child that can never answer and wait forever.
    fn record_grant(&mut self, chunk: u64, child: ChildId, perm: Perm) {
        if !self.children.contains_key(&child) {
            return;
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            e.set_child(child, perm);
        }
    }

    /// PUSH `data` of `chunk` to `child` with READ, recording the grant.
    fn send_push(&mut self, child: ChildId, chunk: u64, data: Bytes, now: Millis) {
        let ttl = self
            .table
            .get(&chunk)
            .map_or(0, |e| self.ttl_for_child(e, now));
        self.record_grant(chunk, child, Perm::Read);
        let xid = self.alloc_xid(Outstanding::Release {
            chunk,
            carried: false,
        });
        let mut m = Message::new(Opcode::Push, xid);
        m.params.volume_id = Some(self.cfg.child_volume_id);
        m.params.block_num = Some(chunk);
        m.params.permissions = Some(Perm::Read);
        m.params.data = Some(data);
        m.params.ttl_ms = Some(ttl);
        m.params.version = Some(self.version_of(chunk));
        // A PUSH has no reply; the XID only names it in traces.
        self.outstanding.remove(&xid);
        self.stats.pushes_sent += 1;
        self.send_child(child, m);
    }

    /// Apply a PUT or local write once we hold WRITE and nothing conflicts.
    fn apply_write(&mut self, chunk: u64, from: &Requester, req: &Req, now: Millis) -> Step {
        let (sync, semi) = match req {
            Req::Put { sync, .. } => (*sync, false),
            Req::Write { sync, semi, .. } => (*sync, *semi),
            _ => (false, false),
        };
        let relay = self.is_relay();
        let applied = self
            .table
            .get(&chunk)
            .and_then(|e| e.queue.front())
            .is_some_and(|p| p.applied);
        if !applied {
            // A partial write merges into the current contents, which the
            // root may first have to read.
            let partial = matches!(req, Req::Write { offset, data, .. }
                if *offset != 0 || data.len() != self.chunk_size as usize);
            if partial {
                if let Some(step) = self.wait_for_data(chunk, from) {
                    return step;
                }
            }
            let (new, floor) = match req {
                Req::Put { data, version, .. } => (Ok(data.clone()), *version),
                Req::Write { offset, data, .. } => (self.merge(chunk, *offset, data), 0),
                _ => (Ok(Bytes::new()), 0),
            };
            let stored = new.and_then(|d| self.store_data(chunk, d, Incoming::Floor(floor)));
            if let Err(s) = stored {
                self.answer(from, Err(s));
                return Step::Done;
            }
            if let Some(p) = self.table.get_mut(&chunk).and_then(|e| e.queue.front_mut()) {
                p.applied = true;
                // The root's origin is as far as data goes. A relay
                // acknowledges nothing itself (only a trusted node can
                // vouch for a write): it passes every write up.
                p.propagated = self.cfg.role == Role::Root || !(sync || semi || relay);
            }
            if let Some(e) = self.table.get_mut(&chunk) {
                e.forward_duty = false;
            }
        }
        let propagated = self
            .table
            .get(&chunk)
            .and_then(|e| e.queue.front())
            .is_some_and(|p| p.propagated);
        if propagated {
            return self.finish_write(chunk, from, req, now);
        }
        // Send it up now: sync to the root, semi-sync to the parent only.
        if !self.flush_up(chunk, sync, Perm::Write, now) {
            return Step::Done;
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            e.forward_duty = semi && !sync;
            if let Some(p) = e.queue.front_mut() {
                p.propagated = true;
            }
        }
        Step::Wait
    }

    /// Merge a partial local write into our copy.
    fn merge(&mut self, chunk: u64, offset: u32, data: &Bytes) -> Result<Bytes, Status> {
        let size = self.chunk_size as usize;
        let off = offset as usize;
        let end = off.checked_add(data.len()).ok_or(Status::OutOfRange)?;
        if end > size {
            return Err(Status::OutOfRange);
        }
        if off == 0 && data.len() == size {
            return Ok(data.clone());
        }
        let old = self.read_data(chunk)?;
        let mut buf = BytesMut::with_capacity(size);
        buf.extend_from_slice(&old);
        buf.resize(size, 0);
        buf[off..end].copy_from_slice(data);
        Ok(buf.freeze())
    }

    /// Send our copy (or, if clean, a barrier) up as the head request's FLUSH.
    /// False when there is no parent to send to (the head has been failed).
    fn flush_up(&mut self, chunk: u64, sync: bool, keep: Perm, now: Millis) -> bool {
        let Some(volume_id) = self.parent_volume_id() else {
            self.fail_head(chunk, Status::ParentUnavailable);
            return false;
        };
        let Some(e) = self.table.get(&chunk) else {
            return false;
        };
        let carry = e.dirty && e.held == Perm::Write;
        let keep = keep.min(e.held);
        let data = if carry {
            self.chunk_bytes(chunk, false)
        } else {
            None
        };
        let xid = self.alloc_xid(Outstanding::Up { chunk, sent: now });
        let mut m = Message::new(Opcode::IoRequest, xid);
        if sync {
            m.header.flags = m.header.flags.with(Flags::FORCE_SYNC);
        }
        m.params.io_op = Some(IoOp::Flush);
        m.params.volume_id = Some(volume_id);
        m.params.block_num = Some(chunk);
        m.params.permissions = Some(keep);
        if data.is_some() {
            m.params.version = Some(self.version_of(chunk));
        }
        m.params.data = data;
        if let Some(e) = self.table.get_mut(&chunk) {
            e.up = Some((xid, UpKind::Flush));
        }
        // The parent applies a FLUSH from a WRITE holder on arrival, so the
        // data is its business from here: a crossing INVALIDATE needs no copy.
        self.clear_dirty(chunk);
        if carry {
            self.relay_sent_up(chunk);
        }
        self.stats.parent_requests += 1;
        self.send_parent(m);
        true
    }

    /// At the root, before answering `from` about `chunk`: wait until the
    /// origin has the chunk's last write and, with `sync`, until it is
    /// durable. `Some` is the step to take instead of answering (wait, or
    /// done after failing the request); `None`: answer now.
    fn await_origin(&mut self, chunk: u64, sync: bool, from: &Requester) -> Option<Step> {
        let state = match self.await_written(chunk) {
            Durable::Ready if sync => self.await_durable(chunk),
            other => other,
        };
        match state {
            Durable::Ready => None,
            Durable::Wait => Some(Step::Wait),
            Durable::Failed => {
                self.answer(from, Err(Status::IoError));
                Some(Step::Done)
            }
        }
    }

    /// Reply to a write whose data is where its mode needs it: at the
    /// root, a sync write waits until the origin has it durably.
    fn finish_write(&mut self, chunk: u64, from: &Requester, req: &Req, now: Millis) -> Step {
        let sync = matches!(
            req,
            Req::Put { sync: true, .. } | Req::Write { sync: true, .. }
        );
        // At the root a write is answered once the origin has it (so a
        // failed write is reported to its writer, as before writes left
        // the node's thread), and a sync one once it is durable.
        if self.is_root() {
            if let Some(step) = self.await_origin(chunk, sync, from) {
                return step;
            }
        }
        match *from {
            Requester::Local(id) => {
                if matches!(req, Req::Write { sync: true, .. }) {
                    // The whole chunk went to the root with FORCE_SYNC (a
                    // full-chunk PUT, or our copy in a FLUSH that pushed
                    // whatever sat above us), so earlier local writes to it
                    // are durable too.
                    self.unsynced.remove(&chunk);
                } else if matches!(req, Req::Write { .. }) {
                    // Acknowledged before the root made it durable: a later
                    // `Sync` must push it there.
                    self.unsynced.insert(chunk);
                }
                self.local_done(id, Ok(LocalReply::Done));
            }
            Requester::Child { child, xid, .. } => {
                let want = match req {
                    Req::Put { want, .. } => *want,
                    _ => Perm::No,
                };
                // If an INVALIDATE took our permission while the data went up,
                // the write still stands but the child gets nothing new. What
                // it already holds stays recorded (a reply never lowers a
                // record, or its own children would outlive it), but with a
                // zero TTL so it renews before using it.
                let fresh = match self.table.get(&chunk) {
                    Some(e)
                        if self.usable(e, now) >= want
                            && Self::conflicts(e, Some(child), recall_target(want)).is_empty() =>
                    {
                        want
                    }
                    _ => Perm::No,
                };
                let record = self
                    .table
                    .get(&chunk)
                    .map_or(Perm::No, |e| e.child_perm(child));
                let granted = fresh.max(record);
                let ttl = if fresh >= granted {
                    self.table
                        .get(&chunk)
                        .map_or(0, |e| self.ttl_for_child(e, now))
                } else {
                    0
                };
                self.record_grant(chunk, child, granted);
                let mut m = Message::new(Opcode::OkReply, xid);
                m.params.volume_id = Some(self.cfg.child_volume_id);
                m.params.block_num = Some(chunk);
                m.params.permissions = Some(granted);
                m.params.ttl_ms = Some(ttl);
                m.params.version = Some(self.version_of(chunk));
                self.send_child(child, m);
            }
        }
        Step::Done
    }

    fn step_pass_up(
        &mut self,
        chunk: u64,
        from: &Requester,
        sync: bool,
        keep: Perm,
        propagated: bool,
    ) -> Step {
        if self.is_root() {
            // A FLUSH's data (applied on arrival) must be on the origin
            // before the reply, so a failed write is refused to its sender.
            if let Some(step) = self.await_origin(chunk, sync, from) {
                return step;
            }
            if sync {
                self.unsynced.remove(&chunk);
            }
            self.answer(from, Ok(LocalReply::Done));
            return Step::Done;
        }
        if propagated && sync {
            // The root has fdatasynced everything this node had sent up on
            // this chunk before the FLUSH, and the FLUSH carried our copy if
            // it was dirty. No write completed meanwhile (this request was at
            // the head of the queue), so every local write acknowledged so far
            // is durable and a semi-sync FORWARD is no longer owed.
            self.unsynced.remove(&chunk);
            if let Some(e) = self.table.get_mut(&chunk) {
                e.forward_duty = false;
            }
        }
        let dirty = self
            .table
            .get(&chunk)
            .is_some_and(|e| e.dirty && e.held == Perm::Write);
        // Not sync and nothing newer than the parent's: nothing to send.
        if propagated || (!sync && !dirty) {
            self.answer(from, Ok(LocalReply::Done));
            return Step::Done;
        }
        let held = self.table.get(&chunk).map_or(Perm::No, |e| e.held);
        // Keep less only if no child still relies on more.
        let floor = self.table.get(&chunk).map_or(Perm::No, |e| {
            e.children.iter().map(|(_, p)| *p).max().unwrap_or(Perm::No)
        });
        if !self.flush_up(chunk, sync, keep.max(floor).min(held), 0) {
            return Step::Done;
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            if e.held > keep.max(floor) {
                e.held = keep.max(floor);
            }
            if let Some(p) = e.queue.front_mut() {
                p.propagated = true;
            }
        }
        Step::Wait
    }

    fn step_forward(&mut self, chunk: u64, from: &Requester, propagated: bool) -> Step {
        let dirty = self
            .table
            .get(&chunk)
            .is_some_and(|e| e.dirty && e.held == Perm::Write);
        if self.is_root() || propagated || !dirty {
            self.answer(from, Ok(LocalReply::Done));
            return Step::Done;
        }
        let keep = self.table.get(&chunk).map_or(Perm::No, |e| e.held);
        if !self.flush_up(chunk, false, keep, 0) {
            return Step::Done;
        }
        if let Some(p) = self.table.get_mut(&chunk).and_then(|e| e.queue.front_mut()) {
            p.propagated = true;
        }
        Step::Wait
    }

    /// Answer a request that carries no chunk contents back.
    pub(crate) fn answer(&mut self, from: &Requester, r: Result<LocalReply, Status>) {
        match *from {
            Requester::Local(id) => self.local_done(id, r),
            Requester::Child { child, xid, .. } => {
                let m = match r {
                    Ok(_) => Message::new(Opcode::OkReply, xid),
                    Err(s) => Message::err_reply(xid, s),
                };
                self.send_child(child, m);
            }
        }
    }

    /// Fail the head request with `status`.
    pub(crate) fn fail_head(&mut self, chunk: u64, status: Status) {
        let Some(e) = self.table.get(&chunk) else {
            return;
        };
        let Some(head) = e.queue.front() else { return };
        let from = head.from.clone();
        self.answer(&from, Err(status));
    }
}

/// What other children may keep while a request for `need` is granted:
/// nothing beside a writer, READ beside a reader.
fn recall_target(need: Perm) -> Perm {
    if need == Perm::Write {
        Perm::No
    } else {
        Perm::Read
    }
}

/// Whether the root has a chunk's contents at hand ([`Node::origin_data`]).
pub(crate) enum Loaded {
    /// Loaded (or no load needed).
    Ready,
    /// An origin read is in flight; the step waits for it.
    Wait,
    /// The origin read failed with this status.
    Failed(Status),
}

/// What one step of a request did.
pub(crate) enum Step {
    /// It waits for a reply; nothing more on this chunk until then.
    Wait,
    /// It finished (successfully or not); pop it.
    Done,
}
