//! The top-tier hit path (read and write, memory and disk tiers) must not
//! allocate. Checked with a counting global allocator.

use canopy_cache::{Backing, CacheConfig, CacheStack, HashKind, Medium, TierConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // Const-initialised and without a destructor, so using it inside the
    // allocator can't itself allocate.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Zeros;

impl Backing for Zeros {
    fn read_chunk(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_chunk(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero_chunk(&self, _: u64) -> io::Result<()> {
        Ok(())
    }
}

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.load(Ordering::Relaxed) - before
}

#[test]
fn top_tier_hits_do_not_allocate() {
    // The counter itself works.
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 10]))) > 0);
    let dir = tempfile::tempdir().unwrap();
    for medium in [
        Medium::Memory,
        Medium::Disk {
            path: dir.path().join("top"),
        },
    ] {
        let cache = CacheStack::new(
            CacheConfig {
                chunk_size: 64 * 1024,
                tiers: vec![TierConfig {
                    medium: medium.clone(),
                    groups: 16,
                    ways: 4,
                    hash: HashKind::Mix { key: 5 },
                }],
                victim_capacity: 8,
                // The filter's counting is on the hit path too.
                admission: true,
                prefault: false,
            },
            Arc::new(Zeros),
        )
        .unwrap();
        let data = vec![7u8; 4096];
        let mut buf = vec![0u8; 4096];
        for ch in 0..8 {
            cache.write(ch, 0, &data).unwrap(); // misses: allowed to allocate
        }
        // Warm up (a disk tier sets up this thread's io_uring on first use).
        cache.read(0, 0, &mut buf).unwrap();
        let n = allocations_during(|| {
            for i in 0..1000u64 {
                let ch = i % 8;
                cache.read(ch, 0, &mut buf).unwrap();
                cache.write(ch, 4096, &data).unwrap();
                cache.zero(ch, 100, 50).unwrap();
            }
        });
        assert_eq!(n, 0, "{medium:?}: hit path allocated {n} times");
        assert_eq!(cache.stats().fills, 8);
    }
}
