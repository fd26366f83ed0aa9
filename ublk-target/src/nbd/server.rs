//! The NBD server: a listener, the handshake, and the transmission phase of
//! each connection, over any [`Backend`].
//!
//! # Threads, and why
//!
//! Each connection gets [`WORKERS_PER_CONNECTION`] threads that share its
//! socket, the model nbdkit uses: a worker takes the connection's read
//! lock, reads one request (and a WRITE's payload), releases the lock,
//! serves the request on its own thread, then takes the write lock and
//! sends the reply. So up to that many requests of one connection proceed
//! at once (a miss waiting on the origin or the network does not hold up
//! the hits behind it), replies go out in completion order as the protocol
//! allows, and a request never changes threads: no channel, no wakeup
//! between a reader, a worker and a writer, which on a two-core machine
//! costs as much as the cache hit itself. A READ's reply header and data
//! leave in one `write` from one buffer.
//!
//! That buffer costs a copy (cache → buffer → socket). Sending each chunk
//! straight from the memory tier (`sendmsg(MSG_DONTWAIT)` under the set
//! lock) was measured on B1's 1 MiB reads: the daemon's `memmove`, a
//! third of its CPU, went away, but the client's copy out of the socket
//! grew by more (fio's CPU per GB from ~285 to ~400 ms; probably because
//! the socket's pages were now filled from cold tier memory rather than
//! from a cache-hot buffer), and throughput fell. So the copy stays.
//!
//! The volume's `handle` is synchronous (the embedded cache does its own
//! blocking I/O), which plain threads fit better than an async runtime;
//! an asynchronous backend (a tree leaf) blocks its worker on its runtime.
//!
//! # Bounds against a hostile client
//!
//! Nothing a client sends is trusted for a size. A READ or WRITE longer
//! than [`MAX_PAYLOAD`] is refused before anything is allocated for it (a
//! refused WRITE's payload is read through a small stack buffer and
//! dropped). The bytes of requests in flight are capped per connection
//! ([`CONNECTION_BUDGET`]) and for the whole server ([`SERVER_BUDGET`]); a
//! worker that would exceed either waits, holding only its own
//! connection's read lock. A client that stops reading its replies is cut
//! off after [`SEND_TIMEOUT`], so it cannot pin the server's budget; one
//! that dawdles in the handshake is cut off after [`HANDSHAKE_TIMEOUT`].
//! At most [`MAX_CONNECTIONS`] connections are served at once. Options
//! are bounded in size and number. A request the server cannot answer
//! (bad magic) ends the connection, never the daemon.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::sockopt;
use parking_lot::{Condvar, Mutex};
use thiserror::Error;

use super::wire::{
    self, Action, BlockSizes, ClientOption, ExportShape, OptionError, Refusal, WireError,
};
use super::{Backend, ExportAddr};
use crate::volume::Op;

/// The largest READ or WRITE served (the maximum block size advertised).
/// 32 MiB is what the specification recommends servers accept and what
/// nbdkit and qemu-nbd use.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The minimum block size advertised: offsets and lengths must be multiples
/// of it. 512 is the sector size of the ublk device serving the same
/// volume, so both exports follow one rule, and every request stays inside
/// what [`crate::volume::Volume`] is tested for.
pub const MIN_BLOCK: u32 = 512;
/// Threads serving one connection: the requests of one connection that can
/// be in progress at once. nbdkit's default; a benchmark at queue depth 32
/// keeps the rest queued in the socket, where they cost nothing.
pub const WORKERS_PER_CONNECTION: usize = 16;
/// Bytes of requests in flight on one connection (two maximal requests).
pub const CONNECTION_BUDGET: u64 = 2 * (MAX_PAYLOAD as u64 + wire::SIMPLE_REPLY_LEN as u64);
/// Bytes of requests in flight on the whole server.
pub const SERVER_BUDGET: u64 = 256 << 20;
/// Connections served at once; further ones are closed on arrival.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take over the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reply may wait for the client to read (then the connection
/// is dropped).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Option data the server reads; longer options are skipped and refused.
const MAX_OPTION_DATA: u32 = 16 << 10;
/// Longer option data than this is not even skipped: the connection ends.
const MAX_OPTION_SKIP: u32 = 1 << 20;
/// Options per handshake; a client that never ends the handshake is cut off.
const MAX_OPTIONS: usize = 256;
/// The largest refused WRITE payload skipped to stay in step; anything
/// longer means the stream is garbage, and the connection ends (as nbdkit).
const MAX_WRITE_SKIP: u32 = 2 * MAX_PAYLOAD;
/// A worker keeps its buffer for the next request up to this size, so
/// ordinary requests (up to a 1 MiB READ) neither allocate nor zero memory;
/// larger ones are freed after use. At most this much per worker stays
/// allocated.
const RETAINED_BUFFER: usize = (1 << 20) + wire::SIMPLE_REPLY_LEN + READ_ALIGN;
/// A READ's data is copied from the cache to an address aligned to this
/// (a cache line). glibc's `rep movsb` copy runs at half speed or worse when
/// source and destination disagree in alignment: with the data right after
/// the 16-byte header of a malloc'd buffer, copying the cache's chunks took
/// over half of the daemon's CPU on 1 MiB reads (perf, B1).
const READ_ALIGN: usize = 64;
/// The send buffer asked for on a Unix socket (the kernel doubles it for
/// its bookkeeping, and caps it at twice `net.core.wmem_max`, 4 MiB here).
/// Unix sockets have no autotuning: at the default 208 KiB a 1 MiB READ's
/// reply fills the socket five times over, and each time the sending
/// worker sleeps until the client has drained most of it, then the client
/// sleeps until the worker refills it. With room for a whole 1 MiB reply
/// both sides copy in longer runs: on B1's 1 MiB reads the daemon's CPU
/// per GB fell by about a tenth and fio's by a tenth too (same-run A/B
/// against the default, six rounds; 1 and 4 MiB did equally well). Per
/// connection that is at most 2 MiB of kernel memory more than before,
/// 128 MiB over [`MAX_CONNECTIONS`]. TCP sockets keep the kernel's
/// autotuning, which grows their buffers by itself.
const UNIX_SEND_BUFFER: usize = 1 << 20;
/// The piece size of a WRITE_ZEROES served as writes of zeros.
const ZERO_PIECE: usize = 1 << 20;
/// The socket's read buffer: several small requests per `read`.
const READ_BUFFER: usize = 64 << 10;

/// Errors starting the server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The listening address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// A Unix socket path is taken by something that is not a stale socket.
    #[error("{0} exists and is not a socket left by a stopped server")]
    PathTaken(PathBuf),
    /// The accept thread could not start.
    #[error("starting the NBD accept thread: {0}")]
    Thread(io::Error),
}

/// Why a connection ended early (logged, never fatal to the server).
#[derive(Debug, Error)]
pub enum SessionError {
    /// The socket failed or the client hung up.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The client broke the protocol in a way that cannot be answered.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A non-fixed-newstyle client sent an option other than EXPORT_NAME.
    #[error("option {0} from a client that did not negotiate fixed newstyle")]
    NotFixed(u32),
    /// Too many options in one handshake.
    #[error("more than {MAX_OPTIONS} options in one handshake")]
    TooManyOptions,
    /// An option too large to even skip.
    #[error("option {option} with {len} bytes of data")]
    OptionTooBig {
        /// The option.
        option: u32,
        /// Its announced length.
        len: u32,
    },
    /// A refused WRITE whose payload is too large to skip.
    #[error("WRITE of {0} bytes is far beyond the maximum block size")]
    PayloadTooBig(u32),
}

/// What the handshake tells the client about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size and block sizes (what requests are checked against).
    pub shape: ExportShape,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportInfo {
    /// The export a backend serves: its size, the block sizes, and the
    /// transmission flags it can truthfully claim.
    pub fn of(backend: &dyn Backend) -> ExportInfo {
        let preferred = u32::try_from(backend.chunk_size())
            .unwrap_or(MAX_PAYLOAD)
            .clamp(MIN_BLOCK, MAX_PAYLOAD)
            .next_power_of_two();
        let mut flags = wire::FLAG_HAS_FLAGS
            | wire::FLAG_SEND_FLUSH
            | wire::FLAG_SEND_FUA
            | wire::FLAG_SEND_TRIM
            | wire::FLAG_SEND_WRITE_ZEROES;
        if backend.shared_across_connections() {
            flags |= wire::FLAG_CAN_MULTI_CONN;
        }
        ExportInfo {
            shape: ExportShape {
                size: backend.size(),
                block: BlockSizes {
                    minimum: MIN_BLOCK,
                    preferred,
                    maximum: MAX_PAYLOAD,
                },
            },
            flags,
        }
    }
}

/// How a handshake ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeEnd {
    /// The client chose the export: transmission starts.
    Transmission,
    /// The client aborted the handshake.
    Aborted,
}

/// Run the server's side of the fixed newstyle handshake on `s`, answering
/// options until the client starts transmission or aborts.
///
/// Every export name is accepted: the daemon serves one volume, and the
/// name carries no meaning (as with nbdkit's default). The block sizes are
/// always sent with the export's information: the specification allows it,
/// and a client that did not ask for them may ignore them.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    export: &ExportInfo,
) -> Result<HandshakeEnd, SessionError> {
    s.write_all(&wire::greeting())?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    let flags = wire::parse_client_flags(flags)?;
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; wire::OPTION_HEADER_LEN];
        s.read_exact(&mut header)?;
        let header = wire::parse_option_header(&header)?;
        let option = header.option;
        if !flags.fixed && option != wire::OPT_EXPORT_NAME {
            // Plain newstyle has no way to refuse an option.
            return Err(SessionError::NotFixed(option));
        }
        let mut out = Vec::new();
        if header.len > MAX_OPTION_DATA {
            if header.len > MAX_OPTION_SKIP || option == wire::OPT_EXPORT_NAME {
                return Err(SessionError::OptionTooBig {
                    option,
                    len: header.len,
                });
            }
            skip(s, header.len)?;
            let msg = b"option data too large";
            wire::encode_option_reply(option, wire::REP_ERR_TOO_BIG, msg, &mut out);
            s.write_all(&out)?;
            continue;
        }
        // Bounded by MAX_OPTION_DATA above.
        data.clear();
        data.resize(header.len as usize, 0);
        s.read_exact(&mut data)?;
        match wire::parse_option(option, &data) {
            Err(e) => invalid(option, e, &mut out),
            Ok(ClientOption::ExportName(_)) => {
                let reply =
                    wire::export_name_reply(export.shape.size, export.flags, flags.no_zeroes);
                s.write_all(&reply)?;
                return Ok(HandshakeEnd::Transmission);
            }
            Ok(ClientOption::Abort) => {
                wire::encode_option_reply(option, wire::REP_ACK, &[], &mut out);
                // The client may already be gone (the specification tells
                // it that it may leave without waiting for this).
                let _ = s.write_all(&out);
                return Ok(HandshakeEnd::Aborted);
            }
            Ok(ClientOption::List) => {
                wire::encode_option_reply(
                    option,
                    wire::REP_SERVER,
                    &wire::rep_server(b""),
                    &mut out,
                );
                wire::encode_option_reply(option, wire::REP_ACK, &[], &mut out);
            }
            Ok(ClientOption::Info { go, requests, .. }) => {
                let info = wire::info_export(export.shape.size, export.flags);
                wire::encode_option_reply(option, wire::REP_INFO, &info, &mut out);
                let sizes = wire::info_block_size(export.shape.block);
                wire::encode_option_reply(option, wire::REP_INFO, &sizes, &mut out);
                if requests.contains(&wire::INFO_NAME) {
                    // Whatever name was asked for, the export is the default one.
                    let name = wire::info_name(b"");
                    wire::encode_option_reply(option, wire::REP_INFO, &name, &mut out);
                }
                wire::encode_option_reply(option, wire::REP_ACK, &[], &mut out);
                if go {
                    s.write_all(&out)?;
                    return Ok(HandshakeEnd::Transmission);
                }
            }
            Ok(ClientOption::Unsupported(_)) => {
                // STARTTLS and STRUCTURED_REPLY land here too: canopy
                // serves plain connections with simple replies.
                let msg = b"option not supported by canopy";
                wire::encode_option_reply(option, wire::REP_ERR_UNSUP, msg, &mut out);
            }
        }
        s.write_all(&out)?;
    }
    Err(SessionError::TooManyOptions)
}

fn invalid(option: u32, e: OptionError, out: &mut Vec<u8>) {
    let msg = e.to_string();
    wire::encode_option_reply(option, wire::REP_ERR_INVALID, msg.as_bytes(), out);
}

/// Read and drop `len` bytes through a small stack buffer (no allocation).
fn skip<R: Read>(r: &mut R, len: u32) -> io::Result<()> {
    let want = u64::from(len);
    let got = io::copy(&mut r.by_ref().take(want), &mut io::sink())?;
    if got < want {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The next thing a client asks during transmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A valid request. A WRITE's payload is still on the stream: the
    /// caller reads exactly `len` bytes of it next.
    Request {
        /// Echoed in the reply.
        handle: u64,
        /// What to do.
        action: Action,
    },
    /// A request to refuse with an error reply (any WRITE payload has
    /// already been consumed).
    Refused {
        /// Echoed in the reply.
        handle: u64,
        /// The error and why.
        refusal: Refusal,
    },
    /// `NBD_CMD_DISC`: answer what is in flight, then close.
    Disconnect,
}

/// Read and check one request header from `r`.
pub fn next_request<R: Read>(r: &mut R, shape: &ExportShape) -> Result<Incoming, SessionError> {
    let mut header = [0u8; wire::REQUEST_LEN];
    r.read_exact(&mut header)?;
    let req = wire::parse_request(&header)?;
    match wire::check_request(&req, shape) {
        Ok(Action::Disconnect) => Ok(Incoming::Disconnect),
        Ok(action) => Ok(Incoming::Request {
            handle: req.handle,
            action,
        }),
        Err(refusal) => {
            if req.command == wire::CMD_WRITE {
                if req.len > MAX_WRITE_SKIP {
                    return Err(SessionError::PayloadTooBig(req.len));
                }
                skip(r, req.len)?;
            }
            Ok(Incoming::Refused {
                handle: req.handle,
                refusal,
            })
        }
    }
}

/// A listening NBD server. Stopping it (or dropping it) closes the
/// listener, lets every connection answer the requests it has in flight,
/// and waits for them to finish.
pub struct NbdServer {
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    accept: Option<JoinHandle<()>>,
    bound: Bound,
}

/// Where the server actually listens (a TCP port 0 becomes the real port).
#[derive(Clone, Debug)]
enum Bound {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for NbdServer {
    /// The export as an NBD URI, for clients (`nbdinfo`, `qemu-img`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.bound {
            Bound::Unix(p) => write!(f, "nbd+unix:///?socket={}", p.display()),
            Bound::Tcp(SocketAddr::V6(a)) => write!(f, "nbd://[{}]:{}", a.ip(), a.port()),
            Bound::Tcp(a) => write!(f, "nbd://{a}"),
        }
    }
}

struct Shared {
    backend: Arc<dyn Backend>,
    export: ExportInfo,
    stop: AtomicBool,
    budget: Budget,
    /// Open connections, by id: a clone of each socket, so a stop can end
    /// its reads.
    conns: Mutex<HashMap<u64, Stream>>,
    /// Signalled when a connection ends.
    gone: Condvar,
    next_id: AtomicU64,
}

impl NbdServer {
    /// Listen on `addr` and serve `backend` to every client, each
    /// connection on its own threads.
    pub fn start(addr: &ExportAddr, backend: Arc<dyn Backend>) -> Result<NbdServer, ServerError> {
        let (listener, bound) = Listener::bind(addr)?;
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared {
            export: ExportInfo::of(backend.as_ref()),
            backend,
            stop: AtomicBool::new(false),
            budget: Budget::new(SERVER_BUDGET),
            conns: Mutex::new(HashMap::new()),
            gone: Condvar::new(),
            next_id: AtomicU64::new(0),
        });
        let accept = {
            let (shared, listener) = (shared.clone(), listener.clone());
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(ServerError::Thread)?
        };
        let server = NbdServer {
            shared,
            listener,
            accept: Some(accept),
            bound,
        };
        tracing::info!(export = %server, "NBD export listening");
        Ok(server)
    }

    /// What clients are told about the export.
    pub fn export(&self) -> ExportInfo {
        self.shared.export
    }

    /// Stop accepting, let each connection answer what it has in flight,
    /// and wait until every connection is closed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        {
            let conns = self.shared.conns.lock();
            self.shared.stop.store(true, Ordering::SeqCst);
            // Ending the read side makes every worker see end-of-stream
            // after its current request; replies in flight still go out.
            for s in conns.values() {
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        // Shutting the listening socket down makes a blocked accept() fail
        // (Linux answers EINVAL), and the accept thread sees the stop flag.
        // Should that fail, connecting to ourselves wakes it too (unless
        // the socket file was removed meanwhile).
        if let Err(e) =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both)
        {
            tracing::debug!(error = %e, "shutting the NBD listener down failed; waking it");
            self.bound.wake();
        }
        if accept.join().is_err() {
            tracing::error!("the NBD accept thread panicked");
        }
        let mut conns = self.shared.conns.lock();
        while !conns.is_empty() {
            self.shared.gone.wait(&mut conns);
        }
        drop(conns);
        if let Bound::Unix(p) = &self.bound {
            let _ = std::fs::remove_file(p);
        }
        tracing::info!("NBD export stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Bound {
    /// Unblock the accept thread (it then sees the stop flag) by connecting
    /// to ourselves.
    fn wake(&self) {
        match self {
            Bound::Unix(p) => {
                let _ = UnixStream::connect(p);
            }
            Bound::Tcp(a) => {
                let mut to = *a;
                if to.ip().is_unspecified() {
                    to.set_ip(match to {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                let _ = TcpStream::connect_timeout(&to, Duration::from_secs(5));
            }
        }
    }
}

fn accept_loop(listener: &Listener, shared: &Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(error = %e, "accepting an NBD connection failed");
                // Out of descriptors or memory: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut conns = shared.conns.lock();
            // Checked under the lock a stop takes, so every registered
            // connection is seen by the stop.
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            if conns.len() >= MAX_CONNECTIONS {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "too many NBD connections; closing a new one"
                );
                continue;
            }
            match stream.try_clone() {
                Ok(c) => {
                    conns.insert(id, c);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot track an NBD connection; closing it");
                    continue;
                }
            }
        }
        let conn_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                serve_connection(&conn_shared, id, stream);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread for an NBD connection");
            forget_connection(shared, id);
        }
    }
}

fn forget_connection(shared: &Shared, id: u64) {
    let mut conns = shared.conns.lock();
    conns.remove(&id);
    shared.gone.notify_all();
}

fn serve_connection(shared: &Arc<Shared>, id: u64, stream: Stream) {
    let peer = stream.peer();
    tracing::info!(conn = id, %peer, "NBD client connected");
    match run_connection(shared, id, stream) {
        Ok(()) => tracing::info!(conn = id, "NBD client disconnected"),
        Err(SessionError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::info!(conn = id, "NBD client hung up")
        }
        Err(e) => tracing::warn!(conn = id, error = %e, "NBD connection dropped"),
    }
    forget_connection(shared, id);
}

/// One connection's shared state during transmission.
///
/// The socket's two locks are std's mutexes, not parking_lot's: all the
/// connection's idle workers queue on the read lock, and parking_lot's
/// waiters spin with `sched_yield` before they sleep, which under fio at
/// QD32 took a quarter of the daemon's CPU (perf, B1) on two cores. std's
/// futex mutex spins briefly without yielding and then sleeps, as nbdkit's
/// pthread mutexes do.
struct Connection {
    reader: StdMutex<BufReader<Stream>>,
    writer: StdMutex<Stream>,
    /// For shutting the socket down from any thread.
    control: Stream,
    closing: AtomicBool,
    budget: Budget,
    /// The first error that ended the connection, for the log.
    error: Mutex<Option<SessionError>>,
}

impl Connection {
    /// Stop taking requests: workers finish what they hold and exit.
    fn close(&self, why: Option<SessionError>) {
        if let Some(e) = why {
            let mut first = self.error.lock();
            if first.is_none() {
                *first = Some(e);
            }
        }
        self.closing.store(true, Ordering::SeqCst);
        // Wakes the worker blocked reading the next request.
        let _ = self.control.shutdown(Shutdown::Read);
    }

    /// Send one reply; a failure ends the connection.
    fn send(&self, bytes: &[u8]) {
        // A worker that panicked while sending has left the stream in an
        // unknown state; the next send fails or the client sees garbage and
        // hangs up, either way the connection ends.
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = w.write_all(bytes) {
            drop(w);
            self.close(Some(e.into()));
        }
    }
}

fn run_connection(shared: &Arc<Shared>, id: u64, mut stream: Stream) -> Result<(), SessionError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
    stream.set_nodelay()?;
    stream.widen_send_buffer();
    if handshake(&mut stream, &shared.export)? == HandshakeEnd::Aborted {
        return Ok(());
    }
    stream.set_read_timeout(None)?;
    let conn = Arc::new(Connection {
        reader: StdMutex::new(BufReader::with_capacity(READ_BUFFER, stream.try_clone()?)),
        writer: StdMutex::new(stream.try_clone()?),
        control: stream,
        closing: AtomicBool::new(false),
        budget: Budget::new(CONNECTION_BUDGET),
        error: Mutex::new(None),
    });
    let mut workers = Vec::with_capacity(WORKERS_PER_CONNECTION);
    for n in 1..WORKERS_PER_CONNECTION {
        let (shared, conn) = (shared.clone(), conn.clone());
        match std::thread::Builder::new()
            .name(format!("nbd-conn-{id}-{n}"))
            .spawn(move || worker(&shared, &conn))
        {
            Ok(h) => workers.push(h),
            // Fewer workers only means less concurrency.
            Err(e) => tracing::warn!(conn = id, error = %e, "cannot start an NBD worker"),
        }
    }
    worker(shared, &conn);
    for w in workers {
        if w.join().is_err() {
            tracing::error!(conn = id, "an NBD worker panicked");
        }
    }
    let _ = conn.control.shutdown(Shutdown::Both);
    let first = conn.error.lock().take();
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One worker of a connection: read a request under the read lock, serve
/// it, reply under the write lock; until the connection closes.
fn worker(shared: &Shared, conn: &Connection) {
    // Reused across requests (see RETAINED_BUFFER): a READ's reply header
    // and data, or a WRITE's payload.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut reader = conn.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.closing.load(Ordering::SeqCst) {
            return;
        }
        let (handle, action) = match next_request(&mut *reader, &shared.export.shape) {
            Ok(Incoming::Request { handle, action }) => (handle, action),
            Ok(Incoming::Refused { handle, refusal }) => {
                drop(reader);
                tracing::debug!(handle, reason = refusal.reason, "NBD request refused");
                conn.send(&wire::simple_reply(refusal.error, handle));
                continue;
            }
            Ok(Incoming::Disconnect) => {
                drop(reader);
                conn.close(None);
                return;
            }
            Err(e) => {
                drop(reader);
                // End of stream after a stop or a client that just left is
                // an ordinary end; anything else is worth the log.
                let quiet = shared.stop.load(Ordering::SeqCst)
                    || matches!(&e, SessionError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof);
                conn.close((!quiet).then_some(e));
                return;
            }
        };
        let need = buffer_need(&action, shared.backend.punches_holes());
        // Both budgets are released when these guards drop, after the reply.
        let _conn_budget = conn.budget.acquire(need as u64);
        let _server_budget = shared.budget.acquire(need as u64);
        if buf.len() < need {
            buf.resize(need, 0);
        }
        if let Action::Write { len, .. } = action {
            // `need` is the payload length here, at most MAX_PAYLOAD.
            if let Err(e) = reader.read_exact(&mut buf[..len as usize]) {
                drop(reader);
                conn.close(Some(e.into()));
                return;
            }
        }
        drop(reader);
        // A READ's data goes to a cache-line boundary, its header just
        // before it (see READ_ALIGN); other requests use the buffer as is.
        let start = match action {
            Action::Read { .. } => read_start(buf.as_ptr() as usize),
            _ => 0,
        };
        let reply = &mut buf[start..];
        let reply_len = match execute(shared.backend.as_ref(), action, reply) {
            Ok(data_len) => {
                reply[..wire::SIMPLE_REPLY_LEN].copy_from_slice(&wire::simple_reply(0, handle));
                wire::SIMPLE_REPLY_LEN + data_len
            }
            Err(error) => {
                reply[..wire::SIMPLE_REPLY_LEN].copy_from_slice(&wire::simple_reply(error, handle));
                wire::SIMPLE_REPLY_LEN
            }
        };
        conn.send(&reply[..reply_len]);
        if buf.capacity() > RETAINED_BUFFER {
            buf = Vec::new();
        }
    }
}

/// Where in a worker buffer at address `addr` a READ's reply starts: the
/// first offset whose data (after the reply header) lies on a
/// [`READ_ALIGN`] boundary.
fn read_start(addr: usize) -> usize {
    let data = addr.wrapping_add(wire::SIMPLE_REPLY_LEN);
    data.wrapping_neg() % READ_ALIGN
}

/// Bytes of worker buffer a request needs: a reply header always, plus a
/// READ's data behind it (and room to align it), a WRITE's payload, or a
/// piece of zeros.
fn buffer_need(action: &Action, punches_holes: bool) -> usize {
    let header = wire::SIMPLE_REPLY_LEN;
    match *action {
        Action::Read { len, .. } => READ_ALIGN + header + len as usize,
        Action::Write { len, .. } => header.max(len as usize),
        Action::WriteZeroes {
            len, no_hole: true, ..
        } if punches_holes => header.max((len as usize).min(ZERO_PIECE)),
        _ => header,
    }
}

/// Serve one valid request. `buf` holds a WRITE's payload at its start,
/// or receives a READ's data after the reply header. Returns the bytes of
/// data the reply carries, or the NBD error.
fn execute(backend: &dyn Backend, action: Action, buf: &mut [u8]) -> Result<usize, u32> {
    let h = wire::SIMPLE_REPLY_LEN;
    match action {
        Action::Read { offset, len } => {
            let len = len as usize;
            let data = buf.get_mut(h..h + len).ok_or(wire::EIO)?;
            done(backend.handle(Op::Read, offset, len, data))?;
            Ok(len)
        }
        Action::Write { offset, len, fua } => {
            let len = len as usize;
            let data = buf.get_mut(..len).ok_or(wire::EIO)?;
            done(backend.handle(Op::Write { fua }, offset, len, data))?;
            Ok(0)
        }
        Action::Flush => done(backend.handle(Op::Flush, 0, 0, &mut [])).map(|()| 0),
        Action::Trim { offset, len, fua } => {
            done(backend.handle(Op::Discard, offset, len as usize, &mut []))?;
            durable(backend, fua)
        }
        Action::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => {
            if no_hole && backend.punches_holes() {
                // The client wants the range allocated: write real zeros,
                // a piece at a time from one zeroed buffer.
                let piece = (len as usize).min(ZERO_PIECE);
                let zeros = buf.get_mut(..piece).ok_or(wire::EIO)?;
                zeros.fill(0);
                let mut at = 0u64;
                while at < u64::from(len) {
                    let n = (u64::from(len) - at).min(piece as u64) as usize;
                    let op = Op::Write { fua: false };
                    done(backend.handle(op, offset + at, n, &mut zeros[..n]))?;
                    at += n as u64;
                }
            } else {
                done(backend.handle(Op::WriteZeroes, offset, len as usize, &mut []))?;
            }
            durable(backend, fua)
        }
        // Answered before a request ever gets here.
        Action::Disconnect => Ok(0),
    }
}

/// FUA on TRIM or WRITE_ZEROES: the volume has no per-request durability
/// for them, so a FLUSH follows (covering them and more).
fn durable(backend: &dyn Backend, fua: bool) -> Result<usize, u32> {
    if fua {
        done(backend.handle(Op::Flush, 0, 0, &mut []))?;
    }
    Ok(0)
}

/// A completion result (bytes done, or a negative errno) as an NBD error.
fn done(result: i32) -> Result<(), u32> {
    if result >= 0 {
        return Ok(());
    }
    Err(match -result {
        libc::EINVAL | libc::EOPNOTSUPP => wire::EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => wire::ENOSPC,
        libc::EPERM | libc::EROFS => wire::EPERM,
        libc::ESHUTDOWN => wire::ESHUTDOWN,
        _ => wire::EIO,
    })
}

/// A byte budget shared by the workers that draw on it.
struct Budget {
    available: Mutex<u64>,
    returned: Condvar,
    total: u64,
}

/// Bytes drawn from a [`Budget`], given back on drop.
struct Drawn<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Budget {
    fn new(total: u64) -> Budget {
        Budget {
            available: Mutex::new(total),
            returned: Condvar::new(),
            total,
        }
    }

    /// Wait until `n` bytes are free and take them. A request larger than
    /// the whole budget (impossible: payloads are capped below it) takes
    /// the whole budget rather than waiting forever.
    fn acquire(&self, n: u64) -> Drawn<'_> {
        let n = n.min(self.total);
        let mut free = self.available.lock();
        while *free < n {
            self.returned.wait(&mut free);
        }
        *free -= n;
        Drawn { budget: self, n }
    }
}

impl Drop for Drawn<'_> {
    fn drop(&mut self) {
        *self.budget.available.lock() += self.n;
        self.budget.returned.notify_all();
    }
}

/// A listening socket of either kind.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn bind(addr: &ExportAddr) -> Result<(Listener, Bound), ServerError> {
        let bind_err = |source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ExportAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path).map_err(bind_err)?;
                // The socket gives full access to the volume: owner only
                // (the operator can loosen it deliberately).
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(bind_err)?;
                Ok((Listener::Unix(l), Bound::Unix(path.clone())))
            }
            ExportAddr::Tcp(a) => {
                let addrs: Vec<SocketAddr> = a.to_socket_addrs().map_err(bind_err)?.collect();
                let l = TcpListener::bind(&addrs[..]).map_err(bind_err)?;
                let local = l.local_addr().map_err(bind_err)?;
                Ok((Listener::Tcp(l), Bound::Tcp(local)))
            }
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
        })
    }

    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// Remove a socket file left by a server that is gone (nothing accepts on
/// it); refuse to touch anything else.
fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() || UnixStream::connect(path).is_ok() {
        return Err(ServerError::PathTaken(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|source| ServerError::Bind {
        addr: path.display().to_string(),
        source,
    })
}

/// A connected socket of either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Small replies leave at once instead of waiting for Nagle.
    fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Unix(_) => Ok(()),
            Stream::Tcp(s) => s.set_nodelay(true),
        }
    }

    /// A Unix socket gets [`UNIX_SEND_BUFFER`]; a failure only costs
    /// speed, so it is logged and the connection goes on.
    fn widen_send_buffer(&self) {
        if let Stream::Unix(s) = self {
            let size = UNIX_SEND_BUFFER;
            if let Err(e) = nix::sys::socket::setsockopt(s, sockopt::SndBuf, &size) {
                tracing::debug!(error = %e, "cannot widen an NBD socket's send buffer");
            }
        }
    }

    fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix socket".to_string(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use wire::Request;

    /// A client's whole input, and whatever the server wrote back.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const EXPORT: ExportInfo = ExportInfo {
        shape: ExportShape {
            size: 1 << 30,
            block: BlockSizes {
                minimum: MIN_BLOCK,
                preferred: 65536,
                maximum: MAX_PAYLOAD,
            },
        },
        flags: wire::FLAG_HAS_FLAGS | wire::FLAG_SEND_FLUSH,
    };

    fn client(flags: u32, options: &[(u32, &[u8])]) -> Duplex {
        let mut input = flags.to_be_bytes().to_vec();
        for (o, data) in options {
            input.extend_from_slice(&wire::encode_option_header(*o, data.len() as u32));
            input.extend_from_slice(data);
        }
        Duplex {
            input: Cursor::new(input),
            output: Vec::new(),
        }
    }

    /// The option replies in `out` (after the greeting): (option, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut rest = &out[wire::GREETING_LEN..];
        let mut all = Vec::new();
        while rest.len() >= 20 {
            let h = wire::parse_option_reply_header(rest[..20].try_into().unwrap()).unwrap();
            let end = 20 + h.len as usize;
            all.push((h.option, h.reply, rest[20..end].to_vec()));
            rest = &rest[end..];
        }
        assert!(rest.is_empty(), "trailing bytes: {rest:?}");
        all
    }

    #[test]
    fn go_describes_the_export_then_starts_transmission() {
        let info = wire::encode_info_data(b"anything", &[wire::INFO_NAME]).unwrap();
        let mut s = client(
            wire::FLAG_C_FIXED_NEWSTYLE,
            &[(wire::OPT_STRUCTURED_REPLY, &[]), (wire::OPT_GO, &info)],
        );
        assert_eq!(
            handshake(&mut s, &EXPORT).unwrap(),
            HandshakeEnd::Transmission
        );
        assert_eq!(s.output[..wire::GREETING_LEN], wire::greeting());
        let r = replies(&s.output);
        assert_eq!(r[0].1, wire::REP_ERR_UNSUP);
        assert_eq!(
            r[1],
            (
                wire::OPT_GO,
                wire::REP_INFO,
                wire::info_export(1 << 30, EXPORT.flags).to_vec()
            )
        );
        assert_eq!(r[2].2, wire::info_block_size(EXPORT.shape.block).to_vec());
        assert_eq!(r[3].2, wire::info_name(b""));
        assert_eq!(r[4], (wire::OPT_GO, wire::REP_ACK, vec![]));
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn export_name_answers_without_an_option_reply() {
        let flags = wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES;
        let mut s = client(flags, &[(wire::OPT_EXPORT_NAME, b"x")]);
        assert_eq!(
            handshake(&mut s, &EXPORT).unwrap(),
            HandshakeEnd::Transmission
        );
        assert_eq!(
            s.output[wire::GREETING_LEN..],
            wire::export_name_reply(1 << 30, EXPORT.flags, true)
        );
        // A plain newstyle client gets the zeros, and may only do this.
        let mut s = client(0, &[(wire::OPT_EXPORT_NAME, b"")]);
        assert_eq!(
            handshake(&mut s, &EXPORT).unwrap(),
            HandshakeEnd::Transmission
        );
        assert_eq!(s.output.len(), wire::GREETING_LEN + 134);
        let mut s = client(0, &[(wire::OPT_LIST, b"")]);
        assert!(matches!(
            handshake(&mut s, &EXPORT),
            Err(SessionError::NotFixed(_))
        ));
    }

    #[test]
    fn info_list_and_abort() {
        let info = wire::encode_info_data(b"", &[]).unwrap();
        let mut s = client(
            wire::FLAG_C_FIXED_NEWSTYLE,
            &[
                (wire::OPT_INFO, &info),
                (wire::OPT_LIST, &[]),
                (wire::OPT_ABORT, &[]),
            ],
        );
        assert_eq!(handshake(&mut s, &EXPORT).unwrap(), HandshakeEnd::Aborted);
        let kinds: Vec<u32> = replies(&s.output).iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            [
                wire::REP_INFO,
                wire::REP_INFO,
                wire::REP_ACK,
                wire::REP_SERVER,
                wire::REP_ACK,
                wire::REP_ACK
            ]
        );
    }

    #[test]
    fn oversized_and_endless_options_are_bounded() {
        let big = vec![0u8; MAX_OPTION_DATA as usize + 1];
        let mut s = client(
            wire::FLAG_C_FIXED_NEWSTYLE,
            &[(77, &big), (wire::OPT_ABORT, &[])],
        );
        assert_eq!(handshake(&mut s, &EXPORT).unwrap(), HandshakeEnd::Aborted);
        assert_eq!(replies(&s.output)[0].1, wire::REP_ERR_TOO_BIG);
        // Announced but never sent: the server stops at the header.
        let mut s = client(wire::FLAG_C_FIXED_NEWSTYLE, &[]);
        s.input
            .get_mut()
            .extend_from_slice(&wire::encode_option_header(
                wire::OPT_GO,
                MAX_OPTION_SKIP + 1,
            ));
        assert!(matches!(
            handshake(&mut s, &EXPORT),
            Err(SessionError::OptionTooBig { .. })
        ));
        let many: Vec<(u32, &[u8])> = (0..=MAX_OPTIONS).map(|_| (99u32, &[][..])).collect();
        let mut s = client(wire::FLAG_C_FIXED_NEWSTYLE, &many);
        assert!(matches!(
            handshake(&mut s, &EXPORT),
            Err(SessionError::TooManyOptions)
        ));
    }

    #[test]
    fn a_refused_write_consumes_its_payload() {
        let write = Request {
            flags: 0,
            command: wire::CMD_WRITE,
            handle: 5,
            offset: 3,
            len: 1024,
        };
        let read = Request {
            command: wire::CMD_READ,
            offset: 0,
            len: 512,
            ..write
        };
        let mut input = wire::encode_request(&write).to_vec();
        input.extend_from_slice(&[0xaa; 1024]);
        input.extend_from_slice(&wire::encode_request(&read));
        let mut r = Cursor::new(input);
        assert!(matches!(
            next_request(&mut r, &EXPORT.shape).unwrap(),
            Incoming::Refused { handle: 5, refusal } if refusal.error == wire::EINVAL
        ));
        assert_eq!(
            next_request(&mut r, &EXPORT.shape).unwrap(),
            Incoming::Request {
                handle: 5,
                action: Action::Read {
                    offset: 0,
                    len: 512
                }
            }
        );
        let huge = Request {
            len: u32::MAX,
            offset: 1 << 40,
            ..write
        };
        let mut r = Cursor::new(wire::encode_request(&huge).to_vec());
        assert!(is_too_big(next_request(&mut r, &EXPORT.shape)));
    }

    fn is_too_big(r: Result<Incoming, SessionError>) -> bool {
        matches!(r, Err(SessionError::PayloadTooBig(_)))
    }

    #[test]
    fn errnos_map_to_nbd_errors() {
        assert_eq!(done(4096), Ok(()));
        assert_eq!(done(-libc::EINVAL), Err(wire::EINVAL));
        assert_eq!(done(-libc::EOPNOTSUPP), Err(wire::EINVAL));
        assert_eq!(done(-libc::EFBIG), Err(wire::ENOSPC));
        assert_eq!(done(-libc::EIO), Err(wire::EIO));
        assert_eq!(done(-libc::ENOMEM), Err(wire::EIO));
    }

    #[test]
    fn read_data_lands_on_a_cache_line_and_fits_the_buffer() {
        for addr in [0usize, 1, 16, 48, 63, 64, 4096 + 16, usize::MAX - 100] {
            let start = read_start(addr);
            assert!(start < READ_ALIGN, "{addr}");
            let data = addr.wrapping_add(start + wire::SIMPLE_REPLY_LEN);
            assert_eq!(data % READ_ALIGN, 0, "{addr}");
        }
        // The aligned reply always fits what buffer_need asked for, and a
        // 1 MiB READ's buffer is kept for the next request.
        let read = Action::Read {
            offset: 0,
            len: 1 << 20,
        };
        let need = buffer_need(&read, false);
        assert!(READ_ALIGN - 1 + wire::SIMPLE_REPLY_LEN + (1 << 20) <= need);
        assert!(need <= RETAINED_BUFFER);
    }

    #[test]
    fn a_unix_connection_gets_a_wider_send_buffer() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let before: usize = nix::sys::socket::getsockopt(&ours, sockopt::SndBuf).unwrap();
        let stream = Stream::Unix(ours);
        stream.widen_send_buffer();
        let Stream::Unix(ours) = &stream else {
            unreachable!()
        };
        let after: usize = nix::sys::socket::getsockopt(ours, sockopt::SndBuf).unwrap();
        // The kernel doubles what it is given, up to twice wmem_max.
        let max = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX / 2);
        assert_eq!(after, (2 * UNIX_SEND_BUFFER).min(2 * max), "was {before}");
    }

    #[test]
    fn the_budget_never_waits_forever_on_one_request() {
        let b = Budget::new(100);
        let a = b.acquire(60);
        drop(a);
        let whole = b.acquire(1000);
        assert_eq!(*b.available.lock(), 0);
        drop(whole);
        assert_eq!(*b.available.lock(), 100);
    }
}
