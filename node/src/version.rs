//! Chunk versions (DESIGN.md, "Data model").
//!
//! Every chunk has a version that rises with every write, so that a copy
//! can be named by (chunk, version). Sealed records sign it, and grants name
//! it, which is what lets a reader behind an untrusted relay tell an old
//! copy from the current one.
//!
//! - The root's versions start at a base the driver sets once per run
//!   ([`Node::set_version_base`]): every chunk not written since is at the
//!   base. The driver derives it from the wall clock, so versions handed
//!   out by an earlier run of the root are all below it and none is reused
//!   for other contents.
//! - A node learns a chunk's version from its parent with the grant, the
//!   PUSH or the PUT reply that brings the chunk, and raises it on every
//!   write it applies while holding WRITE: a local write, a child's PUT,
//!   or the data a WRITE-holding child sends back (FLUSH, INVALIDATE
//!   answer), which carries the child's version. The parent keeps the
//!   higher of the child's and its own plus one, so versions only rise as
//!   data climbs the tree.
//! - A PUT from a node that does not hold WRITE cannot know the version:
//!   it carries a floor, one above the highest version each node on its
//!   way knows (one of them may hold a dirty copy newer than the root's),
//!   and the node that applies it assigns a version above both the floor
//!   and its own.

use std::collections::HashMap;

use crate::Node;

/// The root's versions of the chunks written during this run; the others
/// are at the base.
#[derive(Debug)]
pub(crate) struct RootVersions {
    base: u64,
    written: HashMap<u64, u64>,
}

impl Default for RootVersions {
    fn default() -> Self {
        RootVersions {
            base: 1,
            written: HashMap::new(),
        }
    }
}

/// What a writer said of the version of the data it sent.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Incoming {
    /// The data's own version, given by a child that held WRITE (FLUSH,
    /// INVALIDATE answer; 0: none). The same version again is a resent copy
    /// (a FLUSH retried after its reply was lost or refused: the child has
    /// not written since, or it would have raised it), which keeps its
    /// version. A lower one is counted (`stale_versions`) and still takes
    /// a new version: it follows a failed write (the parent applied a PUT
    /// whose forwarding failed, then the child gave back its older dirty
    /// copy: both writes failed, either may stand), or a replay, which the
    /// write cookies refuse before it gets here.
    Exact(u64),
    /// The lowest version the data may take: a PUT (its writer did not
    /// hold WRITE, so it cannot know the version, only a floor above every
    /// version it knew), or a local write (0).
    Floor(u64),
}

impl Node {
    /// Root: the version of every chunk not written during this run. It must
    /// exceed every version an earlier run handed out (the driver uses the
    /// wall clock in ms shifted left by 20 bits, which allows a million
    /// writes per chunk per ms of uptime). Call before the first message;
    /// 0 is taken as 1, since 0 means "unknown" on the wire.
    pub fn set_version_base(&mut self, base: u64) {
        self.root_versions.base = base.max(1);
        self.root_versions.written.clear();
    }

    /// The version of the chunk's contents as this node knows them: at the
    /// root the current one, elsewhere the one granted or written here (0:
    /// none).
    pub(crate) fn version_of(&self, chunk: u64) -> u64 {
        if self.is_root() {
            let v = &self.root_versions;
            v.written.get(&chunk).copied().unwrap_or(v.base)
        } else {
            self.table.get(&chunk).map_or(0, |e| e.version)
        }
    }

    /// A write was applied here: the chunk's new version, from what the
    /// writer said of it (see [`Incoming`]).
    pub(crate) fn bump_version(&mut self, chunk: u64, incoming: Incoming) -> u64 {
        let cur = self.version_of(chunk);
        let new = match incoming {
            // A relay cannot re-seal: its copy keeps the version its
            // writer sealed it under.
            Incoming::Exact(v) | Incoming::Floor(v) if self.is_relay() => v,
            Incoming::Exact(v) if v != 0 && v == cur => cur,
            Incoming::Exact(v) => {
                if v != 0 && v < cur {
                    tracing::warn!(
                        chunk,
                        version = v,
                        current = cur,
                        "write of a version below ours"
                    );
                    self.stats.stale_versions += 1;
                }
                cur.saturating_add(1).max(v)
            }
            Incoming::Floor(f) => cur.saturating_add(1).max(f),
        };
        if self.is_root() {
            self.root_versions.written.insert(chunk, new);
        } else if let Some(e) = self.table.get_mut(&chunk) {
            e.version = new;
        }
        new
    }
}
