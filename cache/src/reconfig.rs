//! Live reconfiguration: adding, removing, rehashing and resizing tiers
//! while other threads do I/O.
//!
//! A reconfiguration takes the layout lock exclusively, so I/O pauses for
//! its duration (new I/O queues behind it, in-flight backing I/O carries on
//! since it holds no layout lock). A tier that goes away or is rebuilt hands
//! its entries to the normal demotion cascade, so dirty data always ends up
//! in some tier or the victim repository; the repository may end up over its
//! soft capacity, which the caller then drains like any other back-pressure.

use crate::backing::Backing;
use crate::config::{check_unique_paths, Medium, Reconfig, TierConfig};
use crate::error::CacheError;
use crate::set::Entry;
use crate::stack::{cascade, AfterMove, CacheStack, MoveState};
use crate::tier::Tier;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where a rebuilt disk tier's file is created before it takes over the
/// configured path.
fn rebuild_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".rebuild");
    PathBuf::from(s)
}

/// Moves every entry of `old` (no longer in `tiers`) into `tiers[start..]`
/// through the cascade; `start == tiers.len()` sends them straight to the
/// victim repository. Least recently used first, so that the most recently
/// used entries are the ones left highest in the stack.
fn reinsert(tiers: &[Tier], mv: &mut MoveState, old: &Tier, start: usize) {
    let mut order: Vec<(u64, usize, usize)> = Vec::new();
    for (s, set) in old.sets.iter().enumerate() {
        let set = set.lock();
        for (w, e) in set.entries.iter().enumerate() {
            if !e.is_vacant() {
                order.push((e.lru, s, w));
            }
        }
    }
    // LRU stamps are per set, so this interleaves sets by their own age
    // order; good enough to keep each set's hot entries on top.
    order.sort_unstable_by_key(|&(lru, _, _)| lru);
    let MoveState {
        victim,
        incoming,
        spare,
    } = mv;
    for (_, s, w) in order {
        let set = old.sets[s].lock();
        let e = set.entries[w];
        let loaded = old.load(&set, s, w, incoming);
        drop(set);
        if loaded.is_err() {
            // The tier's file can't give the chunk back; nothing can be
            // recovered. Counted; a clean chunk is merely re-read later.
            old.note_io_error();
            continue;
        }
        cascade(
            tiers,
            victim,
            incoming,
            spare,
            start,
            Entry::new(e.tag, e.dirty, e.gen),
        );
    }
}

impl<B: Backing> CacheStack<B> {
    /// Applies one live change to the stack's shape. On error nothing changed.
    pub fn reconfigure(&self, op: Reconfig) -> Result<(), CacheError> {
        let after = {
            let mut layout = self.layout.write();
            // Everyone takes `movement` under a shared layout lock, so with
            // the exclusive lock held this never waits.
            let mut mv = self.movement.lock();
            let tiers = &mut layout.tiers;
            let n = tiers.len();
            let bad_index = |index: usize| CacheError::BadTierIndex { index, tiers: n };
            match op {
                Reconfig::AddTier { index, tier } => {
                    if index > n {
                        return Err(bad_index(index));
                    }
                    tier.validate(self.chunk_size)?;
                    check_unique_paths(tiers.iter().map(|t| &t.cfg).chain([&tier]))?;
                    let t = Tier::build(&tier, self.chunk_size, None, self.prefault)?;
                    tiers.insert(index, t);
                }
                Reconfig::RemoveTier { index } => {
                    if index >= n {
                        return Err(bad_index(index));
                    }
                    if n == 1 {
                        return Err(CacheError::InvalidConfig(
                            "cannot remove the only tier".into(),
                        ));
                    }
                    let old = tiers.remove(index);
                    // Its entries go to the tier that was below it (now at
                    // `index`), or to the victim repository if it was the bottom.
                    reinsert(tiers, &mut mv, &old, index);
                    // `old` drops here: memory freed, its file removed.
                }
                Reconfig::Rehash { index, hash } => {
                    let Some(t) = tiers.get(index) else {
                        return Err(bad_index(index));
                    };
                    let cfg = TierConfig {
                        hash,
                        ..t.cfg.clone()
                    };
                    self.rebuild(tiers, &mut mv, index, cfg)?;
                }
                Reconfig::Resize {
                    index,
                    groups,
                    ways,
                } => {
                    let Some(t) = tiers.get(index) else {
                        return Err(bad_index(index));
                    };
                    let cfg = TierConfig {
                        groups,
                        ways,
                        ..t.cfg.clone()
                    };
                    self.rebuild(tiers, &mut mv, index, cfg)?;
                }
            }
            AfterMove::of(&mut mv.victim)
        };
        self.after_move(after);
        Ok(())
    }

    /// Replaces `tiers[index]` with an empty tier built from `cfg` and
    /// re-inserts the old tier's entries into it through the cascade
    /// (overflow demotes into the tiers below).
    fn rebuild(
        &self,
        tiers: &mut [Tier],
        mv: &mut MoveState,
        index: usize,
        cfg: TierConfig,
    ) -> Result<(), CacheError> {
        cfg.validate(self.chunk_size)?;
        let mut new = match &cfg.medium {
            Medium::Memory => Tier::build(&cfg, self.chunk_size, None, self.prefault)?,
            Medium::Disk { path } => {
                if tiers[index].disk_is_block_device() {
                    // The new layout would overwrite slots the old one still
                    // has to be read from.
                    return Err(CacheError::InvalidConfig(format!(
                        "a tier on block device {} can't be rebuilt in place; remove and re-add it",
                        path.display()
                    )));
                }
                // Build beside the old file, then take over its name: the
                // old tier keeps reading through its open descriptor.
                let tmp = rebuild_path(path);
                let mut t = Tier::build(&cfg, self.chunk_size, Some(&tmp), self.prefault)?;
                if let Some(f) = t.disk_mut() {
                    // On failure `t` drops and removes the temporary file.
                    f.rename_to(path)?;
                }
                t
            }
        };
        // Keep the tier's history (movement counters, hits, misses).
        new.inherit_counters(&tiers[index]);
        let mut old = std::mem::replace(&mut tiers[index], new);
        if let Some(f) = old.disk_mut() {
            // The path now names the new tier's file.
            f.disown_path();
        }
        reinsert(tiers, mv, &old, index);
        Ok(())
    }
}
