//! The stack itself: construction, the read/write/zero paths, and the
//! movement of chunks between tiers (promotion, demotion cascade, spill,
//! rescue).

use crate::backing::Backing;
use crate::cleaner::Wake;
use crate::config::CacheConfig;
use crate::error::CacheError;
use crate::set::{Entry, Set, EMPTY};
use crate::stripe::Stripes;
use crate::tier::{Src, Tier};
use crate::victim::Victim;
use parking_lot::{Mutex, MutexGuard, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The tier list; guarded by the stack's `RwLock` (shared for I/O,
/// exclusive for reconfiguration).
pub(crate) struct Layout {
    /// Top first. Never empty.
    pub(crate) tiers: Vec<Tier>,
}

/// State owned by whoever holds the movement lock.
///
/// The victim repository lives here rather than beside the tier list: every
/// access to it (spill, rescue, drain, lookup after a top-tier miss) is a
/// movement anyway, so a separate lock would only add a lock-order rule.
pub(crate) struct MoveState {
    pub(crate) victim: Victim,
    /// Staging buffer for the chunk being inserted at the head of a cascade.
    pub(crate) incoming: Box<[u8]>,
    /// Staging buffer for the chunk being displaced at each cascade step.
    pub(crate) spare: Box<[u8]>,
}

/// What to do once the locks are released after a movement.
#[derive(Clone, Copy, Default)]
pub(crate) struct AfterMove {
    /// Something spilled into the victim repository: wake the cleaner.
    pub(crate) wake: bool,
    /// The repository is over its soft capacity: drain some of it.
    pub(crate) over: bool,
}

impl AfterMove {
    pub(crate) fn of(victim: &mut Victim) -> AfterMove {
        AfterMove {
            wake: std::mem::take(&mut victim.spilled),
            over: victim.over_capacity(),
        }
    }
}

/// A stacked, set-associative, write-back chunk cache in front of a
/// [`Backing`] store. See the crate documentation for the design.
///
/// `Send + Sync`: share it as `Arc<CacheStack<B>>` between I/O threads.
/// Dropping it discards dirty data that was never flushed: call
/// [`flush`](Self::flush) first.
pub struct CacheStack<B: Backing> {
    pub(crate) chunk_size: usize,
    pub(crate) victim_capacity: usize,
    pub(crate) backing: Arc<B>,
    /// Lock order: chunk stripe -> `layout` -> `movement` -> set locks.
    pub(crate) layout: RwLock<Layout>,
    pub(crate) movement: Mutex<MoveState>,
    pub(crate) stripes: Stripes,
    pub(crate) wake: Arc<Wake>,
    pub(crate) fills: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) writebacks: AtomicU64,
    pub(crate) victim_errors: AtomicU64,
    /// The owner takes chunks out of the victim repository itself
    /// ([`CacheStack::detached`]): no back-pressure draining, and a miss is
    /// reported instead of filled.
    pub(crate) owner_drains: bool,
    /// The top tier's admission filter is on ([`CacheConfig::admission`];
    /// never for a detached stack).
    pub(crate) admission: bool,
    /// Memory tiers, including ones added later, are committed when built
    /// ([`CacheConfig::prefault`]).
    pub(crate) prefault: bool,
}

/// One access, carried into the slow path.
enum Access<'a> {
    Read {
        offset: usize,
        buf: &'a mut [u8],
    },
    /// `dirty: false` is a write-through: the backing already holds these
    /// bytes, so the entry keeps whatever dirty state it had.
    Write {
        offset: usize,
        src: Src<'a>,
        dirty: bool,
    },
}

impl<'a> Access<'a> {
    /// Serves the access from a whole-chunk buffer; a write also marks the
    /// entry dirty and bumps its generation.
    fn apply(&mut self, chunk_bytes: &mut [u8], e: &mut Entry) {
        match self {
            Access::Read { offset, buf } => {
                let end = *offset + buf.len();
                buf.copy_from_slice(&chunk_bytes[*offset..end]);
            }
            Access::Write { offset, src, dirty } => {
                let end = *offset + src.len();
                src.apply(&mut chunk_bytes[*offset..end]);
                e.dirty |= *dirty;
                e.gen = e.gen.wrapping_add(1);
            }
        }
    }

    /// Serves the access in place in a top-tier way.
    fn apply_top(
        &mut self,
        tier: &Tier,
        set: &mut Set,
        set_idx: usize,
        way: usize,
    ) -> std::io::Result<()> {
        let res = match self {
            Access::Read { offset, buf } => tier.read_range(set, set_idx, way, *offset, buf),
            Access::Write { offset, src, dirty } => {
                let res = tier.write_range(set, set_idx, way, *offset, *src);
                let e = &mut set.entries[way];
                e.gen = e.gen.wrapping_add(1);
                if res.is_ok() || *dirty || e.dirty {
                    // Even a failed write may have changed some bytes of a
                    // disk slot, so a write-back must count as modified.
                    e.dirty |= *dirty;
                } else {
                    // A failed write-through into a clean slot: the backing
                    // already has the bytes, so drop the half-written copy.
                    set.vacate(way);
                    return res;
                }
                res
            }
        };
        set.record_hit(way);
        res
    }

    /// For a whole-chunk write: marks `e` as [`Access::apply`] would and
    /// hands back the bytes, to be stored without staging them.
    fn whole_write(&self, e: &mut Entry) -> Option<Src<'a>> {
        match self {
            Access::Write {
                offset: 0,
                src,
                dirty,
            } => {
                e.dirty |= *dirty;
                e.gen = e.gen.wrapping_add(1);
                Some(*src)
            }
            _ => None,
        }
    }

    /// Whether a miss must read the backing first (anything but a
    /// whole-chunk write).
    fn needs_fill(&self, chunk_size: usize) -> bool {
        !matches!(self, Access::Write { offset: 0, src, .. } if src.len() == chunk_size)
    }
}

/// Finds `chunk` in the tiers: `(tier, set, way)`. Called under the
/// movement lock, where tags can't change (only movements change tags), so
/// the answer stays valid until the lock is released. `count_misses` records
/// a miss in every lower tier searched without success.
pub(crate) fn find_in_tiers(
    tiers: &[Tier],
    chunk: u64,
    count_misses: bool,
) -> Option<(usize, usize, usize)> {
    for (t, tier) in tiers.iter().enumerate() {
        let s = tier.group(chunk);
        let mut set = tier.sets[s].lock();
        if let Some(w) = set.find(chunk) {
            return Some((t, s, w));
        }
        // The top tier's miss was already counted on the fast path.
        if count_misses && t > 0 {
            set.misses += 1;
        }
    }
    None
}

/// Inserts `entry` (its bytes in `incoming`) into tier `start`, and pushes
/// each displaced LRU chunk into the next tier down, placed there by that
/// tier's own hash. What falls out of the bottom goes to the victim
/// repository. The caller holds the movement lock and guarantees `entry`'s
/// chunk is nowhere else in the stack.
///
/// A tier I/O error never loses a chunk: the chunk(s) in hand go to the
/// (in-memory) victim repository instead and the error is counted.
pub(crate) fn cascade(
    tiers: &[Tier],
    victim: &mut Victim,
    incoming: &mut [u8],
    spare: &mut [u8],
    start: usize,
    entry: Entry,
) {
    cascade_from(tiers, victim, None, incoming, spare, start, entry);
}

/// [`cascade`], where `src`, if given, holds `entry`'s bytes instead of
/// `incoming`: a whole-chunk write of an absent chunk goes straight into
/// its way, where staging it in `incoming` first copied every chunk a
/// node received twice (2% of B4's samples). `incoming` then holds them
/// only if a tier error leaves the chunk in hand.
fn cascade_from(
    tiers: &[Tier],
    victim: &mut Victim,
    mut src: Option<Src<'_>>,
    incoming: &mut [u8],
    spare: &mut [u8],
    start: usize,
    entry: Entry,
) {
    let mut cur_e = entry;
    let mut cur: &mut [u8] = incoming;
    let mut other: &mut [u8] = spare;
    // The bytes in hand go to `cur` when a tier error stops the cascade
    // before they were stored anywhere.
    let in_hand = |src: &mut Option<Src<'_>>, cur: &mut [u8]| {
        if let Some(d) = src.take() {
            d.apply(cur);
        }
    };
    for (t, tier) in tiers.iter().enumerate().skip(start) {
        if t > start {
            tier.demotions.fetch_add(1, Ordering::Relaxed);
        }
        let s = tier.group(cur_e.tag);
        let mut set = tier.sets[s].lock();
        let way = set.replacement_way();
        let old = set.entries[way];
        if t == 0 {
            // The top tier's admission filter: the newcomer starts with the
            // frequency its set's sketch remembers (misses, and what it
            // earned before it last left), and the chunk it displaces hands
            // its own back to the sketch.
            cur_e.freq = cur_e.freq.max(set.sketch.estimate(cur_e.tag));
            if !old.is_vacant() {
                set.sketch.raise(old.tag, old.freq);
            }
        }
        let store = |set: &mut Set, cur: &[u8], src: Option<Src<'_>>| match src {
            Some(d) => tier.write_range(set, s, way, 0, d),
            None => tier.store(set, s, way, cur),
        };
        if old.is_vacant() {
            if store(&mut set, cur, src).is_ok() {
                set.place(way, cur_e);
                return;
            }
            tier.note_io_error();
            in_hand(&mut src, cur);
            break;
        }
        // Displace the LRU chunk: its bytes go to `other`, ours take its way.
        if tier.load(&set, s, way, other).is_err() {
            // Nothing here changed; `cur` is still in hand.
            tier.note_io_error();
            in_hand(&mut src, cur);
            break;
        }
        if store(&mut set, cur, src).is_err() {
            // The way's bytes are now unknown: both chunks leave this tier.
            tier.note_io_error();
            set.vacate(way);
            tier.evictions.fetch_add(1, Ordering::Relaxed);
            victim.push(old.tag, other, old.dirty, old.gen);
            in_hand(&mut src, cur);
            break;
        }
        // Stored: from here on `cur` holds the chunk in hand.
        src = None;
        set.place(way, cur_e);
        tier.evictions.fetch_add(1, Ordering::Relaxed);
        cur_e = old;
        std::mem::swap(&mut cur, &mut other);
    }
    victim.push(cur_e.tag, cur, cur_e.dirty, cur_e.gen);
}

impl<B: Backing> CacheStack<B> {
    /// Builds the stack (creating disk-tier files) after validating
    /// `config`: chunk size a power of two in 16..=1 MiB, at least one
    /// tier, every tier with at least one group and one way, no two disk
    /// tiers on one path.
    pub fn new(config: CacheConfig, backing: Arc<B>) -> Result<Self, CacheError> {
        config.validate()?;
        let cs = config.chunk_size;
        let tiers = config
            .tiers
            .iter()
            .map(|t| Tier::build(t, cs, None, config.prefault))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CacheStack {
            chunk_size: cs,
            victim_capacity: config.victim_capacity,
            backing,
            layout: RwLock::new(Layout { tiers }),
            movement: Mutex::new(MoveState {
                victim: Victim::new(config.victim_capacity, cs),
                incoming: vec![0u8; cs].into_boxed_slice(),
                spare: vec![0u8; cs].into_boxed_slice(),
            }),
            stripes: Stripes::new(),
            wake: Arc::new(Wake::new()),
            fills: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            writebacks: AtomicU64::new(0),
            victim_errors: AtomicU64::new(0),
            owner_drains: false,
            admission: config.admission,
            prefault: config.prefault,
        })
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The backing store.
    pub fn backing(&self) -> &Arc<B> {
        &self.backing
    }

    /// Rejects a buffer that is not exactly one chunk, and the reserved
    /// chunk number (for whole-chunk calls).
    pub(crate) fn check_whole(&self, chunk: u64, len: usize) -> Result<(), CacheError> {
        if len != self.chunk_size {
            return Err(CacheError::OutOfRange {
                chunk,
                offset: 0,
                len,
                chunk_size: self.chunk_size,
            });
        }
        self.check(chunk, 0, len)
    }

    /// Rejects ranges that leave the chunk, and the reserved chunk number.
    pub(crate) fn check(&self, chunk: u64, offset: usize, len: usize) -> Result<(), CacheError> {
        let fits = matches!(offset.checked_add(len), Some(end) if end <= self.chunk_size);
        if chunk == EMPTY || !fits {
            return Err(CacheError::OutOfRange {
                chunk,
                offset,
                len,
                chunk_size: self.chunk_size,
            });
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at byte `offset` within chunk `chunk` (offset+len <= chunk_size). Miss => fill from backing.
    ///
    /// Chunk number `u64::MAX` is reserved (it is the empty-entry tag) and
    /// rejected with [`CacheError::OutOfRange`].
    pub fn read(&self, chunk: u64, offset: usize, buf: &mut [u8]) -> Result<(), CacheError> {
        self.check(chunk, offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut admit = true;
        // Fast path: shared layout lock, one set lock, a copy. No allocation.
        {
            let layout = self.layout.read();
            if let Some(top) = layout.tiers.first() {
                let s = top.group(chunk);
                let mut set = top.sets[s].lock();
                if let Some(way) = set.find(chunk) {
                    let res = top.read_range(&set, s, way, offset, buf);
                    set.record_hit(way);
                    return res.map_err(CacheError::from);
                }
                set.record_miss(chunk, self.admission);
                // Decided now, while the set is locked anyway; the slow
                // path applies it only if the chunk is absent everywhere.
                admit = !self.admission || set.admits(chunk);
            }
        }
        self.slow(chunk, Access::Read { offset, buf }, false, admit)
    }

    /// Write-back write: data lands in the cache, dirty. A partial write to a missing chunk fills it first (read-modify-write); a whole-chunk write does not read the backing.
    pub fn write(&self, chunk: u64, offset: usize, data: &[u8]) -> Result<(), CacheError> {
        self.check(chunk, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.write_src(chunk, offset, Src::Data(data), true, false)
    }

    /// Zero a byte range within one chunk. A whole chunk: drop it from every tier/victim (dirty or not) and backing.zero_chunk. Partial: a write of zeros.
    pub fn zero(&self, chunk: u64, offset: usize, len: usize) -> Result<(), CacheError> {
        self.check(chunk, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if offset == 0 && len == self.chunk_size {
            return self.zero_whole(chunk);
        }
        self.write_src(chunk, offset, Src::Zeros(len), true, false)
    }

    /// A write (of data or zeros): fast path on a top-tier hit, else the slow path.
    /// `dirty: false` for a write-through; `stripe_held` when the caller
    /// already holds the chunk's stripe lock (the slow path must not take it
    /// again).
    pub(crate) fn write_src(
        &self,
        chunk: u64,
        offset: usize,
        src: Src<'_>,
        dirty: bool,
        stripe_held: bool,
    ) -> Result<(), CacheError> {
        {
            let layout = self.layout.read();
            if let Some(top) = layout.tiers.first() {
                let s = top.group(chunk);
                let mut set = top.sets[s].lock();
                if let Some(way) = set.find(chunk) {
                    let mut access = Access::Write { offset, src, dirty };
                    return access
                        .apply_top(top, &mut set, s, way)
                        .map_err(CacheError::from);
                }
                set.record_miss(chunk, self.admission);
            }
        }
        // Writes are always admitted (see `slow`).
        self.slow(
            chunk,
            Access::Write { offset, src, dirty },
            stripe_held,
            true,
        )
    }

    /// Everything that isn't a top-tier hit: promotion from a lower tier,
    /// rescue from the victim repository, or a miss (fill from the backing
    /// and insert). Every insertion cascades demotions down the stack.
    ///
    /// `admit: false` is the admission filter's verdict on a read that
    /// missed the top tier: if the chunk turns out to be absent everywhere,
    /// the read is served from the backing without caching the chunk. Only
    /// a read of an attached stack is ever refused: its chunk is clean (the
    /// backing holds exactly these bytes), so not caching it loses nothing.
    /// Writes, promotions and rescues are always admitted.
    fn slow(
        &self,
        chunk: u64,
        mut access: Access<'_>,
        stripe_held: bool,
        admit: bool,
    ) -> Result<(), CacheError> {
        let needs_fill = access.needs_fill(self.chunk_size);
        let refuse =
            !admit && self.admission && !self.owner_drains && matches!(access, Access::Read { .. });
        // A chunk that is cached somewhere can be promoted without touching
        // the backing, so it needn't wait behind (say) a writeback on the
        // same stripe: the stripe is taken up front only if it is free
        // (the common case, which spares a miss a second search), and
        // otherwise only once the chunk is known to be absent.
        let mut stripe: Option<MutexGuard<'_, ()>> = None;
        let mut have_stripe = stripe_held;
        if !have_stripe {
            stripe = self.stripes.of(chunk).try_lock();
            have_stripe = stripe.is_some();
        }
        let mut filled: Option<Box<[u8]>> = None;
        let mut first = true;
        let (result, after) = loop {
            let layout = self.layout.read();
            let mut guard = self.movement.lock();
            let MoveState {
                victim,
                incoming,
                spare,
            } = &mut *guard;
            let tiers = &layout.tiers[..];
            // Once filled, the chunk was absent with its stripe held, and
            // it still is: every insertion of an absent chunk holds its
            // stripe, and nothing else makes a chunk appear.
            let found = if filled.is_some() {
                None
            } else {
                find_in_tiers(tiers, chunk, first)
            };
            first = false;
            let rescued = if filled.is_some() || found.is_some() {
                None
            } else {
                victim.take(chunk)
            };
            let res = match (found, rescued) {
                // Someone promoted or inserted it since our fast-path miss.
                (Some((0, s, w)), _) => {
                    let top = &tiers[0];
                    let mut set = top.sets[s].lock();
                    access
                        .apply_top(top, &mut set, s, w)
                        .map_err(CacheError::from)
                }
                // Promotion: take it out of tier t, serve the access from the
                // staging copy, insert at the top (cascading demotions).
                (Some((t, s, w)), _) => {
                    let tier = &tiers[t];
                    let mut set = tier.sets[s].lock();
                    let mut e = set.entries[w];
                    match tier.load(&set, s, w, incoming) {
                        Err(err) => {
                            // Left where it was; the caller sees the error.
                            tier.note_io_error();
                            Err(CacheError::from(err))
                        }
                        Ok(()) => {
                            set.vacate(w);
                            set.hits += 1;
                            drop(set);
                            tier.promotions.fetch_add(1, Ordering::Relaxed);
                            access.apply(incoming, &mut e);
                            cascade(tiers, victim, incoming, spare, 0, e);
                            Ok(())
                        }
                    }
                }
                // Rescue: the repository's buffer becomes the staging
                // buffer (no copy) and the old staging buffer is recycled.
                (None, Some(mut ve)) => {
                    std::mem::swap(incoming, &mut ve.data);
                    victim.recycle(ve.data);
                    victim.rescues += 1;
                    let mut e = Entry::new(chunk, ve.dirty, ve.gen);
                    access.apply(incoming, &mut e);
                    cascade(tiers, victim, incoming, spare, 0, e);
                    Ok(())
                }
                // A detached stack has nothing to fill from.
                (None, None) if self.owner_drains && needs_fill => {
                    Err(CacheError::NotCached { chunk })
                }
                (None, None) => {
                    if !have_stripe {
                        // Lock order is stripe before layout/movement:
                        // let go, take the stripe, look again.
                        drop(guard);
                        drop(layout);
                        stripe = Some(self.stripes.of(chunk).lock());
                        have_stripe = true;
                        continue;
                    }
                    if refuse {
                        // With the stripe held the backing's bytes are the
                        // chunk's current ones (nobody can write it back,
                        // zero it or cache it meanwhile); serve the read
                        // from them and leave the cache as it is.
                        tiers[0].refused.fetch_add(1, Ordering::Relaxed);
                        let mut buf = victim.take_buf();
                        drop(guard);
                        drop(layout);
                        let res = self.backing.read_chunk(chunk, &mut buf);
                        if res.is_ok() {
                            self.fills.fetch_add(1, Ordering::Relaxed);
                            let mut e = Entry::new(chunk, false, 0);
                            access.apply(&mut buf, &mut e);
                        }
                        // Movement alone (no layout) is fine in lock order.
                        self.movement.lock().victim.recycle(buf);
                        return res.map_err(CacheError::from);
                    }
                    if needs_fill && filled.is_none() {
                        // With the stripe held the chunk can't be
                        // inserted, written back or zeroed by anyone
                        // else, so the backing's bytes stay current
                        // while we read them without the movement lock.
                        let mut buf = victim.take_buf();
                        drop(guard);
                        drop(layout);
                        if let Err(e) = self.backing.read_chunk(chunk, &mut buf) {
                            self.movement.lock().victim.recycle(buf);
                            return Err(e.into());
                        }
                        self.fills.fetch_add(1, Ordering::Relaxed);
                        filled = Some(buf);
                        continue;
                    }
                    let mut e = Entry::new(chunk, false, 0);
                    let whole = match filled.take() {
                        Some(mut buf) => {
                            std::mem::swap(incoming, &mut buf);
                            victim.recycle(buf);
                            None
                        }
                        None => access.whole_write(&mut e),
                    };
                    if whole.is_none() {
                        access.apply(incoming, &mut e);
                    }
                    cascade_from(tiers, victim, whole, incoming, spare, 0, e);
                    Ok(())
                }
            };
            if !self.owner_drains {
                // Clean victims are dropped on the spot (what back-pressure
                // would do next, without taking the locks again).
                victim.drop_clean_excess();
            }
            break (res, AfterMove::of(victim));
        };
        drop(stripe);
        self.after_move(after);
        result
    }

    /// Follow-up once all locks are released: wake the cleaner for new
    /// victims; if the repository is over capacity, drain some of it here
    /// (without blocking on other chunks' locks).
    pub(crate) fn after_move(&self, after: AfterMove) {
        if after.wake {
            self.wake.notify();
        }
        if after.over && !self.owner_drains {
            self.relieve_pressure();
        }
    }

    /// Drops `chunk` from whichever tier or the repository holds it,
    /// without touching the backing store. The caller holds the chunk's
    /// stripe lock or owns the stack's draining (detached mode).
    pub(crate) fn discard_cached(&self, chunk: u64) -> bool {
        let layout = self.layout.read();
        let mut mv = self.movement.lock();
        match find_in_tiers(&layout.tiers, chunk, false) {
            Some((t, s, w)) => {
                layout.tiers[t].sets[s].lock().vacate(w);
                true
            }
            None => mv.victim.discard(chunk),
        }
    }

    /// Whole-chunk zero: discard in the backing, then drop every cached copy.
    fn zero_whole(&self, chunk: u64) -> Result<(), CacheError> {
        let _stripe = self.stripes.of(chunk).lock();
        // Backing first: if the discard fails the cache still holds the last
        // written data, so nothing acknowledged is lost. While we hold the
        // stripe nobody can fill, insert or write back this chunk; a
        // concurrent top-tier write hit may land meanwhile and is then
        // superseded by this zero, a valid order for overlapping requests.
        self.backing.zero_chunk(chunk)?;
        self.discard_cached(chunk);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HashKind, Medium, TierConfig};
    use crate::detached::Detached;

    const CS: usize = 4096;

    /// A detached stack of one disk tier of 1 set of 2 ways, in `dir`.
    fn disk_stack(dir: &std::path::Path) -> CacheStack<Detached> {
        CacheStack::detached(CacheConfig {
            chunk_size: CS,
            tiers: vec![TierConfig {
                medium: Medium::Disk {
                    path: dir.join("tier"),
                },
                groups: 1,
                ways: 2,
                hash: HashKind::Modulo,
            }],
            victim_capacity: 4,
            admission: false,
            prefault: false,
        })
        .unwrap()
    }

    fn chunk(b: u8) -> Vec<u8> {
        vec![b; CS]
    }

    fn read(stack: &CacheStack<Detached>, c: u64) -> Vec<u8> {
        let mut buf = vec![0u8; CS];
        assert!(stack.lookup(c, &mut buf).unwrap(), "chunk {c} is kept");
        buf
    }

    #[test]
    fn a_whole_chunk_insert_that_its_tier_fails_is_kept_whole() {
        // Inserts store straight from the caller's bytes (`cascade_from`):
        // when the tier's write fails, those bytes must still reach the
        // victim repository, in a vacant way and when displacing another.
        let dir = tempfile::tempdir().unwrap();
        let stack = disk_stack(dir.path());
        stack.insert(1, &chunk(1)).unwrap();
        stack.insert(2, &chunk(2)).unwrap();
        stack.layout.write().tiers[0]
            .disk_mut()
            .unwrap()
            .fail_writes()
            .unwrap();
        // A full set: 1 (the LRU) is read out, the write of 3 over it
        // fails, and both leave the tier.
        stack.insert(3, &chunk(3)).unwrap();
        // 1's way is vacant now: the write of 4 into it fails too.
        stack.insert(4, &chunk(4)).unwrap();
        let errors: u64 = stack.stats().tiers.iter().map(|t| t.io_errors).sum();
        assert_eq!(errors, 2, "each failed write counted");
        let mut kept = stack.victims(16);
        kept.sort_unstable();
        assert_eq!(kept, [1, 3, 4]);
        for c in 1..=4u64 {
            assert_eq!(read(&stack, c), chunk(c as u8), "chunk {c}");
        }
    }
}
