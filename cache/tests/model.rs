//! Property test: random operation sequences against a reference model of
//! the volume, over tiny tiers so that eviction, demotion, spilling,
//! rescue and back-pressure happen constantly.

mod common;

use canopy_cache::{CacheConfig, CacheStack, HashKind, Medium, Reconfig, TierConfig};
use common::{pattern, MemBacking};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const CS: usize = 512;
const CHUNKS: u64 = 64;

#[derive(Clone, Debug)]
enum Op {
    Read {
        chunk: u64,
        off: usize,
        len: usize,
    },
    Write {
        chunk: u64,
        off: usize,
        len: usize,
        seed: u64,
    },
    WriteThrough {
        chunk: u64,
        off: usize,
        len: usize,
        seed: u64,
    },
    Zero {
        chunk: u64,
        off: usize,
        len: usize,
    },
    Flush,
    Clean {
        max: usize,
    },
    AddTier {
        index: usize,
        tier: TierSpec,
    },
    RemoveTier {
        index: usize,
    },
    Rehash {
        index: usize,
        hash: HashKind,
    },
    Resize {
        index: usize,
        groups: usize,
        ways: usize,
    },
}

#[derive(Clone, Debug)]
struct TierSpec {
    disk: bool,
    groups: usize,
    ways: usize,
    hash: HashKind,
}

fn hash_kind() -> impl Strategy<Value = HashKind> {
    prop_oneof![
        Just(HashKind::Modulo),
        any::<u64>().prop_map(|key| HashKind::Mix { key }),
    ]
}

fn tier_spec() -> impl Strategy<Value = TierSpec> {
    (any::<bool>(), 1usize..=3, 1usize..=3, hash_kind()).prop_map(|(disk, groups, ways, hash)| {
        TierSpec {
            disk,
            groups,
            ways,
            hash,
        }
    })
}

/// A byte range inside a chunk, biased towards whole-chunk and edge cases.
fn range() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        2 => Just((0, CS)),
        1 => (1usize..CS).prop_map(|n| (0, n)),
        1 => (0usize..CS).prop_map(|o| (o, CS - o)),
        4 => (0usize..=CS, 0usize..=CS).prop_map(|(a, b)| (a.min(b), a.max(b) - a.min(b))),
    ]
}

fn chunk() -> impl Strategy<Value = u64> {
    // Mostly a hot subset so that hits, promotions and rescues happen.
    prop_oneof![3 => 0u64..12, 1 => 0u64..CHUNKS]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (chunk(), range()).prop_map(|(chunk, (off, len))| Op::Read { chunk, off, len }),
        12 => (chunk(), range(), any::<u64>())
            .prop_map(|(chunk, (off, len), seed)| Op::Write { chunk, off, len, seed }),
        2 => (chunk(), range(), any::<u64>())
            .prop_map(|(chunk, (off, len), seed)| Op::WriteThrough { chunk, off, len, seed }),
        3 => (chunk(), range()).prop_map(|(chunk, (off, len))| Op::Zero { chunk, off, len }),
        1 => Just(Op::Flush),
        2 => (0usize..4).prop_map(|max| Op::Clean { max }),
        1 => (0usize..8, tier_spec()).prop_map(|(index, tier)| Op::AddTier { index, tier }),
        1 => (0usize..8).prop_map(|index| Op::RemoveTier { index }),
        1 => (0usize..8, hash_kind()).prop_map(|(index, hash)| Op::Rehash { index, hash }),
        1 => (0usize..8, 1usize..=3, 1usize..=3)
            .prop_map(|(index, groups, ways)| Op::Resize { index, groups, ways }),
    ]
}

static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

fn tier_config(dir: &Path, spec: &TierSpec) -> TierConfig {
    let medium = if spec.disk {
        let n = FILE_SEQ.fetch_add(1, Ordering::Relaxed);
        Medium::Disk {
            path: dir.join(format!("tier-{n}")),
        }
    } else {
        Medium::Memory
    };
    TierConfig {
        medium,
        groups: spec.groups,
        ways: spec.ways,
        hash: spec.hash.clone(),
    }
}

struct Harness {
    cache: CacheStack<MemBacking>,
    backing: Arc<MemBacking>,
    model: HashMap<u64, Vec<u8>>,
    capacity: usize,
}

impl Harness {
    fn expected(&self, chunk: u64) -> Vec<u8> {
        self.model
            .get(&chunk)
            .cloned()
            .unwrap_or_else(|| vec![0; CS])
    }

    fn model_write(&mut self, chunk: u64, off: usize, data: &[u8]) {
        let mut c = self.expected(chunk);
        c[off..off + data.len()].copy_from_slice(data);
        self.model.insert(chunk, c);
    }

    /// The invariants that must hold between any two operations.
    fn check(&self) -> Result<(), TestCaseError> {
        if let Err(e) = self.cache.check_invariants() {
            return Err(TestCaseError::fail(e));
        }
        let mut buf = vec![0u8; CS];
        for c in 0..CHUNKS {
            // Content in cache if present, else in backing, equals the model:
            // in particular no dirty chunk vanished without a writeback.
            let actual = match self.cache.peek(c, &mut buf) {
                Ok(Some(_)) => buf.clone(),
                Ok(None) => self.backing.get(c),
                Err(e) => return Err(TestCaseError::fail(format!("peek {c}: {e}"))),
            };
            prop_assert_eq!(&actual, &self.expected(c), "chunk {} diverged", c);
        }
        let st = self.cache.stats();
        // Single-threaded, so back-pressure never finds a chunk lock busy
        // and must have drained the repository back to capacity.
        prop_assert!(
            st.victim.len <= self.capacity,
            "victim {} > capacity {}",
            st.victim.len,
            self.capacity
        );
        prop_assert_eq!(self.backing.overlaps.load(Ordering::Relaxed), 0);
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let cache = &self.cache;
        match op {
            Op::Read { chunk, off, len } => {
                let mut buf = vec![0xAAu8; *len];
                cache.read(*chunk, *off, &mut buf).map_err(fail)?;
                let exp = self.expected(*chunk);
                prop_assert_eq!(&buf[..], &exp[*off..off + len], "read {}", chunk);
            }
            Op::Write {
                chunk,
                off,
                len,
                seed,
            } => {
                let data = pattern(*seed, *len);
                let reads = self.backing.reads.load(Ordering::Relaxed);
                cache.write(*chunk, *off, &data).map_err(fail)?;
                if *len == CS {
                    prop_assert_eq!(
                        self.backing.reads.load(Ordering::Relaxed),
                        reads,
                        "whole-chunk write read the backing"
                    );
                }
                self.model_write(*chunk, *off, &data);
            }
            Op::WriteThrough {
                chunk,
                off,
                len,
                seed,
            } => {
                let data = pattern(*seed, *len);
                cache.write_through(*chunk, *off, &data).map_err(fail)?;
                self.model_write(*chunk, *off, &data);
                prop_assert_eq!(
                    &self.backing.get(*chunk)[*off..*off + *len],
                    &data[..],
                    "write-through bytes not in the backing"
                );
            }
            Op::Zero { chunk, off, len } => {
                let zeroes = self.backing.zeroes.load(Ordering::Relaxed);
                cache.zero(*chunk, *off, *len).map_err(fail)?;
                self.model_write(*chunk, *off, &vec![0; *len]);
                if *len == CS {
                    prop_assert_eq!(self.backing.zeroes.load(Ordering::Relaxed), zeroes + 1);
                    let mut buf = vec![0u8; CS];
                    prop_assert!(self.cache.peek(*chunk, &mut buf).map_err(fail)?.is_none());
                }
            }
            Op::Flush => {
                cache.flush().map_err(fail)?;
                prop_assert_eq!(cache.dirty_count(), 0);
                for c in 0..CHUNKS {
                    prop_assert_eq!(
                        self.backing.get_durable(c),
                        self.expected(c),
                        "chunk {} not durable after flush",
                        c
                    );
                }
            }
            Op::Clean { max } => {
                let before = cache.stats().victim.len;
                let n = cache.clean_victims(*max).map_err(fail)?;
                prop_assert_eq!(n, before.min(*max));
            }
            Op::AddTier { index, tier } => {
                let n = cache.config().tiers.len();
                if n < 4 {
                    let dir = self.dir();
                    let cfg = tier_config(&dir, tier);
                    cache
                        .reconfigure(Reconfig::AddTier {
                            index: index % (n + 1),
                            tier: cfg,
                        })
                        .map_err(fail)?;
                }
            }
            Op::RemoveTier { index } => {
                let n = cache.config().tiers.len();
                let r = cache.reconfigure(Reconfig::RemoveTier { index: index % n });
                prop_assert_eq!(r.is_ok(), n > 1);
            }
            Op::Rehash { index, hash } => {
                let n = cache.config().tiers.len();
                cache
                    .reconfigure(Reconfig::Rehash {
                        index: index % n,
                        hash: hash.clone(),
                    })
                    .map_err(fail)?;
                prop_assert_eq!(&cache.config().tiers[index % n].hash, hash);
            }
            Op::Resize {
                index,
                groups,
                ways,
            } => {
                let n = cache.config().tiers.len();
                cache
                    .reconfigure(Reconfig::Resize {
                        index: index % n,
                        groups: *groups,
                        ways: *ways,
                    })
                    .map_err(fail)?;
                let t = &cache.config().tiers[index % n];
                prop_assert_eq!((t.groups, t.ways), (*groups, *ways));
            }
        }
        Ok(())
    }

    fn dir(&self) -> std::path::PathBuf {
        DIR.with(|d| d.path().to_path_buf())
    }
}

thread_local! {
    static DIR: tempfile::TempDir = tempfile::tempdir().expect("tempdir");
}

fn fail(e: canopy_cache::CacheError) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn cache_matches_model(
        tiers in prop::collection::vec(tier_spec(), 1..=3),
        capacity in 0usize..4,
        admission in any::<bool>(),
        // Committing the memory up front must change nothing observable.
        prefault in any::<bool>(),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let dir = DIR.with(|d| d.path().to_path_buf());
        let config = CacheConfig {
            chunk_size: CS,
            tiers: tiers.iter().map(|t| tier_config(&dir, t)).collect(),
            victim_capacity: capacity,
            admission,
            prefault,
        };
        let backing = Arc::new(MemBacking::new(CS));
        let cache = CacheStack::new(config, Arc::clone(&backing)).map_err(fail)?;
        let mut h = Harness { cache, backing, model: HashMap::new(), capacity };
        for op in &ops {
            h.apply(op)?;
            h.check()?;
        }
        // Whatever happened, a final flush makes the backing equal the model.
        h.apply(&Op::Flush)?;
    }
}
