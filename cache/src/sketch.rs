//! The admission filter's frequency sketch: a count-min sketch of 4-bit
//! counters (TinyLFU, Einziger et al.; the shape Caffeine and moka use),
//! one per set of the top tier.
//!
//! Why per set rather than one for the whole stack: a candidate only ever
//! competes with the victim of *its own* set, so the set's sketch is all
//! the evidence a decision needs, and it lives inside the set's `Mutex`
//! that every access to the set already holds. Counting then adds no shared
//! cache line and no lock to any path, and aging is a local affair of the
//! set. The counters are one cache line (128 counters for a set of up to
//! 16 ways, about 16 a way as in Caffeine).
//!
//! Hand-written rather than taken from a crate: the crates that exist
//! (`count-min-sketch`, `cachelito-core`, the private sketch of `caches`)
//! allocate their tables on the heap, hash with SipHash, and keep 8- to
//! 32-bit counters; this one must be a fixed 64 bytes inline in a set, hash
//! once per access, and never allocate.

use crate::hash::mix64;

/// Counters in one sketch (4 bits each, 16 per word).
const COUNTERS: usize = 128;
/// Independent counters each chunk is counted in (the sketch's depth).
const DEPTH: usize = 4;
/// A counter's ceiling: 4 bits.
pub(crate) const MAX_FREQ: u8 = 15;
/// Keeps the sketch's hash independent of every tier's `Mix` placement
/// and of the chunk-lock stripes.
const SALT: u64 = 0x7A1E_F00D_5EED_0003;

/// A count-min sketch of [`COUNTERS`] 4-bit counters. See the module docs.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sketch {
    words: [u64; COUNTERS / 16],
}

/// The counters of one chunk: `(word, shift)` each.
#[inline]
fn slots(chunk: u64) -> [(usize, u32); DEPTH] {
    let h = mix64(chunk ^ SALT);
    let mut out = [(0, 0); DEPTH];
    for (i, slot) in out.iter_mut().enumerate() {
        // 7 bits an index, from disjoint 16-bit lanes of one hash.
        let idx = ((h >> (i * 16)) as usize) & (COUNTERS - 1);
        *slot = (idx >> 4, ((idx & 15) * 4) as u32);
    }
    out
}

impl Sketch {
    #[inline]
    fn get(&self, (w, shift): (usize, u32)) -> u8 {
        ((self.words[w] >> shift) & 0xF) as u8
    }

    /// Counts one access to `chunk`. Conservative update: only the
    /// counters at the chunk's current minimum rise, which keeps other
    /// chunks' estimates from being inflated by collisions.
    #[inline]
    pub(crate) fn increment(&mut self, chunk: u64) {
        let slots = slots(chunk);
        let min = slots.iter().map(|&s| self.get(s)).min().unwrap_or(0);
        if min >= MAX_FREQ {
            return;
        }
        for (w, shift) in slots {
            if self.get((w, shift)) == min {
                self.words[w] += 1 << shift;
            }
        }
    }

    /// How often `chunk` was counted (since aging last halved it); never
    /// an underestimate of that, sometimes an overestimate (collisions).
    #[inline]
    pub(crate) fn estimate(&self, chunk: u64) -> u8 {
        slots(chunk).iter().map(|&s| self.get(s)).min().unwrap_or(0)
    }

    /// Raises `chunk`'s counters to at least `freq`: a chunk leaving the
    /// top tier hands back the frequency it earned there (hits are counted
    /// in its entry, not here), so that if it comes back soon it competes
    /// with its real history.
    pub(crate) fn raise(&mut self, chunk: u64, freq: u8) {
        let freq = freq.min(MAX_FREQ);
        for (w, shift) in slots(chunk) {
            let cur = self.get((w, shift));
            if cur < freq {
                self.words[w] += u64::from(freq - cur) << shift;
            }
        }
    }

    /// Halves every counter (TinyLFU's reset), so that old popularity
    /// fades and a chunk that was hot an hour ago can be displaced by one
    /// that is hot now.
    pub(crate) fn halve(&mut self) {
        for w in &mut self.words {
            *w = (*w >> 1) & 0x7777_7777_7777_7777;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_saturate_at_fifteen_and_halve() {
        let mut s = Sketch::default();
        assert_eq!(s.estimate(42), 0);
        for i in 1..=20u8 {
            s.increment(42);
            assert_eq!(s.estimate(42), i.min(MAX_FREQ));
        }
        s.halve();
        assert_eq!(s.estimate(42), 7);
        s.halve();
        s.halve();
        s.halve();
        assert_eq!(s.estimate(42), 0);
    }

    #[test]
    fn estimates_never_undercount() {
        // A set's sketch sees a few dozen distinct chunks between halvings;
        // with collisions an estimate may exceed the true count, never fall
        // below it.
        let mut s = Sketch::default();
        let mut truth = std::collections::HashMap::new();
        for i in 0..300u64 {
            let c = (i * 7919) % 40;
            s.increment(c);
            *truth.entry(c).or_insert(0u8) += 1;
        }
        for (c, n) in truth {
            assert!(s.estimate(c) >= n.min(MAX_FREQ), "chunk {c}");
        }
    }

    #[test]
    fn a_hot_chunk_stands_out_from_one_hit_wonders() {
        let mut s = Sketch::default();
        for _ in 0..6 {
            s.increment(1);
        }
        for c in 1000..1030 {
            s.increment(c);
        }
        assert!(s.estimate(1) >= 6);
        let overcounted = (1000..1030).filter(|&c| s.estimate(c) > 2).count();
        assert!(
            overcounted <= 3,
            "{overcounted} of 30 cold chunks look warm"
        );
    }

    #[test]
    fn raise_only_raises() {
        let mut s = Sketch::default();
        for _ in 0..5 {
            s.increment(9);
        }
        s.raise(9, 3);
        assert_eq!(s.estimate(9), 5);
        s.raise(9, 12);
        assert_eq!(s.estimate(9), 12);
        s.raise(9, 200);
        assert_eq!(s.estimate(9), MAX_FREQ);
    }
}
