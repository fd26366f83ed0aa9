//! From a [`PeerConfig`] to a running [`Peer`]: open the origin, bind the
//! listener, open the trace, build the node, start the driver.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use canopy_node::Node;
use canopy_origin::{OriginError, OriginStore};
use tokio::net::TcpListener;

use crate::config::{PeerConfig, PeerRole};
use crate::driver::{self, DriverOptions, Peer};
use crate::seal::LinkKeys;
use crate::trace::{TraceTarget, Tracer};
use crate::view::ReadView;

/// Why a peer could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The volume's key file could not be used (its error says why: a
    /// missing file, loose permissions, another volume's keys...).
    #[error(transparent)]
    Keys(#[from] canopy_keys::KeyError),
    /// The cookie ledger cannot be opened.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The origin could not be opened, created or extended.
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// Creating or extending the origin file failed.
    #[error("origin {path}: {source}")]
    OriginFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The origin is larger than `size` asks for.
    #[error("origin {path} has {actual} bytes but size = {wanted}; refusing to shrink it")]
    OriginTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The size asked for.
        wanted: u64,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The trace file could not be opened.
    #[error("cannot open protocol trace {path}: {source}")]
    Trace {
        /// The target.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A disk tier's file cannot be created or written.
    #[error("cache disk tier {path}: {source}")]
    CacheDisk {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A required setting is missing (a config that skipped validation).
    #[error("missing setting: {0}")]
    Missing(&'static str),
}

/// Open the root's origin, first creating a missing file or extending a
/// shorter one to `size` when a size is given.
///
/// Extending is safe (the new tail reads as zeros, which is what an unwritten
/// volume holds); shrinking would destroy data, so a larger origin is refused.
pub fn open_origin(
    path: &Path,
    size: Option<u64>,
    chunk_size: usize,
) -> Result<OriginStore, SetupError> {
    let file_err = |source| SetupError::OriginFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(size) = size {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(file_err)?;
                f.set_len(size).map_err(file_err)?;
                tracing::info!(path = %path.display(), size, "created origin");
            }
            Err(e) => return Err(file_err(e)),
            Ok(m) if m.is_file() && m.len() < size => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(file_err)?;
                f.set_len(size).map_err(file_err)?;
                tracing::info!(path = %path.display(), from = m.len(), to = size, "extended origin");
            }
            Ok(_) => {}
        }
    }
    let store = OriginStore::open(path, None, chunk_size)?;
    if let Some(wanted) = size {
        if store.size() != wanted {
            return Err(SetupError::OriginTooLarge {
                path: path.to_path_buf(),
                actual: store.size(),
                wanted,
            });
        }
    }
    Ok(store)
}

/// Load the keys a configuration names: the trusted key file (`keys`) or,
/// for a relay, the relay file (`verify_key`), each checked to be for this
/// volume. None for a volume without keys.
pub fn load_keys(cfg: &PeerConfig) -> Result<Option<LinkKeys>, SetupError> {
    if let Some(path) = &cfg.keys {
        let k = Arc::new(canopy_keys::TrustedKeys::load_for(path, &cfg.volume)?);
        return Ok(Some(match ledger_path(cfg) {
            Some(l) => LinkKeys::trusted_with_ledger(k, &l)?,
            None => LinkKeys::trusted(k),
        }));
    }
    if let Some(path) = &cfg.verify_key {
        let v = canopy_keys::Verifier::load_for(path, &cfg.volume)?;
        return Ok(Some(LinkKeys::relay(Arc::new(v))));
    }
    Ok(None)
}

/// Where a trusted node keeps its cookie ledger: `ledger`, or beside a
/// root's origin file.
fn ledger_path(cfg: &PeerConfig) -> Option<std::path::PathBuf> {
    if let Some(l) = &cfg.ledger {
        return Some(l.clone());
    }
    let origin = cfg.origin.as_ref()?;
    if !std::fs::metadata(origin).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let mut name = origin.as_os_str().to_os_string();
    name.push(".cookies");
    Some(name.into())
}

/// Build the sans-IO node a configuration describes (opening the origin
/// for a root), for a volume with `keys` if given.
pub fn build_node(cfg: &PeerConfig, keys: Option<&LinkKeys>) -> Result<Node, SetupError> {
    build_node_sharing(cfg, keys).map(|(node, _)| node)
}

/// [`build_node`], and for a root its origin file, shared with the node,
/// for the driver's own reads of it (`origin_read.rs`).
fn build_node_sharing(
    cfg: &PeerConfig,
    keys: Option<&LinkKeys>,
) -> Result<(Node, Option<Arc<OriginStore>>), SetupError> {
    let mut shared = None;
    let mut ncfg = cfg.node_config();
    ncfg.volume_key = keys.map(LinkKeys::volume_key);
    // A trusted writer's links re-send a write with its first cookie, which
    // the node above applies at most once: re-sending is safe.
    ncfg.retry_writes = keys.is_some_and(LinkKeys::spends_cookies);
    let mut node = match cfg.role {
        PeerRole::Root => {
            let path = cfg.origin.as_deref().ok_or(SetupError::Missing("origin"))?;
            // Validation bounded chunk_size to 4K..=1M.
            let chunk = usize::try_from(cfg.chunk_size()).unwrap_or(usize::MAX);
            let store = Arc::new(open_origin(path, cfg.size.map(|s| s.0), chunk)?);
            let size = store.size();
            let chunk32 = u32::try_from(chunk).unwrap_or(u32::MAX);
            shared = Some(store.clone());
            let origin = Box::new(store);
            let mut node = Node::new_root(ncfg, Some(origin), chunk32, size);
            node.set_version_base(version_base());
            node
        }
        PeerRole::Proxy | PeerRole::Leaf | PeerRole::Relay => {
            for t in &cfg.cache_disk {
                check_disk_tier(&t.path)?;
            }
            Node::new_child(ncfg)
        }
    };
    node.set_push_ahead(cfg.push_ahead.unwrap_or(0));
    Ok((node, shared))
}

/// The root's first chunk version this run (`canopy_node::Node::set_version_base`):
/// the wall clock in ms, shifted left 20 bits, so that every version an
/// earlier run handed out is below it (a chunk would need a million writes
/// per ms of that run's uptime to catch up), without a file to keep.
/// Depends on the clock not going back across a restart, as the signed
/// expiries of grants and cookies do.
fn version_base() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX >> 20)
        });
    ms.min(u64::MAX >> 20) << 20
}

/// The node builds its disk tiers only once the root announces the chunk
/// size, maybe much later: check now that each file can be created and
/// written, so a wrong path or permission stops the daemon at start with
/// its name rather than leaving the node without the tier.
fn check_disk_tier(path: &std::path::Path) -> Result<(), SetupError> {
    let existed = path.exists();
    let err = |source| SetupError::CacheDisk {
        path: path.to_path_buf(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(err)?;
    if !existed {
        std::fs::remove_file(path).map_err(err)?;
    }
    Ok(())
}

/// Where `trace_protocol` sends lines: `-` is standard output, except for
/// a leaf, whose standard output carries command replies.
pub fn trace_target(cfg: &PeerConfig) -> Option<TraceTarget> {
    match cfg.trace_protocol.as_deref() {
        None => None,
        Some("-") if cfg.role == PeerRole::Leaf => Some(TraceTarget::Stderr),
        Some("-") => Some(TraceTarget::Stdout),
        Some(p) => Some(TraceTarget::File(PathBuf::from(p))),
    }
}

/// Start a peer as `cfg` describes, on the current tokio runtime.
pub async fn start_peer(cfg: &PeerConfig) -> Result<Peer, SetupError> {
    start(cfg, None).await
}

/// Start a peer whose node publishes its local reads into `view`, so that
/// threads outside tokio (a ublk leaf's queues) serve repeat reads without
/// the node task.
pub async fn start_peer_with_view(
    cfg: &PeerConfig,
    view: Arc<ReadView>,
) -> Result<Peer, SetupError> {
    start(cfg, Some(view)).await
}

async fn start(cfg: &PeerConfig, view: Option<Arc<ReadView>>) -> Result<Peer, SetupError> {
    let name = cfg.name();
    let keys = load_keys(cfg)?;
    let (mut node, origin_store) = build_node_sharing(cfg, keys.as_ref())?;
    node.set_publish_reads(view.is_some());
    let listener = match cfg.listen.as_deref() {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| SetupError::Bind {
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let trace = match trace_target(cfg) {
        Some(t) => Some(Tracer::open(&name, &t).map_err(|source| SetupError::Trace {
            path: cfg.trace_protocol.clone().unwrap_or_default(),
            source,
        })?),
        None => None,
    };
    let peer = driver::start(
        node,
        DriverOptions {
            name: name.clone(),
            listener,
            parent: cfg.parent.clone(),
            trace,
            view,
            keys,
            max_parent_faults: cfg.max_parent_faults.unwrap_or(3),
            origin_store,
        },
    );
    if let Some(addr) = peer.local_addr() {
        tracing::info!(node = %name, %addr, role = cfg.role.name(), volume = %cfg.volume, "listening");
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_is_created_extended_and_never_shrunk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.img");
        let s = open_origin(&p, Some(64 << 10), 4096).unwrap();
        assert_eq!(s.size(), 64 << 10);
        drop(s);
        let s = open_origin(&p, Some(128 << 10), 4096).unwrap();
        assert_eq!(s.size(), 128 << 10);
        drop(s);
        assert_eq!(open_origin(&p, None, 4096).unwrap().size(), 128 << 10);
        let e = open_origin(&p, Some(64 << 10), 4096).err().unwrap();
        assert!(e.to_string().contains("refusing to shrink"), "{e}");
        let e = open_origin(&dir.path().join("none"), None, 4096)
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn a_disk_tier_that_cannot_be_created_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = PeerConfig::new(PeerRole::Proxy, "v");
        cfg.listen = Some("127.0.0.1:0".into());
        cfg.parent = Some("127.0.0.1:1".into());
        cfg.cache_disk = vec![crate::config::DiskTier {
            path: dir.path().join("missing-dir/t.cache"),
            size: crate::config::Size(1 << 20),
        }];
        let e = build_node(&cfg, None).err().unwrap();
        assert!(e.to_string().contains("missing-dir/t.cache"), "{e}");
        // A path that can be created passes, and is not left behind.
        cfg.cache_disk[0].path = dir.path().join("t.cache");
        assert!(build_node(&cfg, None).is_ok());
        assert!(!dir.path().join("t.cache").exists());
    }
}
