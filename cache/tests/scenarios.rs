//! Hand-built scenarios: exact counter values, LRU order, back-pressure,
//! FUA, discard, the cleaner thread, error handling, disk tiers and
//! configuration validation.

mod common;

use canopy_cache::{
    Backing, CacheConfig, CacheError, CacheStack, HashKind, Location, Medium, Reconfig, TierConfig,
};
use common::{pattern, MemBacking};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CS: usize = 4096;

fn mem(groups: usize, ways: usize) -> TierConfig {
    TierConfig {
        medium: Medium::Memory,
        groups,
        ways,
        hash: HashKind::Modulo,
    }
}

fn stack(
    tiers: Vec<TierConfig>,
    victim_capacity: usize,
) -> (CacheStack<MemBacking>, Arc<MemBacking>) {
    let backing = Arc::new(MemBacking::new(CS));
    let cfg = CacheConfig {
        chunk_size: CS,
        tiers,
        victim_capacity,
        admission: false,
        prefault: false,
    };
    (CacheStack::new(cfg, Arc::clone(&backing)).unwrap(), backing)
}

fn whole(seed: u64) -> Vec<u8> {
    pattern(seed, CS)
}

fn where_is(c: &CacheStack<MemBacking>, chunk: u64) -> Option<(Location, bool)> {
    let mut buf = vec![0; c.chunk_size()];
    c.peek(chunk, &mut buf)
        .unwrap()
        .map(|r| (r.location, r.dirty))
}

#[test]
fn counters_follow_promotion_demotion_spill_rescue_drain() {
    let (c, backing) = stack(vec![mem(1, 1), mem(1, 1)], 4);
    c.write(0, 0, &whole(0)).unwrap();
    c.write(1, 0, &whole(1)).unwrap(); // 0 demoted to tier 1
    c.write(2, 0, &whole(2)).unwrap(); // 1 demoted, 0 spills
    assert_eq!(where_is(&c, 0), Some((Location::Victim, true)));
    assert_eq!(where_is(&c, 1), Some((Location::Tier(1), true)));
    assert_eq!(where_is(&c, 2), Some((Location::Tier(0), true)));

    let mut buf = vec![0; CS];
    c.read(0, 0, &mut buf).unwrap(); // rescue: 2 demoted, 1 spills
    assert_eq!(buf, whole(0));
    assert_eq!(where_is(&c, 1), Some((Location::Victim, true)));
    c.read(2, 0, &mut buf).unwrap(); // promotion from tier 1: 0 demoted
    assert_eq!(buf, whole(2));
    c.read(2, 100, &mut buf[..10]).unwrap(); // top-tier hit
    assert_eq!(where_is(&c, 0), Some((Location::Tier(1), true)));
    assert_eq!(
        backing.reads.load(Ordering::Relaxed),
        0,
        "whole writes never fill"
    );

    let st = c.stats();
    let (t0, t1) = (&st.tiers[0], &st.tiers[1]);
    assert_eq!((t0.hits, t0.misses), (1, 5));
    assert_eq!((t1.hits, t1.misses), (1, 4));
    assert_eq!(t1.promotions, 1);
    assert_eq!(t0.promotions, 0);
    assert_eq!(t0.evictions, 4);
    assert_eq!(t1.demotions, 4);
    assert_eq!(t1.evictions, 2);
    assert_eq!(st.victim.spills, 2);
    assert_eq!(st.victim.rescues, 1);
    assert_eq!((st.victim.len, st.victim.dirty), (1, 1));
    assert_eq!((t0.occupied, t0.dirty, t1.occupied, t1.dirty), (1, 1, 1, 1));

    assert_eq!(c.clean_victims(10).unwrap(), 1);
    let st = c.stats();
    assert_eq!(
        (
            st.victim.drains,
            st.victim.writebacks,
            st.victim.drops,
            st.victim.len
        ),
        (1, 1, 0, 0)
    );
    assert_eq!(backing.get(1), whole(1));
    assert_eq!(c.dirty_count(), 2);
    c.flush().unwrap();
    let st = c.stats();
    assert_eq!((st.flushes, st.writebacks, c.dirty_count()), (1, 3, 0));
    for ch in 0..3 {
        assert_eq!(backing.get_durable(ch), whole(ch));
    }
    c.check_invariants().unwrap();
}

#[test]
fn clean_victims_drops_clean_entries_without_writing() {
    let (c, backing) = stack(vec![mem(1, 1)], 8);
    let mut buf = vec![0; 16];
    for ch in 0..4 {
        c.read(ch, 0, &mut buf).unwrap(); // fills, clean
    }
    assert_eq!(c.stats().fills, 4);
    assert_eq!(c.stats().victim.len, 3);
    assert_eq!(c.clean_victims(2).unwrap(), 2);
    assert_eq!(c.clean_victims(10).unwrap(), 1);
    let st = c.stats();
    assert_eq!(
        (st.victim.drains, st.victim.drops, st.victim.writebacks),
        (3, 3, 0)
    );
    assert!(backing.write_log.lock().is_empty());
}

#[test]
fn lru_within_a_set_picks_the_eviction() {
    let (c, _) = stack(vec![mem(1, 2)], 8);
    c.write(10, 0, &whole(10)).unwrap();
    c.write(11, 0, &whole(11)).unwrap();
    let mut buf = [0u8; 8];
    c.read(10, 0, &mut buf).unwrap(); // 10 now more recent than 11
    c.write(12, 0, &whole(12)).unwrap();
    assert_eq!(where_is(&c, 11), Some((Location::Victim, true)));
    assert_eq!(where_is(&c, 10), Some((Location::Tier(0), true)));
    c.write(13, 0, &whole(13)).unwrap(); // 10 is LRU now
    assert_eq!(where_is(&c, 10), Some((Location::Victim, true)));
    assert_eq!(where_is(&c, 12), Some((Location::Tier(0), true)));
}

#[test]
fn back_pressure_drains_to_capacity() {
    let (c, backing) = stack(vec![mem(1, 1)], 0);
    c.write(0, 0, &whole(0)).unwrap();
    c.write(1, 0, &whole(1)).unwrap(); // 0 spills, capacity 0: written back at once
    let st = c.stats();
    assert_eq!(
        (
            st.victim.spills,
            st.victim.drains,
            st.victim.writebacks,
            st.victim.len
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(backing.get(0), whole(0));
    let mut buf = vec![0; CS];
    c.read(0, 0, &mut buf).unwrap(); // fill from backing; 1 written back
    assert_eq!(buf, whole(0));
    assert_eq!(c.stats().fills, 1);
    assert_eq!(backing.get(1), whole(1));
}

#[test]
fn partial_write_to_missing_chunk_fills_first() {
    let (c, backing) = stack(vec![mem(2, 2)], 4);
    backing.visible.lock().insert(5, whole(5));
    c.write(5, 100, &[1, 2, 3]).unwrap();
    assert_eq!(backing.reads.load(Ordering::Relaxed), 1);
    let mut expect = whole(5);
    expect[100..103].copy_from_slice(&[1, 2, 3]);
    let mut buf = vec![0; CS];
    c.read(5, 0, &mut buf).unwrap();
    assert_eq!(buf, expect);
}

#[test]
fn write_through_reaches_backing_and_keeps_dirty_state() {
    let (c, backing) = stack(vec![mem(2, 2)], 4);
    c.write(3, 0, &whole(3)).unwrap();
    c.write(4, 0, &whole(4)).unwrap();
    let syncs = backing.syncs.load(Ordering::Relaxed);
    // Chunk 3 is dirty: the written range reaches the backing, the rest of
    // the chunk is still only in the cache, so it stays dirty.
    c.write_through(3, 10, &[9; 20]).unwrap();
    assert_eq!(&backing.get(3)[10..30], &[9; 20]);
    assert_eq!(
        backing.syncs.load(Ordering::Relaxed),
        syncs,
        "no sync per write"
    );
    assert_eq!(where_is(&c, 3), Some((Location::Tier(0), true)));
    // FUA = write-through + sync.
    backing.sync().unwrap();
    assert_eq!(&backing.get_durable(3)[10..30], &[9; 20]);
    // A clean chunk stays clean: cache and backing agree after the write.
    c.flush().unwrap();
    c.write_through(4, 0, &[7; 8]).unwrap();
    let mut expect = whole(4);
    expect[..8].fill(7);
    assert_eq!(backing.get(4), expect);
    assert_eq!(where_is(&c, 4), Some((Location::Tier(0), false)));
    assert_eq!(c.dirty_count(), 0);
    // A miss fills from the backing after the range is written there.
    c.write_through(9, 100, &[5; 10]).unwrap();
    let mut buf = vec![0u8; CS];
    c.read(9, 0, &mut buf).unwrap();
    assert_eq!(buf, backing.get(9));
    assert_eq!(&buf[100..110], &[5; 10]);
    assert_eq!(c.dirty_count(), 0);
}

#[test]
fn zero_whole_discards_partial_zero_writes() {
    let (c, backing) = stack(vec![mem(2, 2), mem(2, 2)], 4);
    backing.visible.lock().insert(7, whole(70));
    c.write(7, 0, &whole(7)).unwrap();
    c.zero(7, 0, CS).unwrap();
    assert_eq!(where_is(&c, 7), None);
    assert_eq!(backing.zeroes.load(Ordering::Relaxed), 1);
    assert!(
        backing.write_log.lock().is_empty(),
        "a discarded dirty chunk is not written"
    );
    let mut buf = vec![1; CS];
    c.read(7, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    c.write(8, 0, &whole(8)).unwrap();
    c.zero(8, 1000, 2000).unwrap();
    let mut expect = whole(8);
    expect[1000..3000].fill(0);
    c.read(8, 0, &mut buf).unwrap();
    assert_eq!(buf, expect);
    assert_eq!(backing.zeroes.load(Ordering::Relaxed), 1);
}

#[test]
fn cleaner_thread_drains_and_stops() {
    let (c, backing) = stack(vec![mem(1, 2)], 1000);
    let c = Arc::new(c);
    let handle = c.spawn_cleaner(Duration::from_secs(3600));
    assert!(handle.is_running());
    for ch in 0..50 {
        c.write(ch, 0, &whole(ch)).unwrap();
    }
    // Woken by the spills, not by the (hour-long) interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.stats().victim.len > 0 {
        assert!(Instant::now() < deadline, "cleaner did not drain");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(handle);
    let st = c.stats();
    assert_eq!(st.victim.drains, 48);
    assert_eq!(st.victim.writebacks, 48);
    for ch in 0..48 {
        assert_eq!(backing.get(ch), whole(ch));
    }
    // Handle dropped: the thread's reference to the stack is gone.
    assert_eq!(Arc::strong_count(&c), 1);
}

#[test]
fn failed_writebacks_keep_data_and_are_counted() {
    let (c, backing) = stack(vec![mem(1, 1)], 8);
    for ch in 0..4 {
        c.write(ch, 0, &whole(ch)).unwrap();
    }
    backing.fail_writes.store(true, Ordering::Relaxed);
    assert!(matches!(c.clean_victims(10), Err(CacheError::Io(_))));
    assert!(c.stats().victim.errors >= 3);
    assert_eq!(c.stats().victim.len, 3);
    assert!(c.flush().is_err());
    assert_eq!(c.dirty_count(), 4);
    let c = Arc::new(c);
    let handle = c.spawn_cleaner(Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(c.stats().victim.len, 3, "nothing drained while writes fail");
    backing.fail_writes.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.stats().victim.len > 0 {
        assert!(Instant::now() < deadline, "cleaner did not retry");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(handle);
    c.flush().unwrap();
    for ch in 0..4 {
        assert_eq!(backing.get_durable(ch), whole(ch));
    }
}

#[test]
fn disk_tiers_hold_data_and_survive_reconfiguration() {
    let dir = tempfile::tempdir().unwrap();
    let disk = |name: &str, groups, ways, hash| TierConfig {
        medium: Medium::Disk {
            path: dir.path().join(name),
        },
        groups,
        ways,
        hash,
    };
    let (c, backing) = stack(
        vec![
            mem(2, 2),
            disk("d1", 4, 2, HashKind::Mix { key: 7 }),
            disk("d2", 3, 3, HashKind::Modulo),
        ],
        64,
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("d1")).unwrap().len(),
        (4 * 2 * CS) as u64
    );
    for ch in 0..40 {
        c.write(ch, 0, &whole(ch)).unwrap();
        c.write(ch, 17, &[ch as u8; 33]).unwrap();
    }
    let expect = |ch: u64| {
        let mut v = whole(ch);
        v[17..50].fill(ch as u8);
        v
    };
    let check = |c: &CacheStack<MemBacking>| {
        let mut buf = vec![0; CS];
        for ch in 0..40 {
            c.read(ch, 0, &mut buf).unwrap();
            assert_eq!(buf, expect(ch), "chunk {ch}");
        }
        c.check_invariants().unwrap();
    };
    check(&c);
    let st = c.stats();
    assert_eq!(st.tiers[1].medium, "disk");
    assert!(st.tiers[1].occupied > 0 && st.tiers[2].occupied > 0);
    let dirty = c.dirty_count();
    assert_eq!(dirty, 40);

    c.reconfigure(Reconfig::Rehash {
        index: 1,
        hash: HashKind::Mix { key: 99 },
    })
    .unwrap();
    assert!(!dir.path().join("d1.rebuild").exists());
    c.reconfigure(Reconfig::Resize {
        index: 2,
        groups: 5,
        ways: 1,
    })
    .unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("d2")).unwrap().len(),
        (5 * CS) as u64
    );
    assert_eq!(c.dirty_count(), 40, "reconfiguration loses no dirty chunk");
    check(&c);
    c.reconfigure(Reconfig::RemoveTier { index: 2 }).unwrap();
    assert!(
        !dir.path().join("d2").exists(),
        "a removed disk tier's file is deleted"
    );
    c.reconfigure(Reconfig::AddTier {
        index: 0,
        tier: disk("top", 2, 2, HashKind::Modulo),
    })
    .unwrap();
    check(&c);
    assert_eq!(c.config().tiers.len(), 3);
    c.flush().unwrap();
    for ch in 0..40 {
        assert_eq!(backing.get_durable(ch), expect(ch));
    }
    // Informational: whether this machine's kernel let us use io_uring.
    eprintln!("io_uring fallbacks: {}", c.stats().io_uring_fallbacks);
}

#[test]
fn remove_every_tier_but_one_keeps_dirty_data() {
    let (c, backing) = stack(vec![mem(2, 2), mem(3, 2), mem(2, 3)], 1000);
    for ch in 0..30 {
        c.write(ch, 0, &whole(ch)).unwrap();
    }
    assert_eq!(c.dirty_count(), 30);
    c.reconfigure(Reconfig::RemoveTier { index: 0 }).unwrap();
    c.reconfigure(Reconfig::RemoveTier { index: 1 }).unwrap();
    assert!(matches!(
        c.reconfigure(Reconfig::RemoveTier { index: 0 }),
        Err(CacheError::InvalidConfig(_))
    ));
    assert_eq!(c.dirty_count(), 30);
    assert!(backing.write_log.lock().is_empty());
    assert_eq!(c.stats().victim.len, 30 - 6);
    c.check_invariants().unwrap();
    c.flush().unwrap();
    for ch in 0..30 {
        assert_eq!(backing.get_durable(ch), whole(ch));
    }
}

#[test]
fn invalid_configs_are_rejected() {
    let backing = Arc::new(MemBacking::new(CS));
    let try_new = |chunk_size, tiers: Vec<TierConfig>| {
        CacheStack::new(
            CacheConfig {
                chunk_size,
                tiers,
                victim_capacity: 4,
                admission: false,
                prefault: false,
            },
            Arc::clone(&backing),
        )
        .err()
    };
    for bad in [0, 8, 1000, 3 * 1024, 2 << 20] {
        assert!(
            matches!(
                try_new(bad, vec![mem(1, 1)]),
                Some(CacheError::InvalidConfig(_))
            ),
            "chunk size {bad} accepted"
        );
    }
    assert!(try_new(16, vec![mem(1, 1)]).is_none());
    assert!(try_new(1 << 20, vec![mem(1, 1)]).is_none());
    assert!(matches!(
        try_new(CS, vec![]),
        Some(CacheError::InvalidConfig(_))
    ));
    assert!(matches!(
        try_new(CS, vec![mem(0, 1)]),
        Some(CacheError::InvalidConfig(_))
    ));
    assert!(matches!(
        try_new(CS, vec![mem(1, 0)]),
        Some(CacheError::InvalidConfig(_))
    ));
    assert!(matches!(
        try_new(CS, vec![mem(usize::MAX / 2, 4)]),
        Some(CacheError::InvalidConfig(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let d = TierConfig {
        medium: Medium::Disk {
            path: dir.path().join("same"),
        },
        groups: 1,
        ways: 1,
        hash: HashKind::Modulo,
    };
    assert!(matches!(
        try_new(CS, vec![d.clone(), d.clone()]),
        Some(CacheError::InvalidConfig(_))
    ));
    let missing_dir = TierConfig {
        medium: Medium::Disk {
            path: dir.path().join("no/such/dir/file"),
        },
        ..d.clone()
    };
    assert!(matches!(
        try_new(CS, vec![missing_dir]),
        Some(CacheError::Io(_))
    ));

    let (c, _) = stack(vec![mem(1, 1)], 4);
    assert!(matches!(
        c.reconfigure(Reconfig::AddTier {
            index: 2,
            tier: mem(1, 1)
        }),
        Err(CacheError::BadTierIndex { index: 2, tiers: 1 })
    ));
    assert!(matches!(
        c.reconfigure(Reconfig::Resize {
            index: 0,
            groups: 0,
            ways: 1
        }),
        Err(CacheError::InvalidConfig(_))
    ));
    assert!(matches!(
        c.reconfigure(Reconfig::Rehash {
            index: 5,
            hash: HashKind::Modulo
        }),
        Err(CacheError::BadTierIndex { .. })
    ));
    c.reconfigure(Reconfig::AddTier {
        index: 1,
        tier: d.clone(),
    })
    .unwrap();
    assert!(matches!(
        c.reconfigure(Reconfig::AddTier { index: 0, tier: d }),
        Err(CacheError::InvalidConfig(_))
    ));
    assert_eq!(c.config().tiers.len(), 2);

    let mut buf = [0u8; 8];
    for (chunk, off, len) in [
        (0, CS - 4, 8),
        (0, CS + 1, 0),
        (u64::MAX, 0, 8),
        (0, usize::MAX, 2),
    ] {
        let mut big = vec![0u8; len];
        assert!(matches!(
            c.read(chunk, off, &mut big),
            Err(CacheError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.write(chunk, off, &big),
            Err(CacheError::OutOfRange { .. })
        ));
        assert!(matches!(
            c.zero(chunk, off, len),
            Err(CacheError::OutOfRange { .. })
        ));
    }
    c.read(0, CS - 8, &mut buf).unwrap();
}
