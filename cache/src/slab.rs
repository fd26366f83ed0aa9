//! The memory a memory tier's chunks live in: one anonymous mapping per
//! tier, aligned to 2 MiB and advised for transparent huge pages, split
//! into one [`Region`] per set.
//!
//! # Why not a `Box<[u8]>` per set
//!
//! A tier starts cold, and every first touch of its memory is a page
//! fault. With 4 KiB pages that is 256 faults per MiB filled: profiles of
//! B4 (eight leaves each filling 256 MiB cold) spent about 11% of their
//! samples in them, and filling a fresh 256 MiB tier ran at 1.3 GiB/s
//! (`benches/fill.rs`), a fraction of the copy's speed. A per-set
//! allocation (512 KiB for 8 ways of 64 KiB) can never be a huge page: it
//! is neither 2 MiB long nor 2 MiB aligned. One mapping per tier,
//! 2 MiB aligned and `MADV_HUGEPAGE`, lets the kernel back it with 2 MiB
//! pages when transparent huge pages are in `madvise` or `always` mode:
//! one fault per 2 MiB, and far fewer TLB misses when chunks are copied
//! out of it. Where THP is off the advice is refused or ignored and the
//! tier behaves as before.
//!
//! # Committing the memory up front
//!
//! By default the memory is only committed as chunks arrive: populating a
//! tier that may be many GiB makes starting a daemon cost a full pass over
//! it, most of which a short-lived or lightly used node never touches.
//! But every first touch then has the kernel zero a page in the middle of
//! a read, and in a VM (nested paging) that costs about 1.5 s per GiB:
//! in B4 (eight leaves filling 256 MiB each on two cores) it was a third
//! of the run's CPU. A host that dedicates the memory to the cache sets
//! [`CacheConfig::prefault`](crate::CacheConfig::prefault), and the tier
//! is populated when it is built (`MADV_POPULATE_WRITE`, split over a few
//! threads): the zeroing happens once, before any read waits for it, and
//! a host short of the memory shows then (an error, or the OOM killer at
//! start) rather than under load later.

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

/// The size of a transparent huge page on x86-64 and most arm64 kernels
/// (`/sys/kernel/mm/transparent_hugepage/hpage_pmd_size`). Aligning to it
/// where it is smaller costs nothing; where it is larger (64 KiB-page
/// arm64: 512 MiB) the advice only covers fewer pages.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// One anonymous mapping, unmapped when the last [`Region`] of it is gone.
struct Slab {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a Slab is only an owned address range; it is never read or
// written through (its Regions are), and unmapping it from any thread is
// fine once no Region points into it, which the Arc guarantees.
unsafe impl Send for Slab {}
// SAFETY: as above: a shared &Slab gives no access to the memory.
unsafe impl Sync for Slab {}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is exactly the mapping `map` kept, and
        // no Region refers to it any more (each holds an Arc to us).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// One set's slots: `ways` chunk-sized pieces of a tier's mapping, way
/// `w` of set `s` at `(w * sets + s) * chunk` (see [`regions`]), owned
/// like a `Box<[u8]>` per way (reached through `&`/`&mut` exactly as the
/// set holding it is), zeroed at first.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    /// Bytes per slot.
    chunk: usize,
    /// From one way's slot to the next: `sets * chunk`.
    stride: usize,
    ways: usize,
    /// Keeps the mapping alive as long as this region exists. `None` for
    /// an empty region (disk tiers keep no bytes in memory).
    _slab: Option<Arc<Slab>>,
}

// SAFETY: a Region is the unique owner of its slots (regions are created
// only by `regions`, whose slots never overlap, and are not Clone), so
// sending one to another thread is like sending a Box<[u8]> per way.
unsafe impl Send for Region {}
// SAFETY: `&Region` only hands out `&[u8]`, and `&mut [u8]` needs
// `&mut Region`; the borrow rules on the Region are the rules on its
// slots, as for a Box<[u8]>.
unsafe impl Sync for Region {}

impl Region {
    /// A region of no slots.
    pub(crate) fn empty() -> Region {
        Region {
            ptr: NonNull::dangling(),
            chunk: 0,
            stride: 0,
            ways: 0,
            _slab: None,
        }
    }

    /// Way `w`'s slot. Panics if `w` is not a way of this set, as
    /// indexing would.
    #[inline]
    pub(crate) fn way(&self, w: usize) -> &[u8] {
        assert!(w < self.ways, "way {w} of {}", self.ways);
        // SAFETY: `w < ways`, so `ptr + w * stride .. + chunk` is one of
        // this region's slots, inside a live mapping (the Arc keeps it),
        // readable and zero-initialised by mmap, and no other Region's
        // slot overlaps it; shared access through `&self` cannot alias a
        // `&mut` to it (that needs `&mut self`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(w * self.stride), self.chunk) }
    }

    /// Way `w`'s slot, to write. Panics if `w` is not a way of this set.
    #[inline]
    pub(crate) fn way_mut(&mut self, w: usize) -> &mut [u8] {
        assert!(w < self.ways, "way {w} of {}", self.ways);
        // SAFETY: as in `way`, and `&mut self` makes this the only
        // reference to the slot for its lifetime.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(w * self.stride), self.chunk)
        }
    }
}

/// The zeroed slots of `sets` sets of `ways` ways of `chunk` bytes, in
/// one fresh mapping, *way-major*: way `w` of set `s` at byte
/// `(w * sets + s) * chunk`. A set fills its vacant ways in order, and the
/// hash spreads chunks over all sets, so a tier fills from the front of
/// the mapping: with 2 MiB pages a tier an eighth full has committed about
/// an eighth of its memory, where a set-major layout (each set's ways
/// together) would have touched every huge page. A mapping of 2 MiB or
/// more is aligned to [`HUGE_PAGE`], rounded up to a whole huge page, and
/// advised `MADV_HUGEPAGE`. `prefault`: commit all of it now (see the
/// module docs).
pub(crate) fn regions(
    chunk: usize,
    ways: usize,
    sets: usize,
    prefault: bool,
) -> io::Result<Vec<Region>> {
    let too_big = || io::Error::from(io::ErrorKind::OutOfMemory);
    let stride = chunk.checked_mul(sets).ok_or_else(too_big)?;
    let total = stride.checked_mul(ways).ok_or_else(too_big)?;
    if total == 0 {
        return Ok((0..sets).map(|_| Region::empty()).collect());
    }
    let slab = map(total)?;
    if prefault {
        // On failure `slab` drops and unmaps what was committed.
        populate(&slab)?;
    }
    let slab = Arc::new(slab);
    Ok((0..sets)
        .map(|s| Region {
            // SAFETY: s * chunk < stride <= total <= slab.len, so the
            // offset stays inside the mapping; the last slot of this set,
            // at s * chunk + (ways - 1) * stride, ends by total.
            ptr: unsafe { NonNull::new_unchecked(slab.base.as_ptr().add(s * chunk)) },
            chunk,
            stride,
            ways,
            _slab: Some(slab.clone()),
        })
        .collect())
}

/// Maps at least `len` (> 0) zeroed bytes, huge-page aligned and advised
/// when `len` reaches a huge page.
fn map(len: usize) -> io::Result<Slab> {
    let page = page_size();
    let huge = len >= HUGE_PAGE;
    let unit = if huge { HUGE_PAGE } else { page };
    let want = len
        .checked_next_multiple_of(unit)
        .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
    // Over-map by one huge page so that an aligned start exists inside,
    // then give back what lies outside it.
    let slack = if huge { HUGE_PAGE } else { 0 };
    let mapped = want
        .checked_add(slack)
        .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
    // SAFETY: an anonymous private mapping at an address of the kernel's
    // choosing touches no existing memory; the result is checked.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mapped,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(unit);
    let head = aligned - start;
    let tail = mapped - head - want;
    // SAFETY: both ranges lie inside the mapping just made and outside
    // `aligned..aligned+want`, which is all we keep; nothing refers to
    // them. Page-aligned: `start` is, `head` is a multiple of the page
    // size (both addresses are), and so is `want`.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + want) as *mut libc::c_void, tail);
        }
    }
    if huge {
        // Advice only: where THP is compiled out or disabled this fails
        // or is ignored, and the tier uses ordinary pages as before.
        // SAFETY: the range is exactly our mapping; MADV_HUGEPAGE changes
        // how it is backed, never its contents.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, want, libc::MADV_HUGEPAGE);
        }
    }
    Ok(Slab {
        // mmap never returns address 0 for a non-fixed mapping.
        base: NonNull::new(aligned as *mut u8)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?,
        len: want,
    })
}

/// The most threads [`populate`] zeroes pages on: the kernel's zeroing
/// scales with cores, and a few are enough to make a many-GiB tier take
/// seconds rather than tens of them.
const POPULATE_THREADS: usize = 8;

/// Commit every page of `slab`, which nothing else refers to yet.
///
/// `MADV_POPULATE_WRITE` (Linux 5.14) faults the pages in writable without
/// writing them, in pieces on up to [`POPULATE_THREADS`] threads. Where the
/// kernel lacks it (EINVAL), each page is written once instead, which is
/// sound only because no [`Region`] points into the slab yet. Any other
/// error (ENOMEM: the host cannot give the memory) is returned.
fn populate(slab: &Slab) -> io::Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, POPULATE_THREADS);
    // Pieces of whole huge pages (a slab of a huge page or more is a
    // whole number of them), else the whole slab as one piece.
    let unit = if slab.len >= HUGE_PAGE {
        HUGE_PAGE
    } else {
        slab.len
    };
    let per = slab.len.div_ceil(unit).div_ceil(threads) * unit;
    let base = slab.base.as_ptr() as usize;
    if per >= slab.len {
        // One piece (a small tier, or one core): no thread to start.
        return populate_range(base, slab.len);
    }
    let results: Vec<io::Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..slab.len)
            .step_by(per)
            .map(|off| {
                let len = per.min(slab.len - off);
                s.spawn(move || populate_range(base + off, len))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("populating thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Commit `len` bytes at `addr`, a piece of a slab no Region refers to.
fn populate_range(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range lies inside a live mapping of ours (the caller
    // borrows the slab for the whole scope); POPULATE_WRITE only faults
    // pages in, as a write would, without changing their contents.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // A kernel older than 5.14.
    touch_range(addr, len);
    Ok(())
}

/// Write a zero into every page of `addr..addr + len`, as a first touch
/// by the tier would; for a range of a fresh mapping that nothing else
/// reads or writes yet.
fn touch_range(addr: usize, len: usize) {
    for off in (0..len).step_by(page_size()) {
        // SAFETY: inside a live, private range of the caller's (each
        // populating thread has its own piece, and no Region exists yet);
        // the page is zero already, so its contents do not change.
        unsafe { std::ptr::write_volatile((addr + off) as *mut u8, 0) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field `name` (such as `VmFlags:`) of the mapping holding
    /// `addr`, from /proc/self/smaps.
    fn smaps_field(addr: usize, name: &str) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix(name) {
                    return Some(v.trim().to_string());
                }
            }
        }
        None
    }

    /// Resident bytes of `addr..addr + len` (page-aligned), by mincore:
    /// exact to the range, where a mapping's Rss in smaps would count a
    /// neighbour the kernel merged it with.
    fn resident(addr: usize, len: usize) -> usize {
        let page = page_size();
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: the range is one of the test's live mappings, and `vec`
        // has a byte for each of its pages.
        let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count() * page
    }

    #[test]
    fn a_large_tier_is_one_aligned_mapping_advised_for_huge_pages() {
        // 5 sets of 8 ways of 64 KiB: 2.5 MiB, rounded up to two huge pages.
        let (chunk, ways, sets) = (64 << 10, 8, 5);
        let mut rs = regions(chunk, ways, sets, false).unwrap();
        let base = rs[0].way(0).as_ptr() as usize;
        assert_eq!(base % HUGE_PAGE, 0, "aligned to a huge page");
        for (s, r) in rs.iter().enumerate() {
            for w in 0..ways {
                let at = r.way(w).as_ptr() as usize;
                assert_eq!(at, base + (w * sets + s) * chunk, "way-major");
                assert_eq!(r.way(w).len(), chunk);
                assert!(r.way(w).iter().all(|&b| b == 0), "zeroed");
            }
        }
        // Each slot is its own: writing one leaves every other alone.
        rs[2].way_mut(3).fill(0xab);
        for (s, r) in rs.iter().enumerate() {
            for w in 0..ways {
                let want = if (s, w) == (2, 3) { 0xab } else { 0 };
                assert!(r.way(w).iter().all(|&b| b == want), "set {s} way {w}");
            }
        }
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            // `hg` is MADV_HUGEPAGE in the kernel's VmFlags.
            let flags = smaps_field(base, "VmFlags:").expect("our mapping is in smaps");
            assert!(flags.split(' ').any(|f| f == "hg"), "VmFlags: {flags}");
        }
        // The mapping outlives dropping all but one region.
        let last = rs.pop().unwrap();
        drop(rs);
        assert_eq!(last.way(ways - 1)[chunk - 1], 0);
    }

    #[test]
    #[should_panic(expected = "way 2 of 2")]
    fn a_way_past_the_set_is_refused() {
        let rs = regions(16, 2, 3, false).unwrap();
        let _ = rs[0].way(2);
    }

    #[test]
    fn small_and_empty_tiers() {
        let rs = regions(48, 2, 3, false).unwrap();
        assert_eq!(rs.len(), 3);
        let base = rs[0].way(0).as_ptr() as usize;
        assert_eq!(rs[1].way(0).as_ptr() as usize, base + 48);
        assert_eq!(rs[0].way(1).as_ptr() as usize, base + 3 * 48);
        assert!(rs
            .iter()
            .all(|r| (0..2).all(|w| r.way(w).len() == 48 && r.way(w).iter().all(|&b| b == 0))));
        let none = regions(0, 8, 4, true).unwrap();
        assert_eq!(none.len(), 4);
        assert!(regions(usize::MAX, 2, 2, false).is_err());
    }

    #[test]
    fn a_prefaulted_tier_is_resident_and_zeroed_before_first_use() {
        // 4 sets of 8 ways of 64 KiB: exactly one huge page.
        let (chunk, ways, sets) = (64 << 10, 8, 4);
        let lazy = regions(chunk, ways, sets, false).unwrap();
        let lazy_base = lazy[0].way(0).as_ptr() as usize;
        assert_eq!(
            resident(lazy_base, HUGE_PAGE),
            0,
            "nothing committed until touched"
        );
        let rs = regions(chunk, ways, sets, true).unwrap();
        let base = rs[0].way(0).as_ptr() as usize;
        assert_eq!(resident(base, HUGE_PAGE), HUGE_PAGE, "all committed");
        assert!(rs
            .iter()
            .all(|r| (0..ways).all(|w| r.way(w).iter().all(|&b| b == 0))));
        // A tier smaller than a page is committed too.
        let small = regions(48, 2, 3, true).unwrap();
        let at = small[0].way(0).as_ptr() as usize;
        assert_eq!(resident(at, page_size()), page_size());
    }

    #[test]
    fn populating_in_pieces_covers_every_page() {
        // Nine huge pages: more than the threads, and not a multiple of
        // them, so the last piece is short.
        let slab = map(9 * HUGE_PAGE).unwrap();
        let base = slab.base.as_ptr() as usize;
        populate(&slab).unwrap();
        assert_eq!(resident(base, slab.len), slab.len);
        // The fallback for kernels before 5.14 commits every page too.
        let old = map(3 * HUGE_PAGE + 4096).unwrap();
        let obase = old.base.as_ptr() as usize;
        assert_eq!(resident(obase, old.len), 0);
        touch_range(obase, old.len);
        assert_eq!(resident(obase, old.len), old.len);
    }
}
