//! Published reads: a driver may serve repeat local reads of a chunk
//! without the node, from a copy the node publishes, as long as the node
//! revokes it before anything could make it stale.
//!
//! The node publishes a chunk when it serves a local read of it (so only
//! chunks its own user reads are published) and revokes it at the first
//! event about that chunk other than a local read: any message from the
//! parent or a child naming it, any local write, lock or sync, a release,
//! and, for all chunks, the loss of the parent. That is deliberately more
//! than strictly needed: a revocation costs one trip through the node on
//! the next read, a missed one would serve stale data. Because the driver
//! applies [`Action::Revoke`] before it performs the actions that follow
//! it (an INVALIDATE's answer, a write's acknowledgement), no reader can
//! see the old copy once the change is visible anywhere else. The copy
//! also carries the grant's expiry, past which the reader must not use it.

use bytes::Bytes;
use canopy_proto::Perm;

use crate::node::{Action, Node};
use crate::Millis;

impl Node {
    /// Publish local reads (see [`crate::NodeConfig::publish_reads`]); for
    /// a driver that decides after the configuration was built. Turning it
    /// off withdraws what was published.
    pub fn set_publish_reads(&mut self, on: bool) {
        self.cfg.publish_reads = on;
        if !on {
            self.revoke_all();
        }
    }

    /// After serving a local read of `chunk` with `data`: publish it, if
    /// this node publishes reads and the copy is one it may keep serving
    /// (a child's usable grant with no INVALIDATE pending).
    pub(crate) fn publish(&mut self, chunk: u64, data: &Bytes, now: Millis) {
        if !self.cfg.publish_reads || self.is_root() {
            return;
        }
        let Some(e) = self.table.get(&chunk) else {
            return;
        };
        if self.usable(e, now) < Perm::Read || !e.parent_inval.is_empty() {
            return;
        }
        let expiry = e.expiry;
        self.published.insert(chunk);
        // Bytes that just arrived may be a slice of the link's whole read
        // buffer (`Store`'s `last`): a published copy lives on, and would
        // keep all of that buffer alive. It gets bytes of its own.
        let data = if self.store.is_last(chunk, data) {
            Bytes::copy_from_slice(data)
        } else {
            data.clone()
        };
        self.actions.push_back(Action::Publish {
            chunk,
            data,
            expiry,
        });
    }

    /// Withdraw `chunk`'s published copy, if any, before whatever is about
    /// to change it.
    pub(crate) fn revoke(&mut self, chunk: u64) {
        if self.published.remove(&chunk) {
            self.actions.push_back(Action::Revoke { chunk });
        }
    }

    /// Withdraw every published copy (the parent is gone).
    pub(crate) fn revoke_all(&mut self) {
        let all = std::mem::take(&mut self.published);
        for chunk in all {
            self.actions.push_back(Action::Revoke { chunk });
        }
    }
}
