//! Filling a cold memory tier: every chunk of a fresh 256 MiB tier written
//! once, as a tree node's store fills while a volume is read through it
//! cold (B4's leaves). What this measures beyond the copies is the kernel
//! faulting the tier's memory in on first touch; the page faults of one
//! fill are printed beside criterion's timing, since they are what a
//! change to the tier's allocation moves.

use canopy_cache::{Backing, CacheConfig, CacheStack, HashKind, Medium, TierConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CS: usize = 64 * 1024;
const TIER: usize = 256 << 20;
const WAYS: usize = 8;

/// A backing store that costs nothing (whole-chunk writes never read it).
struct NullBacking;

impl Backing for NullBacking {
    fn read_chunk(&self, _chunk: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_chunk(&self, _chunk: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero_chunk(&self, _chunk: u64) -> io::Result<()> {
        Ok(())
    }
}

fn cold_stack() -> CacheStack<NullBacking> {
    CacheStack::new(
        CacheConfig {
            chunk_size: CS,
            tiers: vec![TierConfig {
                medium: Medium::Memory,
                groups: TIER / CS / WAYS,
                ways: WAYS,
                hash: HashKind::Modulo,
            }],
            victim_capacity: 64,
            admission: false,
            prefault: false,
        },
        Arc::new(NullBacking),
    )
    .expect("valid config")
}

/// Writes every chunk of the tier once (modulo hashing puts chunk `c` in
/// set `c % groups`, so `TIER / CS` chunks fill every way exactly).
fn fill(cache: &CacheStack<NullBacking>, data: &[u8]) {
    for ch in 0..(TIER / CS) as u64 {
        cache.write(ch, 0, data).expect("write");
    }
}

/// Minor page faults of this process so far.
fn minor_faults() -> i64 {
    // SAFETY: getrusage only writes the struct we pass, which is a plain
    // C struct for which all zeroes is a valid value.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_minflt
    }
}

fn cold_fill(c: &mut Criterion) {
    let data = vec![0x5Au8; CS];
    {
        let cache = cold_stack();
        let before = minor_faults();
        let t = Instant::now();
        fill(&cache, &data);
        let first = t.elapsed();
        let faults = minor_faults() - before;
        assert_eq!(cache.stats().tiers[0].occupied, TIER / CS);
        // The process's first fill gets memory the kernel has not handed
        // out before (in a VM perhaps not even the host), unlike the
        // timed fills below, which reuse what the previous one freed.
        eprintln!(
            "fill/cold_memory_tier_256MiB: first fill in this process {first:?}, \
             {faults} minor page faults ({} per MiB)",
            faults / (TIER >> 20) as i64
        );
    }
    let mut group = c.benchmark_group("fill");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Bytes(TIER as u64));
    group.bench_function("cold_memory_tier_256MiB", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                // Building and dropping the stack are not timed: only the
                // first touch of its memory is.
                let cache = cold_stack();
                let t = Instant::now();
                fill(&cache, &data);
                spent += t.elapsed();
                drop(cache);
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, cold_fill);
criterion_main!(benches);
