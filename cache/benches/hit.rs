//! Hit-path benchmarks: 4 KiB reads out of 64 KiB chunks resident in the
//! top tier, a 4 KiB write hit, and a lower-tier hit that promotes.

use canopy_cache::{Backing, CacheConfig, CacheStack, HashKind, Medium, TierConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::io;
use std::sync::Arc;

const CS: usize = 64 * 1024;
const IO: usize = 4096;

/// A backing store that costs nothing, so only the cache is measured.
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

fn mem(groups: usize, ways: usize, hash: HashKind) -> TierConfig {
    TierConfig {
        medium: Medium::Memory,
        groups,
        ways,
        hash,
    }
}

fn top_tier_hits(c: &mut Criterion) {
    // 256 x 4 x 64 KiB = 64 MiB top tier; 512 resident chunks, two per set.
    const RESIDENT: u64 = 512;
    let cache = CacheStack::new(
        CacheConfig {
            chunk_size: CS,
            tiers: vec![
                mem(256, 4, HashKind::Modulo),
                mem(64, 4, HashKind::Mix { key: 1 }),
            ],
            victim_capacity: 64,
            admission: false,
            prefault: false,
        },
        Arc::new(NullBacking),
    )
    .expect("valid config");
    let chunk_data = vec![0x5Au8; CS];
    for ch in 0..RESIDENT {
        cache.write(ch, 0, &chunk_data).expect("prefill");
    }
    assert_eq!(cache.stats().tiers[0].occupied, RESIDENT as usize);

    let mut group = c.benchmark_group("hit");
    group.throughput(Throughput::Elements(1));
    let mut buf = vec![0u8; IO];
    let mut i = 0u64;
    group.bench_function("top_tier_read_4k_of_64k", |b| {
        b.iter(|| {
            // Walk chunks and 4 KiB offsets so the copies aren't all from one line of cache.
            let ch = i % RESIDENT;
            let off = ((i / RESIDENT) % (CS / IO) as u64) as usize * IO;
            i = i.wrapping_add(1);
            cache.read(black_box(ch), off, &mut buf).expect("read");
            black_box(&buf);
        })
    });
    // Same chunk and offset every time: the 4 KiB copy stays in L1/L2, so
    // this isolates the lookup cost from memory bandwidth.
    group.bench_function("top_tier_read_4k_hot", |b| {
        b.iter(|| {
            cache.read(black_box(7), 8192, &mut buf).expect("read");
            black_box(&buf);
        })
    });
    let data = vec![0xC3u8; IO];
    group.bench_function("top_tier_write_4k_of_64k", |b| {
        b.iter(|| {
            let ch = i % RESIDENT;
            let off = ((i / RESIDENT) % (CS / IO) as u64) as usize * IO;
            i = i.wrapping_add(1);
            cache.write(black_box(ch), off, &data).expect("write");
        })
    });
    assert_eq!(cache.stats().fills, 0, "every access was a hit");
    group.finish();
}

fn lower_tier_promotion(c: &mut Criterion) {
    // A one-entry top tier: alternating between two chunks makes every read
    // a tier-1 hit that promotes one chunk and demotes the other.
    let cache = CacheStack::new(
        CacheConfig {
            chunk_size: CS,
            tiers: vec![
                mem(1, 1, HashKind::Modulo),
                mem(16, 4, HashKind::Mix { key: 3 }),
            ],
            victim_capacity: 64,
            admission: false,
            prefault: false,
        },
        Arc::new(NullBacking),
    )
    .expect("valid config");
    let chunk_data = vec![0x5Au8; CS];
    cache.write(0, 0, &chunk_data).expect("prefill");
    cache.write(1, 0, &chunk_data).expect("prefill");

    let mut group = c.benchmark_group("promote");
    group.throughput(Throughput::Elements(1));
    let mut buf = vec![0u8; IO];
    let mut i = 0u64;
    group.bench_function("tier1_hit_promote_4k_of_64k", |b| {
        b.iter(|| {
            cache.read(black_box(i & 1), 0, &mut buf).expect("read");
            i = i.wrapping_add(1);
            black_box(&buf);
        })
    });
    group.finish();
    let st = cache.stats();
    assert_eq!(st.fills, 0);
    assert!(st.tiers[1].promotions > 0);
}

criterion_group!(benches, top_tier_hits, lower_tier_promotion);
criterion_main!(benches);
