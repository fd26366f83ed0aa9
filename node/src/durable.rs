//! The root's origin writes and group commit, off the node's thread.
//!
//! Writes: [`Action::OriginWrite`], one per chunk in flight (a newer one
//! waits in the row), completed by [`Node::origin_written`]; until then the
//! row keeps the bytes and nothing reads them.
//!
//! fdatasync runs one at a time, and each covers every origin write
//! completed before it started.
//!
//! A request that needs a chunk durable (a sync write, a FORCE_SYNC FLUSH
//! barrier) asks [`Node::await_durable`]: ready at once if the chunk has no
//! write not yet covered by a completed fdatasync; otherwise the row waits,
//! an [`Action::OriginSync`] is issued if none is in flight, and
//! [`Node::origin_synced`] re-runs the waiting rows when it completes. Many
//! sync writers arriving while one fdatasync runs are all covered by the
//! next one, so the node task never blocks on a disk flush and a burst of
//! sync writes costs two fdatasyncs, not one each.

use std::collections::{BTreeMap, BTreeSet};

use canopy_proto::Status;

use crate::node::{Action, Node};
use crate::version::Incoming;
use crate::Millis;

/// Chunks pending durability beyond which an fdatasync is issued anyway.
const PENDING_TRIM: usize = 4096;

/// The `pending` number of a chunk whose write is still in flight: no
/// fdatasync can cover it yet.
const IN_FLIGHT: u64 = u64::MAX;

/// The root's durability bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct Durability {
    /// Origin writes completed so far: each gets the next number.
    written: u64,
    /// Chunks with a write not known durable: the number of the last one.
    pending: BTreeMap<u64, u64>,
    /// The fdatasync in flight covers writes up to this number.
    in_flight: Option<u64>,
    /// Chunks whose head request waits for durability.
    waiters: BTreeSet<u64>,
    /// Chunks whose waiting request must fail once: the fdatasync meant to
    /// cover them failed.
    failed: BTreeSet<u64>,
}

/// Whether a chunk's writes are durable ([`Node::await_durable`]).
pub(crate) enum Durable {
    /// Durable (or nothing was written).
    Ready,
    /// An fdatasync covering them is in flight or issued; the row is re-run
    /// when it completes.
    Wait,
    /// The fdatasync that should have covered them failed.
    Failed,
}

impl Node {
    /// The origin has just written `chunk` (not yet durable).
    pub(crate) fn note_origin_write(&mut self, chunk: u64) {
        let d = &mut self.durability;
        d.written += 1;
        d.pending.insert(chunk, d.written);
        // Children that never ask for durability (async trees) would let
        // the map grow with every chunk written: an fdatasync nobody waits
        // for trims it. (Chunks still being written are bounded by the
        // rows, which keep their bytes until then.)
        if d.pending.len() >= PENDING_TRIM && d.in_flight.is_none() {
            self.issue_origin_sync();
        }
    }

    /// Whether every write of `chunk` so far is durable; if not, the head
    /// request on its row waits for the fdatasync this issues or joins.
    pub(crate) fn await_durable(&mut self, chunk: u64) -> Durable {
        let d = &mut self.durability;
        if d.failed.remove(&chunk) {
            return Durable::Failed;
        }
        let Some(&seq) = d.pending.get(&chunk) else {
            return Durable::Ready;
        };
        d.waiters.insert(chunk);
        if seq == IN_FLIGHT {
            // `origin_written` runs the row again once the write is done.
            return Durable::Wait;
        }
        // One in flight that started before this write is followed by
        // another once it completes (see `origin_synced`).
        if d.in_flight.is_none() {
            self.issue_origin_sync();
        }
        Durable::Wait
    }

    fn issue_origin_sync(&mut self) {
        self.durability.in_flight = Some(self.durability.written);
        self.stats.origin_syncs += 1;
        self.actions.push_back(Action::OriginSync);
    }

    /// The fdatasync that [`Action::OriginSync`] asked for completed (root
    /// only). On success every write completed before it was issued is
    /// durable; on failure the requests waiting for them fail (their
    /// writes stay pending, so a later barrier tries again). Either way
    /// the waiting rows run again, and another fdatasync is issued if some
    /// still wait for writes it did not cover.
    pub fn origin_synced(&mut self, result: Result<(), Status>, now: Millis) {
        let Some(covered) = self.durability.in_flight.take() else {
            tracing::debug!("origin sync completed but none was in flight");
            return;
        };
        let d = &mut self.durability;
        match result {
            Ok(()) => {
                // IN_FLIGHT is above every number: never covered.
                d.pending.retain(|_, seq| *seq > covered);
                // The root's own acknowledged writes (async mode) are
                // durable once their chunk has nothing pending.
                let pending = &d.pending;
                self.unsynced.retain(|c| pending.contains_key(c));
            }
            Err(s) => {
                tracing::error!(status = %s, "origin fdatasync failed");
                for &chunk in &d.waiters {
                    if d.pending.get(&chunk).is_some_and(|seq| *seq <= covered) {
                        d.failed.insert(chunk);
                    }
                }
            }
        }
        let waiters = std::mem::take(&mut self.durability.waiters);
        for chunk in waiters {
            self.run(chunk, now);
        }
    }

    /// Serve an [`Action::OriginSync`] on the caller's thread (tests and
    /// drivers without threads): fdatasync the origin, then
    /// [`Node::origin_synced`].
    pub fn serve_origin_sync(&mut self, now: Millis) {
        let result = match self.origin.as_ref() {
            Some(origin) => origin.sync().map_err(|e| {
                tracing::error!(error = %e, "origin sync failed");
                Status::IoError
            }),
            None => Ok(()),
        };
        self.origin_synced(result, now);
    }
}

impl Node {
    /// Whether the origin has the chunk's last write (not necessarily
    /// durably); if it is still in flight the head request waits and
    /// [`Node::origin_written`] runs the row again. Failed: that write (or
    /// an fdatasync meant to cover it) failed, reported once.
    pub(crate) fn await_written(&mut self, chunk: u64) -> Durable {
        if self.table.get(&chunk).is_some_and(|e| e.writing) {
            return Durable::Wait;
        }
        if self.durability.failed.remove(&chunk) {
            return Durable::Failed;
        }
        Durable::Ready
    }

    /// A write of `chunk` is in flight (or waits behind one): not durable,
    /// and not yet numbered.
    pub(crate) fn durability_writing(&mut self, chunk: u64) {
        self.durability.pending.insert(chunk, IN_FLIGHT);
    }

    /// The write that [`Action::OriginWrite`] asked for completed (root
    /// only). On success the chunk's bytes are on the origin (durable at
    /// the next fdatasync); a newer write that waited is issued now. On
    /// failure the origin may lack what the row holds: unless a newer write
    /// follows, the bytes are dropped (nothing read them: reads wait for
    /// the write) and the next request that needs the chunk durable fails
    /// once. The row runs again either way.
    pub fn origin_written(&mut self, chunk: u64, result: Result<(), Status>, now: Millis) {
        let Some(e) = self.table.get_mut(&chunk) else {
            tracing::debug!(chunk, "origin write completed for no row");
            return;
        };
        if !e.writing {
            tracing::debug!(chunk, "origin write completed but none was in flight");
            return;
        }
        let next = e.write_next.take();
        e.writing = next.is_some();
        if let Err(s) = &result {
            tracing::error!(chunk, status = %s, "origin write failed");
            self.durability.failed.insert(chunk);
        }
        match (next, result) {
            (Some(data), _) => {
                self.actions.push_back(Action::OriginWrite { chunk, data });
            }
            (None, Ok(())) => self.note_origin_write(chunk),
            (None, Err(_)) => {
                self.durability.pending.remove(&chunk);
                self.drop_bytes(chunk);
                // What the origin now holds is not the refused write's data,
                // so it gets a version of its own: a sealed copy of the
                // refused data must never pass for it.
                self.bump_version(chunk, Incoming::Floor(0));
            }
        }
        self.run(chunk, now);
        self.forget_if_idle(chunk);
    }

    /// Serve an [`Action::OriginWrite`] on the caller's thread (tests and
    /// drivers without threads): write the origin, then
    /// [`Node::origin_written`].
    pub fn serve_origin_write(&mut self, chunk: u64, data: &[u8], now: Millis) {
        let result = match self.origin.as_ref() {
            Some(origin) => origin.write_chunk(chunk, data).map_err(|e| {
                tracing::error!(chunk, error = %e, "origin write failed");
                Status::IoError
            }),
            None => Ok(()),
        };
        self.origin_written(chunk, result, now);
    }
}
