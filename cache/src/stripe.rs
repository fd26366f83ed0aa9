//! Chunk locks: a fixed, striped array of mutexes keyed by chunk number.
//!
//! Held by every operation that exchanges a chunk's data with the backing
//! store (fill on miss, writeback, whole-chunk zero), so that for one chunk
//! those never overlap: an older writeback snapshot can't land after a newer
//! one, and a fill can't race a writeback into caching stale bytes. Striping
//! bounds the memory (no per-chunk lock objects, no allocation) at the cost
//! of occasional false sharing between unrelated chunks on one stripe.

use crate::hash::mix64;
use parking_lot::Mutex;

/// Number of stripes (a power of two).
const STRIPES: usize = 1024;
/// Keeps stripe choice independent of any tier's `Mix` placement.
const SALT: u64 = 0x5EED_C0FF_EE00_0001;

/// The stripe array.
pub(crate) struct Stripes {
    locks: Box<[Mutex<()>]>,
}

impl Stripes {
    /// All stripes unlocked.
    pub(crate) fn new() -> Stripes {
        Stripes {
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// The lock guarding `chunk`'s backing I/O.
    #[inline]
    pub(crate) fn of(&self, chunk: u64) -> &Mutex<()> {
        &self.locks[(mix64(chunk ^ SALT) as usize) & (STRIPES - 1)]
    }
}
