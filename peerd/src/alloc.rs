//! The process allocator's settings for a daemon that moves whole chunks.
//!
//! Every record a relay forwards is repacked into a fresh buffer of a
//! chunk's size (64 KiB by default, up to 1 MiB), and a trusted node opens
//! and seals into fresh buffers too. glibc serves allocations above its
//! mmap threshold (128 KiB at start, then adjusted) with `mmap` and returns
//! the top of its heap to the kernel once 128 KiB of it is free, so a
//! steady stream of chunk buffers turns into page faults and zeroing: B3
//! (`bench/run b3`) measured a relay at half its speed from that alone.
//! Fixing both thresholds keeps chunk buffers in the heap and reused.

/// Allocations up to this size come from the heap, not from `mmap`: above
/// the largest chunk record.
pub const MMAP_THRESHOLD: usize = 4 << 20;

// glibc caps the mmap threshold (HEAP_MAX_SIZE / 2, 32 MiB on 64-bit) and
// refuses a larger one.
const _: () = assert!(MMAP_THRESHOLD <= 32 << 20);

/// Free memory at the top of the heap kept for reuse rather than returned
/// to the kernel.
pub const TRIM_THRESHOLD: usize = 64 << 20;

/// Set the allocator for chunk traffic (see the module doc). Call it at the
/// start of `main`, before any thread starts. Where the C library is not
/// glibc this does nothing; returns whether the settings took.
pub fn tune_for_chunks() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes two of glibc's malloc parameters;
        // both values are in range (positive, below i32::MAX).
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32) };
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as i32) };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(tune_for_chunks());
    }
}
