//! The root's origin reads, off the node task: page-aligned chunk buffers
//! recycled through a pool; reads through io_uring where the origin takes
//! O_DIRECT ([`UringReads`]), else on blocking threads whose completions
//! go straight to the node task.
//!
//! B2 (`bench/run b2`, a cold read through a leaf straight from a root)
//! profiled each origin read at the root as a zeroed allocation of a chunk
//! and a page (a `memset` of every chunk read, and malloc's free-list work)
//! and two hops back to the node task (the blocking thread woke a task
//! that only forwarded the result). A pooled buffer needs no zeroing, since
//! the read overwrites all of it, and [`Reply`] sends from the blocking
//! thread itself, still answering (with an error) if the read panics.
//!
//! Even so, each blocking read cost a thread wake-up and a sleep (futex
//! calls and context switches, which a VM pays dearly for: the blocking
//! pool's parking was a tenth of B2's CPU). With io_uring the node task
//! submits the reads of one wakeup in one system call, the kernel runs
//! O_DIRECT reads without a thread, and the completions wake the node task
//! through an eventfd in tokio's own poller.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use canopy_cache::Backing;
use canopy_origin::{DirectChunk, OriginStore};
use canopy_proto::Status;
use io_uring::{opcode, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
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

impl Pooled {
    /// The chunk as `Bytes` that give the buffer back when dropped.
    fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
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
    Ok(pooled.into_bytes())
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

/// One origin read in the ring: the chunk, its buffer and how much of it
/// has arrived.
struct Slot {
    chunk: u64,
    buf: Vec<u8>,
    /// Where the page-aligned chunk starts in `buf`.
    off: usize,
    at: DirectChunk,
    /// Bytes read so far (a short read is continued).
    done: usize,
}

/// The root's origin reads through io_uring, driven by the node task (see
/// the module docs): [`UringReads::start`] queues a read,
/// [`UringReads::submit`] hands what was queued to the kernel in one call,
/// [`UringReads::ready`] waits for completions and [`UringReads::reap`]
/// collects them. Only whole chunks the origin can read with O_DIRECT
/// qualify ([`OriginStore::direct_chunk`]); the caller reads the others on
/// a blocking thread.
pub(crate) struct UringReads {
    ring: IoUring,
    /// Signalled by the ring on every completion; in tokio's poller.
    efd: AsyncFd<OwnedFd>,
    store: Arc<OriginStore>,
    pool: Arc<BufPool>,
    /// Reads in the ring, by the index their SQE carries as user data.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// SQEs queued since the last submit.
    queued: usize,
    /// The last submit failed and was logged; quieter until one succeeds.
    deferring: bool,
}

impl UringReads {
    /// A ring for up to `depth` reads at once of `store`'s chunks into
    /// `pool`'s buffers (which must be chunk-sized). Needs a tokio runtime
    /// with I/O enabled. Fails where io_uring is unavailable (an old
    /// kernel, seccomp, `io_uring_disabled`).
    pub(crate) fn new(
        store: Arc<OriginStore>,
        pool: Arc<BufPool>,
        depth: usize,
    ) -> io::Result<Self> {
        let entries = u32::try_from(depth.next_power_of_two()).unwrap_or(1 << 12);
        let ring = IoUring::new(entries)?;
        // SAFETY: eventfd(2) takes no pointers; a non-negative result is a
        // new descriptor that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        // Registering outside a runtime would panic.
        tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        // SAFETY: an OwnedFd's descriptor stays open, the same one, until
        // the OwnedFd (here owned by the AsyncFd) is dropped.
        let efd = unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }?;
        Ok(UringReads {
            ring,
            efd,
            store,
            pool,
            slots: Vec::new(),
            free: Vec::new(),
            queued: 0,
            deferring: false,
        })
    }

    /// Reads in the ring.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queue a read of `chunk`; false if the ring cannot read it (not a
    /// whole O_DIRECT chunk, or the ring is full): read it otherwise.
    pub(crate) fn start(&mut self, chunk: u64) -> bool {
        let Some(at) = self.store.direct_chunk(chunk) else {
            return false;
        };
        if at.align > PAGE || at.len > self.pool.size || at.len == 0 {
            return false;
        }
        let buf = self.pool.take();
        let off = aligned_offset(&buf);
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.slots[idx] = Some(Slot {
            chunk,
            buf,
            off,
            at,
            done: 0,
        });
        if self.push(idx) {
            true
        } else {
            if let Some(s) = self.slots[idx].take() {
                self.pool.give(s.buf);
            }
            self.free.push(idx);
            false
        }
    }

    /// Queue the SQE for what slot `idx` still lacks; false if the
    /// submission queue is full.
    fn push(&mut self, idx: usize) -> bool {
        let Some(s) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
            return false;
        };
        let left = s.at.len - s.done;
        let Ok(len) = u32::try_from(left) else {
            return false;
        };
        // `off + done + left` is within `buf`: `off + at.len <= off +
        // pool.size <= buf.len()`.
        let ptr = s.buf[s.off + s.done..].as_mut_ptr();
        let entry = opcode::Read::new(types::Fd(s.at.fd), ptr, len)
            .offset(s.at.offset + s.done as u64)
            .build()
            .user_data(idx as u64);
        // SAFETY: the buffer lives in `slots[idx]` until its completion is
        // reaped (`reap`), or until `Drop` has waited for it; the Vec's
        // heap memory does not move while the slot holds it. The
        // descriptor belongs to `store`, which we keep alive as long.
        let pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if pushed {
            self.queued += 1;
        }
        pushed
    }

    /// Hand the queued reads to the kernel, in one system call.
    pub(crate) fn submit(&mut self) {
        if self.queued == 0 {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.queued = 0;
                    self.deferring = false;
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Out of resources for now (EAGAIN, EBUSY): the SQEs stay
                // queued ([`UringReads::deferred`]) and the driver submits
                // again shortly, since no completion may be coming to
                // prompt it (nothing else in flight).
                Err(e) => {
                    if !self.deferring {
                        tracing::warn!(error = %e, queued = self.queued, "io_uring submit deferred");
                    }
                    self.deferring = true;
                    return;
                }
            }
        }
    }

    /// Reads are queued that the kernel has not been given yet (the last
    /// [`UringReads::submit`] failed, or none followed a `start`): the
    /// driver must submit again.
    pub(crate) fn deferred(&self) -> bool {
        self.queued > 0
    }

    /// Wait until completions may be there to reap.
    pub(crate) async fn ready(&self) {
        match self.efd.readable().await {
            Ok(mut g) => {
                // Cleared before reaping: a completion that lands after
                // this signals again, so none is left unseen.
                g.clear_ready();
                let mut count = [0u8; 8];
                // SAFETY: reads at most 8 bytes into `count`. The counter
                // is only reset; a failure (EAGAIN) means it was zero.
                let _ = unsafe {
                    libc::read(self.efd.as_raw_fd(), count.as_mut_ptr().cast(), count.len())
                };
            }
            Err(e) => {
                // Cannot happen for an eventfd; never spin on it.
                tracing::error!(error = %e, "io_uring eventfd failed");
                std::future::pending::<()>().await;
            }
        }
    }

    /// Collect the finished reads into `out`; short reads go on and a
    /// read that failed to start is retried.
    pub(crate) fn reap(&mut self, out: &mut Vec<OriginDone>) {
        let mut cqes: Vec<(usize, i32)> = Vec::new();
        for cqe in self.ring.completion() {
            cqes.push((cqe.user_data() as usize, cqe.result()));
        }
        for (idx, res) in cqes {
            let Some(s) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                tracing::error!(idx, "io_uring completion for no read");
                continue;
            };
            let outcome = if res == -libc::EINTR || res == -libc::EAGAIN {
                None
            } else if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else if res == 0 {
                Some(Err(io::Error::from(io::ErrorKind::UnexpectedEof)))
            } else {
                s.done += res as usize;
                (s.done >= s.at.len).then_some(Ok(()))
            };
            match outcome {
                // Not finished: read the rest.
                None => {
                    if !self.push(idx) {
                        self.finish(idx, Err(io::Error::other("io_uring queue full")), out);
                    }
                }
                Some(r) => self.finish(idx, r, out),
            }
        }
        self.submit();
    }

    /// The read in slot `idx` is over: its chunk or its error into `out`.
    fn finish(&mut self, idx: usize, r: io::Result<()>, out: &mut Vec<OriginDone>) {
        let Some(mut s) = self.slots.get_mut(idx).and_then(Option::take) else {
            return;
        };
        self.free.push(idx);
        match r {
            Ok(()) => {
                self.store.count_read();
                // A partial last chunk reads as zeros past the volume's end.
                if let Some(tail) = s.buf.get_mut(s.off + s.at.len..s.off + self.pool.size) {
                    tail.fill(0);
                }
                let bytes = Pooled {
                    buf: s.buf,
                    off: s.off,
                    pool: self.pool.clone(),
                }
                .into_bytes();
                out.push((s.chunk, Ok(bytes)));
            }
            Err(e) => {
                tracing::error!(chunk = s.chunk, error = %e, "origin read failed");
                self.pool.give(std::mem::take(&mut s.buf));
                out.push((s.chunk, Err(Status::IoError)));
            }
        }
    }
}

impl Drop for UringReads {
    /// The kernel may still write into the buffers of reads in flight:
    /// wait for them before the buffers go. If the ring fails meanwhile,
    /// the buffers are leaked rather than freed under the kernel.
    fn drop(&mut self) {
        let mut out = Vec::new();
        while self.in_flight() > 0 {
            if self.queued > 0 || self.in_flight() > 0 {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "io_uring failed with reads in flight; their buffers are leaked");
                        for s in self.slots.iter_mut().filter_map(Option::take) {
                            std::mem::forget(s.buf);
                        }
                        return;
                    }
                }
            }
            self.queued = 0;
            out.clear();
            self.reap(&mut out);
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

    /// An origin of `chunks` 4 KiB chunks and a 512-byte tail, each byte
    /// a function of its offset; None where the filesystem has no O_DIRECT.
    fn direct_origin(dir: &tempfile::TempDir, chunks: u64) -> Option<Arc<OriginStore>> {
        let path = dir.path().join("origin");
        let len = chunks * 4096 + 512;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let store = OriginStore::open(&path, None, 4096).unwrap();
        store.is_direct().then(|| Arc::new(store))
    }

    fn expected(chunk: u64, len: u64) -> Vec<u8> {
        (0..4096u64)
            .map(|i| {
                let at = chunk * 4096 + i;
                if at < len {
                    (at % 251) as u8
                } else {
                    0
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn reads_through_the_ring_return_each_chunk() {
        let dir = tempfile::tempdir().unwrap();
        // Fail, never skip: a test that cannot run must say so (these
        // machines have both O_DIRECT and io_uring).
        let store = direct_origin(&dir, 40).expect("O_DIRECT in the temporary directory");
        let len = store.size();
        let pool = BufPool::new(4096);
        let mut u = UringReads::new(store.clone(), pool.clone(), 16).expect("io_uring");
        let before = store.stats().reads;
        // More reads than the ring's depth, in two waves, and the tail.
        let mut want: Vec<u64> = (0..41).rev().collect();
        let mut got = std::collections::BTreeMap::new();
        let mut out = Vec::new();
        while got.len() < 41 {
            while u.in_flight() < 16 {
                let Some(c) = want.pop() else { break };
                if !u.start(c) {
                    // Only the 512-byte tail may need the buffered path,
                    // where the device's alignment is larger.
                    assert_eq!(c, 40);
                    got.insert(c, Bytes::from(expected(c, len)));
                }
            }
            u.submit();
            assert!(!u.deferred(), "submitted");
            if u.in_flight() == 0 {
                continue;
            }
            u.ready().await;
            u.reap(&mut out);
            for (c, r) in out.drain(..) {
                assert!(got.insert(c, r.unwrap()).is_none(), "chunk {c} twice");
            }
        }
        for (c, d) in &got {
            assert_eq!(d.as_ref(), expected(*c, len).as_slice(), "chunk {c}");
        }
        assert!(store.stats().reads >= before + 40);
        assert!(!u.start(41), "past the end");
        // Reads still in the kernel when the ring goes: waited for.
        for c in 0..8 {
            assert!(u.start(c));
        }
        assert!(u.deferred(), "queued, not yet given to the kernel");
        u.submit();
        assert!(!u.deferred());
        drop(u);
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
