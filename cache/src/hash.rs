//! Group-selection hash functions, plus the small hashes used internally
//! (chunk-lock stripes, the victim index).

use crate::config::HashKind;
use std::hash::{BuildHasherDefault, Hasher};

/// splitmix64's finaliser: a cheap bijective mix whose every output bit
/// depends on every input bit, so `% groups` on it is well spread even for
/// sequential or strided chunk numbers.
#[inline]
pub(crate) fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A tier's hash function specialised for its group count.
///
/// Kept as plain data (no enum matching on a heap value) because it runs on
/// every top-tier lookup.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupHash {
    mix: bool,
    key: u64,
    groups: u64,
    /// `groups - 1` when `groups` is a power of two: `%` becomes a mask,
    /// which matters on the hit path (a 64-bit division is ~25-40 cycles).
    mask: Option<u64>,
}

impl GroupHash {
    /// Builds the function for `groups` (>= 1) groups.
    pub(crate) fn new(kind: &HashKind, groups: usize) -> Self {
        let groups = groups.max(1) as u64;
        let (mix, key) = match *kind {
            HashKind::Modulo => (false, 0),
            HashKind::Mix { key } => (true, key),
        };
        GroupHash {
            mix,
            key,
            groups,
            mask: groups.is_power_of_two().then(|| groups - 1),
        }
    }

    /// The group `chunk` belongs to, in `0..groups`.
    #[inline]
    pub(crate) fn group(&self, chunk: u64) -> usize {
        let h = if self.mix {
            mix64(chunk ^ self.key)
        } else {
            chunk
        };
        let g = match self.mask {
            Some(m) => h & m,
            None => h % self.groups,
        };
        // g < groups, and groups came from a usize.
        g as usize
    }
}

/// Human-readable name of a hash function, used in stats.
pub(crate) fn describe(kind: &HashKind) -> String {
    match kind {
        HashKind::Modulo => "modulo".to_string(),
        HashKind::Mix { key } => format!("mix(key={key:#x})"),
    }
}

/// A `Hasher` for `u64` chunk keys: one `mix64` instead of SipHash, since
/// chunk numbers come from our own callers, not from an adversary choosing
/// keys to collide a hash table.
#[derive(Default, Clone, Copy)]
pub(crate) struct ChunkHasher(u64);

impl Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u64 keys, which this crate never uses; keep it
        // correct anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// `BuildHasher` for maps keyed by chunk number.
pub(crate) type ChunkBuildHasher = BuildHasherDefault<ChunkHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulo_is_low_order_bits() {
        let h = GroupHash::new(&HashKind::Modulo, 16);
        for c in [0u64, 1, 15, 16, 17, 0xdead_beef, u64::MAX - 1] {
            assert_eq!(h.group(c), (c & 15) as usize);
        }
        let h = GroupHash::new(&HashKind::Modulo, 12);
        for c in 0..1000u64 {
            assert_eq!(h.group(c), (c % 12) as usize);
        }
    }

    #[test]
    fn single_group_always_zero() {
        for kind in [HashKind::Modulo, HashKind::Mix { key: 99 }] {
            let h = GroupHash::new(&kind, 1);
            assert!((0..1000).all(|c| h.group(c) == 0));
        }
    }

    fn chi_square(kind: &HashKind, groups: usize, keys: impl Iterator<Item = u64>) -> f64 {
        let h = GroupHash::new(kind, groups);
        let mut counts = vec![0u64; groups];
        let mut n = 0u64;
        for k in keys {
            counts[h.group(k)] += 1;
            n += 1;
        }
        let expected = n as f64 / groups as f64;
        counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum()
    }

    #[test]
    fn mix_distribution_is_flat() {
        // Sequential, strided (a pathological pattern for Modulo) and
        // high-bit-only keys; chi-square with 63 degrees of freedom has mean
        // 63 and sd ~11, so 150 is far out in the tail for a uniform hash.
        let kind = HashKind::Mix { key: 0x1234_5678 };
        let seq = chi_square(&kind, 64, 0..64_000);
        let strided = chi_square(&kind, 64, (0..64_000u64).map(|i| i * 64));
        let high = chi_square(&kind, 64, (0..64_000u64).map(|i| i << 40));
        assert!(seq < 150.0, "sequential chi2 {seq}");
        assert!(strided < 150.0, "strided chi2 {strided}");
        assert!(high < 150.0, "high-bit chi2 {high}");
        // Non-power-of-two group count goes through `%`.
        let odd = chi_square(&kind, 61, 0..61_000);
        assert!(odd < 150.0, "61 groups chi2 {odd}");
        // The strided pattern is what Modulo cannot spread.
        let modulo_strided = chi_square(&HashKind::Modulo, 64, (0..64_000u64).map(|i| i * 64));
        assert!(modulo_strided > 10_000.0);
    }

    #[test]
    fn mix_keys_give_different_placements() {
        let a = GroupHash::new(&HashKind::Mix { key: 1 }, 1024);
        let b = GroupHash::new(&HashKind::Mix { key: 2 }, 1024);
        let same = (0..10_000u64).filter(|&c| a.group(c) == b.group(c)).count();
        // Independent placements agree ~1/1024 of the time.
        assert!(
            same < 60,
            "{same} of 10000 chunks share a group under both keys"
        );
    }

    #[test]
    fn chunk_hasher_spreads() {
        use std::hash::BuildHasher;
        let b = ChunkBuildHasher::default();
        assert_ne!(b.hash_one(1u64), b.hash_one(2u64));
    }
}
