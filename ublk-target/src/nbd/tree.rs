//! A leaf of a canopy tree as an NBD backend: requests go to the node this
//! process runs (see [`crate::leaf`]), which fetches chunks from its parent
//! and keeps them coherent with the rest of the tree.

use std::sync::Arc;

use bytes::Bytes;

use super::Backend;
use crate::leaf::LeafVolume;
use crate::volume::Op;

/// [`LeafVolume`] served to NBD workers, which are plain threads: each
/// request that is not a published read blocks its worker on the runtime
/// that runs the node.
pub struct TreeBackend {
    leaf: Arc<LeafVolume>,
    rt: tokio::runtime::Handle,
}

impl TreeBackend {
    /// Serve `leaf`, whose node runs on `rt`.
    pub fn new(leaf: Arc<LeafVolume>, rt: tokio::runtime::Handle) -> TreeBackend {
        TreeBackend { leaf, rt }
    }
}

impl Backend for TreeBackend {
    fn size(&self) -> u64 {
        self.leaf.size()
    }

    fn chunk_size(&self) -> usize {
        self.leaf.chunk_size()
    }

    // Every connection goes through the one node of this process: a FLUSH
    // makes every write that node acknowledged durable at the root, a FUA
    // write is durable at the root before its reply, and reads on any
    // connection see the node's coherent copy. So multi-conn holds.
    fn shared_across_connections(&self) -> bool {
        true
    }

    // The tree has no hole to punch: zeros are written.
    fn punches_holes(&self) -> bool {
        false
    }

    fn handle(&self, op: Op, offset: u64, len: usize, buf: &mut [u8]) -> i32 {
        // A read of published chunks needs neither the node nor the
        // runtime. The queue index is past the ublk queues', so NBD hits
        // do not touch their counters (one writer each).
        if op == Op::Read && self.leaf.try_read(usize::MAX, offset, len, buf) {
            return i32::try_from(len).unwrap_or(i32::MAX);
        }
        let data = match op {
            Op::Write { .. } => Bytes::copy_from_slice(buf.get(..len).unwrap_or(buf)),
            _ => Bytes::new(),
        };
        let done = self
            .rt
            .block_on(self.leaf.handle(Some(op), offset, len, data));
        if let (Some(read), true) = (&done.data, done.result >= 0) {
            let n = read.len().min(buf.len());
            buf[..n].copy_from_slice(&read[..n]);
        }
        done.result
    }
}
