//! The root's origin reads, off the node task: page-aligned chunk buffers
//! recycled through a pool, and completions that go straight from the
//! blocking thread to the node task.
//!
//! B2 (`bench/run b2`, a cold read through a leaf straight from a root)
//! profiled each origin read at the root as a zeroed allocation of a chunk
//! and a page (a `memset` of every chunk read, and malloc's free-list work)
//! and two hops back to the node task (the blocking thread woke a task
//! that only forwarded the result). A pooled buffer needs no zeroing, since
//! the read overwrites all of it, and [`Reply`] sends from the blocking
//! thread itself, still answering (with an error) if the read panics.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use canopy_cache::Backing;
use canopy_proto::Status;
use tokio::sync::mpsc;

/// Memory pages: O_DIRECT needs the buffer aligned to the device's
/// alignment, which a page covers.
const PAGE: usize = 4096;

/// Bytes of free buffers a pool keeps at most; beyond this (or
/// [`POOL_MIN`] buffers, if more) a returned buffer is freed.
const POOL_BYTES: usize = 8 << 20;

/// Buffers a pool keeps at least room for, whatever their size.
const POOL_MIN: usize = 8;

/// A finished origin read: the chunk and its contents or why not.
pub(crate) type OriginDone = (u64, Result<Bytes, Status>);

/// Free chunk buffers, each a chunk and a page long so that a page-aligned
/// chunk fits in it.
#[derive(Debug)]
pub(crate) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// A chunk's size.
    size: usize,
    /// Free buffers kept at most.
    keep: usize,
}

impl BufPool {
    /// A pool of buffers for `size`-byte chunks.
    pub(crate) fn new(size: usize) -> Arc<Self> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            size,
            keep: (POOL_BYTES / size.max(1)).max(POOL_MIN),
        })
    }

    /// A buffer from the pool, or a new one (zeroed once, when made).
    fn take(&self) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut f| f.pop());
        reused.unwrap_or_else(|| vec![0u8; self.size + PAGE])
    }

    /// Give a buffer back, unless the pool is full.
    fn give(&self, buf: Vec<u8>) {
        if buf.len() != self.size + PAGE {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.keep {
                f.push(buf);
            }
        }
    }

    /// Free buffers held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }
}

/// A pool buffer holding one chunk at a page-aligned offset; back to the
/// pool when the last [`Bytes`] of it is dropped.
struct Pooled {
    buf: Vec<u8>,
    off: usize,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        // `off + size <= buf.len()` by construction (`read_pooled`); an
        // empty slice rather than a panic if that were ever broken.
        self.buf
            .get(self.off..self.off + self.pool.size)
            .unwrap_or_default()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// The first page-aligned offset in `buf`.
fn aligned_offset(buf: &[u8]) -> usize {
    (PAGE - buf.as_ptr() as usize % PAGE) % PAGE
}

/// Read `chunk` into a page-aligned pool buffer, so that an O_DIRECT origin
/// reads straight into it (no bounce buffer, no copy) and nothing is
/// zeroed first.
pub(crate) fn read_pooled(
    origin: &dyn Backing,
    pool: &Arc<BufPool>,
    chunk: u64,
) -> std::io::Result<Bytes> {
    let mut buf = pool.take();
    let off = aligned_offset(&buf);
    let size = pool.size;
    let r = match buf.get_mut(off..off + size) {
        Some(b) => origin.read_chunk(chunk, b),
        None => Err(std::io::Error::other("chunk buffer too small")),
    };
    let pooled = Pooled {
        buf,
        off,
        pool: pool.clone(),
    };
    r?;
    Ok(Bytes::from_owner(pooled))
}

/// The answer to one origin read, sent from wherever the read ran. If it
/// is dropped unsent (the read panicked), it answers with an I/O error, so
/// the read's slot is freed and its requests fail instead of hanging.
pub(crate) struct Reply {
    chunk: u64,
    tx: Option<mpsc::UnboundedSender<OriginDone>>,
}

impl Reply {
    /// The answer for `chunk`, to be sent on `tx`.
    pub(crate) fn new(chunk: u64, tx: mpsc::UnboundedSender<OriginDone>) -> Self {
        Reply {
            chunk,
            tx: Some(tx),
        }
    }

    /// Send the result. The node task may have stopped; then nobody needs
    /// the data.
    pub(crate) fn send(mut self, r: Result<Bytes, Status>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.chunk, r));
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            tracing::error!(chunk = self.chunk, "origin read ended without a result");
            let _ = tx.send((self.chunk, Err(Status::IoError)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backing whose chunk `c` is all `c as u8`, and whose chunk 13
    /// fails.
    struct Pattern;

    impl Backing for Pattern {
        fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if chunk == 13 {
                return Err(std::io::Error::other("bad sector"));
            }
            buf.fill(chunk as u8);
            Ok(())
        }
        fn write_chunk(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn zero_chunk(&self, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buffers_are_aligned_reused_and_bounded() {
        let pool = BufPool::new(8192);
        let a = read_pooled(&Pattern, &pool, 1).unwrap();
        assert_eq!(a.len(), 8192);
        assert!(a.iter().all(|&b| b == 1));
        assert_eq!(a.as_ptr() as usize % PAGE, 0);
        let first = a.as_ptr();
        // A slice keeps the buffer; the last reference gives it back.
        let part = a.slice(100..200);
        drop(a);
        assert_eq!(pool.held(), 0);
        drop(part);
        assert_eq!(pool.held(), 1);
        // Reused: same memory, nothing of the old chunk left.
        let b = read_pooled(&Pattern, &pool, 2).unwrap();
        assert_eq!(b.as_ptr(), first);
        assert!(b.iter().all(|&x| x == 2));
        // A failed read returns its buffer too.
        assert!(read_pooled(&Pattern, &pool, 13).is_err());
        assert_eq!(pool.held(), 1);
        // Never more than `keep` free buffers.
        let many: Vec<_> = (0..pool.keep + 5)
            .map(|c| read_pooled(&Pattern, &pool, 100 + c as u64).unwrap())
            .collect();
        drop(many);
        assert_eq!(pool.held(), pool.keep);
    }

    #[test]
    fn a_reply_dropped_unsent_answers_with_an_error() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        Reply::new(4, tx.clone()).send(Ok(Bytes::from_static(b"x")));
        assert_eq!(rx.try_recv().unwrap(), (4, Ok(Bytes::from_static(b"x"))));
        let r = Reply::new(5, tx);
        let t = std::thread::spawn(move || {
            let _r = r;
            panic!("read panicked");
        });
        assert!(t.join().is_err());
        assert_eq!(rx.try_recv().unwrap(), (5, Err(Status::IoError)));
        assert!(rx.try_recv().is_err());
    }
}
