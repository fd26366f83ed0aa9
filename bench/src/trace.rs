//! Access traces for the cache workloads (B5): chunk numbers, generated
//! from a seed so that every run and every cache sees the same sequence.

use rand::distr::Distribution;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::Zipf;

/// Spread rank `r` over a 32-bit chunk space, one to one (an odd
/// multiplier is a bijection modulo 2^32): the hottest chunks of a volume
/// are not its first ones, and a cache indexed by low-order bits must not
/// get consecutive keys for free.
pub fn scatter(r: u64) -> u64 {
    r.wrapping_mul(0x9E37_79B1) & 0xFFFF_FFFF
}

/// `len` accesses to `keys` chunks with Zipf(`s`) popularity (rank 1 the
/// most popular), scattered over the chunk space.
pub fn zipf(keys: u64, s: f64, len: usize, seed: u64) -> Vec<u64> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    // `keys` ≥ 1 and `s` ≥ 0 finite by construction (the callers' constants).
    let Ok(dist) = Zipf::new(keys as f64, s) else {
        return Vec::new();
    };
    (0..len)
        .map(|_| scatter(dist.sample(&mut rng) as u64 - 1))
        .collect()
}

/// `len` accesses alternating between a hot set and scans: `hot` chunks
/// read uniformly at random, `4 × hot` times, then one sequential scan of
/// `2 × hot` chunks never read before (a backup, a `dd`, a filesystem
/// check), and so on. A cache that lets each scan flush the hot set pays
/// for it after every scan; one that keeps the hot set hits on 80% of the
/// accesses at best.
pub fn scan_hot(hot: u64, len: usize, seed: u64) -> Vec<u64> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let hot = hot.max(1);
    let mut out = Vec::with_capacity(len);
    // Scans run above the hot chunks' range, each where the last ended.
    let mut cold = 1u64 << 32;
    while out.len() < len {
        for _ in 0..4 * hot {
            out.push(scatter(rng.random_range(0..hot)));
        }
        for _ in 0..2 * hot {
            out.push(cold);
            cold += 1;
        }
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn traces_are_reproducible_from_their_seed() {
        assert_eq!(zipf(1000, 0.99, 500, 7), zipf(1000, 0.99, 500, 7));
        assert_ne!(zipf(1000, 0.99, 500, 7), zipf(1000, 0.99, 500, 8));
        assert_eq!(scan_hot(64, 2000, 3), scan_hot(64, 2000, 3));
    }

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let t = zipf(10_000, 0.99, 200_000, 1);
        assert_eq!(t.len(), 200_000);
        let mut count: HashMap<u64, usize> = HashMap::new();
        for k in &t {
            *count.entry(*k).or_default() += 1;
        }
        assert!(count.len() <= 10_000);
        // Rank 1 (scatter(0)) is the most popular, near 1/H(10000, 0.99)
        // ≈ 10% of accesses; rank 2 about half as often.
        let first = count[&scatter(0)] as f64 / t.len() as f64;
        let second = count[&scatter(1)] as f64 / t.len() as f64;
        assert!((0.08..0.13).contains(&first), "{first}");
        assert!((first / second - 2.0).abs() < 0.3, "{first} {second}");
    }

    #[test]
    fn scan_hot_alternates_a_hot_set_and_fresh_scans() {
        let hot = 100;
        let t = scan_hot(hot, 1_200, 5);
        assert_eq!(t.len(), 1_200);
        let hot_keys: Vec<u64> = (0..hot).map(scatter).collect();
        // Two rounds: 400 hot accesses, then 200 scanned chunks.
        for (i, k) in t.iter().enumerate() {
            let scanning = (i % 600) >= 400;
            assert_eq!(*k >= 1 << 32, scanning, "access {i}");
            if !scanning {
                assert!(hot_keys.contains(k));
            }
        }
        // Scanned chunks are never read twice.
        let scanned: Vec<u64> = t.iter().copied().filter(|k| *k >= 1 << 32).collect();
        let mut uniq = scanned.clone();
        uniq.dedup();
        assert_eq!(uniq.len(), scanned.len());
    }
}
