//! A disk tier's file and the I/O to it.
//!
//! I/O goes through a per-thread `io_uring` doing one read or write at a
//! time (`submit_and_wait(1)`): the calls are synchronous from the caller's
//! point of view, but a thread-local ring means no ring is shared between
//! threads (no lock) and nothing is allocated per operation. If a thread
//! can't set up a ring (old kernel, seccomp, `io_uring_disabled`), that
//! thread falls back to `pread`/`pwrite`, and the fallback is counted.

use io_uring::{opcode, types, IoUring};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Threads that could not set up (or had to abandon) an io_uring and use
/// pread/pwrite instead. Process-wide: the rings are per thread, not per
/// cache. Touched once per thread, never per operation.
static URING_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many threads fell back from io_uring to pread/pwrite so far.
pub fn io_uring_fallbacks() -> u64 {
    URING_FALLBACKS.load(Ordering::Relaxed)
}

// One instance per thread, in a thread-local: its size doesn't matter, and
// boxing the ring would add a pointer chase to every disk I/O.
#[allow(clippy::large_enum_variant)]
enum Ring {
    /// This thread hasn't done disk I/O yet.
    Untried,
    Ready(IoUring),
    /// Setup failed (or the ring broke): use pread/pwrite.
    Unavailable,
}

thread_local! {
    static RING: RefCell<Ring> = const { RefCell::new(Ring::Untried) };
}

/// A ring failure after which the ring can't be trusted any more (as opposed
/// to the operation itself failing, which is reported in the CQE).
struct RingBroken;

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// One read or write of up to `len` bytes through the ring; returns the
/// byte count (which may be short) or the operation's error.
///
/// # Safety
/// `ptr..ptr+len` must be valid for the access (`Dir::Read`: writable) for
/// the duration of the call. The call does not return before the kernel is
/// done with the buffer.
unsafe fn ring_op(
    ring: &mut IoUring,
    fd: i32,
    dir: Dir,
    ptr: *mut u8,
    len: usize,
    off: u64,
) -> Result<io::Result<usize>, RingBroken> {
    // Chunks are at most 1 MiB, so the length always fits.
    let len32 = u32::try_from(len).map_err(|_| RingBroken)?;
    let entry = match dir {
        Dir::Read => opcode::Read::new(types::Fd(fd), ptr, len32)
            .offset(off)
            .build(),
        Dir::Write => opcode::Write::new(types::Fd(fd), ptr.cast_const(), len32)
            .offset(off)
            .build(),
    };
    // SAFETY: the caller guarantees the buffer stays valid, and we don't
    // return until the matching completion has been reaped (or the SQE is
    // known never to have been submitted, see below).
    if unsafe { ring.submission().push(&entry) }.is_err() {
        // Only one op is ever in flight on this ring, so the queue can't be
        // full unless something is badly wrong.
        return Err(RingBroken);
    }
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            // Interrupted or transiently out of resources: the SQE is either
            // still queued or already in flight; calling again submits it
            // (or nothing) and waits, which is right in both cases.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) =>
            {
                continue
            }
            // io_uring_enter reports other errors before consuming any SQE;
            // dropping the ring then guarantees the queued SQE (and its
            // buffer pointer) is never submitted.
            Err(_) => return Err(RingBroken),
        }
        if let Some(cqe) = ring.completion().next() {
            let res = cqe.result();
            return Ok(if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                // res >= 0 and <= len.
                Ok(res as usize)
            });
        }
    }
}

/// One (possibly short) read or write at `off`, through this thread's ring
/// or pread/pwrite.
fn rw_once(file: &File, dir: Dir, buf: *mut u8, len: usize, off: u64) -> io::Result<usize> {
    let via_ring = RING.try_with(|cell| {
        // Never re-entered: nothing inside calls back into this module.
        let mut ring = cell.borrow_mut();
        if let Ring::Untried = *ring {
            *ring = match IoUring::new(4) {
                Ok(r) => Ring::Ready(r),
                Err(_) => {
                    URING_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    Ring::Unavailable
                }
            };
        }
        if let Ring::Ready(r) = &mut *ring {
            // SAFETY: `buf..buf+len` is a live slice borrowed by our caller
            // (mutably for reads) for the whole call.
            match unsafe { ring_op(r, file.as_raw_fd(), dir, buf, len, off) } {
                Ok(res) => return Some(res),
                Err(RingBroken) => {
                    URING_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    *ring = Ring::Unavailable;
                }
            }
        }
        None
    });
    if let Ok(Some(res)) = via_ring {
        return res;
    }
    // SAFETY: see above; we rebuild the slice the caller lent us.
    match dir {
        Dir::Read => file.read_at(unsafe { std::slice::from_raw_parts_mut(buf, len) }, off),
        Dir::Write => file.write_at(unsafe { std::slice::from_raw_parts(buf, len) }, off),
    }
}

/// A disk tier's backing file.
pub(crate) struct DiskFile {
    file: File,
    path: PathBuf,
    /// We created (or truncated) a regular file: remove it when the tier
    /// goes away. Block devices, and files whose path has been taken over by
    /// a rebuilt tier, are left alone.
    unlink_on_drop: bool,
    block: bool,
}

impl DiskFile {
    /// Opens `path` for a tier of `len` bytes: a regular file is created or
    /// truncated to `len` (sparse), a block device must already be that big.
    pub(crate) fn create(path: &Path, len: u64) -> io::Result<DiskFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let ft = file.metadata()?.file_type();
        let block = ft.is_block_device();
        let unlink_on_drop = if block {
            let size = (&file).seek(SeekFrom::End(0))?;
            if size < len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} holds {size} bytes, tier needs {len}", path.display()),
                ));
            }
            false
        } else {
            // Drop any previous content: the tier starts empty and stale
            // bytes would only waste space.
            file.set_len(0)?;
            file.set_len(len)?;
            true
        };
        Ok(DiskFile {
            file,
            path: path.to_path_buf(),
            unlink_on_drop,
            block,
        })
    }

    /// Reopens the file read-only, so that every later write to it fails
    /// (EBADF): how tests make a tier's I/O fail.
    #[cfg(test)]
    pub(crate) fn fail_writes(&mut self) -> io::Result<()> {
        self.file = OpenOptions::new().read(true).open(&self.path)?;
        Ok(())
    }

    /// Whether this is a block device (used as is, never truncated or removed).
    pub(crate) fn is_block_device(&self) -> bool {
        self.block
    }

    /// Renames the file to `to` (replacing what is there). Open descriptors
    /// keep working, which is what lets a rebuilt tier take over the old
    /// tier's path while the old tier's data is still being copied out.
    pub(crate) fn rename_to(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        Ok(())
    }

    /// Forget the path: another tier now owns it, so don't remove it on drop.
    pub(crate) fn disown_path(&mut self) {
        self.unlink_on_drop = false;
    }

    /// Reads exactly `buf.len()` bytes at `off`.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], mut off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let n = rw_once(&self.file, Dir::Read, rest.as_mut_ptr(), rest.len(), off)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short read from tier file",
                ));
            }
            done += n;
            off += n as u64;
        }
        Ok(())
    }

    /// Writes all of `data` at `off`.
    pub(crate) fn write_all_at(&self, data: &[u8], mut off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            // The write path only reads through the pointer.
            let ptr = rest.as_ptr().cast_mut();
            let n = rw_once(&self.file, Dir::Write, ptr, rest.len(), off)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "tier file accepted no bytes",
                ));
            }
            done += n;
            off += n as u64;
        }
        Ok(())
    }
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        if self.unlink_on_drop {
            // Best effort: a leftover cache file is harmless, and Drop can't
            // report errors.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t0");
        let f = DiskFile::create(&path, 8192).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        f.write_all_at(&data, 1000).unwrap();
        let mut back = vec![0u8; 3000];
        f.read_exact_at(&mut back, 1000).unwrap();
        assert_eq!(back, data);
        let mut past = [0u8; 16];
        assert!(f.read_exact_at(&mut past, 8190).is_err());
        drop(f);
        assert!(!path.exists());
    }
}
