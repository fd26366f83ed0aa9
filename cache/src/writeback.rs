//! Getting dirty data to the backing store: flush, FUA writes, the
//! cleaner's victim draining and back-pressure.
//!
//! Every writeback follows the same protocol, under the chunk's stripe lock:
//! snapshot the bytes and the write generation under the movement lock,
//! release it, `write_chunk`, then take the movement lock again and mark the
//! chunk clean only if its generation is unchanged, wherever it has moved to
//! meanwhile. A write that lands during the writeback bumps the generation
//! and so keeps the chunk dirty. The stripe lock serialises writebacks of
//! one chunk, so an older snapshot can never overwrite a newer one.

use crate::backing::Backing;
use crate::error::CacheError;
use crate::stack::{find_in_tiers, CacheStack};
use crate::tier::Src;
use std::sync::atomic::Ordering;

/// What a writeback found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wb {
    /// The chunk is not cached.
    NotCached,
    /// The chunk is cached and clean; nothing written.
    Clean,
    /// Written back (and clean now unless rewritten meanwhile).
    Written,
    /// Removed from the victim repository (written back first if it was dirty).
    Drained,
}

impl<B: Backing> CacheStack<B> {
    /// Writes `chunk` back if it is dirty. The caller holds the chunk's
    /// stripe lock. With `drain`, a chunk found in the victim repository is
    /// removed from it once clean.
    pub(crate) fn writeback_locked(&self, chunk: u64, drain: bool) -> Result<Wb, CacheError> {
        // Snapshot.
        let (buf, gen, from_victim) = {
            let layout = self.layout.read();
            let mut mv = self.movement.lock();
            let victim = &mut mv.victim;
            match find_in_tiers(&layout.tiers, chunk, false) {
                Some((t, s, w)) => {
                    let tier = &layout.tiers[t];
                    let set = tier.sets[s].lock();
                    let e = set.entries[w];
                    if !e.dirty {
                        return Ok(Wb::Clean);
                    }
                    let mut buf = victim.take_buf();
                    if let Err(err) = tier.load(&set, s, w, &mut buf) {
                        tier.note_io_error();
                        victim.recycle(buf);
                        return Err(err.into());
                    }
                    (buf, e.gen, false)
                }
                None => {
                    let (dirty, gen) = match victim.get(chunk) {
                        None => return Ok(Wb::NotCached),
                        Some(ve) => (ve.dirty, ve.gen),
                    };
                    if !dirty {
                        if drain {
                            victim.discard(chunk);
                            victim.drains += 1;
                            victim.drops += 1;
                            return Ok(Wb::Drained);
                        }
                        return Ok(Wb::Clean);
                    }
                    let mut buf = victim.take_buf();
                    match victim.get(chunk) {
                        Some(ve) => buf.copy_from_slice(&ve.data),
                        // Looked up a moment ago under the same lock.
                        None => return Ok(Wb::NotCached),
                    }
                    (buf, gen, true)
                }
            }
        };

        // The slow part, with only the stripe held.
        let res = self.backing.write_chunk(chunk, &buf);

        // Commit.
        let layout = self.layout.read();
        let mut mv = self.movement.lock();
        let victim = &mut mv.victim;
        victim.recycle(buf);
        res?;
        self.writebacks.fetch_add(1, Ordering::Relaxed);
        if from_victim {
            victim.writebacks += 1;
        }
        match find_in_tiers(&layout.tiers, chunk, false) {
            Some((t, s, w)) => {
                let mut set = layout.tiers[t].sets[s].lock();
                let e = &mut set.entries[w];
                if e.gen == gen {
                    e.dirty = false;
                }
                Ok(Wb::Written)
            }
            None => {
                let Some(ve) = victim.get_mut(chunk) else {
                    // Only a whole-chunk zero (which needs our stripe) or a
                    // clean drop removes a dirty-at-snapshot chunk; neither
                    // can have happened, but a missing chunk is harmless.
                    return Ok(Wb::Written);
                };
                if ve.gen != gen {
                    return Ok(Wb::Written);
                }
                ve.dirty = false;
                if drain {
                    victim.discard(chunk);
                    victim.drains += 1;
                    return Ok(Wb::Drained);
                }
                Ok(Wb::Written)
            }
        }
    }

    /// Write back every chunk that was dirty when flush started, then backing.sync(). Afterwards all writes acknowledged before the call are durable.
    pub fn flush(&self) -> Result<(), CacheError> {
        // Under the movement lock no chunk is in transit, so this sees every
        // dirty chunk exactly once. A chunk that a concurrent writeback
        // snapshotted is still dirty here; writing it back below waits for
        // that writeback's stripe, so its `write_chunk` completes before our
        // `sync`.
        let mut dirty = self.dirty_chunks();
        // Ascending order is kinder to the backing store.
        dirty.sort_unstable();
        for chunk in dirty {
            let _stripe = self.stripes.of(chunk).lock();
            self.writeback_locked(chunk, false)?;
        }
        self.backing.sync()?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Write-through write: the bytes reach the backing (`write_range`)
    /// before this returns, then the cache; the cached chunk keeps the dirty
    /// state it had (a clean chunk stays clean). Not durable until
    /// `backing().sync()` or [`flush`](Self::flush): FUA is this plus a sync.
    ///
    /// The backing goes first so that an acknowledged write is never held
    /// only in memory, and the chunk's stripe lock is held throughout so no
    /// writeback of an older snapshot can land after it.
    pub fn write_through(&self, chunk: u64, offset: usize, data: &[u8]) -> Result<(), CacheError> {
        self.check(chunk, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let stripe = self.stripes.of(chunk).lock();
        let mut scratch = self.movement.lock().victim.take_buf();
        let res = self.backing.write_range(chunk, offset, data, &mut scratch);
        self.movement.lock().victim.recycle(scratch);
        res?;
        let res = self.write_src(chunk, offset, Src::Data(data), false, true);
        drop(stripe);
        // The chunk this write pushed into the victim repository may share
        // our stripe, which back-pressure (inside `write_src`) could not
        // take while we held it: relieve again now that it is free, so the
        // repository does not stay over capacity until the cleaner runs.
        let over = {
            let _layout = self.layout.read();
            self.movement.lock().victim.over_capacity()
        };
        if over {
            self.relieve_pressure();
        }
        res
    }

    /// Every dirty chunk in the tiers and the victim repository.
    pub(crate) fn dirty_chunks(&self) -> Vec<u64> {
        let layout = self.layout.read();
        let mv = self.movement.lock();
        let mut out = Vec::new();
        for tier in &layout.tiers {
            for set in tier.sets.iter() {
                let set = set.lock();
                out.extend(
                    set.entries
                        .iter()
                        .filter(|e| e.dirty && !e.is_vacant())
                        .map(|e| e.tag),
                );
            }
        }
        out.extend(mv.victim.chunks().filter(|(_, e)| e.dirty).map(|(c, _)| c));
        out
    }

    /// One cleaner pass: write back (if dirty) and drop up to `max` victim entries; returns how many were drained.
    ///
    /// Oldest entries first. Blocks on one chunk lock at a time (never while
    /// holding another). A failed writeback is counted, its entry moved to
    /// the back of the queue so the others still drain, and the first error
    /// is returned at the end of the pass.
    pub fn clean_victims(&self, max: usize) -> Result<usize, CacheError> {
        if self.owner_drains {
            // A detached stack's owner takes its victims itself.
            return Ok(0);
        }
        let mut drained = 0;
        let mut first_err = None;
        // Each attempt drains an entry, or finds it rescued/rewritten, or
        // fails; the bound keeps a pass finite even under constant spilling.
        let limit = max.saturating_mul(2).saturating_add(8);
        let mut attempts = 0;
        while drained < max && attempts < limit {
            attempts += 1;
            let target = {
                let _layout = self.layout.read();
                let mut mv = self.movement.lock();
                let victim = &mut mv.victim;
                let mut target = None;
                while drained < max {
                    match victim.oldest() {
                        None => break,
                        Some((c, false)) => {
                            victim.discard(c);
                            victim.drains += 1;
                            victim.drops += 1;
                            drained += 1;
                        }
                        Some((c, true)) => {
                            target = Some(c);
                            break;
                        }
                    }
                }
                target
            };
            let Some(chunk) = target else { break };
            let _stripe = self.stripes.of(chunk).lock();
            match self.writeback_locked(chunk, true) {
                Ok(Wb::Drained) => drained += 1,
                // Rescued, or rewritten during the writeback: not drained.
                Ok(_) => {}
                Err(e) => {
                    self.victim_errors.fetch_add(1, Ordering::Relaxed);
                    let _layout = self.layout.read();
                    self.movement.lock().victim.requeue(chunk);
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(drained),
        }
    }

    /// Back-pressure, run by an I/O thread after its movement pushed the
    /// victim repository over capacity: drain down to capacity, dropping
    /// clean entries and writing back dirty ones whose chunk lock is free
    /// right now. Chunks whose lock is busy are skipped (it would be a lock
    /// convoy, or a deadlock with a thread holding that lock), so capacity
    /// is soft for that instant; the cleaner catches up. Errors are counted,
    /// not returned: the I/O that triggered this already succeeded.
    pub(crate) fn relieve_pressure(&self) {
        if self.owner_drains {
            // A detached stack's owner decides what leaves (see `detached.rs`).
            return;
        }
        let mut budget = 64usize;
        loop {
            let picked = {
                let _layout = self.layout.read();
                let mut mv = self.movement.lock();
                let victim = &mut mv.victim;
                loop {
                    if !victim.over_capacity() {
                        return;
                    }
                    // Pop the stale slots at the FIFO's front (chunks
                    // rescued or dropped since they arrived): the scan
                    // below would walk past all of them again on every
                    // pick, which made every miss of a full stack cost
                    // hundreds of map lookups (B5).
                    let _ = victim.oldest();
                    let mut pick = None;
                    for (c, dirty) in victim.iter_oldest() {
                        if !dirty {
                            pick = Some((c, None));
                            break;
                        }
                        // try_lock only: we hold the movement lock, which
                        // must never wait for a stripe.
                        if let Some(g) = self.stripes.of(c).try_lock() {
                            pick = Some((c, Some(g)));
                            break;
                        }
                    }
                    match pick {
                        None => return,
                        Some((c, None)) => {
                            victim.discard(c);
                            victim.drains += 1;
                            victim.drops += 1;
                        }
                        Some((c, Some(g))) => break (c, g),
                    }
                }
            };
            let (chunk, _stripe) = picked;
            match self.writeback_locked(chunk, true) {
                Ok(_) => {}
                Err(_) => {
                    self.victim_errors.fetch_add(1, Ordering::Relaxed);
                    let _layout = self.layout.read();
                    self.movement.lock().victim.requeue(chunk);
                    return;
                }
            }
            budget -= 1;
            if budget == 0 {
                return;
            }
        }
    }
}
