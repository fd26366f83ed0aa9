//! A detached stack (canopy-node's chunk store): misses are reported, and
//! chunks leave only when the owner takes them out of the victim repository.

use canopy_cache::{CacheConfig, CacheError, CacheStack, HashKind, Medium, TierConfig};
use proptest::prelude::*;
use std::collections::HashMap;

const CS: usize = 64;

fn config(dir: Option<&std::path::Path>) -> CacheConfig {
    let mut tiers = vec![TierConfig {
        medium: Medium::Memory,
        groups: 2,
        ways: 2,
        hash: HashKind::Modulo,
    }];
    if let Some(dir) = dir {
        tiers.push(TierConfig {
            medium: Medium::Disk {
                path: dir.join("tier"),
            },
            groups: 1,
            ways: 3,
            hash: HashKind::Mix { key: 7 },
        });
    }
    CacheConfig {
        chunk_size: CS,
        tiers,
        victim_capacity: 2,
        // Ignored by a detached stack, which must never refuse.
        admission: true,
        prefault: false,
    }
}

fn bytes(tag: u8) -> Vec<u8> {
    (0..CS).map(|i| tag.wrapping_add(i as u8)).collect()
}

#[test]
fn misses_are_reported_and_nothing_leaves_by_itself() {
    let stack = CacheStack::detached(config(None)).expect("stack");
    let mut buf = vec![0; CS];
    assert!(!stack.lookup(3, &mut buf).expect("lookup"));
    for c in 0..12u64 {
        stack.insert(c, &bytes(c as u8)).expect("insert");
    }
    // 4 ways in the tier, so 8 went to the repository, 6 over its capacity;
    // no back-pressure dropped any of them.
    assert_eq!(stack.victims(usize::MAX).len(), 8);
    assert_eq!(stack.victims(3).len(), 3);
    assert_eq!(stack.victim_excess(), 6);
    for c in 0..12u64 {
        assert!(stack.lookup(c, &mut buf).expect("lookup"), "chunk {c}");
        assert_eq!(buf, bytes(c as u8));
    }
    stack.check_invariants().expect("invariants");
    // The owner takes victims out, with their bytes.
    let v = stack.victims(usize::MAX);
    let first = v[0];
    let data = stack.take_victim(first).expect("in the repository");
    assert_eq!(&data[..], &bytes(first as u8)[..]);
    assert!(!stack.lookup(first, &mut buf).expect("lookup"));
    assert!(stack.take_victim(first).is_none());
    // Removal from a tier.
    stack.insert(100, &bytes(100)).expect("insert");
    assert!(stack.remove(100));
    assert!(!stack.remove(100));
    assert!(!stack.lookup(100, &mut buf).expect("lookup"));
    // Not a chunk: wrong sizes and the reserved number are refused.
    assert!(matches!(
        stack.insert(1, &[0; 3]),
        Err(CacheError::OutOfRange { .. })
    ));
    assert!(matches!(
        stack.lookup(1, &mut [0; 3]),
        Err(CacheError::OutOfRange { .. })
    ));
    assert!(stack.insert(u64::MAX, &bytes(0)).is_err());
    assert!(!stack.remove(u64::MAX));
    // There is no backing store to flush to or clean into.
    assert!(matches!(stack.flush(), Err(CacheError::Io(_))));
    assert_eq!(stack.clean_victims(100).expect("clean"), 0);
    // One taken out, one more pushed down by chunk 100's insertion.
    assert_eq!(stack.victim_excess(), 6);
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u8),
    Lookup(u64),
    Remove(u64),
    /// Take the `n`-th oldest victim.
    Take(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..24u64, any::<u8>()).prop_map(|(c, t)| Op::Insert(c, t)),
        4 => (0..24u64).prop_map(Op::Lookup),
        1 => (0..24u64).prop_map(Op::Remove),
        2 => (0..8usize).prop_map(Op::Take),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Against a map: every chunk inserted and not removed or taken is
    /// found with its last bytes, whatever promotions, demotions (through a
    /// disk tier with another hash) and spills happened.
    #[test]
    fn detached_stack_matches_a_map(ops in proptest::collection::vec(op(), 1..200), disk in any::<bool>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let stack = CacheStack::detached(config(disk.then_some(dir.path()))).expect("stack");
        let mut model: HashMap<u64, u8> = HashMap::new();
        let mut buf = vec![0; CS];
        for op in ops {
            match op {
                Op::Insert(c, t) => {
                    stack.insert(c, &bytes(t)).expect("insert");
                    model.insert(c, t);
                }
                Op::Lookup(c) => {
                    let found = stack.lookup(c, &mut buf).expect("lookup");
                    prop_assert_eq!(found, model.contains_key(&c));
                    if let Some(t) = model.get(&c) {
                        prop_assert_eq!(&buf, &bytes(*t));
                    }
                }
                Op::Remove(c) => {
                    prop_assert_eq!(stack.remove(c), model.remove(&c).is_some());
                }
                Op::Take(n) => {
                    if let Some(&c) = stack.victims(usize::MAX).get(n) {
                        let data = stack.take_victim(c).expect("listed");
                        let t = model.remove(&c).expect("in the model");
                        prop_assert_eq!(&data[..], &bytes(t)[..]);
                    }
                }
            }
            stack.check_invariants().map_err(TestCaseError::fail)?;
        }
        for (c, t) in &model {
            prop_assert!(stack.lookup(*c, &mut buf).expect("lookup"));
            prop_assert_eq!(&buf, &bytes(*t));
        }
    }
}
