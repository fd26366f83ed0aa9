//! Sealing allocates exactly one buffer, the record's ciphertext, and
//! opening at most one, the plaintext. Checked with a counting global
//! allocator.

use canopy_keys::TrustedKeys;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

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

fn allocations_during<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (ALLOCS.load(Ordering::Relaxed) - before, out)
}

#[test]
fn seal_and_open_allocate_one_buffer_each() {
    let keys = TrustedKeys::generate("vol").unwrap();
    // Warm up whatever the first call initialises (CPU feature detection).
    let warm = keys.seal(0, 0, b"warm");
    keys.open(&warm).unwrap();
    for len in [0, 1, 4096, 65536, 1 << 20] {
        let plain = vec![7u8; len];
        let (n, rec) = allocations_during(|| keys.seal(1, 2, &plain));
        assert_eq!(n, 1, "seal of {len} bytes");
        assert_eq!(rec.ciphertext.len(), len + 16);
        let (n, opened) = allocations_during(|| keys.open(&rec).unwrap());
        // An empty plaintext needs no buffer at all.
        assert_eq!(n, u64::from(len > 0), "open of {len} bytes");
        assert_eq!(opened.len(), len);
        let (n, ()) = allocations_during(|| keys.verifier().verify(&rec).unwrap());
        assert_eq!(n, 0, "verify of {len} bytes");
    }
}
