//! The Client module: our CONNECT and requests to the parent, its
//! INVALIDATEs and PUSHes, and HEARTBEAT.

use canopy_proto::{Message, Opcode, Perm, Status};

use crate::entry::{Entry, UpKind};
use crate::node::{Action, Node, Outstanding, Upstream};
use crate::Millis;

impl Node {
    /// The transport to the parent is up: connect now, or (a proxy with
    /// `connect_lazily`) when the first child or local request needs it.
    pub fn parent_up(&mut self, now: Millis) {
        if self.is_root() {
            return;
        }
        self.upstream = Upstream::Idle;
        // A lazy proxy connects when someone needs the volume: a waiting
        // child or local request, or children it already serves (after a
        // parent's restart they would otherwise wait for a new child).
        if !self.cfg.connect_lazily
            || !self.waiting_connect.is_empty()
            || !self.waiting_local.is_empty()
            || !self.children.is_empty()
        {
            self.send_connect();
        }
        let _ = now;
    }

    pub(crate) fn send_connect(&mut self) {
        let xid = self.alloc_xid(Outstanding::Connect);
        let mut m = Message::new(Opcode::Connect, xid);
        m.params.volume_name = Some(self.cfg.volume_name.clone());
        m.params.connect_flags = Some(self.cfg.write_mode.connect_flag());
        m.params.key = self
            .cfg
            .volume_key
            .map(|k| bytes::Bytes::copy_from_slice(&k));
        self.upstream = Upstream::Connecting;
        self.send_parent(m);
    }

    /// The transport to the parent failed, or its heartbeat did: everything
    /// we hold from it is void, and so is everything our children hold
    /// from us.
    ///
    /// The children's connections are closed too, so that each runs its
    /// own parent loss. Recalling their grants is not enough: data a child
    /// handed us (a FLUSH, an INVALIDATE answer) that had not gone further
    /// up is lost with our permission, and the child, which no longer holds
    /// it, would otherwise let its next `Sync` claim durability for it (a
    /// barrier passes through us to the root and succeeds). A child that
    /// loses its parent marks every write not yet durable as possibly lost
    /// (`unsynced_lost`), drops what it holds and reconnects. Until the
    /// seed's recovery (RECOVER) lands, a proxy's parent failure therefore
    /// restarts its subtree.
    pub fn parent_down(&mut self, now: Millis) {
        if self.is_root() {
            return;
        }
        if self.upstream != Upstream::Down {
            tracing::warn!("parent lost: dropping every chunk held from it");
        }
        if matches!(self.upstream, Upstream::Connected { .. }) {
            let mut children: Vec<_> = self.children.keys().copied().collect();
            children.sort_unstable();
            for child in children {
                tracing::warn!(child, "closing child: our parent was lost");
                self.actions.push_back(Action::CloseChild(child));
                self.child_gone(child, now);
            }
        }
        self.revoke_all();
        self.upstream = Upstream::Down;
        self.next_heartbeat = None;
        self.outstanding
            .retain(|_, o| matches!(o, Outstanding::Invalidate { .. }));
        let mut chunks: Vec<u64> = self.table.keys().copied().collect();
        // Sorted so that a simulation replays the same actions in the same order.
        chunks.sort_unstable();
        for chunk in &chunks {
            let Some(e) = self.table.get_mut(chunk) else {
                continue;
            };
            if e.dirty {
                self.stats.lost_dirty += 1;
                tracing::error!(chunk, "unflushed async write lost with the parent");
            }
            if e.pinned != Perm::No {
                // The root forgets the grant with us: another node may take
                // the lock now. Unpinned, and reported to its user.
                e.pinned = Perm::No;
                self.stats.locks_lost += 1;
                self.locks_lost.insert(*chunk);
                tracing::error!(chunk, "local lock lost with the parent");
            }
            e.parent_inval.clear();
            let up = e.up.take();
            let from_head = e.queue.front().map(|p| p.from.clone());
            self.drop_copy(*chunk);
            if self.hold_put(*chunk, up, now) {
                // Its PUT goes again once reconnected (`retry.rs`).
            } else if up.is_some() {
                if let Some(from) = from_head {
                    self.answer(&from, Err(Status::ParentUnavailable));
                }
                if let Some(e) = self.table.get_mut(chunk) {
                    e.queue.pop_front();
                }
            }
            // Grants we made rest on ours: take them back (children that
            // connected while we were not connected hold none).
            let victims: Vec<_> = self.table.get(chunk).map_or(Vec::new(), |e| {
                e.children
                    .iter()
                    .filter(|(c, _)| !e.recall.iter().any(|(r, _)| r == c))
                    .map(|(c, _)| *c)
                    .collect()
            });
            if !victims.is_empty() {
                self.start_recall(*chunk, victims, Perm::No);
            }
        }
        // Writes acknowledged but not yet durable at the root may have died
        // with the parent (our dirty copies just did): the next `Sync` on
        // each such chunk reports it rather than syncing what is left.
        self.unsynced_lost.extend(self.unsynced.iter().copied());
        for (id, _) in std::mem::take(&mut self.waiting_local) {
            self.local_done(id, Err(Status::ParentUnavailable));
        }
        for chunk in chunks {
            self.run(chunk, now);
        }
        self.release_waiting_connects(now);
    }

    /// A message arrived from the parent.
    pub fn handle_parent(&mut self, m: Message, now: Millis) {
        if self.is_root() {
            return;
        }
        // Anything the parent sends shows it alive, not only a HEARTBEAT
        // reply: under a bulk transfer a heartbeat can wait behind many
        // chunks in the same stream for longer than HB_TTL (a slow VM
        // writing a filesystem through a proxy with a disk tier did).
        if let Upstream::Connected {
            deadline,
            hb_ttl_ms,
            ..
        } = &mut self.upstream
        {
            *deadline = (*deadline).max(now + u64::from(*hb_ttl_ms));
        }
        if let Some(chunk) = m.params.block_num {
            self.revoke(chunk);
        }
        if let Some(Outstanding::Up { chunk, .. }) = self.outstanding.get(&m.header.xid) {
            // A reply names its chunk only through the request it answers.
            let chunk = *chunk;
            self.revoke(chunk);
        }
        self.handle_parent_inner(m, now);
        self.arm_sync(now);
    }

    fn handle_parent_inner(&mut self, m: Message, now: Millis) {
        match m.header.opcode {
            Opcode::OkReply | Opcode::ErrReply => self.parent_reply(m, now),
            Opcode::Invalidate => self.parent_invalidate(m, now),
            Opcode::Push => self.parent_push(m, now),
            other => {
                tracing::warn!(opcode = %other, "unexpected message from the parent");
                if !other.is_reply() {
                    self.send_parent(Message::err_reply(m.header.xid, Status::Unsupported));
                }
            }
        }
    }

    fn parent_reply(&mut self, m: Message, now: Millis) {
        let xid = m.header.xid;
        let Some(what) = self.outstanding.remove(&xid) else {
            tracing::debug!(xid, "reply from the parent to nothing we asked");
            return;
        };
        let ok = m.header.opcode == Opcode::OkReply;
        match what {
            Outstanding::Connect => self.connect_answered(m, ok, now),
            Outstanding::Heartbeat { sent } => {
                if let Upstream::Connected {
                    hb_ttl_ms,
                    deadline,
                    ..
                } = &mut self.upstream
                {
                    if ok {
                        *hb_ttl_ms = m.params.hb_ttl_ms.unwrap_or(*hb_ttl_ms);
                        *deadline = sent + u64::from(*hb_ttl_ms);
                    }
                }
            }
            Outstanding::Up { chunk, sent } => self.up_answered(chunk, xid, sent, m, ok, now),
            Outstanding::Release { chunk, carried } => {
                if !ok {
                    tracing::warn!(chunk, status = ?m.params.status, "parent refused a release");
                    if carried {
                        self.release_refused(chunk);
                    }
                }
            }
            Outstanding::Invalidate { .. } => {
                tracing::warn!(xid, "parent answered an INVALIDATE we sent to a child");
            }
        }
    }

    /// The parent refused a FLUSH that carried our dirty copy without a
    /// request waiting on it (sync daemon, eviction, a clean stop), e.g.
    /// because the root could not write its origin. If we still hold WRITE
    /// and the copy, it is dirty again and goes up on the next pass. If we
    /// gave it up, the parent may not have it: count the loss, and make the
    /// next device FLUSH of that chunk fail rather than claim durability.
    fn release_refused(&mut self, chunk: u64) {
        if let Some(e) = self.table.get_mut(&chunk) {
            if e.held == Perm::Write && e.has_data {
                e.dirty = true;
                self.dirty.insert(chunk);
                return;
            }
        }
        tracing::error!(
            chunk,
            "the parent refused our only copy of acknowledged writes"
        );
        self.stats.lost_dirty += 1;
        if self.unsynced.contains(&chunk) {
            self.unsynced_lost.insert(chunk);
        }
    }

    fn connect_answered(&mut self, m: Message, ok: bool, now: Millis) {
        let volume_id = m.params.volume_id;
        let same_keys = m.params.key.as_deref() == self.cfg.volume_key.as_ref().map(|k| &k[..]);
        let mut status = m.params.status;
        match (ok, volume_id) {
            (true, Some(_)) if !same_keys => {
                tracing::error!(
                    ours = self.cfg.volume_key.is_some(),
                    theirs = m.params.key.is_some(),
                    "parent serves the volume with other keys (or one of us has none); not joining"
                );
                status = Some(Status::BadVerifier);
                self.upstream = Upstream::Idle;
            }
            (true, Some(volume_id)) => {
                let hb = m.params.hb_ttl_ms.unwrap_or(self.cfg.hb_ttl_ms);
                self.chunk_size = m.params.chunk_size.unwrap_or(0);
                self.volume_size = m.params.volume_size.unwrap_or(0);
                if let Some(bytes) = self.cfg.capacity_bytes {
                    let chunk = u64::from(self.chunk_size.max(1));
                    let chunks = usize::try_from(bytes / chunk).unwrap_or(usize::MAX);
                    self.cfg.capacity_chunks = chunks.max(1);
                }
                self.build_store();
                // Our children get the parent's global TTL, unchanged (seed example 1).
                self.cfg.hb_ttl_ms = hb;
                self.upstream = Upstream::Connected {
                    volume_id,
                    hb_ttl_ms: hb,
                    deadline: now + u64::from(hb),
                };
                self.next_heartbeat = Some(now + u64::from(hb / 3).max(1));
                tracing::info!(
                    volume_id,
                    chunk_size = self.chunk_size,
                    volume_size = self.volume_size,
                    "connected to parent"
                );
            }
            _ => {
                tracing::error!(status = ?m.params.status, "parent refused CONNECT");
                self.upstream = Upstream::Idle;
            }
        }
        let m = Message {
            params: canopy_proto::Params { status, ..m.params },
            ..m
        };
        self.release_waiting_connects(now);
        // PUTs whose answers were lost with the last parent go again.
        self.resend_puts(now);
        let waiting = std::mem::take(&mut self.waiting_local);
        for (id, op) in waiting {
            if self.is_ready() {
                self.local(id, op, now);
            } else {
                self.local_done(
                    id,
                    Err(m.params.status.unwrap_or(Status::ParentUnavailable)),
                );
            }
        }
    }

    fn up_answered(
        &mut self,
        chunk: u64,
        xid: u32,
        sent: Millis,
        m: Message,
        ok: bool,
        now: Millis,
    ) {
        let data_len = self.data_len();
        let relay = self.is_relay();
        let Some(e) = self.table.get_mut(&chunk) else {
            return;
        };
        let Some((up_xid, kind)) = e.up else { return };
        if up_xid != xid {
            return;
        }
        e.up = None;
        if !ok && kind == UpKind::Put && m.params.status == Some(Status::InRecovery) {
            // A re-sent PUT whose first attempt is still being applied
            // above: ask again shortly (`retry.rs`).
            if self.put_in_recovery(chunk, xid, now) {
                return;
            }
        }
        let Some(e) = self.table.get_mut(&chunk) else {
            return;
        };
        e.sent_put = None;
        if !ok {
            // `flush_up` cleared `dirty` when it sent our copy, but a refused
            // FLUSH may not have stored it. While we still hold WRITE our copy
            // is the newest there is, so sending it again later is harmless
            // and losing track of it is not.
            if kind == UpKind::Flush && e.held == Perm::Write && e.has_data && !e.dirty {
                e.dirty = true;
                self.dirty.insert(chunk);
            }
            if kind == UpKind::Put && !e.dirty {
                // The parent may have applied the PUT before failing it (the
                // root's origin took the data but its fdatasync failed), so
                // the bytes we and our children hold may be older than what
                // it serves now: drop ours (the permission stays, as in the
                // parent's record; the bytes are fetched again when needed)
                // and recall theirs before anything else is served on the
                // chunk. A child's dirty data comes back in its answer.
                let victims: Vec<_> = e
                    .children
                    .iter()
                    .filter(|(c, _)| !e.recall.iter().any(|(r, _)| r == c))
                    .map(|(c, _)| *c)
                    .collect();
                self.revoke(chunk);
                self.drop_bytes(chunk);
                if !victims.is_empty() {
                    self.start_recall(chunk, victims, Perm::No);
                }
            }
            let status = m.params.status.unwrap_or(Status::IoError);
            self.fail_head(chunk, status);
            if let Some(e) = self.table.get_mut(&chunk) {
                e.queue.pop_front();
            }
            self.run(chunk, now);
            return;
        }
        let granted = m.params.permissions.unwrap_or(Perm::No);
        // TTL is counted from when we asked, so it covers the round trip and
        // our grant always ends before our parent's (seed example 1).
        let expiry = sent + u64::from(m.params.ttl_ms.unwrap_or(0));
        match kind {
            UpKind::Flush => {}
            UpKind::Acquire => {
                let need_data = self.chunk_size > 0 && !e.has_data;
                let bad_size = m.params.data.as_ref().is_some_and(|d| d.len() != data_len);
                if granted == Perm::No || bad_size || (need_data && m.params.data.is_none()) {
                    tracing::warn!(chunk, ?granted, "parent's grant unusable");
                    e.held = e.held.max(granted);
                    self.fail_head(chunk, Status::NoPermission);
                    if let Some(e) = self.table.get_mut(&chunk) {
                        e.queue.pop_front();
                    }
                    self.run(chunk, now);
                    return;
                }
                e.held = granted;
                e.expiry = Some(expiry);
                // A dirty copy is newer than the parent's (we held WRITE all
                // along; only our TTL ran out): keep ours, and its version.
                if !e.dirty {
                    e.version = m.params.version.unwrap_or(0);
                }
                if let Some(d) = m.params.data {
                    if !e.dirty {
                        self.set_bytes(chunk, d);
                    }
                } else if self.chunk_size == 0 {
                    self.set_bytes(chunk, bytes::Bytes::new());
                }
            }
            UpKind::Put => {
                // Our write is in; what we hold is what the parent says now
                // (it never lowers a record, so this is not less than our
                // children hold).
                let put = put_data(e);
                // A relay's copy is the writer's record, sealed under the
                // floor it sent; if the root chose another version, that
                // record must not be served as the chunk's: fetched again.
                let misversioned = relay && put_version(e) != m.params.version;
                // A semi-sync PUT left the data with the parent only: dropping
                // our copy later owes a FORWARD.
                let semi = matches!(
                    e.queue.front().map(|p| &p.req),
                    Some(crate::entry::Req::Write {
                        semi: true,
                        sync: false,
                        ..
                    })
                );
                if granted > Perm::No {
                    e.held = granted;
                    e.expiry = Some(expiry);
                    e.version = m.params.version.unwrap_or(0);
                    e.dirty = false;
                    e.forward_duty = semi;
                    self.dirty.remove(&chunk);
                    if misversioned {
                        self.drop_bytes(chunk);
                    } else if let Some(d) = put {
                        self.set_bytes(chunk, d);
                    }
                } else {
                    self.drop_copy(chunk);
                }
                if let Some(p) = self.table.get_mut(&chunk).and_then(|e| e.queue.front_mut()) {
                    p.applied = true;
                    p.propagated = true;
                }
            }
        }
        self.run(chunk, now);
    }

    fn parent_invalidate(&mut self, m: Message, now: Millis) {
        let xid = m.header.xid;
        let (Some(chunk), Some(target)) = (m.params.block_num, m.params.permissions) else {
            self.send_parent(Message::err_reply(xid, Status::MissingParam));
            return;
        };
        if m.params.volume_id != self.parent_volume_id() {
            self.send_parent(Message::err_reply(xid, Status::NoSuchVolume));
            return;
        }
        self.stats.invalidates_received += 1;
        if !self.table.contains_key(&chunk) {
            let mut r = Message::new(Opcode::OkReply, xid);
            r.params.permissions = Some(Perm::No);
            self.send_parent(r);
            return;
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            e.parent_inval.push_back((xid, target));
        }
        self.run(chunk, now);
    }

    fn parent_push(&mut self, m: Message, now: Millis) {
        let (Some(chunk), Some(data)) = (m.params.block_num, m.params.data) else {
            return;
        };
        if m.params.volume_id != self.parent_volume_id() || data.len() != self.data_len() {
            return;
        }
        // Only into an empty row: anything else is mid-transaction, and the
        // parent's record of us is corrected by its next INVALIDATE.
        let e = self.table.entry(chunk).or_default();
        if e.held != Perm::No || e.is_busy() {
            return;
        }
        e.held = m.params.permissions.unwrap_or(Perm::No).min(Perm::Read);
        if e.held == Perm::No {
            self.forget_if_idle(chunk);
            return;
        }
        e.expiry = Some(now + u64::from(m.params.ttl_ms.unwrap_or(0)));
        e.version = m.params.version.unwrap_or(0);
        self.set_bytes(chunk, data);
        self.touch(chunk);
        self.maybe_evict(now);
    }
}

/// The version (floor) a child's PUT at the head of the queue carried.
fn put_version(e: &Entry) -> Option<u64> {
    match e.queue.front().map(|p| &p.req) {
        Some(crate::entry::Req::Put { version, .. }) => Some(*version),
        _ => None,
    }
}

/// The data a PUT at the head of the queue carried, to become our own copy
/// (None: keep what we have).
fn put_data(e: &Entry) -> Option<bytes::Bytes> {
    use crate::entry::Req;
    match e.queue.front().map(|p| &p.req) {
        Some(Req::Put { data, .. }) => Some(data.clone()),
        Some(Req::Write { data, .. }) => Some(data.clone()),
        _ => None,
    }
}
