//! The top tier's admission filter (`CacheConfig::admission`): scans and
//! one-off reads don't push a hot set out, old popularity fades, and
//! nothing but a clean read is ever refused.

mod common;

use canopy_cache::{CacheConfig, CacheStack, HashKind, Location, Medium, TierConfig};
use common::{pattern, MemBacking};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const CS: usize = 64;

/// One set of `ways` ways, so every chunk competes with every other.
fn stack(ways: usize, admission: bool) -> (CacheStack<MemBacking>, Arc<MemBacking>) {
    let backing = Arc::new(MemBacking::new(CS));
    let cfg = CacheConfig {
        chunk_size: CS,
        tiers: vec![TierConfig {
            medium: Medium::Memory,
            groups: 1,
            ways,
            hash: HashKind::Modulo,
        }],
        victim_capacity: 1,
        admission,
        prefault: false,
    };
    (CacheStack::new(cfg, Arc::clone(&backing)).unwrap(), backing)
}

fn read(c: &CacheStack<MemBacking>, chunk: u64) -> Vec<u8> {
    let mut buf = vec![0u8; CS];
    c.read(chunk, 0, &mut buf).unwrap();
    buf
}

fn location(c: &CacheStack<MemBacking>, chunk: u64) -> Option<(Location, bool)> {
    let mut buf = vec![0u8; CS];
    c.peek(chunk, &mut buf)
        .unwrap()
        .map(|r| (r.location, r.dirty))
}

/// Rounds of a hot set read four times each, then a scan of fresh chunks;
/// whether every hot chunk was in the top tier after every scan.
fn hot_set_survives_scans(admission: bool) -> bool {
    let (c, _) = stack(8, admission);
    let hot: Vec<u64> = (0..4).collect();
    let mut cold = 1000;
    let mut survived = true;
    for _round in 0..50 {
        for _ in 0..4 {
            for &h in &hot {
                read(&c, h);
            }
        }
        for _ in 0..8 {
            read(&c, cold);
            cold += 1;
        }
        survived &= hot
            .iter()
            .all(|&h| matches!(location(&c, h), Some((Location::Tier(0), _))));
    }
    c.check_invariants().unwrap();
    survived
}

#[test]
fn a_scan_does_not_evict_the_hot_set() {
    assert!(hot_set_survives_scans(true));
    // The same trace through plain LRU loses the hot set: the test means
    // something.
    assert!(!hot_set_survives_scans(false));
}

#[test]
fn refused_reads_return_the_backing_bytes_and_are_not_cached() {
    let (c, backing) = stack(4, true);
    for h in 0..4 {
        backing.visible.lock().insert(h, pattern(h, CS));
        for _ in 0..10 {
            assert_eq!(read(&c, h), pattern(h, CS));
        }
    }
    for chunk in 100..120 {
        backing.visible.lock().insert(chunk, pattern(chunk, CS));
        let reads = backing.reads.load(Ordering::Relaxed);
        // A partial read too, served from the fill.
        let mut part = vec![0u8; 10];
        c.read(chunk, 7, &mut part).unwrap();
        assert_eq!(part, pattern(chunk, CS)[7..17]);
        assert_eq!(backing.reads.load(Ordering::Relaxed), reads + 1);
        assert_eq!(location(&c, chunk), None, "chunk {chunk} was cached");
    }
    let stats = c.stats();
    assert_eq!(stats.tiers[0].refused, 20);
    assert_eq!(stats.fills, 24);
    for h in 0..4 {
        assert_eq!(location(&c, h), Some((Location::Tier(0), false)));
    }
    c.check_invariants().unwrap();
}

#[test]
fn writes_are_always_admitted_and_never_lost() {
    let (c, backing) = stack(4, true);
    // A set full of very popular chunks.
    for h in 0..4 {
        for _ in 0..15 {
            read(&c, h);
        }
    }
    // Writes to chunks never seen: whole, partial (read-modify-write of a
    // fill), zeros, and write-through. Each is cached wherever it lands.
    c.write(100, 0, &pattern(100, CS)).unwrap();
    assert_eq!(location(&c, 100), Some((Location::Tier(0), true)));
    c.write(101, 3, &[9u8; 5]).unwrap();
    assert_eq!(location(&c, 101), Some((Location::Tier(0), true)));
    c.zero(102, 1, 2).unwrap();
    assert_eq!(location(&c, 102), Some((Location::Tier(0), true)));
    c.write_through(103, 0, &pattern(103, CS)).unwrap();
    assert!(location(&c, 103).is_some());
    assert_eq!(c.stats().tiers[0].refused, 0);
    // Nothing written is lost: each reads back, and flush puts it in the
    // backing store.
    assert_eq!(read(&c, 100), pattern(100, CS));
    let mut want = vec![0u8; CS];
    want[3..8].fill(9);
    assert_eq!(read(&c, 101), want);
    c.flush().unwrap();
    assert_eq!(backing.get(100), pattern(100, CS));
    assert_eq!(backing.get(101), want);
    assert_eq!(backing.get(103), pattern(103, CS));
    assert_eq!(c.dirty_count(), 0);
    c.check_invariants().unwrap();
}

#[test]
fn old_popularity_fades_so_a_new_hot_set_gets_in() {
    let (c, _) = stack(4, true);
    let old: Vec<u64> = (0..4).collect();
    let new: Vec<u64> = (10..14).collect();
    for &h in &old {
        for _ in 0..15 {
            read(&c, h);
        }
    }
    // The new set is refused at first: the old one's counts are at the
    // ceiling. Without aging, ties at the ceiling would keep it out for
    // ever; with it, the old counts halve while the new ones grow.
    read(&c, new[0]);
    assert_eq!(location(&c, new[0]), None);
    for _ in 0..60 {
        for &h in &new {
            read(&c, h);
        }
    }
    for &h in &new {
        assert_eq!(location(&c, h), Some((Location::Tier(0), false)), "{h}");
    }
    for &h in &old {
        assert_ne!(location(&c, h).map(|l| l.0), Some(Location::Tier(0)));
    }
    assert!(c.stats().tiers[0].refused > 0);
}

#[test]
fn a_detached_stack_never_refuses() {
    let cfg = CacheConfig {
        chunk_size: CS,
        tiers: vec![TierConfig {
            medium: Medium::Memory,
            groups: 1,
            ways: 2,
            hash: HashKind::Modulo,
        }],
        victim_capacity: 1,
        admission: true,
        prefault: false,
    };
    let c = CacheStack::detached(cfg).unwrap();
    assert!(!c.config().admission);
    let mut buf = vec![0u8; CS];
    for _ in 0..10 {
        c.insert(1, &pattern(1, CS)).unwrap();
        assert!(c.lookup(1, &mut buf).unwrap());
    }
    // Every chunk the owner inserts is there afterwards, however cold.
    for chunk in 100..110 {
        c.insert(chunk, &pattern(chunk, CS)).unwrap();
        assert!(c.lookup(chunk, &mut buf).unwrap());
        assert_eq!(buf, pattern(chunk, CS));
    }
}

#[test]
fn the_setting_survives_a_saved_configuration() {
    let (c, _) = stack(4, true);
    assert!(c.config().admission);
    // Configurations saved before the filter existed load with it off.
    let json = r#"{"chunk_size":64,"tiers":[{"medium":"Memory","groups":1,"ways":2,"hash":"Modulo"}],"victim_capacity":1}"#;
    let cfg: CacheConfig = serde_json::from_str(json).unwrap();
    assert!(!cfg.admission);
}
