//! Sealing, opening and verifying chunk records at the candidate chunk
//! sizes, to choose the default chunk size: seal (encrypt + hash + sign),
//! open (hash + verify + decrypt), verify (hash + verify: a relay's cost per
//! chunk) and verify_batch of 16 records.

use canopy_keys::{SealedRecord, TrustedKeys};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

const SIZES: [usize; 4] = [4 << 10, 64 << 10, 256 << 10, 1 << 20];
const BATCH: usize = 16;

fn label(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{}MiB", size >> 20)
    } else {
        format!("{}KiB", size >> 10)
    }
}

fn bench(c: &mut Criterion) {
    let keys = match TrustedKeys::generate("bench") {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    };
    let verifier = keys.verifier();
    let mut group = c.benchmark_group("record");
    for size in SIZES {
        let plain: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let rec = keys.seal(1, 1, &plain);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("seal", label(size)), &plain, |b, p| {
            b.iter(|| keys.seal(black_box(1), 1, black_box(p)))
        });
        group.bench_with_input(BenchmarkId::new("open", label(size)), &rec, |b, r| {
            b.iter(|| keys.open(black_box(r)))
        });
        group.bench_with_input(BenchmarkId::new("verify", label(size)), &rec, |b, r| {
            b.iter(|| verifier.verify(black_box(r)))
        });

        let recs: Vec<SealedRecord> = (0..BATCH as u64).map(|i| keys.seal(i, 1, &plain)).collect();
        let refs: Vec<&SealedRecord> = recs.iter().collect();
        group.throughput(Throughput::Bytes((size * BATCH) as u64));
        group.bench_with_input(
            BenchmarkId::new("verify_batch16", label(size)),
            &refs,
            |b, r| b.iter(|| verifier.verify_batch(black_box(r))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
