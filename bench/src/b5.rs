//! B5 (issue 5): canopy's stacked cache against moka and a plain LRU of the
//! same capacity in chunks, on the same traces: hit ratio, and lookups per
//! second on one thread.
//!
//! canopy's side is the stack as the product builds it
//! (`canopy_cache::layout::stack_layout`: a memory tier of 8-way sets
//! indexed by the chunk's low-order bits, and a victim repository of an
//! eighth of it, with the top tier's admission filter on as the embedded
//! volume has it), over a backing store that costs nothing and counts its
//! reads: every miss is one. A lookup is a read of the chunk's first 8
//! bytes (a hit copies them; a miss fills the chunk from the backing).
//! moka's and the LRU's values are one shared `Bytes` per chunk (a
//! reference-count increment, no allocation), inserted on a miss.

use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use canopy_cache::layout::stack_layout;
use canopy_cache::{Backing, CacheStack};

use crate::progress::Progress;
use crate::table::{ratio, Table};
use crate::trace;

/// Bytes per chunk: small, so the figures are the lookups', not memcpy's.
const CHUNK: usize = 64;

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Chunks the caches hold.
    pub capacity: usize,
    /// Chunks the Zipf trace draws from.
    pub keys: u64,
    /// Accesses per trace.
    pub accesses: usize,
}

impl Size {
    /// The figures' run: 4096 chunks of cache, a million-chunk volume, four
    /// million accesses per trace.
    pub const FULL: Size = Size {
        capacity: 4096,
        keys: 1 << 20,
        accesses: 4_000_000,
    };
    /// A run that only shows the harness works (CI).
    pub const SMOKE: Size = Size {
        capacity: 256,
        keys: 4096,
        accesses: 20_000,
    };
}

/// One cache on one trace.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    /// Lookups that found their chunk.
    pub hits: u64,
    /// Lookups made.
    pub lookups: u64,
    /// Seconds the lookups took.
    pub secs: f64,
}

impl Figures {
    /// Hits over lookups.
    pub fn hit_ratio(&self) -> f64 {
        self.hits as f64 / self.lookups.max(1) as f64
    }

    /// Lookups per second.
    pub fn rate(&self) -> f64 {
        self.lookups as f64 / self.secs.max(1e-9)
    }
}

/// A backing store that costs nothing and counts its reads (the misses).
#[derive(Default)]
struct Counting {
    reads: AtomicU64,
}

impl Backing for Counting {
    fn read_chunk(&self, _chunk: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        buf.fill(0);
        Ok(())
    }
    fn write_chunk(&self, _chunk: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero_chunk(&self, _chunk: u64) -> io::Result<()> {
        Ok(())
    }
}

/// canopy's stack holding `capacity` chunks at most (memory tier and
/// victim repository together), and the number it holds exactly.
fn canopy_stack(capacity: usize) -> Result<(CacheStack<Counting>, usize)> {
    // Tier + tier/8 victims ≤ capacity, the tier a whole number of sets.
    let tier_slots = capacity * 8 / 9;
    let mut config = stack_layout(CHUNK, (tier_slots * CHUNK) as u64, &[], 1)
        .map_err(|e| anyhow!("cache layout: {e}"))?;
    // As the embedded volume builds it (canopy-ublk's `cache_layout`): the
    // top tier's admission filter on.
    config.admission = true;
    let held = config
        .tiers
        .iter()
        .map(|t| t.groups * t.ways)
        .sum::<usize>()
        + config.victim_capacity;
    let stack = CacheStack::new(config, Arc::new(Counting::default()))
        .map_err(|e| anyhow!("cache stack: {e}"))?;
    Ok((stack, held))
}

fn run_canopy(capacity: usize, keys: &[u64]) -> Result<(Figures, usize)> {
    let (stack, held) = canopy_stack(capacity)?;
    let mut buf = [0u8; 8];
    let start = Instant::now();
    for &k in keys {
        stack
            .read(k, 0, &mut buf)
            .with_context(|| format!("canopy read of chunk {k}"))?;
        std::hint::black_box(&buf);
    }
    let secs = start.elapsed().as_secs_f64();
    let misses = stack.backing().reads.load(Ordering::Relaxed);
    let lookups = keys.len() as u64;
    Ok((
        Figures {
            hits: lookups.saturating_sub(misses),
            lookups,
            secs,
        },
        held,
    ))
}

/// Time `keys` through `lookup`, which says whether a key hit (a peer
/// inserts it on a miss).
fn timed(keys: &[u64], mut lookup: impl FnMut(u64) -> bool) -> Figures {
    let mut hits = 0u64;
    let start = Instant::now();
    for &k in keys {
        hits += u64::from(lookup(k));
    }
    Figures {
        hits,
        lookups: keys.len() as u64,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn run_moka(capacity: usize, keys: &[u64]) -> Figures {
    let cache: moka::sync::Cache<u64, Bytes> = moka::sync::Cache::new(capacity as u64);
    let value = Bytes::from(vec![0u8; CHUNK]);
    timed(keys, |k| match cache.get(&k) {
        Some(v) => {
            std::hint::black_box(&v);
            true
        }
        None => {
            cache.insert(k, value.clone());
            false
        }
    })
}

fn run_lru(capacity: usize, keys: &[u64]) -> Figures {
    let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
    let mut cache: lru::LruCache<u64, Bytes> = lru::LruCache::new(cap);
    let value = Bytes::from(vec![0u8; CHUNK]);
    timed(keys, |k| match cache.get(&k) {
        Some(v) => {
            std::hint::black_box(v);
            true
        }
        None => {
            cache.put(k, value.clone());
            false
        }
    })
}

/// One trace's results.
pub struct Row {
    /// The trace's name.
    pub trace: &'static str,
    /// canopy, moka, LRU.
    pub canopy: Figures,
    /// moka.
    pub moka: Figures,
    /// The LRU.
    pub lru: Figures,
}

impl Row {
    /// Whether canopy meets B5's targets on this trace: hit ratio at least
    /// the LRU's and 0.9× moka's, lookups/s at least 5× moka's.
    pub fn met(&self) -> bool {
        let h = self.canopy.hit_ratio();
        h >= self.lru.hit_ratio()
            && h >= 0.9 * self.moka.hit_ratio()
            && self.canopy.rate() >= 5.0 * self.moka.rate()
    }
}

/// B5 as the harness runs it: the full size, or the smoke size.
pub fn bench(smoke: bool, progress: &Progress) -> Result<Vec<Table>> {
    let size = if smoke { Size::SMOKE } else { Size::FULL };
    let (rows, held) = run(size, progress)?;
    Ok(vec![table(&rows, held, size)])
}

/// Run B5 at `size`: both traces, each cache on each. `progress` is told
/// what runs.
pub fn run(size: Size, progress: &Progress) -> Result<(Vec<Row>, usize)> {
    let traces: [(&'static str, Vec<u64>); 2] = [
        ("zipf(0.99)", trace::zipf(size.keys, 0.99, size.accesses, 1)),
        (
            "scans + hot set",
            trace::scan_hot(size.capacity as u64 / 2, size.accesses, 2),
        ),
    ];
    let mut rows = Vec::new();
    let mut held = 0;
    for (name, keys) in &traces {
        progress.stage(&format!("B5 {name}: canopy"));
        let (canopy, h) = run_canopy(size.capacity, keys)?;
        held = h;
        // Equal capacity: the peers hold what canopy's stack holds.
        progress.stage(&format!("B5 {name}: moka"));
        let moka = run_moka(held, keys);
        progress.stage(&format!("B5 {name}: LRU"));
        let lru = run_lru(held, keys);
        rows.push(Row {
            trace: name,
            canopy,
            moka,
            lru,
        });
    }
    Ok((rows, held))
}

/// B5's table.
pub fn table(rows: &[Row], held: usize, size: Size) -> Table {
    let mut t = Table::new(
        format!(
            "B5, cache: {held} chunks each, {} accesses per trace, one thread",
            size.accesses
        ),
        &[
            "trace",
            "hit canopy",
            "hit moka",
            "hit LRU",
            "Mlookups/s canopy",
            "Mlookups/s moka",
            "Mlookups/s LRU",
            "hit vs LRU",
            "hit vs moka",
            "speed vs moka",
            "target met",
        ],
    );
    for r in rows {
        t.row(vec![
            r.trace.to_string(),
            format!("{:.3}", r.canopy.hit_ratio()),
            format!("{:.3}", r.moka.hit_ratio()),
            format!("{:.3}", r.lru.hit_ratio()),
            format!("{:.1}", r.canopy.rate() / 1e6),
            format!("{:.1}", r.moka.rate() / 1e6),
            format!("{:.1}", r.lru.rate() / 1e6),
            ratio(r.canopy.hit_ratio(), r.lru.hit_ratio()),
            ratio(r.canopy.hit_ratio(), r.moka.hit_ratio()),
            ratio(r.canopy.rate(), r.moka.rate()),
            if r.met() { "yes" } else { "no" }.to_string(),
        ]);
    }
    t.note("targets: hit ratio ≥ the LRU's and ≥ 0.9× moka's; lookups/s ≥ 5× moka's");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cache_holds_the_same_number_of_chunks() {
        let (_, held) = canopy_stack(4096).expect("stack");
        assert!(held <= 4096 && held > 4000, "{held}");
    }

    #[test]
    fn a_smoke_run_counts_hits_that_make_sense() {
        let (rows, held) = run(Size::SMOKE, &Progress::new()).expect("runs");
        assert!(held <= Size::SMOKE.capacity);
        assert_eq!(rows.len(), 2);
        for r in &rows {
            for f in [r.canopy, r.moka, r.lru] {
                assert_eq!(f.lookups, Size::SMOKE.accesses as u64);
                assert!(f.hits < f.lookups);
            }
            // Every cache hits the hottest chunks of either trace.
            assert!(r.canopy.hit_ratio() > 0.2, "{}: {:?}", r.trace, r.canopy);
            assert!(r.lru.hit_ratio() > 0.2, "{}: {:?}", r.trace, r.lru);
        }
        // On the scan trace a cache that keeps the hot set can hit on at
        // most 80% of accesses (see `trace::scan_hot`), and the first pass
        // over the hot set misses too.
        assert!(rows[1].canopy.hit_ratio() <= 0.8);
        assert!(rows[1].moka.hit_ratio() <= 0.8);
    }

    #[test]
    fn the_admission_filter_keeps_the_hot_set_through_scans() {
        // Hit ratios are a property of the traces and the policies, not of
        // the machine: canopy's filter must do at least as well as LRU on
        // both traces, and clearly better where scans flush an LRU.
        let (rows, _) = run(Size::SMOKE, &Progress::new()).expect("runs");
        for r in &rows {
            assert!(
                r.canopy.hits >= r.lru.hits,
                "{}: canopy {:?} LRU {:?}",
                r.trace,
                r.canopy,
                r.lru
            );
        }
        assert!(
            rows[1].canopy.hit_ratio() > rows[1].lru.hit_ratio() + 0.1,
            "{:?} vs {:?}",
            rows[1].canopy,
            rows[1].lru
        );
    }

    #[test]
    fn the_cache_matches_a_count_of_distinct_chunks_when_it_holds_them_all() {
        // A trace of 100 distinct chunks, each read 10 times, in a cache
        // bigger than that: exactly 100 misses for each cache.
        let keys: Vec<u64> = (0..1000).map(|i| trace::scatter(i % 100)).collect();
        let (c, _) = run_canopy(4096, &keys).expect("canopy");
        assert_eq!(c.hits, 900);
        assert_eq!(run_lru(4096, &keys).hits, 900);
        assert_eq!(run_moka(4096, &keys).hits, 900);
    }
}
