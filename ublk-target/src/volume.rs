//! A standalone volume: block requests mapped onto chunks of the stacked
//! cache, over the origin store.
//!
//! This is the part of the ublk target that knows nothing about ublk: it
//! takes an operation, a byte range and a buffer, and answers with the value
//! the kernel expects in the completion (bytes done, or a negative errno).
//! Keeping it apart lets the host (which has no ublk driver) test every
//! request type against a model.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use canopy_cache::{CacheError, CacheStack};
use serde::{Deserialize, Serialize};

use canopy_origin::OriginStore;

/// When a write counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// A write reaches the origin before it is acknowledged (not yet
    /// durable: FLUSH and FUA make it so). Nothing acknowledged is lost if
    /// the daemon dies, which keeps a mounted filesystem consistent across
    /// `canopy-ublk recover`.
    Writethrough,
    /// A write is acknowledged once it is in the cache; dirty chunks reach
    /// the origin on FLUSH, FUA, eviction from the victim repository, or
    /// shutdown. Faster for rewrites, but writes not yet flushed are lost if
    /// the daemon is killed.
    Writeback,
}

/// Block operations the volume serves (the ublk opcodes it understands).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read into the buffer.
    Read,
    /// Write from the buffer; `fua` asks for it to be durable on completion.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Make every acknowledged write durable.
    Flush,
    /// Drop the range; canopy guarantees it then reads back as zeros.
    Discard,
    /// Make the range read back as zeros.
    WriteZeroes,
}

impl Op {
    /// Decode a ublk `op_flags` word; `None` for operations canopy does not
    /// serve (zoned commands, WRITE_SAME).
    pub fn from_ublk(op_flags: u32) -> Option<Op> {
        let fua = op_flags & libublk::sys::UBLK_IO_F_FUA != 0;
        match op_flags & 0xff {
            libublk::sys::UBLK_IO_OP_READ => Some(Op::Read),
            libublk::sys::UBLK_IO_OP_WRITE => Some(Op::Write { fua }),
            libublk::sys::UBLK_IO_OP_FLUSH => Some(Op::Flush),
            libublk::sys::UBLK_IO_OP_DISCARD => Some(Op::Discard),
            libublk::sys::UBLK_IO_OP_WRITE_ZEROES => Some(Op::WriteZeroes),
            _ => None,
        }
    }
}

/// Zeros for partial-chunk discards (a chunk is at most 1 MiB). Static, so
/// zeroing never allocates.
pub(crate) static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// A volume served from the stacked cache over its origin.
pub struct Volume {
    cache: Arc<CacheStack<OriginStore>>,
    size: u64,
    mode: CacheMode,
    errors: AtomicU64,
}

impl Volume {
    /// Serve `cache` (whose backing is the origin) with the given write mode.
    pub fn new(cache: Arc<CacheStack<OriginStore>>, mode: CacheMode) -> Self {
        let size = cache.backing().size();
        Volume {
            cache,
            size,
            mode,
            errors: AtomicU64::new(0),
        }
    }

    /// The cache stack, for statistics and reconfiguration.
    pub fn cache(&self) -> &Arc<CacheStack<OriginStore>> {
        &self.cache
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The write mode.
    pub fn mode(&self) -> CacheMode {
        self.mode
    }

    /// Requests that failed with an I/O error so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Serve one request for `len` bytes at byte `offset`. `buf` is the
    /// request's data buffer (at least `len` bytes for reads and writes).
    ///
    /// Returns what the kernel expects as the completion result: the number
    /// of bytes transferred, or a negative errno. Never panics on a bad
    /// request: the kernel is trusted, but a mistake there must not take the
    /// whole device down.
    pub fn handle(&self, op: Option<Op>, offset: u64, len: usize, buf: &mut [u8]) -> i32 {
        let Some(op) = op else {
            return -libc::EOPNOTSUPP;
        };
        let in_range = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.size);
        if !in_range && op != Op::Flush {
            return -libc::EINVAL;
        }
        if matches!(op, Op::Read | Op::Write { .. }) && len > buf.len() {
            return -libc::EINVAL;
        }
        let result = match op {
            Op::Read => self.for_each_piece(offset, len, |chunk, at, range| {
                self.cache.read(chunk, at, &mut buf[range])
            }),
            Op::Write { fua } => self
                .for_each_piece(offset, len, |chunk, at, range| {
                    let data = &buf[range];
                    // FUA must reach the origin whatever the mode; in
                    // writeback mode that is the only write that does.
                    if fua || self.mode == CacheMode::Writethrough {
                        self.cache.write_through(chunk, at, data)
                    } else {
                        self.cache.write(chunk, at, data)
                    }
                })
                .and_then(|()| {
                    if fua && len > 0 {
                        self.cache.backing().sync().map_err(CacheError::from)
                    } else {
                        Ok(())
                    }
                }),
            // In writethrough mode the cache never holds a dirty chunk (every
            // write and partial zero goes through to the origin; the model
            // test checks this after every request), so a FLUSH is just the
            // origin's fdatasync, not a scan of the whole cache.
            Op::Flush => match self.mode {
                CacheMode::Writethrough => self.cache.backing().sync().map_err(CacheError::from),
                CacheMode::Writeback => self.cache.flush(),
            },
            Op::Discard | Op::WriteZeroes => {
                let chunk_size = self.cache.chunk_size();
                self.for_each_piece(offset, len, |chunk, at, range| {
                    let n = range.len();
                    // A whole chunk is dropped and zeroed on the origin at
                    // once; a partial one is a write of zeros, which in
                    // writethrough mode must reach the origin like any write.
                    if n < chunk_size && self.mode == CacheMode::Writethrough {
                        self.cache.write_through(chunk, at, &ZEROS[..n])
                    } else {
                        self.cache.zero(chunk, at, n)
                    }
                })
            }
        };
        match result {
            // A flush carries no data: the kernel expects 0 back.
            Ok(()) => i32::try_from(len).unwrap_or(i32::MAX),
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(?op, offset, len, error = %e, "request failed");
                -libc::EIO
            }
        }
    }

    /// Call `f` for each piece of `[offset, offset+len)` (see [`pieces`]).
    fn for_each_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, std::ops::Range<usize>) -> Result<(), CacheError>,
    ) -> Result<(), CacheError> {
        for p in pieces(offset, len, self.cache.chunk_size()) {
            f(p.chunk, p.at, p.range)?;
        }
        Ok(())
    }
}

/// One chunk's share of a block request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The chunk number.
    pub chunk: u64,
    /// Where the piece starts inside the chunk.
    pub at: usize,
    /// The piece's bytes within the request's buffer.
    pub range: std::ops::Range<usize>,
}

/// Split the request `[offset, offset+len)` at chunk boundaries. Both the
/// embedded volume and the tree leaf serve a request piece by piece, since a
/// chunk is the unit the cache and the network move.
pub fn pieces(offset: u64, len: usize, chunk_size: usize) -> impl Iterator<Item = Piece> {
    let cs = chunk_size.max(1) as u64;
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let at = (pos % cs) as usize;
        let n = (cs as usize - at).min(len - done);
        let p = Piece {
            chunk: pos / cs,
            at,
            range: done..done + n,
        };
        done += n;
        Some(p)
    })
}
