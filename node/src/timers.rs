//! Time and local access: heartbeats, the sync daemon, eviction, and the
//! entry point for local requests.

use canopy_proto::{IoOp, Message, Opcode, Perm, Status};

use crate::config::{Role, WriteMode};
use crate::entry::{Req, Requester};
use crate::local::{LocalId, LocalOp, LocalReply};
use crate::node::{Action, Node, Outstanding, Upstream};
use crate::Millis;

/// The [`LocalId`] of read-ahead requests: nobody waits for them, so their
/// answers are not reported (`Node::local_done`). The driver numbers its
/// own requests from 1 upwards and never reaches it.
pub(crate) const READ_AHEAD: LocalId = LocalId(u64::MAX);

/// Chunks just before a read that must have been read (or asked for)
/// before it counts as following on: one more than the read itself, as the
/// kernel's readahead asks of a read before it treats it as sequential.
const READ_AHEAD_HISTORY: usize = 2;

/// Chunks a read-ahead window holds at most, whatever the bytes say.
const READ_AHEAD_MAX: usize = 256;

impl Node {
    /// When the driver should next call [`Node::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Millis> {
        let mut t: Option<Millis> = None;
        let mut consider = |x: Option<Millis>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        consider(self.next_heartbeat);
        consider(self.next_resend());
        if !self.dirty.is_empty() {
            consider(self.next_sync);
        }
        if !self.children.is_empty() {
            let grace = 3 * u64::from(self.cfg.hb_ttl_ms);
            consider(self.children.values().map(|c| c.last_heard + grace).min());
        }
        t
    }

    /// Fire whatever timers are due at `now`.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.heartbeat_due(now);
        self.children_silence(now);
        self.sync_daemon(now);
        if !self.resend.is_empty() {
            self.resend_puts(now);
        }
    }

    fn heartbeat_due(&mut self, now: Millis) {
        let Upstream::Connected {
            deadline,
            hb_ttl_ms,
            ..
        } = self.upstream
        else {
            return;
        };
        if now >= deadline {
            tracing::error!("parent missed its heartbeats; treating it as failed");
            self.actions.push_back(Action::ResetParent);
            self.parent_down(now);
            return;
        }
        if self.next_heartbeat.is_some_and(|t| now >= t) {
            let pending = self
                .outstanding
                .values()
                .any(|o| matches!(o, Outstanding::Heartbeat { .. }));
            if !pending {
                let xid = self.alloc_xid(Outstanding::Heartbeat { sent: now });
                self.send_parent(Message::new(Opcode::Heartbeat, xid));
            }
            self.next_heartbeat = Some(now + u64::from(hb_ttl_ms / 3).max(1));
        }
    }

    /// Children that stopped heartbeating are dropped, so their grants can
    /// no longer block writers elsewhere.
    fn children_silence(&mut self, now: Millis) {
        let grace = 3 * u64::from(self.cfg.hb_ttl_ms);
        let mut silent: Vec<_> = self
            .children
            .iter()
            .filter(|(_, c)| c.last_heard + grace <= now)
            .map(|(id, _)| *id)
            .collect();
        silent.sort_unstable();
        for child in silent {
            tracing::warn!(child, "child silent past its heartbeat; closing it");
            self.stats.children_silent += 1;
            self.actions.push_back(Action::CloseChild(child));
            self.child_gone(child, now);
        }
    }

    /// The sync daemon (seed example 4): send dirty chunks up, and give up
    /// the permission on those not used since the last pass, in the same FLUSH.
    fn sync_daemon(&mut self, now: Millis) {
        if self.cfg.role == Role::Root {
            return;
        }
        let Some(due) = self.next_sync else {
            self.next_sync = Some(now + self.cfg.sync_interval_ms);
            return;
        };
        if now < due {
            return;
        }
        self.next_sync = Some(now + self.cfg.sync_interval_ms);
        if self.parent_volume_id().is_none() {
            return;
        }
        let dirty: Vec<u64> = self.dirty.iter().copied().collect();
        for chunk in dirty {
            let Some(e) = self.table.get_mut(&chunk) else {
                continue;
            };
            if e.is_busy() || e.held != Perm::Write || e.pinned != Perm::No {
                continue;
            }
            // Write-behind: a chunk goes up once it has been dirty for a
            // whole interval, so dirty data is at most two intervals old and
            // a chunk being rewritten is not sent up on every pass.
            if !e.sync_aged {
                e.sync_aged = true;
                e.recently_used = false;
                continue;
            }
            let give_up = !e.recently_used && e.children.is_empty();
            e.recently_used = false;
            self.stats.sync_flushes += 1;
            self.send_release(chunk, if give_up { Perm::No } else { Perm::Write });
        }
    }

    /// Send our copy up without waiting (sync daemon, eviction), keeping
    /// `keep`. A dirty copy goes as FLUSH, a clean one as LOCK.
    pub(crate) fn send_release(&mut self, chunk: u64, keep: Perm) {
        self.revoke(chunk);
        let Some(volume_id) = self.parent_volume_id() else {
            return;
        };
        let Some(e) = self.table.get(&chunk) else {
            return;
        };
        let carry = e.dirty && e.held == Perm::Write;
        let forward = keep == Perm::No && e.forward_duty;
        let held = e.held;
        if !carry && keep >= held {
            return;
        }
        let data = if carry {
            self.chunk_bytes(chunk, false)
        } else {
            None
        };
        let xid = self.alloc_xid(Outstanding::Release {
            chunk,
            carried: data.is_some(),
        });
        let mut m = Message::new(Opcode::IoRequest, xid);
        m.params.io_op = Some(if data.is_some() {
            IoOp::Flush
        } else {
            IoOp::Lock
        });
        m.params.volume_id = Some(volume_id);
        m.params.block_num = Some(chunk);
        m.params.permissions = Some(keep.min(held));
        if data.is_some() {
            m.params.version = Some(self.version_of(chunk));
        }
        m.params.data = data;
        self.send_parent(m);
        if forward {
            // Semi-sync duty: the data must stay in two places once we drop it.
            let xid = self.alloc_xid(Outstanding::Release {
                chunk,
                carried: false,
            });
            let mut f = Message::new(Opcode::Forward, xid);
            f.params.volume_id = Some(volume_id);
            f.params.block_num = Some(chunk);
            self.send_parent(f);
        }
        if keep == Perm::No {
            self.drop_copy(chunk);
            self.forget_if_idle(chunk);
        } else {
            self.clear_dirty(chunk);
            if let Some(e) = self.table.get_mut(&chunk) {
                e.held = e.held.min(keep);
            }
            if carry {
                self.relay_sent_up(chunk);
            }
        }
    }

    /// The victim cleaner: what the cache stack pushed out of its tiers
    /// beyond the victim repository's capacity leaves the node, oldest
    /// first, but only once its permission went back to the parent in the
    /// same step (a FLUSH carrying the data if it is dirty, a FORWARD first
    /// if a semi-sync write is owed one). A chunk that a transaction, a
    /// local lock or a child's WRITE holds stays in the repository (its
    /// capacity is soft) and is tried again after the next access. A chunk
    /// whose children hold READ keeps its permission, which they rely on,
    /// and loses only its bytes: fetched again if asked for.
    pub(crate) fn maybe_evict(&mut self, _now: Millis) {
        if self.cfg.role == Role::Root {
            return;
        }
        let (mut excess, candidates) = self.store.overflow(self.cfg.capacity_chunks);
        for chunk in candidates {
            if excess == 0 {
                break;
            }
            let Some(e) = self.table.get(&chunk) else {
                // Bytes without a row cannot happen (a row keeps its bytes);
                // drop them rather than keep them forever.
                self.store.take(chunk);
                excess -= 1;
                continue;
            };
            if e.is_busy() || e.pinned != Perm::No || e.child_writer().is_some() {
                continue;
            }
            if e.children.is_empty() && e.held == Perm::No && !e.dirty {
                // Nothing to give back (a grant a PUT answered with nothing).
                self.drop_bytes(chunk);
                self.forget_if_idle(chunk);
                excess -= 1;
            } else if e.children.is_empty() {
                if self.parent_volume_id().is_none() {
                    // Not connected: nothing can be given back now.
                    break;
                }
                self.stats.evictions += 1;
                self.send_release(chunk, Perm::No);
                self.forget_if_idle(chunk);
                excess -= 1;
            } else if !e.dirty && !e.forward_duty {
                self.stats.evictions += 1;
                self.revoke(chunk);
                self.drop_bytes(chunk);
                excess -= 1;
            }
        }
    }

    /// A local request (the ublk device, a lock client, a test).
    ///
    /// **Read-ahead** (`NodeConfig::read_ahead_bytes`, a child node): a
    /// local read of chunk `c` whose `h` (at least two) chunks before it
    /// were read or asked for already also queues reads of the next `h`
    /// chunks (up to the window) that this node neither has nor has asked
    /// for, as the kernel's readahead grows with the run behind a read.
    /// They are ordinary reads with nobody waiting ([`READ_AHEAD`]): the
    /// chunks arrive with their grants, into the cache, and a reader that
    /// comes for one finds it there, or waits behind its GET instead of
    /// sending another. At most a window's worth is queued at a time. A
    /// cold sequential or file-order reader so keeps more of the parent's
    /// (and the root's disk's) queue busy than its own queue depth, as
    /// fio reading through the page cache does against nbdkit in B2.
    pub fn local(&mut self, id: LocalId, op: LocalOp, now: Millis) {
        let read = matches!(op, LocalOp::Read { .. }) && id != READ_AHEAD;
        let chunk = op.chunk();
        self.local_op(id, op, now);
        if read {
            self.read_ahead(chunk, now);
        }
    }

    /// Chunks in a read-ahead window (0: off): the configured bytes in
    /// whole chunks, once the chunk size is known.
    fn read_ahead_window(&self) -> usize {
        if self.chunk_size == 0 || self.is_root() {
            return 0;
        }
        let chunks = self.cfg.read_ahead_bytes / u64::from(self.chunk_size);
        usize::try_from(chunks)
            .unwrap_or(usize::MAX)
            .min(READ_AHEAD_MAX)
    }

    /// Whether this node has `chunk`, or has asked for it.
    fn has_or_asked(&self, chunk: u64) -> bool {
        self.table
            .get(&chunk)
            .is_some_and(|e| e.has_data || e.up.is_some() || !e.queue.is_empty())
    }

    /// Queue the read-ahead a local read of `chunk` calls for (see
    /// [`Node::local`]).
    fn read_ahead(&mut self, chunk: u64, now: Millis) {
        let window = self.read_ahead_window();
        if window == 0 || !self.is_ready() {
            return;
        }
        let behind = (1..=window as u64)
            .take_while(|&k| chunk.checked_sub(k).is_some_and(|c| self.has_or_asked(c)))
            .count();
        if behind < READ_AHEAD_HISTORY {
            return;
        }
        let last = chunk
            .saturating_add(behind as u64)
            .min(self.num_chunks().saturating_sub(1));
        for next in chunk.saturating_add(1)..=last {
            if self.reading_ahead >= window {
                break;
            }
            if self.has_or_asked(next) {
                continue;
            }
            self.reading_ahead += 1;
            self.stats.read_ahead += 1;
            self.local_op(READ_AHEAD, LocalOp::Read { chunk: next }, now);
        }
    }

    /// Read-ahead requests queued and not answered yet.
    pub fn read_ahead_in_flight(&self) -> usize {
        self.reading_ahead
    }

    fn local_op(&mut self, id: LocalId, op: LocalOp, now: Millis) {
        if !self.is_ready() {
            if self.upstream == Upstream::Idle {
                self.send_connect();
            }
            if self.upstream == Upstream::Down {
                self.local_done(id, Err(Status::ParentUnavailable));
            } else {
                self.waiting_local.push((id, op));
            }
            return;
        }
        let chunk = op.chunk();
        if !matches!(op, LocalOp::Read { .. }) {
            self.revoke(chunk);
        }
        if chunk >= self.num_chunks() {
            self.local_done(id, Err(Status::OutOfRange));
            return;
        }
        if matches!(op, LocalOp::Lock { .. }) && self.locks_lost.remove(&chunk) {
            self.local_done(id, Err(Status::NoPermission));
            return;
        }
        let sync_mode = self.cfg.write_mode == WriteMode::Sync;
        let req = match op {
            LocalOp::Read { .. } => Req::Read,
            LocalOp::Write {
                offset,
                data,
                force_sync,
                ..
            } => {
                let end = (offset as usize).checked_add(data.len());
                if !end.is_some_and(|end| end <= self.chunk_size as usize) {
                    self.local_done(id, Err(Status::OutOfRange));
                    return;
                }
                Req::Write {
                    offset,
                    data,
                    sync: sync_mode || force_sync,
                    semi: self.cfg.write_mode == WriteMode::SemiSync,
                }
            }
            LocalOp::Lock { perm: Perm::No, .. } => {
                // Release: unpin, answer any INVALIDATE that waited for it,
                // and give the chunk back so the next locker need not wait
                // for an INVALIDATE round trip.
                if let Some(e) = self.table.get_mut(&chunk) {
                    e.pinned = Perm::No;
                }
                self.run(chunk, now);
                if self
                    .table
                    .get(&chunk)
                    .is_some_and(|e| !e.is_busy() && e.children.is_empty())
                {
                    self.send_release(chunk, Perm::No);
                }
                self.local_done(id, Ok(LocalReply::Done));
                return;
            }
            LocalOp::Lock { perm, .. } => Req::Lock { perm },
            LocalOp::Sync { .. } => {
                if self.unsynced_lost.remove(&chunk) {
                    // Writes to it were acknowledged, then the parent was
                    // lost before they were durable: say so once. The chunk
                    // stays unsynced, so the next Sync pushes what is left.
                    tracing::error!(chunk, "acknowledged writes may be lost with the parent");
                    self.local_done(id, Err(Status::IoError));
                    return;
                }
                // A FORCE_SYNC FLUSH (a barrier when our copy is clean) makes
                // every node on the way push what it holds and the root
                // fdatasync. `keep` is capped at what we hold: nothing given up.
                Req::PassUp {
                    sync: true,
                    keep: Perm::Write,
                }
            }
        };
        self.enqueue(chunk, Requester::Local(id), req, now);
    }

    /// Start the sync daemon's clock once something is dirty, so its first
    /// pass does not wait for an unrelated timer.
    pub(crate) fn arm_sync(&mut self, now: Millis) {
        if self.next_sync.is_none() && !self.dirty.is_empty() && self.cfg.role != Role::Root {
            self.next_sync = Some(now + self.cfg.sync_interval_ms);
        }
    }

    /// Before a clean stop: send every dirty chunk up and give back every
    /// chunk no child or request still uses. Returns how many went; the
    /// driver waits for [`Node::releases_in_flight`] to reach 0 (or a
    /// deadline) before closing the link, so async writes are not lost.
    pub fn release_all(&mut self, _now: Millis) -> usize {
        let mut chunks: Vec<u64> = self.table.keys().copied().collect();
        // Sorted so that a simulation replays the same actions in the same order.
        chunks.sort_unstable();
        let mut sent = 0;
        for chunk in chunks {
            let Some(e) = self.table.get(&chunk) else {
                continue;
            };
            if e.held == Perm::No || e.is_busy() || !e.children.is_empty() || e.pinned != Perm::No {
                continue;
            }
            self.send_release(chunk, Perm::No);
            sent += 1;
        }
        sent
    }

    /// Releases and sync-daemon FLUSHes sent and not yet answered.
    pub fn releases_in_flight(&self) -> usize {
        self.outstanding.releases()
    }

    /// Chunks whose newest data is only here (async writes not yet sent up).
    pub fn dirty_chunks(&self) -> usize {
        self.dirty.len()
    }

    /// Chunks, in ascending order, whose newest locally acknowledged write
    /// may not be durable at the root yet: a device FLUSH sends
    /// [`LocalOp::Sync`] for each of them and for no other.
    ///
    /// This covers more than the dirty chunks and those owing a semi-sync
    /// FORWARD: data the sync daemon, an eviction or an INVALIDATE answer
    /// sent up without FORCE_SYNC may still sit dirty at a proxy or unsynced
    /// in the root's origin, so a chunk leaves the set only when a sync write
    /// or a `Sync` on it completes (at the root, when the origin is
    /// fdatasynced). Empty in sync mode, and on a root whose own writes are
    /// sync. The set is kept as writes complete, so this costs one copy of
    /// it: the chunks written since the last FLUSH.
    pub fn unsynced_chunks(&self) -> Vec<u64> {
        self.unsynced.iter().copied().collect()
    }
}
