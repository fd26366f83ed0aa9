//! The device as a leaf of a canopy tree: block requests become chunk
//! requests to the node that canopy-peerd's driver runs in this process,
//! which fetches chunks from the parent, caches them and keeps them coherent
//! with the rest of the tree (permissions, invalidation, write modes).
//!
//! Like [`crate::volume`], this knows nothing about ublk, so the host tests
//! drive it against a real tree on loopback. Unlike it, a request is
//! asynchronous: a miss waits for the network, and the queue thread must
//! not wait with it (see `leaf_device`). Reads of chunks the node has
//! published are the exception: [`LeafVolume::try_read`] serves them on
//! the caller's thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use canopy_peerd::driver::join_all;
use canopy_peerd::{NodeHandle, ReadView, RequestError};
use canopy_proto::Status;
use tokio::task::JoinSet;

use crate::volume::{pieces, Op, ZEROS};

/// What one block request came to.
#[derive(Debug)]
pub struct Completion {
    /// The completion result the kernel expects: bytes done, or a negative
    /// errno.
    pub result: i32,
    /// For a successful read: the bytes, exactly as many as asked for.
    pub data: Option<BytesMut>,
}

impl Completion {
    fn errno(e: i32) -> Completion {
        Completion {
            result: -e,
            data: None,
        }
    }
}

/// A volume served by a node of the tree.
pub struct LeafVolume {
    handle: NodeHandle,
    view: Option<Arc<ReadView>>,
    size: u64,
    chunk_size: usize,
    errors: AtomicU64,
    /// Reads served by `try_read`, one counter per queue thread on a cache
    /// line of its own, so counting a hit never bounces a line between
    /// queues.
    hits: Box<[QueueCounter]>,
}

/// A counter written by one queue thread.
#[repr(align(64))]
#[derive(Default)]
struct QueueCounter(AtomicU64);

impl LeafVolume {
    /// Serve the volume through `handle`, whose node is connected and
    /// reported this geometry. With `view` (the node's published reads),
    /// [`LeafVolume::try_read`] serves repeat reads without the node.
    /// `queues` is how many threads call [`LeafVolume::try_read`].
    pub fn new(
        handle: NodeHandle,
        view: Option<Arc<ReadView>>,
        size: u64,
        chunk_size: usize,
        queues: usize,
    ) -> Self {
        LeafVolume {
            handle,
            view,
            size,
            chunk_size,
            errors: AtomicU64::new(0),
            hits: (0..queues.max(1))
                .map(|_| QueueCounter::default())
                .collect(),
        }
    }

    /// Serve a read on the caller's thread if every chunk it touches is
    /// published and fresh: the cache-hit path of a queue thread, with no
    /// task, no allocation and no wait on the node. False when any piece
    /// misses; `buf` then holds partial bytes the full read overwrites.
    ///
    /// `queue` (below the `queues` given to [`LeafVolume::new`]) picks the
    /// caller's hit counter.
    pub fn try_read(&self, queue: usize, offset: u64, len: usize, buf: &mut [u8]) -> bool {
        let Some(view) = &self.view else {
            return false;
        };
        let in_range = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.size);
        let Some(buf) = buf.get_mut(..len).filter(|_| in_range && len > 0) else {
            return false;
        };
        for p in pieces(offset, len, self.chunk_size) {
            if !view.read(p.chunk, p.at, &mut buf[p.range]) {
                return false;
            }
        }
        if let Some(c) = self.hits.get(queue) {
            // One writer per counter: a load and a store, no locked RMW.
            c.0.store(c.0.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        true
    }

    /// Reads served by [`LeafVolume::try_read`] so far.
    pub fn hits(&self) -> u64 {
        self.hits.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }

    /// The node, for statistics and a clean stop.
    pub fn node(&self) -> &NodeHandle {
        &self.handle
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Requests that failed so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Serve one request for `len` bytes at byte `offset`; `data` holds the
    /// bytes of a write (at least `len`) and is ignored otherwise.
    ///
    /// FLUSH makes every write acknowledged before it durable at the root,
    /// whatever the write mode (in async and semi-sync modes that is when
    /// the data goes up); FUA does the same for one write.
    pub async fn handle(&self, op: Option<Op>, offset: u64, len: usize, data: Bytes) -> Completion {
        let Some(op) = op else {
            return Completion::errno(libc::EOPNOTSUPP);
        };
        let in_range = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.size);
        if !in_range && op != Op::Flush {
            return Completion::errno(libc::EINVAL);
        }
        if matches!(op, Op::Write { .. }) && len > data.len() {
            return Completion::errno(libc::EINVAL);
        }
        let done = match op {
            Op::Read => match self.read(offset, len).await {
                Ok(buf) => {
                    return Completion {
                        result: i32::try_from(len).unwrap_or(i32::MAX),
                        data: Some(buf),
                    }
                }
                Err(e) => Err(e),
            },
            Op::Write { fua } => self.write(offset, len, |r| data.slice(r), fua).await,
            Op::Flush => self.handle.flush().await,
            // The tree has no hole to punch: zeros are written, which reads
            // back exactly as the kernel expects of both requests.
            Op::Discard | Op::WriteZeroes => {
                let zeros = Bytes::from_static(&ZEROS[..]);
                // A piece is at most one chunk, and a chunk at most 1 MiB.
                self.write(offset, len, |r| zeros.slice(0..r.len()), false)
                    .await
            }
        };
        match done {
            Ok(()) => Completion {
                result: i32::try_from(len).unwrap_or(i32::MAX),
                data: None,
            },
            Err(e) => self.failed(op, offset, len, e),
        }
    }

    fn failed(&self, op: Op, offset: u64, len: usize, e: RequestError) -> Completion {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(?op, offset, len, error = %e, "request failed");
        Completion::errno(match e {
            RequestError::Refused(Status::OutOfRange) => libc::EINVAL,
            _ => libc::EIO,
        })
    }

    /// Read the pieces concurrently (a request spans up to eight 64 KiB
    /// chunks, and each miss is a round trip) into one buffer.
    async fn read(&self, offset: u64, len: usize) -> Result<BytesMut, RequestError> {
        let mut out = BytesMut::zeroed(len);
        let mut tasks = JoinSet::new();
        for p in pieces(offset, len, self.chunk_size) {
            let h = self.handle.clone();
            tasks.spawn(async move { (h.read(p.chunk).await, p) });
        }
        while let Some(joined) = tasks.join_next().await {
            let (chunk, p) = joined.map_err(|_| RequestError::Stopped)?;
            let chunk = chunk?;
            let src = chunk
                .get(p.at..p.at + p.range.len())
                // The node checks every chunk's size on arrival; a short one
                // here would be a node bug, reported rather than trusted.
                .ok_or(RequestError::Refused(Status::IoError))?;
            out[p.range].copy_from_slice(src);
        }
        Ok(out)
    }

    /// Write each piece (its bytes from `bytes_for(range in the request)`),
    /// concurrently: different chunks are independent, and a request is
    /// done only when all its pieces are.
    async fn write(
        &self,
        offset: u64,
        len: usize,
        bytes_for: impl Fn(std::ops::Range<usize>) -> Bytes,
        fua: bool,
    ) -> Result<(), RequestError> {
        let mut tasks = JoinSet::new();
        for p in pieces(offset, len, self.chunk_size) {
            let h = self.handle.clone();
            let data = bytes_for(p.range.clone());
            // Validated above: a piece starts inside a chunk of at most 1 MiB.
            let at = u32::try_from(p.at).unwrap_or(u32::MAX);
            tasks.spawn(async move { h.write(p.chunk, at, data, fua).await });
        }
        join_all(tasks).await
    }
}
