//! The tokio layer around the sans-IO [`Node`].
//!
//! One task owns the node: the state machine is single-threaded by design,
//! so nothing else ever touches it and no lock is needed. Everything else
//! talks to that task over one bounded channel of `Event`s:
//!
//! - an accept task hands over each child connection (its writer channel);
//! - per connection, a reader task splits frames and decodes them, and a
//!   writer task encodes and writes whatever the node sends;
//! - a parent task dials the parent, redials when the link drops or the node
//!   asks for a reset, and hands each new link over the same way;
//! - [`NodeHandle`]s send local requests and wait on a oneshot for the reply;
//! - at the root, origin reads ([`Action::OriginRead`]) run through an
//!   io_uring (whole O_DIRECT chunks) or on tokio's blocking threads, at
//!   most `ORIGIN_READS` at a time, and come back on a channel or an eventfd
//!   of their own (`origin_read.rs`), so the disk sees many requests at
//!   once and the node keeps serving other chunks while one waits. Origin writes
//!   ([`Action::OriginWrite`], at most `ORIGIN_WRITES` at a time, one per
//!   chunk) and fdatasync ([`Action::OriginSync`], one at a time, covering
//!   every write before it: group commit) run there too, so the root's
//!   origin I/O never runs in the node task (a proxy's or leaf's disk tier
//!   still does).
//!
//! The event channel is bounded so that a node that falls behind slows its
//! readers, and through them TCP, instead of queueing without limit. The
//! writer channels are unbounded: the node task must never wait on a peer,
//! or two nodes writing to each other could deadlock. A peer that stops
//! reading therefore costs memory until its heartbeat grace runs out and the
//! node closes it.
//!
//! The clock is milliseconds since a `tokio::time::Instant` taken at start.
//! After every input the node's actions are drained completely, then
//! [`Node::poll_timeout`] says when to wake next.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use canopy_cache::Backing;
use canopy_node::{Action, ChildId, LocalId, LocalOp, LocalReply, Node, NodeStats};
use canopy_proto::frame::{split_frame, FrameBuf};
use canopy_proto::{decode, DecodeError, Message, Opcode, ParamType, Perm, Status};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::cookie::{is_write, wall_ms, CookieStats, Delivery, LinkCookies, ASK_AGAIN};
use crate::origin_read::{read_pooled, BufPool, OriginDone, Reply, UringReads};
use crate::seal::LinkKeys;
use crate::trace::{Direction, PeerName, Tracer};
use crate::view::ReadView;
use canopy_keys::SealedRecord;

/// Events queued to the node task before readers wait for it.
const EVENT_QUEUE: usize = 1024;

/// What a link's reader asks the socket for at most in one read: a few
/// 64 KiB chunk records (see `read_loop`).
const READ_BUF: usize = 512 * 1024;

/// A reader makes room for [`READ_BUF`] more once less than this is free.
const READ_MIN: usize = 64 * 1024;

/// Children's HEARTBEATs queued apart, ahead of everything else (see
/// `deliver`); beyond this many they wait in the ordinary queue.
const HEARTBEAT_QUEUE: usize = 64;

/// Origin reads the root runs at once. Enough to keep a disk's queue busy
/// (and the node's task free) for a tree's worth of readers, bounded so a
/// flood of requests cannot spawn unbounded blocking work: the rest wait
/// in a backlog of chunk numbers.
const ORIGIN_READS: usize = 32;

/// How soon the node task submits io_uring reads again after the kernel
/// refused them for want of resources (EAGAIN, EBUSY).
const SUBMIT_RETRY: Duration = Duration::from_millis(1);

/// Origin writes the root runs at once, for the same reasons; the node
/// keeps at most one per chunk in flight, so they land in order.
const ORIGIN_WRITES: usize = 32;

/// How long one attempt to reach the parent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a trusted node makes its cookie ledger's spends durable and
/// compacts it (`Issuer::sync`). Spends are appended without an fsync
/// each, and until a sync the file only grows.
const LEDGER_SYNC: Duration = Duration::from_secs(60);

/// How long a shutdown waits for writers to drain their queues.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

/// How long a clean stop waits for the parent to confirm the chunks it sent
/// up (async writes) before it gives up and stops anyway.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// A local request could not be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The node answered with this status.
    #[error("{0}")]
    Refused(Status),
    /// The driver has stopped; nothing will answer.
    #[error("STOPPED")]
    Stopped,
}

/// The driver could not become ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// The parent refused our CONNECT (e.g. NO_SUCH_VOLUME).
    #[error("parent refused CONNECT: {0}")]
    Refused(Status),
    /// The driver stopped before it was ready.
    #[error("driver stopped")]
    Stopped,
}

/// Where a driver stands on its way to serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Not yet: the parent link or its CONNECT is pending.
    Starting,
    /// Listening, and (for a child) connected to the parent. A proxy that
    /// connects lazily is ready once its parent link is up, since its own
    /// CONNECT waits for its first child.
    Ready,
    /// The parent answered our CONNECT with this ERR_REPLY status.
    Refused(Status),
    /// The driver has stopped.
    Stopped,
}

/// Counters and state, for `stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStats {
    /// The node's name.
    pub name: String,
    /// Whether this node is the volume's root.
    pub root: bool,
    /// Whether local requests can be served now.
    pub ready: bool,
    /// Whether a transport link to the parent is up.
    pub parent_link: bool,
    /// Child connections open.
    pub children: usize,
    /// Chunk size in bytes (0 until connected).
    pub chunk_size: u32,
    /// Volume size in bytes (0 until connected).
    pub volume_size: u64,
    /// The node's own counters, flattened into the same JSON object.
    #[serde(flatten)]
    pub node: NodeStats,
    /// Messages that did not decode, and streams whose framing was lost.
    pub decode_errors: u64,
    /// Chunk records refused: a bad signature or tag, or data sent unsealed
    /// on a volume with keys (each answered BAD_VERIFIER, none stored or
    /// forwarded).
    #[serde(default)]
    pub bad_records: u64,
    /// Of those, the ones from the parent.
    #[serde(default)]
    pub bad_records_from_parent: u64,
    /// Times the parent was dropped for sending too many bad records.
    #[serde(default)]
    pub parents_failed: u64,
    /// The cache stack's tiers and victim repository (a proxy or leaf
    /// once connected to a volume with data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<canopy_cache::StackStats>,
    /// Write cookies and receipts (a volume with keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookies: Option<CookieStats>,
    /// Grants from the parent that claimed a TTL past their signed expiry
    /// (lowered to it): a relay withholding invalidations shows here.
    #[serde(default)]
    pub grant_overclaims: u64,
    /// Bytes written to the sockets of every link, parent and children,
    /// since start (frames as sent: sealed records, headers, everything).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes read from the sockets of every link since start.
    #[serde(default)]
    pub bytes_received: u64,
}

/// Bytes through a node's sockets, all its links together: what a tree
/// costs its root in bandwidth (issue 5, B4) is a figure of its own, not
/// one derived from message counts.
#[derive(Debug, Default)]
struct LinkBytes {
    sent: AtomicU64,
    received: AtomicU64,
}

/// Which link a reader serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Child(ChildId),
    /// The parent link of this generation: a message still in flight from a
    /// link we already dropped must not reach the node as if from the new one.
    Parent(u64),
}

/// A link's sending side, as the node task holds it.
struct Link {
    tx: mpsc::UnboundedSender<Message>,
    /// Stops the link's reader (a close we decide on).
    close: Arc<Notify>,
    writer: JoinHandle<()>,
    /// The link's writes in flight (cookies and receipts).
    cookies: Arc<LinkCookies>,
}

impl Link {
    fn close(self) -> JoinHandle<()> {
        self.close.notify_one();
        // Dropping `tx` lets the writer finish its queue, then shut down.
        self.writer
    }
}

/// A closed child link's cookie state, kept for the node's answers to the
/// writes admitted on it (see `NodeTask::orphan`).
struct Orphan {
    cookies: Arc<LinkCookies>,
    /// The link's reader has ended: no more writes will be admitted on it.
    reader_done: bool,
}

/// Inputs to the node task.
// Nearly every event is a `Msg`, so boxing the message would add an
// allocation to the common case to shrink the rare ones.
#[allow(clippy::large_enum_variant)]
enum Event {
    ChildUp {
        id: ChildId,
        peer: SocketAddr,
        link: Link,
    },
    ParentUp {
        gen: u64,
        link: Link,
    },
    Msg(Source, Message),
    Bad(Source, DecodeError),
    /// A stream whose framing was lost (the link then closes).
    FramingLost(Source),
    /// A message whose chunk record, receipt or cookie failed its check
    /// (`seal.rs`, `cookie.rs`).
    BadRecord(Source, Message, Refused),
    Closed(Source),
    Local(LocalOp, oneshot::Sender<Result<LocalReply, Status>>),
    Stats(oneshot::Sender<PeerStats>),
    Unsynced(oneshot::Sender<Vec<u64>>),
}

/// Why the links refused a message, and how to answer it.
struct Refused {
    why: String,
    status: Status,
    /// The parameter at fault.
    param: ParamType,
    /// For a write whose cookie was spent on it: its original receipt.
    receipt: Option<Bytes>,
}

impl Refused {
    fn record(why: String) -> Self {
        Refused {
            why,
            status: Status::BadVerifier,
            param: ParamType::Data,
            receipt: None,
        }
    }
}

/// Sends local requests to a running node. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Event>,
}

impl NodeHandle {
    async fn request(&self, op: LocalOp) -> Result<LocalReply, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Event::Local(op, tx))
            .await
            .map_err(|_| RequestError::Stopped)?;
        match rx.await {
            Ok(r) => r.map_err(RequestError::Refused),
            Err(_) => Err(RequestError::Stopped),
        }
    }

    /// Read a whole chunk.
    pub async fn read(&self, chunk: u64) -> Result<Bytes, RequestError> {
        match self.request(LocalOp::Read { chunk }).await? {
            LocalReply::Data(d) => Ok(d),
            // A read always answers with data; anything else is a node bug,
            // reported rather than trusted.
            LocalReply::Done => Err(RequestError::Refused(Status::IoError)),
        }
    }

    /// Write `data` at `offset` in `chunk`; acknowledged per the write mode,
    /// or once the root has it durably when `force_sync` is set.
    pub async fn write(
        &self,
        chunk: u64,
        offset: u32,
        data: Bytes,
        force_sync: bool,
    ) -> Result<(), RequestError> {
        self.request(LocalOp::Write {
            chunk,
            offset,
            data,
            force_sync,
        })
        .await
        .map(drop)
    }

    /// Take (`Read`, `Write`) or release (`No`) a lock on `chunk`.
    pub async fn lock(&self, chunk: u64, perm: Perm) -> Result<(), RequestError> {
        self.request(LocalOp::Lock { chunk, perm }).await.map(drop)
    }

    /// Make every write to `chunk` acknowledged so far durable at the root,
    /// keeping the permission held.
    pub async fn sync(&self, chunk: u64) -> Result<(), RequestError> {
        self.request(LocalOp::Sync { chunk }).await.map(drop)
    }

    /// A device FLUSH: make every write acknowledged so far durable at the
    /// root. Only chunks whose newest data may not be there yet are sent
    /// (none in sync mode), all at once.
    pub async fn flush(&self) -> Result<(), RequestError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Event::Unsynced(tx))
            .await
            .map_err(|_| RequestError::Stopped)?;
        let chunks = rx.await.map_err(|_| RequestError::Stopped)?;
        let mut syncs = JoinSet::new();
        for chunk in chunks {
            let h = self.clone();
            syncs.spawn(async move { h.sync(chunk).await });
        }
        join_all(syncs).await
    }

    /// The node's counters and state.
    pub async fn stats(&self) -> Result<PeerStats, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Event::Stats(tx))
            .await
            .map_err(|_| RequestError::Stopped)?;
        rx.await.map_err(|_| RequestError::Stopped)
    }
}

/// Wait for every request in `tasks` and return the first failure, if any.
/// Every request runs to its end even after one failed, so none is left
/// half-done behind the error the caller reports.
pub async fn join_all(mut tasks: JoinSet<Result<(), RequestError>>) -> Result<(), RequestError> {
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let r = joined.map_err(|_| RequestError::Stopped).and_then(|r| r);
        if result.is_ok() {
            result = r;
        }
    }
    result
}

/// What the driver is given besides the node.
pub struct DriverOptions {
    /// Name in logs and traces.
    pub name: String,
    /// An already bound listener for children, if this node serves any.
    /// Binding is the caller's business so that a bind error surfaces before
    /// anything starts, and a test can bind port 0 and learn the port.
    pub listener: Option<TcpListener>,
    /// The parent's address (`HOST:PORT`), for a non-root node.
    pub parent: Option<String>,
    /// The protocol trace, if any.
    pub trace: Option<Tracer>,
    /// Where to keep the node's published reads (a node with
    /// `publish_reads`), for readers outside the driver.
    pub view: Option<Arc<ReadView>>,
    /// The volume's keys, on a volume made with them: every link seals or
    /// checks chunk data (`seal.rs`).
    pub keys: Option<LinkKeys>,
    /// Records from the parent that fail their check before this node
    /// counts its parent as misbehaving and drops the link (0: never).
    pub max_parent_faults: u32,
    /// A root's origin file, also held by the node as its backing: the
    /// driver reads its whole O_DIRECT chunks through io_uring
    /// (`origin_read.rs`). Without it, or without io_uring, origin reads
    /// run on blocking threads.
    pub origin_store: Option<Arc<canopy_origin::OriginStore>>,
}

/// A running driver.
pub struct Peer {
    handle: NodeHandle,
    local_addr: Option<SocketAddr>,
    ready: watch::Receiver<Readiness>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Peer {
    /// Sends local requests.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// The address children connect to, if this node listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Wait until the node is ready (see [`Readiness::Ready`]).
    pub async fn ready(&self) -> Result<(), DriverError> {
        let mut rx = self.ready.clone();
        let r = rx
            .wait_for(|r| *r != Readiness::Starting)
            .await
            .map(|r| *r)
            .unwrap_or(Readiness::Stopped);
        match r {
            Readiness::Ready => Ok(()),
            Readiness::Refused(s) => Err(DriverError::Refused(s)),
            Readiness::Starting | Readiness::Stopped => Err(DriverError::Stopped),
        }
    }

    /// Where the driver stands now.
    pub fn readiness(&self) -> Readiness {
        *self.ready.borrow()
    }

    /// Stop accepting, say DISCONNECT to the parent, let writers drain (for
    /// a bounded time) and stop.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "driver task failed");
        }
    }
}

/// Start the driver for `node` on the current tokio runtime.
pub fn start(node: Node, opts: DriverOptions) -> Peer {
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (heartbeats_tx, heartbeats_rx) = mpsc::channel(HEARTBEAT_QUEUE);
    let (ready_tx, ready_rx) = watch::channel(Readiness::Starting);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let local_addr = opts.listener.as_ref().and_then(|l| l.local_addr().ok());

    let keys = opts.keys.map(Arc::new);
    let bytes = Arc::new(LinkBytes::default());
    let acceptor = opts.listener.map(|l| {
        tokio::spawn(accept_loop(
            l,
            events_tx.clone(),
            heartbeats_tx.clone(),
            opts.name.clone(),
            keys.clone(),
            bytes.clone(),
        ))
    });
    let (reset_tx, reset_rx) = mpsc::unbounded_channel();
    let dialer = opts.parent.map(|addr| {
        tokio::spawn(parent_loop(
            addr,
            events_tx.clone(),
            reset_rx,
            keys.clone(),
            bytes.clone(),
        ))
    });
    let lazy = node.config().connect_lazily;
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (synced_tx, synced_rx) = mpsc::unbounded_channel();
    let (written_tx, written_rx) = mpsc::unbounded_channel();
    let origin = node.origin();
    let pool = origin
        .as_ref()
        .map(|_| BufPool::new(node.chunk_size() as usize));
    let uring = match (&opts.origin_store, &pool) {
        (Some(store), Some(pool)) => {
            match UringReads::new(store.clone(), pool.clone(), ORIGIN_READS) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::info!(node = %opts.name, error = %e, "io_uring unavailable; origin reads on blocking threads");
                    None
                }
            }
        }
        _ => None,
    };
    let reads = OriginReads {
        origin,
        pool,
        uring,
        reaped: Vec::new(),
        in_flight: 0,
        backlog: VecDeque::new(),
        done_tx,
        done_rx,
        synced_tx,
        synced_rx,
        writes_in_flight: 0,
        write_backlog: VecDeque::new(),
        written_tx,
        written_rx,
    };
    let ledger_sync = keys.clone().map(|k| {
        let span = tracing::info_span!("node", name = %opts.name);
        tokio::spawn(tracing::Instrument::instrument(
            sync_ledger_every(k, LEDGER_SYNC),
            span,
        ))
    });
    let task = NodeTask {
        node,
        name: opts.name,
        start: Instant::now(),
        timer_floor: 0,
        events: events_rx,
        heartbeats: heartbeats_rx,
        children: HashMap::new(),
        orphans: HashMap::new(),
        parent: None,
        reset_tx,
        pending: HashMap::new(),
        next_local: 1,
        trace: opts.trace,
        ready: ready_tx,
        lazy,
        decode_errors: 0,
        bad_records: 0,
        bad_records_from_parent: 0,
        parent_faults: 0,
        max_parent_faults: opts.max_parent_faults,
        parents_failed: 0,
        acceptor,
        dialer,
        ledger_sync,
        reads,
        view: opts.view,
        keys: keys.clone(),
        bytes,
    };
    // The node's own logs (`canopy_node`) do not know its name: the span
    // gives them it, so that a tree in one process, or nodes sharing a log
    // file, can be told apart.
    let span = tracing::info_span!("node", name = %task.name);
    let task = tokio::spawn(tracing::Instrument::instrument(task.run(shutdown_rx), span));
    Peer {
        handle: NodeHandle { tx: events_tx },
        local_addr,
        ready: ready_rx,
        shutdown: shutdown_tx,
        task,
    }
}

/// The root's origin reads (see [`ORIGIN_READS`]).
struct OriginReads {
    /// Shared with the node, which only reads its geometry.
    origin: Option<Arc<dyn Backing>>,
    /// Chunk buffers for the reads (made once the chunk size is known: a
    /// root knows it from the start).
    pool: Option<Arc<BufPool>>,
    /// Reads of whole O_DIRECT chunks through io_uring, when available.
    uring: Option<UringReads>,
    /// Completions reaped from the ring, kept to reuse the allocation.
    reaped: Vec<OriginDone>,
    /// Reads running on blocking threads.
    in_flight: usize,
    /// Chunks to read once fewer than [`ORIGIN_READS`] run. The node asks
    /// at most once per chunk until answered, so this holds each chunk once.
    backlog: VecDeque<u64>,
    /// Completions, unbounded because at most [`ORIGIN_READS`] are ever
    /// outstanding.
    done_tx: mpsc::UnboundedSender<OriginDone>,
    done_rx: mpsc::UnboundedReceiver<OriginDone>,
    /// fdatasync completions ([`Action::OriginSync`]); the node keeps at
    /// most one in flight.
    synced_tx: mpsc::UnboundedSender<Result<(), Status>>,
    synced_rx: mpsc::UnboundedReceiver<Result<(), Status>>,
    /// Writes running on blocking threads ([`ORIGIN_WRITES`] at most).
    writes_in_flight: usize,
    /// Writes to run once fewer run: each chunk at most once (the node
    /// keeps one write per chunk in flight).
    write_backlog: VecDeque<(u64, Bytes)>,
    written_tx: mpsc::UnboundedSender<(u64, Result<(), Status>)>,
    written_rx: mpsc::UnboundedReceiver<(u64, Result<(), Status>)>,
}

/// The task that owns the node.
struct NodeTask {
    node: Node,
    name: String,
    start: Instant,
    /// Never wake for a timer before this ms: handle_timeout already ran at
    /// the previous ms, so a timer still due then would only spin.
    timer_floor: u64,
    events: mpsc::Receiver<Event>,
    /// Children's HEARTBEATs, served before `events` (see `run`).
    heartbeats: mpsc::Receiver<Event>,
    children: HashMap<ChildId, Link>,
    /// The cookie state of closed child links whose admitted writes the
    /// node may not have answered yet: their answers still spend the
    /// cookies (`LinkKeys::link_closed`).
    orphans: HashMap<ChildId, Orphan>,
    parent: Option<(u64, Link)>,
    /// Tells the parent task to drop link `gen` and dial again.
    reset_tx: mpsc::UnboundedSender<u64>,
    pending: HashMap<u64, oneshot::Sender<Result<LocalReply, Status>>>,
    next_local: u64,
    trace: Option<Tracer>,
    ready: watch::Sender<Readiness>,
    lazy: bool,
    decode_errors: u64,
    bad_records: u64,
    bad_records_from_parent: u64,
    /// Bad records from the current parent link since the last reset.
    parent_faults: u32,
    max_parent_faults: u32,
    parents_failed: u64,
    acceptor: Option<JoinHandle<()>>,
    dialer: Option<JoinHandle<()>>,
    /// Syncs the cookie ledger every [`LEDGER_SYNC`].
    ledger_sync: Option<JoinHandle<()>>,
    reads: OriginReads,
    view: Option<Arc<ReadView>>,
    /// The volume's keys, for the cookie stats.
    keys: Option<Arc<LinkKeys>>,
    /// Socket bytes of every link, for the stats.
    bytes: Arc<LinkBytes>,
}

impl NodeTask {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.update_readiness(None);
        // Set once a stop was asked for and chunks went up: the loop keeps
        // serving the parent's answers until they are all in, or this passes.
        let mut releasing: Option<Instant> = None;
        loop {
            let wake = self
                .node
                .poll_timeout()
                // A deadline past what Instant can hold (TTLs come from
                // peers) is as good as none, rather than a panic.
                .and_then(|t| {
                    self.start
                        .checked_add(Duration::from_millis(t.max(self.timer_floor)))
                });
            let wake = match (wake, releasing) {
                (Some(w), Some(r)) => Some(w.min(r)),
                (w, r) => w.or(r),
            };
            // io_uring refused reads for now: come back soon to submit
            // them (`drain` does), as no completion may come to prompt it.
            let wake = if self.reads.uring.as_ref().is_some_and(UringReads::deferred) {
                let retry = Instant::now() + SUBMIT_RETRY;
                Some(wake.map_or(retry, |w| w.min(retry)))
            } else {
                wake
            };
            tokio::select! {
                biased;
                r = shutdown.changed(), if releasing.is_none() => {
                    // A dropped sender means the Peer is gone: stop as well.
                    if r.is_err() || *shutdown.borrow() {
                        // A clean stop first sends dirty chunks up and gives
                        // back what it holds, so async writes survive it.
                        let sent = self.node.release_all(self.now());
                        self.drain();
                        if sent == 0 || self.node.releases_in_flight() == 0 {
                            break;
                        }
                        tracing::info!(node = %self.name, chunks = sent, "sending chunks up before stopping");
                        releasing = Some(Instant::now() + RELEASE_WAIT);
                        continue;
                    }
                }
                // Before new requests: an fdatasync completion answers the
                // sync writes and barriers that waited for it.
                Some(r) = self.reads.synced_rx.recv() => {
                    self.node.origin_synced(r, self.now());
                }
                // Before new requests: a write completion answers its
                // writer and the reads that waited for it.
                Some((chunk, r)) = self.reads.written_rx.recv() => {
                    self.reads.writes_in_flight = self.reads.writes_in_flight.saturating_sub(1);
                    self.node.origin_written(chunk, r, self.now());
                    while self.reads.writes_in_flight < ORIGIN_WRITES {
                        let Some((c, d)) = self.reads.write_backlog.pop_front() else { break };
                        self.spawn_origin_write(c, d);
                    }
                }
                // The same for reads through io_uring.
                () = uring_ready(self.reads.uring.as_ref()) => {
                    let mut done = std::mem::take(&mut self.reads.reaped);
                    if let Some(u) = self.reads.uring.as_mut() {
                        u.reap(&mut done);
                    }
                    for (chunk, r) in done.drain(..) {
                        self.reads.in_flight = self.reads.in_flight.saturating_sub(1);
                        self.node.origin_loaded(chunk, r, self.now());
                    }
                    self.reads.reaped = done;
                    while self.reads.in_flight < ORIGIN_READS {
                        let Some(next) = self.reads.backlog.pop_front() else { break };
                        self.spawn_origin_read(next);
                    }
                }
                // Before new requests: a completion frees a read slot and
                // answers requests that already waited.
                Some((chunk, r)) = self.reads.done_rx.recv() => {
                    self.reads.in_flight = self.reads.in_flight.saturating_sub(1);
                    self.node.origin_loaded(chunk, r, self.now());
                    while self.reads.in_flight < ORIGIN_READS {
                        let Some(next) = self.reads.backlog.pop_front() else { break };
                        self.spawn_origin_read(next);
                    }
                }
                // Timers before requests: under a steady stream of events
                // (mkfs discarding a device through a slow VM) `events` is
                // never empty, and a biased select that polled it first
                // would never send our HEARTBEATs, so the parent would count
                // us as failed after 3 × HB_TTL (scenario h under load).
                // `timer_floor` keeps this to once a millisecond at most.
                () = sleep_until_opt(wake) => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                    self.timer_floor = now.saturating_add(1);
                }
                // A child's HEARTBEAT jumps the queue: an idle child under
                // a parent busy with another child's writes would otherwise
                // wait behind up to EVENT_QUEUE of them for its answer, and
                // in a slow VM that took longer than HB_TTL (scenario h).
                Some(ev) = self.heartbeats.recv() => {
                    self.on_event(ev);
                    self.drain();
                }
                ev = self.events.recv() => {
                    // The handle in `Peer` keeps the channel open until the
                    // Peer is dropped, and that closes `shutdown` too.
                    let Some(ev) = ev else { break };
                    self.on_event(ev);
                }
            }
            self.drain();
            if let Some(deadline) = releasing {
                if self.node.releases_in_flight() == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(node = %self.name, unanswered = self.node.releases_in_flight(), "parent did not confirm every chunk sent up before the stop");
                    break;
                }
            }
        }
        // Nothing revokes once the node stops: readers must ask (and fail).
        if let Some(v) = &self.view {
            v.clear();
        }
        self.stop().await;
    }

    fn on_event(&mut self, ev: Event) {
        let now = self.now();
        match ev {
            Event::ChildUp { id, peer, link } => {
                tracing::info!(node = %self.name, child = id, %peer, "child connected");
                self.children.insert(id, link);
            }
            Event::ParentUp { gen, link } => {
                tracing::info!(node = %self.name, "parent link up");
                self.parent_faults = 0;
                if let Some((_, old)) = self.parent.replace((gen, link)) {
                    // Cannot happen (the dialer waits for a link to end before
                    // the next), but an old link must not linger if it does.
                    drop(old.close());
                    self.node.parent_down(now);
                }
                self.node.parent_up(now);
            }
            Event::Msg(Source::Child(id), m) => {
                if !self.children.contains_key(&id) {
                    // Closed by us; its last messages are moot. A write
                    // among them was admitted with its cookie: it fails.
                    if !m.header.opcode.is_reply() {
                        let r = Message::err_reply(m.header.xid, Status::ParentUnavailable);
                        self.answer_orphan(id, r);
                    }
                    return;
                }
                self.record(Direction::Recv, PeerName::Child(id), &m);
                self.node.handle_child(id, m, now);
            }
            Event::Msg(Source::Parent(gen), m) => {
                if !self.parent_is(gen) {
                    return;
                }
                self.record(Direction::Recv, PeerName::Parent, &m);
                let was_ready = self.node.is_ready();
                let refusal = (m.header.opcode == Opcode::ErrReply)
                    .then(|| m.params.status.unwrap_or(Status::IoError));
                self.node.handle_parent(m, now);
                // Before CONNECT is answered, the only request we have out is
                // the CONNECT: an ERR_REPLY that leaves us unready refused it.
                if !was_ready && !self.node.is_ready() {
                    self.update_readiness(refusal);
                }
            }
            Event::Bad(src, e) => {
                self.decode_errors += 1;
                tracing::warn!(node = %self.name, peer = %self.peer_name(src), error = %e, "undecodable message");
                if let Some(reply) = e.to_err_reply() {
                    match src {
                        Source::Child(id) => self.send_child(id, reply),
                        Source::Parent(gen) if self.parent_is(gen) => self.send_parent(reply),
                        Source::Parent(_) => {}
                    }
                } else if let (Some(xid), true) = (e.xid, e.opcode.is_some_and(Opcode::is_reply)) {
                    // A reply we cannot read: fail the request it answers,
                    // rather than leave it waiting for an answer that came.
                    let mut r = Message::err_reply(xid, e.status);
                    r.params.err_param = e.err_param;
                    match src {
                        Source::Child(id) if self.children.contains_key(&id) => {
                            self.node.handle_child(id, r, now);
                        }
                        Source::Parent(gen) if self.parent_is(gen) => {
                            self.node.handle_parent(r, now);
                        }
                        _ => {}
                    }
                }
                // On a volume with keys the parent may be a relay: garbled
                // messages count against it like bad records.
                if let (Source::Parent(gen), true) = (src, self.keys.is_some()) {
                    if self.parent_is(gen) {
                        self.parent_fault(gen, now);
                    }
                }
            }
            Event::BadRecord(src, m, r) => self.bad_record(src, m, r, now),
            Event::FramingLost(src) => {
                self.decode_errors += 1;
                tracing::warn!(node = %self.name, peer = %self.peer_name(src), "framing lost");
            }
            Event::Closed(Source::Child(id)) => {
                // The reader's last event: nothing more is admitted on it.
                if let Some(link) = self.children.remove(&id) {
                    tracing::info!(node = %self.name, child = id, "child disconnected");
                    self.orphan(id, &link, true);
                    drop(link.close());
                } else if let Some(o) = self.orphans.get_mut(&id) {
                    o.reader_done = true;
                }
                self.prune_orphan(id);
                // Also after a close we decided on: the node may still hold
                // state for a child that never finished CONNECT.
                self.node.child_gone(id, now);
            }
            Event::Closed(Source::Parent(gen)) => {
                if self.parent_is(gen) {
                    tracing::warn!(node = %self.name, "parent link lost");
                    if let Some((_, link)) = self.parent.take() {
                        drop(link.close());
                    }
                    self.node.parent_down(now);
                }
            }
            Event::Local(op, reply) => {
                let id = self.next_local;
                self.next_local += 1;
                self.pending.insert(id, reply);
                self.node.local(LocalId(id), op, now);
            }
            Event::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Event::Unsynced(reply) => {
                let _ = reply.send(self.node.unsynced_chunks());
            }
        }
    }

    /// A message whose record, receipt or cookie failed its check:
    /// counted, never given to the node as it came. A request is refused
    /// with the refusal's status (BAD_VERIFIER for a record or receipt,
    /// NO_PERMISSION or COOKIE_SPENT for a cookie); a reply becomes an
    /// ERR_REPLY with it for the request it answers, so the requester fails
    /// (and may retry) instead of waiting; a PUSH is dropped. A parent that
    /// sends `max_parent_faults` bad records or receipts is counted as
    /// failed: the link is dropped and the node runs its parent loss.
    /// (Re-attaching to another parent comes with failure recovery; this is
    /// where it will hook in.)
    fn bad_record(&mut self, src: Source, m: Message, r: Refused, now: u64) {
        if let Source::Parent(gen) = src {
            if !self.parent_is(gen) {
                return;
            }
        } else if let Source::Child(id) = src {
            if !self.children.contains_key(&id) {
                return;
            }
        }
        // Cookie refusals are counted in the cookie stats; a bad record or
        // receipt here.
        let bad = r.status == Status::BadVerifier;
        if bad {
            self.bad_records += 1;
            tracing::warn!(node = %self.name, peer = %self.peer_name(src), msg = %m, reason = %r.why, "chunk record refused");
        } else {
            tracing::warn!(node = %self.name, peer = %self.peer_name(src), msg = %m, reason = %r.why, status = %r.status, "write refused");
        }
        let xid = m.header.xid;
        let refuse = || {
            let mut e = Message::err_reply(xid, r.status);
            e.params.err_param = Some(r.param as u16);
            e.params.receipt = r.receipt.clone();
            e
        };
        match (m.header.opcode, src) {
            (Opcode::IoRequest | Opcode::Forward, Source::Child(id)) => {
                self.send_child(id, refuse());
            }
            (Opcode::OkReply, Source::Child(id)) => {
                self.record(Direction::Recv, PeerName::Child(id), &m);
                self.node.handle_child(id, refuse(), now);
            }
            (Opcode::OkReply, Source::Parent(_)) => {
                self.record(Direction::Recv, PeerName::Parent, &m);
                self.node.handle_parent(refuse(), now);
            }
            _ => {}
        }
        if let (Source::Parent(gen), true) = (src, bad) {
            self.bad_records_from_parent += 1;
            self.parent_fault(gen, now);
        }
    }

    /// The parent (of link generation `gen`) sent a bad record, receipt or
    /// message: after `max_parent_faults` it is counted as failed, the link
    /// dropped and the node runs its parent loss. (Re-attaching to another
    /// parent comes with failure recovery; this is where it will hook in.)
    fn parent_fault(&mut self, gen: u64, now: u64) {
        self.parent_faults += 1;
        if self.max_parent_faults > 0 && self.parent_faults >= self.max_parent_faults {
            tracing::error!(
                node = %self.name,
                faults = self.parent_faults,
                "parent sent too many bad records or messages; counting it as failed"
            );
            self.parents_failed += 1;
            self.parent_faults = 0;
            if let Some((_, link)) = self.parent.take() {
                drop(link.close());
                let _ = self.reset_tx.send(gen);
            }
            self.node.parent_down(now);
        }
    }

    fn parent_is(&self, gen: u64) -> bool {
        self.parent.as_ref().is_some_and(|(g, _)| *g == gen)
    }

    fn peer_name(&self, src: Source) -> PeerName {
        match src {
            Source::Child(id) => PeerName::Child(id),
            Source::Parent(_) => PeerName::Parent,
        }
    }

    /// Carry out everything the node asked for, then re-check readiness.
    fn drain(&mut self) {
        while let Some(a) = self.node.poll_action() {
            match a {
                Action::ToParent(m) => self.send_parent(m),
                Action::ToChild(id, m) => self.send_child(id, m),
                Action::CloseChild(id) => {
                    if let Some(link) = self.children.remove(&id) {
                        tracing::warn!(node = %self.name, child = id, "closing child");
                        self.orphan(id, &link, false);
                        drop(link.close());
                    }
                }
                Action::LocalDone(id, r) => {
                    if let Some(tx) = self.pending.remove(&id.0) {
                        // The requester may have given up; that is its business.
                        let _ = tx.send(r);
                    }
                }
                Action::ResetParent => {
                    // The node has already called parent_down on itself.
                    if let Some((gen, link)) = self.parent.take() {
                        drop(link.close());
                        let _ = self.reset_tx.send(gen);
                    }
                }
                Action::Publish {
                    chunk,
                    data,
                    expiry,
                } => {
                    if let Some(v) = &self.view {
                        // Past what Instant can hold is as good as no limit.
                        let until = expiry.and_then(|ms| {
                            self.start.into_std().checked_add(Duration::from_millis(ms))
                        });
                        v.publish(chunk, data, until);
                    }
                }
                Action::Revoke { chunk } => {
                    if let Some(v) = &self.view {
                        v.revoke(chunk);
                    }
                }
                Action::OriginSync => self.spawn_origin_sync(),
                Action::OriginWrite { chunk, data } => {
                    if self.reads.writes_in_flight < ORIGIN_WRITES {
                        self.spawn_origin_write(chunk, data);
                    } else {
                        self.reads.write_backlog.push_back((chunk, data));
                    }
                }
                Action::OriginRead { chunk } => {
                    if self.reads.in_flight < ORIGIN_READS {
                        self.spawn_origin_read(chunk);
                    } else {
                        self.reads.backlog.push_back(chunk);
                    }
                }
            }
        }
        // The reads this wakeup asked for go to the kernel in one call.
        if let Some(u) = self.reads.uring.as_mut() {
            u.submit();
        }
        self.update_readiness(None);
    }

    /// Write `chunk` to the origin on a blocking thread; the result comes
    /// back on `reads.written_rx`.
    fn spawn_origin_write(&mut self, chunk: u64, data: Bytes) {
        let Some(origin) = self.reads.origin.clone() else {
            // The node asks only when it has an origin.
            tracing::error!(node = %self.name, chunk, "origin write asked for without an origin");
            let now = self.now();
            self.node.origin_written(chunk, Err(Status::IoError), now);
            return;
        };
        let done = self.reads.written_tx.clone();
        self.reads.writes_in_flight += 1;
        let write = tokio::task::spawn_blocking(move || {
            origin.write_chunk(chunk, &data).map_err(|e| {
                tracing::error!(chunk, error = %e, "origin write failed");
                Status::IoError
            })
        });
        // Awaited on a task of its own so that a panicking write still
        // frees its slot and answers its writer (with an error).
        tokio::spawn(async move {
            let r = write.await.unwrap_or_else(|e| {
                tracing::error!(chunk, error = %e, "origin write task failed");
                Err(Status::IoError)
            });
            let _ = done.send((chunk, r));
        });
    }

    /// fdatasync the origin on a blocking thread, so the node serves on
    /// meanwhile; the result comes back on `reads.synced_rx`.
    fn spawn_origin_sync(&mut self) {
        let Some(origin) = self.reads.origin.clone() else {
            // Nothing to make durable.
            let now = self.now();
            self.node.origin_synced(Ok(()), now);
            return;
        };
        let done = self.reads.synced_tx.clone();
        let sync = tokio::task::spawn_blocking(move || {
            origin.sync().map_err(|e| {
                tracing::error!(error = %e, "origin fdatasync failed");
                Status::IoError
            })
        });
        // Awaited on a task of its own so that a panicking sync still
        // answers (with an error) the requests waiting for it.
        tokio::spawn(async move {
            let r = sync.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "origin fdatasync task failed");
                Err(Status::IoError)
            });
            // The node task may have stopped; then nobody waits.
            let _ = done.send(r);
        });
    }

    /// Read `chunk` from the origin on a blocking thread into a pooled
    /// buffer; the blocking thread sends the result on `reads.done_tx`
    /// itself (`origin_read.rs`).
    fn spawn_origin_read(&mut self, chunk: u64) {
        let (Some(origin), Some(pool)) = (self.reads.origin.clone(), self.reads.pool.clone())
        else {
            // A node asks only when it has an origin; answer rather than
            // leave the request waiting forever.
            tracing::error!(node = %self.name, chunk, "origin read asked for without an origin");
            let now = self.now();
            self.node.origin_loaded(chunk, Err(Status::IoError), now);
            return;
        };
        if self.reads.uring.as_mut().is_some_and(|u| u.start(chunk)) {
            self.reads.in_flight += 1;
            return;
        }
        let reply = Reply::new(chunk, self.reads.done_tx.clone());
        self.reads.in_flight += 1;
        // The handle is not awaited: `reply` answers even if the read
        // panics (its drop sends an error).
        drop(tokio::task::spawn_blocking(move || {
            let r = read_pooled(origin.as_ref(), &pool, chunk).map_err(|e| {
                tracing::error!(chunk, error = %e, "origin read failed");
                Status::IoError
            });
            reply.send(r);
        }));
    }

    fn send_parent(&mut self, m: Message) {
        let Some((_, link)) = self.parent.as_ref() else {
            tracing::debug!(node = %self.name, msg = %m, "no parent link; message dropped");
            return;
        };
        if link.tx.send(m.clone()).is_ok() {
            self.record(Direction::Send, PeerName::Parent, &m);
        }
    }

    fn send_child(&mut self, id: ChildId, m: Message) {
        let Some(link) = self.children.get(&id) else {
            tracing::debug!(node = %self.name, child = id, msg = %m, "child gone; message dropped");
            self.answer_orphan(id, m);
            return;
        };
        if link.tx.send(m.clone()).is_ok() {
            self.record(Direction::Send, PeerName::Child(id), &m);
        }
    }

    /// A child link closed: keep its cookie state while writes admitted
    /// on it may wait for the node's answer (a trusted node; see
    /// `LinkKeys::link_closed`). Its reader may still be admitting writes
    /// when we close it, so it stays until that reader has ended too.
    fn orphan(&mut self, id: ChildId, link: &Link, reader_done: bool) {
        if self.keys.as_ref().is_some_and(|k| k.spends_cookies()) {
            let cookies = link.cookies.clone();
            self.orphans.insert(
                id,
                Orphan {
                    cookies,
                    reader_done,
                },
            );
        }
    }

    /// Forget an orphan once its reader has ended and every write
    /// admitted on it has been answered.
    fn prune_orphan(&mut self, id: ChildId) {
        let (Some(k), Some(o)) = (&self.keys, self.orphans.get(&id)) else {
            return;
        };
        if o.reader_done && !k.awaits_answers(&o.cookies) {
            self.orphans.remove(&id);
        }
    }

    /// The node's answer to a child whose link is gone: nothing is sent,
    /// but a write's cookie is spent with the answer (a receipt kept for
    /// its retry, or voided if the write failed).
    fn answer_orphan(&mut self, id: ChildId, mut m: Message) {
        let (Some(k), Some(o)) = (&self.keys, self.orphans.get(&id)) else {
            return;
        };
        k.reply_down(&o.cookies, &mut m, wall_ms());
        self.prune_orphan(id);
    }

    fn record(&mut self, dir: Direction, peer: PeerName, m: &Message) {
        if let Some(t) = self.trace.as_mut() {
            t.record(dir, peer, m);
        }
    }

    fn update_readiness(&mut self, refused: Option<Status>) {
        let ready = self.node.is_ready() || (self.lazy && self.parent.is_some());
        let next = match (ready, refused) {
            (true, _) => Readiness::Ready,
            (false, Some(s)) => Readiness::Refused(s),
            (false, None) => return,
        };
        self.ready.send_if_modified(|r| {
            // Ready is sticky: losing the parent later is a logged event, not
            // a reason to tell a waiting starter "not yet".
            if *r == next || *r == Readiness::Ready {
                return false;
            }
            *r = next;
            true
        });
    }

    fn stats(&self) -> PeerStats {
        PeerStats {
            name: self.name.clone(),
            root: self.node.is_root(),
            ready: self.node.is_ready(),
            parent_link: self.parent.is_some(),
            children: self.children.len(),
            chunk_size: self.node.chunk_size(),
            volume_size: self.node.volume_size(),
            node: self.node.stats().clone(),
            decode_errors: self.decode_errors,
            bad_records: self.bad_records,
            bad_records_from_parent: self.bad_records_from_parent,
            parents_failed: self.parents_failed,
            cache: self.node.cache_stats(),
            cookies: self.keys.as_ref().map(|k| k.cookie_stats()),
            grant_overclaims: self.keys.as_ref().map_or(0, |k| k.grant_overclaims()),
            bytes_sent: self.bytes.sent.load(Ordering::Relaxed),
            bytes_received: self.bytes.received.load(Ordering::Relaxed),
        }
    }

    /// Shut down: no new children, DISCONNECT upward, drain writers.
    ///
    /// Dirty chunks went up before this (see `run`), so an async writer's
    /// acknowledged writes survive a clean stop.
    async fn stop(mut self) {
        // Awaited after the abort: the listening socket is closed only when
        // the task is dropped, and a restart on the same address must find
        // it free once shutdown() has returned.
        if let Some(a) = self.acceptor.take() {
            a.abort();
            let _ = a.await;
        }
        if let Some(d) = self.dialer.take() {
            d.abort();
            let _ = d.await;
        }
        if let Some(l) = self.ledger_sync.take() {
            l.abort();
            let _ = l.await;
        }
        let mut writers = Vec::new();
        if self.parent.is_some() {
            // XID 0 is never one the node allocates, so the parent's OK_REPLY
            // cannot be mistaken for the answer to anything of ours.
            self.send_parent(Message::new(Opcode::Disconnect, 0));
        }
        if let Some((_, link)) = self.parent.take() {
            writers.push(link.close());
        }
        for (_, link) in self.children.drain() {
            writers.push(link.close());
        }
        let _ = self.ready.send(Readiness::Stopped);
        // Pending local requests are answered "stopped" by dropping them.
        self.pending.clear();
        let drained = tokio::time::timeout(SHUTDOWN_DRAIN, async {
            for w in writers {
                let _ = w.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(node = %self.name, "writers did not drain in time");
        }
        // Spends are appended without an fsync each (`ledger.rs`): a clean
        // stop makes them durable, for retries after the restart.
        if let Some(k) = self.keys.clone() {
            sync_ledger(k).await;
        }
        tracing::info!(node = %self.name, "stopped");
    }
}

/// Sync the cookie ledger every `period` (a no-op at a relay, or without a
/// ledger file), on a blocking thread: the fsync and a compaction's
/// rewrite must not stall the runtime's workers.
async fn sync_ledger_every(keys: Arc<LinkKeys>, period: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sync_ledger(keys.clone()).await;
    }
}

/// Sync the cookie ledger on a blocking thread; a failure is logged (the
/// spends stay appended, and the next sync tries again).
async fn sync_ledger(keys: Arc<LinkKeys>) {
    match tokio::task::spawn_blocking(move || keys.sync_ledger()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cookie ledger not synced"),
        Err(e) => tracing::warn!(error = %e, "cookie ledger sync failed"),
    }
}

/// Completions of `uring`'s reads may be there; never, without a ring.
async fn uring_ready(uring: Option<&UringReads>) {
    match uring {
        Some(u) => u.ready().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Spawn a writer for `wr`, returning the link the node task keeps and the
/// close signal for the matching reader.
/// `down`: the link leads to a child (grants going down get their signed
/// expiry).
fn spawn_link(
    wr: OwnedWriteHalf,
    keys: Option<Arc<LinkKeys>>,
    down: bool,
    bytes: Arc<LinkBytes>,
) -> (Link, LinkEnd) {
    let (tx, rx) = mpsc::unbounded_channel();
    let close = Arc::new(Notify::new());
    let cookies = Arc::new(LinkCookies::default());
    let writer = tokio::spawn(write_loop(
        wr,
        rx,
        keys,
        down,
        cookies.clone(),
        bytes.clone(),
    ));
    let end = LinkEnd {
        close: close.clone(),
        cookies,
        tx: tx.clone(),
        bytes,
    };
    let link = Link {
        tx,
        close,
        writer,
        cookies: end.cookies.clone(),
    };
    (link, end)
}

/// What a link's reader shares with its writer.
struct LinkEnd {
    /// The close signal for the reader.
    close: Arc<Notify>,
    /// The link's writes in flight (cookies and receipts).
    cookies: Arc<LinkCookies>,
    /// The link's own answers (GET_COOKIES), past the node.
    tx: mpsc::UnboundedSender<Message>,
    /// The node's socket byte counts.
    bytes: Arc<LinkBytes>,
}

async fn accept_loop(
    listener: TcpListener,
    events: mpsc::Sender<Event>,
    heartbeats: mpsc::Sender<Event>,
    name: String,
    keys: Option<Arc<LinkKeys>>,
    bytes: Arc<LinkBytes>,
) {
    let mut next_id: ChildId = 1;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning on it.
                tracing::warn!(node = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY refused");
        }
        let id = next_id;
        next_id += 1;
        let (rd, wr) = stream.into_split();
        let (link, end) = spawn_link(wr, keys.clone(), true, bytes.clone());
        // ChildUp goes first on the same channel the reader will use, so the
        // node task knows the child before any of its messages.
        if events
            .send(Event::ChildUp { id, peer, link })
            .await
            .is_err()
        {
            return;
        }
        tokio::spawn(read_loop(
            rd,
            Source::Child(id),
            Inbox {
                events: events.clone(),
                heartbeats: Some(heartbeats.clone()),
            },
            end,
            keys.clone(),
        ));
    }
}

async fn parent_loop(
    addr: String,
    events: mpsc::Sender<Event>,
    mut resets: mpsc::UnboundedReceiver<u64>,
    keys: Option<Arc<LinkKeys>>,
    bytes: Arc<LinkBytes>,
) {
    let mut gen = 0u64;
    let mut failures = 0u32;
    loop {
        // Bounded, so a parent that drops SYNs is retried on our schedule
        // rather than the kernel's two minutes.
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await;
        let stream = match attempt.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
            Ok(s) => s,
            Err(e) => {
                failures = failures.saturating_add(1);
                // Log the first few failures, then one a minute: a daemon
                // waiting for its parent should not flood the log.
                if failures <= 5 || failures % 60 == 0 {
                    tracing::warn!(parent = %addr, error = %e, attempt = failures, "cannot reach parent; retrying");
                }
                // 100 ms, 200, 400, 800, then every second.
                let backoff = 100u64 << failures.min(5).saturating_sub(1);
                tokio::time::sleep(Duration::from_millis(backoff.min(1000))).await;
                continue;
            }
        };
        if failures > 0 {
            tracing::info!(parent = %addr, "parent reachable again");
        }
        failures = 0;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY refused");
        }
        gen += 1;
        let up_since = Instant::now();
        let (rd, wr) = stream.into_split();
        let (link, end) = spawn_link(wr, keys.clone(), false, bytes.clone());
        let close = end.close.clone();
        if events.send(Event::ParentUp { gen, link }).await.is_err() {
            return;
        }
        let reader = read_loop(
            rd,
            Source::Parent(gen),
            Inbox {
                events: events.clone(),
                heartbeats: None,
            },
            end,
            keys.clone(),
        );
        tokio::pin!(reader);
        let mut was_reset = false;
        let mut resets_open = true;
        loop {
            tokio::select! {
                () = &mut reader => break,
                g = resets.recv(), if resets_open => match g {
                    // A reset of this generation closes the reader, which
                    // then reports Closed; older generations are stale.
                    Some(g) if g == gen => {
                        was_reset = true;
                        close.notify_one();
                    }
                    Some(_) => {}
                    None => {
                        resets_open = false;
                        close.notify_one();
                    }
                }
            }
        }
        if events.is_closed() || !resets_open {
            return;
        }
        // A reset means the parent stopped answering: dial again promptly.
        // A parent that accepts and drops us at once must not be hammered.
        let pause = if was_reset || up_since.elapsed() >= Duration::from_secs(5) {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        tokio::time::sleep(pause).await;
    }
}

/// Where a link's reader sends what it reads.
struct Inbox {
    events: mpsc::Sender<Event>,
    /// A child link's HEARTBEATs (None on the parent link).
    heartbeats: Option<mpsc::Sender<Event>>,
}

async fn read_loop(
    mut rd: OwnedReadHalf,
    src: Source,
    inbox: Inbox,
    end: LinkEnd,
    keys: Option<Arc<LinkKeys>>,
) {
    let close = end.close.clone();
    let mut buf = BytesMut::with_capacity(READ_BUF);
    // The messages of one read, whose records are checked together (a
    // relay verifies their signatures as one batch).
    let mut batch: Vec<Message> = Vec::new();
    'outer: loop {
        let mut framing_lost = false;
        loop {
            match split_frame(&mut buf) {
                Ok(Some(frame)) => match decode(&frame) {
                    Ok(m) => batch.push(m),
                    Err(e) => {
                        if !deliver(&inbox, src, &keys, &end, &mut batch).await
                            || inbox.events.send(Event::Bad(src, e)).await.is_err()
                        {
                            return;
                        }
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    // The stream has lost its framing; nothing after this
                    // can be trusted.
                    tracing::warn!(?src, error = %e, "bad frame; closing the connection");
                    let _ = inbox.events.send(Event::FramingLost(src)).await;
                    framing_lost = true;
                    break;
                }
            }
        }
        if !deliver(&inbox, src, &keys, &end, &mut batch).await {
            return;
        }
        if framing_lost {
            break 'outer;
        }
        // Room for several chunk records per read: fewer reads, and the
        // records that arrive together are checked as one batch (see
        // `deliver`). Once the messages split off the buffer are gone,
        // this reuses its allocation rather than making a new one.
        if buf.capacity() - buf.len() < READ_MIN {
            buf.reserve(READ_BUF);
        }
        tokio::select! {
            () = close.notified() => break,
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => {
                    end.bytes.received.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(?src, error = %e, "read failed");
                    break;
                }
            }
        }
    }
    let _ = inbox.events.send(Event::Closed(src)).await;
}

/// Check the records of `batch` (if the volume has keys) and hand the
/// messages to the node task in order; false once the task is gone.
async fn deliver(
    inbox: &Inbox,
    src: Source,
    keys: &Option<Arc<LinkKeys>>,
    end: &LinkEnd,
    batch: &mut Vec<Message>,
) -> bool {
    if batch.is_empty() {
        return true;
    }
    let checks = match keys {
        Some(k) => k.incoming(batch),
        None => Vec::new(),
    };
    for (i, mut m) in batch.drain(..).enumerate() {
        let ev = match (keys, checks.get(i)) {
            (_, Some(Err(e))) => Event::BadRecord(src, m, Refused::record(e.to_string())),
            (Some(k), check) => {
                let digest = check.and_then(|c| c.as_ref().ok().copied().flatten());
                match link_checks(k, src, end, &mut m, digest) {
                    Ok(true) => Event::Msg(src, m),
                    Ok(false) => continue,
                    Err(r) => Event::BadRecord(src, m, r),
                }
            }
            (None, _) => Event::Msg(src, m),
        };
        let ev = match (&inbox.heartbeats, &ev) {
            (Some(hb), Event::Msg(_, m)) if m.header.opcode == Opcode::Heartbeat => {
                match hb.try_send(ev) {
                    Ok(()) => continue,
                    // Full (a child flooding HEARTBEATs): the ordinary queue.
                    Err(mpsc::error::TrySendError::Full(ev)) => ev,
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            _ => ev,
        };
        if inbox.events.send(ev).await.is_err() {
            return false;
        }
    }
    true
}

/// The checks of a volume with keys past the record's own: a grant's
/// signed expiry (`seal.rs`), and write cookies and receipts
/// (`cookie.rs`). `Ok(false)`: the link took the message itself.
fn link_checks(
    k: &LinkKeys,
    src: Source,
    end: &LinkEnd,
    m: &mut Message,
    digest: Option<[u8; 32]>,
) -> Result<bool, Refused> {
    match src {
        Source::Parent(_) => {
            // A grant from the parent must carry a valid signed expiry,
            // which also bounds its TTL.
            k.grant_up(m).map_err(|e| Refused::record(e.to_string()))?;
            match k.reply_up(&end.cookies, m) {
                Ok(Delivery::Deliver) => Ok(true),
                Ok(Delivery::Consumed) => Ok(false),
                Err(e) => Err(Refused {
                    why: e.to_string(),
                    status: Status::BadVerifier,
                    param: ParamType::Receipt,
                    receipt: None,
                }),
            }
        }
        Source::Child(_) => {
            k.connect_down(&end.cookies, m);
            if m.header.opcode == Opcode::GetCookies {
                let _ = end.tx.send(k.answer_get_cookies(m, wall_ms()));
                return Ok(false);
            }
            if is_write(m) {
                k.write_down(&end.cookies, m, digest, wall_ms())
                    .map_err(|r| Refused {
                        why: r.why.to_string(),
                        status: r.status,
                        param: ParamType::Cookie,
                        receipt: r.receipt,
                    })?;
            }
            Ok(true)
        }
    }
}

async fn write_loop(
    wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Message>,
    keys: Option<Arc<LinkKeys>>,
    down: bool,
    link: Arc<LinkCookies>,
    bytes: Arc<LinkBytes>,
) {
    let mut out = LinkOut {
        wr,
        buf: FrameBuf::new(),
        keys,
        down,
        link,
        bytes,
        parked: VecDeque::new(),
        parked_since: None,
    };
    if out.run(&mut rx).await.is_err() {
        tracing::debug!("link writer stopped");
    }
    if let Some(k) = &out.keys {
        k.link_closed(&out.link);
    }
    let _ = out.wr.shutdown().await;
    // The socket failed with answers still queued: they cannot be sent,
    // but a write's answer spends its cookie all the same (see
    // `LinkKeys::link_closed`). The queue ends when the node task drops
    // the link, on the reader's close.
    if let Some(k) = out.keys.as_ref().filter(|k| down && k.spends_cookies()) {
        while let Some(mut m) = rx.recv().await {
            k.reply_down(&out.link, &mut m, wall_ms());
        }
    }
}

/// A link's sending side: seals (or, at a relay, unpacks) each message's
/// chunk data, adds cookies and receipts, frames, and writes in batches.
struct LinkOut {
    wr: OwnedWriteHalf,
    /// Frames for the next write; chunk data stays in the messages' own
    /// buffers (`FrameBuf`), not copied into one.
    buf: FrameBuf,
    keys: Option<Arc<LinkKeys>>,
    /// The link leads to a child.
    down: bool,
    link: Arc<LinkCookies>,
    /// The node's socket byte counts.
    bytes: Arc<LinkBytes>,
    /// Sealed messages held back, in order, behind a write that waits for
    /// a cookie (parent link). HEARTBEATs pass them: they order nothing,
    /// and a parent that stopped hearing them would count us as failed.
    parked: VecDeque<UpWrite>,
    /// When the oldest parked write started waiting, for the log.
    parked_since: Option<Instant>,
}

/// A message going up, sealed: its record, and the plaintext of a write
/// request (kept with its cookie for a re-send, see `LinkKeys::bake_up`).
struct UpWrite {
    m: Message,
    rec: Option<SealedRecord>,
    plain: Option<Bytes>,
}

/// The link is gone (a write to the socket failed, or the node dropped it).
struct LinkGone;

impl LinkOut {
    async fn run(&mut self, rx: &mut mpsc::UnboundedReceiver<Message>) -> Result<(), LinkGone> {
        let up = self.keys.as_ref().filter(|_| !self.down).cloned();
        if let Some(k) = &up {
            // A new parent link: cookies from an earlier one may be from a
            // parent that has restarted since, which refuses them.
            k.cookie_state().clear();
        }
        loop {
            self.unpark();
            self.ask_cookies();
            if !self.buf.is_empty() {
                self.flush().await?;
            }
            let m = match &up {
                // A parent link also wakes when cookies arrive (a parked
                // write), when children took cookies from its pool (top it
                // up), and to ask again for cookies that did not come.
                Some(k) => tokio::select! {
                    m = rx.recv() => m,
                    () = k.cookie_state().wanted() => continue,
                    () = k.cookie_state().wait_filled(ASK_AGAIN), if !self.parked.is_empty() => continue,
                },
                None => rx.recv().await,
            };
            let Some(m) = m else {
                return Ok(());
            };
            self.put(m);
            // Batch whatever else is already queued into one write, bounded
            // so a long queue does not build one giant buffer.
            while self.buf.len() < 1 << 20 {
                match rx.try_recv() {
                    Ok(m) => self.put(m),
                    Err(_) => break,
                }
            }
        }
    }

    /// Write out `buf`.
    async fn flush(&mut self) -> Result<(), LinkGone> {
        let n = self.buf.len() as u64;
        let r = self.wr.write_all_buf(&mut self.buf).await;
        if r.is_ok() {
            self.bytes.sent.fetch_add(n, Ordering::Relaxed);
        }
        self.buf.clear();
        r.map_err(|e| {
            tracing::debug!(error = %e, "write failed");
            LinkGone
        })
    }

    /// On a parent link with keys: a GET_COOKIES if the pool runs low.
    fn ask_cookies(&mut self) {
        let Some(k) = &self.keys else {
            return;
        };
        if !self.down && k.should_ask(&self.link) {
            self.buf.push(&k.get_cookies(&self.link));
        }
    }

    /// Seal, cookie and frame one message. A message that cannot be
    /// sealed is dropped, never sent in clear.
    fn put(&mut self, mut m: Message) {
        let Some(k) = self.keys.clone() else {
            self.buf.push(&m);
            return;
        };
        if self.down {
            k.grant_down(&mut m, &self.link);
        } else if m.header.flags.contains(canopy_proto::Flags::RECOVERY_OP) {
            // The node sends a write again whose answer was lost: it goes
            // with the record and cookie it first went with, so the node
            // that spends the cookie applies it at most once.
            if let Some(again) = k.resend_up(&self.link, &m) {
                self.queue_up(
                    &k,
                    UpWrite {
                        m: again,
                        rec: None,
                        plain: None,
                    },
                );
                return;
            }
        }
        let plain = (!self.down && m.header.opcode == Opcode::IoRequest)
            .then(|| m.params.data.clone())
            .flatten();
        let rec = match k.outgoing(&mut m, &self.link) {
            Ok(rec) => rec,
            Err(e) => {
                tracing::error!(msg = %m, error = %e, "cannot seal a message; dropped");
                return;
            }
        };
        if self.down {
            k.reply_down(&self.link, &mut m, wall_ms());
            self.buf.push(&m);
        } else {
            self.queue_up(&k, UpWrite { m, rec, plain });
        }
    }

    /// Send a sealed message up, or park it behind writes that wait for
    /// cookies (HEARTBEATs pass them).
    fn queue_up(&mut self, k: &LinkKeys, w: UpWrite) {
        if !self.parked.is_empty() && w.m.header.opcode != Opcode::Heartbeat {
            self.parked.push_back(w);
        } else {
            self.send_up(k, w);
        }
    }

    /// Frame a message for the parent, baking a cookie for a write; a
    /// write with no cookie to bake is parked, and all after it.
    fn send_up(&mut self, k: &LinkKeys, mut w: UpWrite) {
        if let (Some(r), true) = (&w.rec, is_write(&w.m)) {
            if k.bake_up(&self.link, &mut w.m, r, w.plain.as_ref())
                .is_err()
            {
                self.parked_since.get_or_insert_with(Instant::now);
                self.parked.push_front(w);
                return;
            }
        }
        self.buf.push(&w.m);
    }

    /// Send what is parked, in order, as far as cookies go.
    fn unpark(&mut self) {
        let Some(k) = self.keys.clone() else {
            return;
        };
        while let Some(w) = self.parked.pop_front() {
            let left = self.parked.len();
            self.send_up(&k, w);
            if self.parked.len() > left {
                // Parked again: still no cookie.
                if self.parked_since.is_some_and(|t| t.elapsed() >= WAIT_WARN) {
                    tracing::warn!(
                        parked = self.parked.len(),
                        "no write cookies from the parent yet; writes wait"
                    );
                    self.parked_since = Some(Instant::now());
                }
                return;
            }
        }
        self.parked_since = None;
    }
}

/// How long writes wait for cookies before each warning.
const WAIT_WARN: Duration = Duration::from_secs(5);
