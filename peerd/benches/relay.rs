//! A relay's work per record, the path a record takes through its links:
//! the reader's check (`LinkKeys::incoming`: signature, then packing the
//! record for the node) and the writer's unpacking on the way out
//! (`LinkKeys::outgoing`), at the candidate chunk sizes, with records
//! arriving one per socket read and sixteen together (one batch check).
//! Issue 4 asks for this figure per core; issue 5's B3 builds on it.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use canopy_keys::TrustedKeys;
use canopy_peerd::seal::LinkKeys;
use canopy_proto::{IoOp, Message, Opcode};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES: [usize; 4] = [4 << 10, 64 << 10, 256 << 10, 1 << 20];

fn label(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{}MiB", size >> 20)
    } else {
        format!("{}KiB", size >> 10)
    }
}

/// `n` sealed FLUSHes of `size` bytes, as a trusted writer sends them.
fn sealed(trusted: &LinkKeys, size: usize, n: u64) -> Vec<Message> {
    let plain = Bytes::from((0..size).map(|i| i as u8).collect::<Vec<u8>>());
    (0..n)
        .map(|chunk| {
            let mut m = Message::new(Opcode::IoRequest, 1);
            m.params.io_op = Some(IoOp::Flush);
            m.params.block_num = Some(chunk);
            m.params.version = Some(7);
            m.params.data = Some(plain.clone());
            if let Err(e) = trusted.outgoing(&mut m) {
                panic!("{e}");
            }
            m
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let keys = match TrustedKeys::generate("bench") {
        Ok(k) => Arc::new(k),
        Err(e) => panic!("{e}"),
    };
    let trusted = LinkKeys::trusted(keys.clone());
    let relay = LinkKeys::relay(Arc::new(keys.verifier().clone()));
    let mut group = c.benchmark_group("relay_forward");
    for size in SIZES {
        for batch in [1u64, 16] {
            let msgs = sealed(&trusted, size, batch);
            group.throughput(Throughput::Bytes(size as u64 * batch));
            let id = BenchmarkId::new(format!("batch{batch}"), label(size));
            group.bench_with_input(id, &msgs, |b, msgs| {
                b.iter(|| {
                    let mut v = msgs.clone();
                    let checks = relay.incoming(&mut v);
                    assert!(checks.iter().all(Result::is_ok));
                    for m in &mut v {
                        if let Err(e) = relay.outgoing(m) {
                            panic!("{e}");
                        }
                    }
                    black_box(v)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
