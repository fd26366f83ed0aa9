//! The volume exported over NBD (`canopy-ublk add --export-nbd`), for
//! kernels without ublk and for VMs, which qemu attaches directly.
//!
//! - [`wire`]: the protocol's messages as pure functions (fuzzed).
//! - [`server`]: the listener, handshake and transmission threads.
//! - [`daemon`]: `add --no-device`, a daemon serving only the export.
//! - [`tree`]: a leaf of a canopy tree as a [`Backend`].
//!
//! The server serves any [`Backend`]: the embedded volume, or a tree leaf.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::volume::{CacheMode, Op, Volume};

pub mod daemon;
pub mod server;
pub mod tree;
pub mod wire;

pub use server::NbdServer;

/// Where the export listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportAddr {
    /// A Unix socket at this path (created mode 0600).
    Unix(PathBuf),
    /// A TCP address, `HOST:PORT` (port 0 picks a free port).
    Tcp(String),
}

impl FromStr for ExportAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(ExportAddr::Unix(PathBuf::from(path))),
            Some(("tcp", addr))
                if addr
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(ExportAddr::Tcp(addr.to_string()))
            }
            _ => Err(format!(
                "'{s}' is not an NBD address: use unix:PATH or tcp:HOST:PORT"
            )),
        }
    }
}

impl fmt::Display for ExportAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ExportAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// What the NBD server serves: block requests in the volume's own terms.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// The unit the volume moves (its chunk size): advertised as the
    /// preferred block size, since smaller writes cost a read-modify-write
    /// of the chunk.
    fn chunk_size(&self) -> usize;

    /// True when every connection sees one shared state, so that a FLUSH
    /// or FUA on one connection covers writes answered on any other (what
    /// `NBD_FLAG_CAN_MULTI_CONN` promises).
    fn shared_across_connections(&self) -> bool;

    /// True when WRITE_ZEROES (and TRIM) may leave a hole in the backing
    /// store; the server then serves `NBD_CMD_FLAG_NO_HOLE` as a write of
    /// zeros.
    fn punches_holes(&self) -> bool;

    /// Serve one request for `len` bytes at `offset`, as
    /// [`Volume::handle`]: `buf` holds a write's bytes or receives a
    /// read's; the result is bytes done or a negative errno. Blocking.
    fn handle(&self, op: Op, offset: u64, len: usize, buf: &mut [u8]) -> i32;
}

impl Backend for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn chunk_size(&self) -> usize {
        self.cache().chunk_size()
    }

    // Every connection is served from this one Volume: one cache stack over
    // one origin. In writethrough mode a FLUSH is the origin's fdatasync,
    // and every answered write, from any connection, is already on the
    // origin; in writeback mode a FLUSH writes back every dirty chunk of the
    // shared cache, then syncs. A FUA write goes through to the origin and
    // syncs it. Reads on any connection see the same cache. So FLUSH and
    // FUA are visible across connections, as multi-conn requires.
    fn shared_across_connections(&self) -> bool {
        true
    }

    // A whole chunk zeroed goes to the origin as a punched hole.
    fn punches_holes(&self) -> bool {
        true
    }

    fn handle(&self, op: Op, offset: u64, len: usize, buf: &mut [u8]) -> i32 {
        Volume::handle(self, Some(op), offset, len, buf)
    }
}

/// How the embedded volume's writes are acknowledged, for the log.
pub(crate) fn mode_name(mode: CacheMode) -> &'static str {
    match mode {
        CacheMode::Writethrough => "writethrough",
        CacheMode::Writeback => "writeback",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:/run/v.sock".parse(),
            Ok(ExportAddr::Unix(PathBuf::from("/run/v.sock")))
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse(),
            Ok(ExportAddr::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!("tcp:[::1]:0".parse(), Ok(ExportAddr::Tcp("[::1]:0".into())));
        for bad in [
            "",
            "unix:",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:port",
            "nbd:x",
            "/p",
        ] {
            assert!(bad.parse::<ExportAddr>().is_err(), "{bad}");
        }
        assert_eq!(ExportAddr::Tcp("h:1".into()).to_string(), "tcp:h:1");
    }
}
