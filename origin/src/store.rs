//! The origin store: the authoritative copy of a standalone volume, kept in a
//! regular file or a block device.
//!
//! I/O bypasses the page cache with `O_DIRECT` where the filesystem supports
//! it, because canopy keeps its own cache and caching every chunk twice would
//! halve the memory it can use. Where `O_DIRECT` is refused (some
//! filesystems) or an access is not aligned the way the kernel demands, a
//! second, buffered descriptor on the same file is used; Linux keeps the two
//! coherent for accesses that do not overlap in time, and canopy's chunk locks
//! make sure they never do for one chunk.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use canopy_cache::Backing;
use serde::Serialize;

/// Why the origin could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The file does not exist and no size was given to create it.
    #[error("origin {0} does not exist (give --size to create it)")]
    Missing(PathBuf),
    /// The file exists with another size than the one asked for.
    #[error("origin {path} already exists with {actual} bytes, but --size asks for {wanted}; refusing to resize it")]
    SizeMismatch {
        /// The origin's path.
        path: PathBuf,
        /// Its current size.
        actual: u64,
        /// The size asked for.
        wanted: u64,
    },
    /// The size is zero or not a whole number of 512-byte sectors.
    #[error("origin size {0} is not a positive multiple of 512 bytes")]
    BadSize(u64),
    /// Not a regular file or a block device.
    #[error("origin {0} is neither a regular file nor a block device")]
    NotFileOrDevice(PathBuf),
    /// The chunk size is not a power of two in range.
    #[error("chunk size {0} must be a power of two between 4K and 1M")]
    BadChunkSize(usize),
    /// An I/O error, with the path for context.
    #[error("origin {path}: {source}")]
    Io {
        /// The origin's path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Counters and facts about the origin, reported with the cache statistics.
#[derive(Clone, Debug, Serialize, serde::Deserialize, Default)]
pub struct OriginStats {
    /// Path of the file or device.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Whether O_DIRECT is in use.
    pub direct: bool,
    /// Chunk reads (cache fills).
    pub reads: u64,
    /// Chunk or range writes (write-backs and write-throughs).
    pub writes: u64,
    /// fdatasync calls.
    pub syncs: u64,
    /// Chunks zeroed (discard / write-zeroes).
    pub zeroes: u64,
}

/// A chunk's place on the origin's O_DIRECT descriptor
/// ([`OriginStore::direct_chunk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectChunk {
    /// The O_DIRECT descriptor; valid while the store lives.
    pub fd: std::os::fd::RawFd,
    /// Byte offset of the chunk.
    pub offset: u64,
    /// Bytes of the chunk inside the volume (a multiple of `align`).
    pub len: usize,
    /// Alignment the buffer's address must have.
    pub align: usize,
}

/// The authoritative store of a standalone volume.
pub struct OriginStore {
    path: PathBuf,
    size: u64,
    chunk_size: usize,
    /// Buffered descriptor: always present; used for unaligned accesses and
    /// when the filesystem refuses O_DIRECT.
    buffered: File,
    /// The O_DIRECT descriptor and its alignment, when available.
    direct: Option<(File, usize)>,
    reads: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
    zeroes: AtomicU64,
}

/// The smallest and largest chunk sizes a volume may use.
pub const CHUNK_SIZE_RANGE: (usize, usize) = (4 << 10, 1 << 20);

/// Validate a chunk size: a power of two within [`CHUNK_SIZE_RANGE`].
pub fn check_chunk_size(chunk_size: usize) -> Result<(), OriginError> {
    if chunk_size.is_power_of_two()
        && (CHUNK_SIZE_RANGE.0..=CHUNK_SIZE_RANGE.1).contains(&chunk_size)
    {
        Ok(())
    } else {
        Err(OriginError::BadChunkSize(chunk_size))
    }
}

/// Validate a volume size: positive and a whole number of 512-byte sectors.
pub fn check_volume_size(size: u64) -> Result<(), OriginError> {
    if size == 0 || !size.is_multiple_of(512) {
        Err(OriginError::BadSize(size))
    } else {
        Ok(())
    }
}

impl OriginStore {
    /// Open `path`, creating it with `create_size` bytes when it is missing.
    ///
    /// With `create_size` given and the file present, the sizes must agree:
    /// silently growing or truncating somebody's volume is not a decision a
    /// flag typo should make.
    pub fn open(
        path: &Path,
        create_size: Option<u64>,
        chunk_size: usize,
    ) -> Result<Self, OriginError> {
        check_chunk_size(chunk_size)?;
        let io_err = |source| OriginError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(s) = create_size {
            check_volume_size(s)?;
        }
        let exists = path.exists();
        if !exists && create_size.is_none() {
            return Err(OriginError::Missing(path.to_path_buf()));
        }
        if exists {
            // Check the type before opening for writing, so a directory or a
            // FIFO gets its own error instead of an EISDIR or a hang.
            let ft = std::fs::metadata(path).map_err(io_err)?.file_type();
            if !(ft.is_file() || ft.is_block_device()) {
                return Err(OriginError::NotFileOrDevice(path.to_path_buf()));
            }
        }
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!exists)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let meta = buffered.metadata().map_err(io_err)?;
        let ft = meta.file_type();
        let size = if ft.is_block_device() {
            // lseek(SEEK_END) reports a block device's capacity without an
            // ioctl; the descriptor's position is never used afterwards.
            use std::io::Seek;
            let mut f = &buffered;
            f.seek(io::SeekFrom::End(0)).map_err(io_err)?
        } else if ft.is_file() {
            if !exists {
                if let Some(s) = create_size {
                    buffered.set_len(s).map_err(io_err)?;
                }
            }
            buffered.metadata().map_err(io_err)?.len()
        } else {
            return Err(OriginError::NotFileOrDevice(path.to_path_buf()));
        };
        if let Some(wanted) = create_size {
            if exists && wanted != size {
                return Err(OriginError::SizeMismatch {
                    path: path.to_path_buf(),
                    actual: size,
                    wanted,
                });
            }
        }
        check_volume_size(size)?;
        let direct = open_direct(path);
        if direct.is_none() {
            tracing::info!(path = %path.display(), "O_DIRECT not available on the origin; using buffered I/O");
        }
        Ok(OriginStore {
            path: path.to_path_buf(),
            size,
            chunk_size,
            buffered,
            direct,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
        })
    }

    /// Size of the volume in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size this store was opened with.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Number of chunks, counting a partial last chunk.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }

    /// Whether O_DIRECT is in use.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Counters for the stats report.
    pub fn stats(&self) -> OriginStats {
        OriginStats {
            path: self.path.clone(),
            size: self.size,
            direct: self.is_direct(),
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            zeroes: self.zeroes.load(Ordering::Relaxed),
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is outside the origin ({} bytes)",
                    self.size
                ),
            )),
        }
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        if let Some((file, align)) = &self.direct {
            if is_aligned(offset, buf.len(), *align) {
                if (buf.as_ptr() as usize).is_multiple_of(*align) {
                    return file.read_exact_at(buf, offset);
                }
                // Offsets line up but the caller's memory does not (cache
                // slots are not page-aligned): bounce through an aligned
                // per-thread buffer rather than give up on O_DIRECT.
                return with_bounce(buf.len(), |bounce| {
                    file.read_exact_at(bounce, offset)?;
                    buf.copy_from_slice(bounce);
                    Ok(())
                });
            }
        }
        self.buffered.read_exact_at(buf, offset)
    }

    /// Write all of `data` at `offset`. Not durable until [`OriginStore::sync`].
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len())?;
        if let Some((file, align)) = &self.direct {
            if is_aligned(offset, data.len(), *align) {
                if (data.as_ptr() as usize).is_multiple_of(*align) {
                    return file.write_all_at(data, offset);
                }
                return with_bounce(data.len(), |bounce| {
                    bounce.copy_from_slice(data);
                    file.write_all_at(bounce, offset)
                });
            }
        }
        self.buffered.write_all_at(data, offset)
    }

    /// Make the byte range read back as zeros, by punching a hole where the
    /// filesystem or device can and by writing zeros where it cannot.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len as usize)?;
        let rc = unsafe {
            // SAFETY: fallocate only reads its integer arguments.
            libc::fallocate(
                self.buffered.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {}
            _ => return Err(err),
        }
        // Fallback: write zeros, one chunk at a time, from an aligned buffer.
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.chunk_size as u64) as usize;
            with_bounce(n, |zeros| {
                zeros.fill(0);
                self.write_at(offset + done, zeros)
            })?;
            done += n as u64;
        }
        Ok(())
    }

    /// fdatasync: everything written so far is on stable storage afterwards.
    pub fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        // One inode: fdatasync on either descriptor flushes both the direct
        // writes' metadata and any buffered pages.
        self.buffered.sync_data()
    }

    /// Where a whole `chunk` can be read with O_DIRECT, for a caller that
    /// reads it asynchronously itself (the tree's root, through io_uring):
    /// the direct descriptor and the chunk's byte range, when there is a
    /// direct descriptor and the range is aligned as it demands (not so for
    /// a partial last chunk of odd length). The caller's buffer must be
    /// aligned to `align`, and it must call [`OriginStore::count_read`].
    pub fn direct_chunk(&self, chunk: u64) -> Option<DirectChunk> {
        let (file, align) = self.direct.as_ref()?;
        let (offset, len) = self.chunk_span(chunk).ok()?;
        is_aligned(offset, len, *align).then(|| DirectChunk {
            fd: file.as_raw_fd(),
            offset,
            len,
            align: *align,
        })
    }

    /// Count a chunk read made outside [`Backing::read_chunk`] (see
    /// [`OriginStore::direct_chunk`]), so the statistics stay whole.
    pub fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// The byte range of `chunk` that lies inside the volume, or an error if
    /// the chunk is past the end.
    fn chunk_span(&self, chunk: u64) -> io::Result<(u64, usize)> {
        let offset = chunk
            .checked_mul(self.chunk_size as u64)
            .filter(|o| *o < self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("chunk {chunk} is past the end of the origin"),
                )
            })?;
        let len = (self.size - offset).min(self.chunk_size as u64) as usize;
        Ok((offset, len))
    }
}

impl Backing for OriginStore {
    fn read_chunk(&self, chunk: u64, buf: &mut [u8]) -> io::Result<()> {
        let (offset, len) = self.chunk_span(chunk)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let (head, tail) = buf.split_at_mut(len.min(buf.len()));
        self.read_at(offset, head)?;
        // A partial last chunk reads as zeros past the end of the volume.
        tail.fill(0);
        Ok(())
    }

    fn write_chunk(&self, chunk: u64, data: &[u8]) -> io::Result<()> {
        let (offset, len) = self.chunk_span(chunk)?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_at(offset, &data[..len.min(data.len())])
    }

    fn sync(&self) -> io::Result<()> {
        OriginStore::sync(self)
    }

    fn zero_chunk(&self, chunk: u64) -> io::Result<()> {
        let (offset, len) = self.chunk_span(chunk)?;
        self.zeroes.fetch_add(1, Ordering::Relaxed);
        self.zero_range(offset, len as u64)
    }

    /// Write just the range, in place: a 4 KiB write-through costs a 4 KiB
    /// origin write, not a read and a write of the whole chunk.
    fn write_range(
        &self,
        chunk: u64,
        offset: usize,
        data: &[u8],
        _scratch: &mut [u8],
    ) -> io::Result<()> {
        let (base, len) = self.chunk_span(chunk)?;
        // Bytes past the end of a partial last chunk do not exist on the
        // origin; they always read back as zeros.
        let end = (offset + data.len()).min(len);
        if offset >= end {
            return Ok(());
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_at(base + offset as u64, &data[..end - offset])
    }
}

fn is_aligned(offset: u64, len: usize, align: usize) -> bool {
    offset.is_multiple_of(align as u64) && len.is_multiple_of(align)
}

/// Open an O_DIRECT descriptor and learn its alignment, or `None` where the
/// filesystem does not support direct I/O.
fn open_direct(path: &Path) -> Option<(File, usize)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let align = dio_alignment(&file).unwrap_or(4096);
    if align == 0 {
        return None;
    }
    // Probe: some filesystems accept O_DIRECT at open and refuse it at the
    // first read. A refusal here means buffered I/O for the volume's life.
    let probe_ok = with_bounce(align, |b| file.read_at(b, 0).map(|_| ())).is_ok();
    probe_ok.then_some((file, align))
}

/// The alignment O_DIRECT needs (largest of memory and offset alignment),
/// from statx(STATX_DIOALIGN); `Some(0)` means direct I/O is unsupported.
fn dio_alignment(file: &File) -> Option<usize> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let rc = unsafe {
        // SAFETY: stx points at writable memory of the right size; the empty
        // path with AT_EMPTY_PATH makes statx describe the descriptor itself.
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx returned 0, so it filled the structure.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let mem = stx.stx_dio_mem_align as usize;
    let off = stx.stx_dio_offset_align as usize;
    if mem == 0 || off == 0 {
        return Some(0);
    }
    Some(mem.max(off).max(512))
}

/// A page-aligned scratch buffer that grows but is never freed while the
/// thread lives, so the bounce path allocates once per thread, not per I/O.
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

const BOUNCE_ALIGN: usize = 4096;

impl AlignedBuf {
    fn layout(cap: usize) -> std::alloc::Layout {
        // Cannot fail: BOUNCE_ALIGN is a power of two and `cap` is bounded by
        // the largest chunk (1 MiB), far from isize::MAX.
        std::alloc::Layout::from_size_align(cap, BOUNCE_ALIGN)
            .unwrap_or_else(|_| std::alloc::Layout::new::<u8>())
    }

    fn ensure(&mut self, len: usize) -> io::Result<&mut [u8]> {
        if len > self.cap {
            let cap = len.next_power_of_two().max(BOUNCE_ALIGN);
            let layout = Self::layout(cap);
            // SAFETY: layout has non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            if ptr.is_null() {
                return Err(io::Error::from(io::ErrorKind::OutOfMemory));
            }
            self.free();
            self.ptr = ptr;
            self.cap = cap;
        }
        // SAFETY: ptr owns `cap >= len` initialised bytes (alloc_zeroed) and
        // the thread-local RefCell gives us exclusive access.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: ptr was allocated with exactly this layout.
            unsafe { std::alloc::dealloc(self.ptr, Self::layout(self.cap)) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

thread_local! {
    static BOUNCE: RefCell<AlignedBuf> = const {
        RefCell::new(AlignedBuf { ptr: std::ptr::null_mut(), cap: 0 })
    };
}

fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> io::Result<R>) -> io::Result<R> {
    BOUNCE.with(|cell| {
        // A re-entrant call (never made today) gets a fresh buffer instead of
        // a panic from the RefCell.
        match cell.try_borrow_mut() {
            Ok(mut b) => f(b.ensure(len)?),
            Err(_) => {
                let mut b = AlignedBuf {
                    ptr: std::ptr::null_mut(),
                    cap: 0,
                };
                f(b.ensure(len)?)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir, size: u64) -> OriginStore {
        OriginStore::open(&dir.path().join("vol"), Some(size), 4096).expect("open origin")
    }

    #[test]
    fn creates_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir, 1 << 20);
        assert_eq!(s.size(), 1 << 20);
        drop(s);
        let s = OriginStore::open(&dir.path().join("vol"), None, 4096).expect("reopen");
        assert_eq!(s.size(), 1 << 20);
    }

    #[test]
    fn refuses_bad_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vol");
        assert!(matches!(
            OriginStore::open(&p, None, 4096),
            Err(OriginError::Missing(_))
        ));
        assert!(matches!(
            OriginStore::open(&p, Some(1000), 4096),
            Err(OriginError::BadSize(1000))
        ));
        assert!(matches!(
            OriginStore::open(&p, Some(1 << 20), 3000),
            Err(OriginError::BadChunkSize(3000))
        ));
        store(&dir, 1 << 20);
        assert!(matches!(
            OriginStore::open(&p, Some(2 << 20), 4096),
            Err(OriginError::SizeMismatch { .. })
        ));
        assert!(matches!(
            OriginStore::open(dir.path(), None, 4096),
            Err(OriginError::NotFileOrDevice(_))
        ));
    }

    #[test]
    fn direct_chunks_are_whole_and_aligned_or_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 2.5 chunks of 4 KiB: the last one is 2 KiB.
        let s = store(&dir, 4096 * 2 + 2048);
        let Some(d) = s.direct_chunk(1) else {
            // A filesystem without O_DIRECT (tmpfs): nothing to hand out.
            assert!(!s.is_direct());
            assert_eq!(s.direct_chunk(0), None);
            return;
        };
        assert_eq!((d.offset, d.len), (4096, 4096));
        assert!(d.align <= 4096 && d.align.is_power_of_two());
        // The tail is whole only if its length suits the alignment.
        match s.direct_chunk(2) {
            Some(t) => assert_eq!((t.offset, t.len), (8192, 2048)),
            None => assert!(!2048usize.is_multiple_of(d.align)),
        }
        assert_eq!(s.direct_chunk(3), None, "past the end");
        let before = s.stats().reads;
        s.count_read();
        assert_eq!(s.stats().reads, before + 1);
    }

    #[test]
    fn chunks_round_trip_including_partial_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        // 2.5 chunks: the last chunk is half outside the volume.
        let s = store(&dir, 4096 * 2 + 2048);
        assert_eq!(s.chunks(), 3);
        let data = vec![0xabu8; 4096];
        s.write_chunk(2, &data).expect("write tail chunk");
        let mut back = vec![1u8; 4096];
        s.read_chunk(2, &mut back).expect("read tail chunk");
        assert!(back[..2048].iter().all(|b| *b == 0xab));
        assert!(back[2048..].iter().all(|b| *b == 0));
        assert!(s.read_chunk(3, &mut back).is_err());
        assert!(s.write_chunk(3, &data).is_err());
    }

    #[test]
    fn unaligned_ranges_and_memory_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir, 1 << 20);
        let mut big = vec![0u8; 8192 + 1];
        // Deliberately misaligned memory: start one byte in.
        big[1..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        s.write_at(4096, &big[1..])
            .expect("aligned offset, misaligned memory");
        s.write_at(512, &[7u8; 512]).expect("sector-granular write");
        let mut back = vec![0u8; 8192];
        s.read_at(4096, &mut back).expect("read back");
        assert_eq!(&back[..], &big[1..]);
        let mut sector = [0u8; 512];
        s.read_at(512, &mut sector).expect("read sector");
        assert!(sector.iter().all(|b| *b == 7));
        assert!(s.read_at((1 << 20) - 512, &mut [0u8; 1024]).is_err());
    }

    #[test]
    fn zero_chunk_reads_back_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(&dir, 1 << 20);
        s.write_chunk(5, &[0x5au8; 4096]).expect("write");
        s.zero_chunk(5).expect("zero");
        s.sync().expect("sync");
        let mut back = [1u8; 4096];
        s.read_chunk(5, &mut back).expect("read");
        assert!(back.iter().all(|b| *b == 0));
        assert_eq!(s.stats().zeroes, 1);
    }
}
