//! The daemon's control socket: statistics, live cache reconfiguration and
//! a clean shutdown, for `canopy-ublk stats|cache|del` to talk to a running
//! volume.
//!
//! One JSON request per connection, one JSON reply. The socket lives in
//! `/run/canopy/` with mode 0600: only root (who runs the daemon) may
//! reconfigure or stop a volume.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use canopy_cache::{HashKind, Medium, Reconfig, StackStats, TierConfig};
use serde::{Deserialize, Serialize};

use crate::spec::tier_geometry;
use crate::volume::{CacheMode, Volume};
use canopy_origin::OriginStats;
use canopy_peerd::PeerStats;

/// Directory holding the control sockets.
pub const RUN_DIR: &str = "/run/canopy";

/// The control socket path of device `id`.
pub fn socket_path(id: u32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("ublk-{id}.sock"))
}

/// A cache change, as sent over the socket (sizes already in bytes).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum CacheChange {
    /// Insert a tier at `index` (0 = top).
    AddTier {
        /// Position in the stack.
        index: usize,
        /// Where it keeps chunks.
        medium: Medium,
        /// Capacity in bytes.
        size: u64,
        /// Hash choosing the set.
        hash: HashKind,
    },
    /// Remove the tier at `index`; its chunks cascade down.
    RemoveTier {
        /// Position in the stack.
        index: usize,
    },
    /// Change the hash of the tier at `index`.
    Rehash {
        /// Position in the stack.
        index: usize,
        /// New hash.
        hash: HashKind,
    },
    /// Change the capacity of the tier at `index`.
    Resize {
        /// Position in the stack.
        index: usize,
        /// New capacity in bytes.
        size: u64,
    },
}

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Report statistics.
    Stats,
    /// Change the cache stack.
    Cache {
        /// What to change.
        change: CacheChange,
    },
    /// Flush, remove the device and exit.
    Shutdown,
}

/// Everything `canopy-ublk stats` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The block device path.
    pub device: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Failed requests.
    pub io_errors: u64,
    /// What serves the device, and its own figures.
    #[serde(flatten)]
    pub served: Served,
}

/// What serves a device, with its figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Served {
    /// A standalone volume: the stacked cache over a local origin.
    Embedded {
        /// Write mode.
        mode: CacheMode,
        /// The cache stack.
        cache: Box<StackStats>,
        /// The origin.
        origin: Box<OriginStats>,
    },
    /// A leaf of a canopy tree.
    Leaf {
        /// The node's counters and state.
        peer: Box<PeerStats>,
        /// Reads served on the queue threads from the node's published
        /// copies, without the node.
        queue_hits: u64,
    },
}

/// What the control socket talks to: an embedded volume or a tree leaf.
pub trait Target: Send + Sync {
    /// Statistics now.
    fn report(&self, device: &str) -> Report;
    /// Change the cache stack; a tree leaf has none to change.
    fn reconfigure(&self, change: &CacheChange) -> Result<(), String>;
}

impl Target for Volume {
    fn report(&self, device: &str) -> Report {
        report(self, device)
    }

    fn reconfigure(&self, change: &CacheChange) -> Result<(), String> {
        let cache = self.cache();
        let cfg = cache.config();
        to_reconfig(change, cfg.chunk_size, &cfg.tiers)
            .and_then(|op| cache.reconfigure(op).map_err(|e| e.to_string()))
    }
}

/// The daemon's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Reply {
    /// Done; statistics after the request.
    Ok {
        /// The report.
        report: Box<Report>,
    },
    /// Refused or failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Why a control request could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon is listening for that device.
    #[error("no canopy daemon answers for device {id} ({path}): {source}")]
    NotRunning {
        /// Device id.
        id: u32,
        /// Socket path tried.
        path: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon answered something unreadable.
    #[error("control socket: bad reply: {0}")]
    BadReply(#[from] serde_json::Error),
}

/// Send one request to the daemon of device `id` and wait for its reply.
pub fn call(id: u32, req: &Request) -> Result<Reply, ControlError> {
    let path = socket_path(id);
    let stream = UnixStream::connect(&path).map_err(|source| ControlError::NotRunning {
        id,
        path: path.clone(),
        source,
    })?;
    // A reconfiguration can re-insert a whole tier; give it time, but never
    // hang forever on a daemon that stopped answering.
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut w = &stream;
    serde_json::to_writer(&mut w, req)?;
    w.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}

/// Turn a [`CacheChange`] into the cache's own reconfiguration, sizing new
/// tiers the same way the command line does.
pub fn to_reconfig(
    change: &CacheChange,
    chunk_size: usize,
    current: &[TierConfig],
) -> Result<Reconfig, String> {
    let tier_at = |index: usize| {
        current
            .get(index)
            .ok_or_else(|| format!("no tier {index} (the stack has {})", current.len()))
    };
    Ok(match change {
        CacheChange::AddTier {
            index,
            medium,
            size,
            hash,
        } => {
            if *index > current.len() {
                return Err(format!(
                    "cannot insert at {index}: the stack has {} tiers",
                    current.len()
                ));
            }
            let (groups, ways) = tier_geometry(*size, chunk_size).map_err(|e| e.to_string())?;
            Reconfig::AddTier {
                index: *index,
                tier: TierConfig {
                    medium: medium.clone(),
                    groups,
                    ways,
                    hash: hash.clone(),
                },
            }
        }
        CacheChange::RemoveTier { index } => {
            tier_at(*index)?;
            if current.len() == 1 {
                return Err("cannot remove the last tier".into());
            }
            Reconfig::RemoveTier { index: *index }
        }
        CacheChange::Rehash { index, hash } => {
            tier_at(*index)?;
            Reconfig::Rehash {
                index: *index,
                hash: hash.clone(),
            }
        }
        CacheChange::Resize { index, size } => {
            let t = tier_at(*index)?;
            let slots = (*size / chunk_size as u64) as usize;
            if slots == 0 {
                return Err(format!("{size} bytes is less than one chunk"));
            }
            // Keep the tier's associativity where it fits; a resize changes
            // how many sets there are.
            let ways = t.ways.min(slots);
            Reconfig::Resize {
                index: *index,
                groups: slots / ways,
                ways,
            }
        }
    })
}

/// The daemon side: serve requests until the process ends.
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Bind the socket of device `id`, replacing a stale one left by a
    /// killed daemon (the device id is ours now, so nobody else can own it).
    pub fn bind(id: u32) -> std::io::Result<(ControlServer, UnixListener)> {
        std::fs::create_dir_all(RUN_DIR)?;
        let path = socket_path(id);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok((ControlServer { path }, listener))
    }

    /// Serve connections on a thread. `shutdown` is called for a
    /// [`Request::Shutdown`]; `device` names the block device in reports.
    pub fn spawn(
        listener: UnixListener,
        target: Arc<dyn Target>,
        device: String,
        shutdown: impl Fn() + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("canopy-control".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let stop = serve_one(&stream, target.as_ref(), &device);
                    if stop {
                        shutdown();
                    }
                }
            })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Build the statistics report for `volume`.
pub fn report(volume: &Volume, device: &str) -> Report {
    Report {
        device: device.to_string(),
        size: volume.size(),
        io_errors: volume.errors(),
        served: Served::Embedded {
            mode: volume.mode(),
            cache: Box::new(volume.cache().stats()),
            origin: Box::new(volume.cache().backing().stats()),
        },
    }
}

/// Answer one connection; returns true when it asked for shutdown.
fn serve_one(stream: &UnixStream, target: &dyn Target, device: &str) -> bool {
    // A client that connects and says nothing must not wedge the only
    // control thread.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return false;
    }
    let (reply, stop) = match serde_json::from_str::<Request>(&line) {
        Err(e) => (
            Reply::Error {
                message: format!("bad request: {e}"),
            },
            false,
        ),
        Ok(Request::Stats) => (ok(target, device), false),
        Ok(Request::Shutdown) => (ok(target, device), true),
        Ok(Request::Cache { change }) => match target.reconfigure(&change) {
            Ok(()) => {
                tracing::info!(?change, "cache reconfigured");
                (ok(target, device), false)
            }
            Err(message) => (Reply::Error { message }, false),
        },
    };
    let mut w = stream;
    if let Ok(text) = serde_json::to_string(&reply) {
        let _ = w.write_all(text.as_bytes());
        let _ = w.write_all(b"\n");
    }
    stop
}

fn ok(target: &dyn Target, device: &str) -> Reply {
    Reply::Ok {
        report: Box::new(target.report(device)),
    }
}
