//! Bounded multi-threaded stress: workers on disjoint chunks (so each can
//! check every read against its own model), a thread reconfiguring the
//! stack the whole time, and a running cleaner.

mod common;

use canopy_cache::{Backing, CacheConfig, CacheStack, HashKind, Medium, Reconfig, TierConfig};
use common::{pattern, MemBacking, Rng};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CS: usize = 4096;
const WORKERS: u64 = 4;
const CHUNKS_PER_WORKER: u64 = 16;
const OPS_PER_WORKER: usize = 30_000;

fn tier(dir: &Path, rng: &mut Rng, seq: &mut u64) -> TierConfig {
    let medium = if rng.below(2) == 0 {
        *seq += 1;
        Medium::Disk {
            path: dir.join(format!("stress-{seq}")),
        }
    } else {
        Medium::Memory
    };
    TierConfig {
        medium,
        groups: 1 + rng.below(4) as usize,
        ways: 1 + rng.below(3) as usize,
        hash: if rng.below(2) == 0 {
            HashKind::Modulo
        } else {
            HashKind::Mix { key: rng.next() }
        },
    }
}

fn random_range(rng: &mut Rng) -> (usize, usize) {
    match rng.below(4) {
        0 => (0, CS),
        _ => {
            let a = rng.below(CS as u64 + 1) as usize;
            let b = rng.below(CS as u64 + 1) as usize;
            (a.min(b), a.max(b) - a.min(b))
        }
    }
}

fn worker(id: u64, cache: &CacheStack<MemBacking>, backing: &MemBacking) -> HashMap<u64, Vec<u8>> {
    let mut rng = Rng(0x9E37_79B9 ^ (id + 1).wrapping_mul(0x1234_5678_9ABC));
    let mut model: HashMap<u64, Vec<u8>> = (0..CHUNKS_PER_WORKER)
        .map(|i| (i * WORKERS + id, vec![0u8; CS]))
        .collect();
    let mut buf = vec![0u8; CS];
    for step in 0..OPS_PER_WORKER {
        // A skewed choice of chunk, so some stay hot and get promoted.
        let idx = if rng.below(3) == 0 {
            rng.below(CHUNKS_PER_WORKER)
        } else {
            rng.below(4)
        };
        let chunk = idx * WORKERS + id;
        let (off, len) = random_range(&mut rng);
        let ctx = || format!("worker {id} step {step} chunk {chunk} [{off}+{len}]");
        match rng.below(100) {
            0..=39 => {
                cache.read(chunk, off, &mut buf[..len]).unwrap();
                assert_eq!(&buf[..len], &model[&chunk][off..off + len], "{}", ctx());
            }
            40..=74 => {
                let data = pattern(rng.next(), len);
                cache.write(chunk, off, &data).unwrap();
                model.get_mut(&chunk).unwrap()[off..off + len].copy_from_slice(&data);
            }
            75..=79 => {
                let data = pattern(rng.next(), len);
                // FUA: write-through, then sync.
                cache.write_through(chunk, off, &data).unwrap();
                backing.sync().unwrap();
                model.get_mut(&chunk).unwrap()[off..off + len].copy_from_slice(&data);
                assert_eq!(
                    &backing.get_durable(chunk)[off..off + len],
                    &data[..],
                    "FUA {}",
                    ctx()
                );
            }
            80..=91 => {
                cache.zero(chunk, off, len).unwrap();
                model.get_mut(&chunk).unwrap()[off..off + len].fill(0);
            }
            92..=93 => {
                cache.flush().unwrap();
                for (c, want) in &model {
                    assert_eq!(
                        &backing.get_durable(*c),
                        want,
                        "flush, chunk {c}, {}",
                        ctx()
                    );
                }
            }
            _ => {
                cache.read(chunk, 0, &mut buf).unwrap();
                assert_eq!(buf, model[&chunk], "{}", ctx());
            }
        }
    }
    model
}

#[test]
fn concurrent_io_with_reconfiguration_and_cleaner() {
    let dir = tempfile::tempdir().unwrap();
    let backing = Arc::new(MemBacking::new(CS));
    // Small spins inside the backing widen the windows in which other
    // threads move chunks around a writeback or fill.
    backing.delay_spins.store(300, Ordering::Relaxed);
    let config = CacheConfig {
        chunk_size: CS,
        tiers: vec![
            TierConfig {
                medium: Medium::Memory,
                groups: 2,
                ways: 2,
                hash: HashKind::Mix { key: 1 },
            },
            TierConfig {
                medium: Medium::Disk {
                    path: dir.path().join("initial"),
                },
                groups: 4,
                ways: 2,
                hash: HashKind::Modulo,
            },
            TierConfig {
                medium: Medium::Memory,
                groups: 3,
                ways: 3,
                hash: HashKind::Mix { key: 2 },
            },
        ],
        victim_capacity: 4,
        // Refusals race the cleaner and reconfiguration too.
        admission: true,
        prefault: false,
    };
    let cache = Arc::new(CacheStack::new(config, Arc::clone(&backing)).unwrap());
    let cleaner = cache.spawn_cleaner(Duration::from_millis(1));
    let done = Arc::new(AtomicBool::new(false));

    let reconf = {
        let cache = Arc::clone(&cache);
        let done = Arc::clone(&done);
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let mut rng = Rng(42);
            let mut seq = 0;
            let mut applied = 0u32;
            while !done.load(Ordering::Relaxed) {
                let n = cache.config().tiers.len();
                let op = match rng.below(4) {
                    0 if n < 4 => Reconfig::AddTier {
                        index: rng.below(n as u64 + 1) as usize,
                        tier: tier(&dir, &mut rng, &mut seq),
                    },
                    1 if n > 1 => Reconfig::RemoveTier {
                        index: rng.below(n as u64) as usize,
                    },
                    2 => Reconfig::Rehash {
                        index: rng.below(n as u64) as usize,
                        hash: HashKind::Mix { key: rng.next() },
                    },
                    _ => Reconfig::Resize {
                        index: rng.below(n as u64) as usize,
                        groups: 1 + rng.below(4) as usize,
                        ways: 1 + rng.below(3) as usize,
                    },
                };
                cache.reconfigure(op).unwrap();
                applied += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            applied
        })
    };

    let workers: Vec<_> = (0..WORKERS)
        .map(|id| {
            let cache = Arc::clone(&cache);
            let backing = Arc::clone(&backing);
            std::thread::spawn(move || worker(id, &cache, &backing))
        })
        .collect();
    let models: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let reconfigs = reconf.join().unwrap();
    drop(cleaner);

    cache.check_invariants().unwrap();
    cache.flush().unwrap();
    assert_eq!(cache.dirty_count(), 0);
    for model in &models {
        for (c, want) in model {
            assert_eq!(
                &backing.get_durable(*c),
                want,
                "chunk {c} after final flush"
            );
        }
    }
    assert_eq!(
        backing.overlaps.load(Ordering::Relaxed),
        0,
        "backing calls for one chunk overlapped"
    );
    let st = cache.stats();
    eprintln!(
        "reconfigs {reconfigs}, fills {}, spills {}, rescues {}, drains {}, victim writebacks {}, promotions {}",
        st.fills,
        st.victim.spills,
        st.victim.rescues,
        st.victim.drains,
        st.victim.writebacks,
        st.tiers.iter().map(|t| t.promotions).sum::<u64>()
    );
    assert!(reconfigs > 10);
    assert!(st.victim.spills > 0 && st.victim.drains > 0);
}

/// A self-describing whole-chunk image: who wrote it and when.
fn stamp(chunk: u64, writer: u64, seq: u64) -> Vec<u8> {
    let mut v = pattern(chunk ^ (writer << 20) ^ (seq << 32), CS);
    v[..8].copy_from_slice(&chunk.to_le_bytes());
    v[8..16].copy_from_slice(&writer.to_le_bytes());
    v[16..24].copy_from_slice(&seq.to_le_bytes());
    v
}

/// Never written (all zeros), or exactly one writer's complete image.
fn is_whole_image(chunk: u64, buf: &[u8]) -> bool {
    if buf.iter().all(|&b| b == 0) {
        return true;
    }
    let word = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
    word(0) == chunk && buf == stamp(chunk, word(1), word(2)).as_slice()
}

#[test]
fn shared_chunks_never_tear() {
    const SHARED: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    let backing = Arc::new(MemBacking::new(CS));
    let config = CacheConfig {
        chunk_size: CS,
        tiers: vec![
            TierConfig {
                medium: Medium::Disk {
                    path: dir.path().join("top"),
                },
                groups: 1,
                ways: 2,
                hash: HashKind::Modulo,
            },
            TierConfig {
                medium: Medium::Memory,
                groups: 2,
                ways: 1,
                hash: HashKind::Mix { key: 9 },
            },
        ],
        victim_capacity: 1,
        admission: true,
        prefault: false,
    };
    let cache = Arc::new(CacheStack::new(config, Arc::clone(&backing)).unwrap());
    let cleaner = cache.spawn_cleaner(Duration::from_millis(1));
    let done = Arc::new(AtomicBool::new(false));
    let reconf = {
        let (cache, done) = (Arc::clone(&cache), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut rng = Rng(7);
            while !done.load(Ordering::Relaxed) {
                let n = cache.config().tiers.len();
                let op = match rng.below(3) {
                    0 if n < 3 => Reconfig::AddTier {
                        index: rng.below(n as u64 + 1) as usize,
                        tier: TierConfig {
                            medium: Medium::Memory,
                            groups: 1 + rng.below(2) as usize,
                            ways: 1 + rng.below(2) as usize,
                            hash: HashKind::Mix { key: rng.next() },
                        },
                    },
                    1 if n > 1 => Reconfig::RemoveTier {
                        index: rng.below(n as u64) as usize,
                    },
                    _ => Reconfig::Resize {
                        index: rng.below(n as u64) as usize,
                        groups: 1 + rng.below(2) as usize,
                        ways: 1 + rng.below(2) as usize,
                    },
                };
                cache.reconfigure(op).unwrap();
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let threads: Vec<_> = (0..3u64)
        .map(|writer| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let mut rng = Rng(100 + writer);
                let mut buf = vec![0u8; CS];
                for seq in 0..10_000u64 {
                    let chunk = rng.below(SHARED);
                    match rng.below(20) {
                        0..=9 => cache.write(chunk, 0, &stamp(chunk, writer, seq)).unwrap(),
                        10 => cache
                            .write_through(chunk, 0, &stamp(chunk, writer, seq))
                            .unwrap(),
                        11 => cache.flush().unwrap(),
                        _ => {
                            cache.read(chunk, 0, &mut buf).unwrap();
                            assert!(is_whole_image(chunk, &buf), "torn read of chunk {chunk}");
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    reconf.join().unwrap();
    drop(cleaner);
    cache.check_invariants().unwrap();
    cache.flush().unwrap();
    let mut buf = vec![0u8; CS];
    for chunk in 0..SHARED {
        let durable = backing.get_durable(chunk);
        assert!(
            is_whole_image(chunk, &durable),
            "torn backing chunk {chunk}"
        );
        if cache.peek(chunk, &mut buf).unwrap().is_some() {
            assert_eq!(buf, durable, "cache and backing disagree on chunk {chunk}");
        }
    }
    assert_eq!(backing.overlaps.load(Ordering::Relaxed), 0);
}
