//! The Server module: CONNECT and IO_REQUEST from children, and their
//! answers to our INVALIDATEs.

use bytes::Bytes;
use canopy_proto::{ConnectFlags, Flags, IoOp, Message, Opcode, ParamType, Perm, Status};

use crate::config::WriteMode;
use crate::entry::{Req, Requester};
use crate::node::{ChildConn, Node, Outstanding, Upstream};
use crate::version::Incoming;
use crate::{ChildId, Millis};

impl Node {
    /// A message arrived from child `child`.
    pub fn handle_child(&mut self, child: ChildId, m: Message, now: Millis) {
        if let Some(chunk) = m.params.block_num {
            self.revoke(chunk);
        }
        if let Some(c) = self.children.get_mut(&child) {
            c.last_heard = now;
        }
        let xid = m.header.xid;
        match m.header.opcode {
            Opcode::Connect => self.child_connect(child, m, now),
            Opcode::Disconnect => {
                self.child_gone(child, now);
                self.send_child(child, Message::new(Opcode::OkReply, xid));
            }
            Opcode::Heartbeat => {
                if !self.children.contains_key(&child) {
                    self.send_child(child, Message::err_reply(xid, Status::NotConnected));
                    return;
                }
                let mut r = Message::new(Opcode::OkReply, xid);
                r.params.hb_ttl_ms = Some(self.cfg.hb_ttl_ms);
                self.send_child(child, r);
            }
            Opcode::IoRequest | Opcode::Forward => self.child_request(child, m, now),
            Opcode::OkReply | Opcode::ErrReply => self.child_reply(child, m, now),
            Opcode::GetCookies | Opcode::Invalidate | Opcode::Push => {
                // Cookies come with the relay work; INVALIDATE and PUSH only
                // ever travel down.
                self.send_child(child, Message::err_reply(xid, Status::Unsupported));
            }
        }
    }

    fn child_connect(&mut self, child: ChildId, m: Message, now: Millis) {
        let xid = m.header.xid;
        let name_ok = match (&m.params.volume_name, m.params.volume_id) {
            (Some(n), _) => *n == self.cfg.volume_name,
            (None, Some(id)) => id == self.cfg.child_volume_id,
            (None, None) => false,
        };
        if !name_ok {
            self.send_child(child, Message::err_reply(xid, Status::NoSuchVolume));
            return;
        }
        if m.params.key.as_deref() != self.cfg.volume_key.as_ref().map(|k| &k[..]) {
            // Keys differ, or only one side has any: the child could not
            // open what we send, or would send what we cannot verify.
            tracing::warn!(
                child,
                ours = self.cfg.volume_key.is_some(),
                theirs = m.params.key.is_some(),
                "CONNECT refused: the child's volume keys differ"
            );
            let mut e = Message::err_reply(xid, Status::BadVerifier);
            e.params.err_param = Some(ParamType::Key as u16);
            self.send_child(child, e);
            return;
        }
        match self.upstream {
            Upstream::None | Upstream::Connected { .. } => {}
            Upstream::Idle => {
                // Seed example 1: a proxy that lacks the volume connects
                // upward when its first child asks for it.
                self.waiting_connect.push((child, m));
                self.send_connect();
                return;
            }
            Upstream::Connecting | Upstream::Down => {
                self.waiting_connect.push((child, m));
                return;
            }
        }
        let mode = WriteMode::from_connect_flags(m.params.connect_flags.unwrap_or_default());
        self.children.insert(
            child,
            ChildConn {
                mode,
                last_heard: now,
            },
        );
        let mut r = Message::new(Opcode::OkReply, xid);
        r.params.volume_name = Some(self.cfg.volume_name.clone());
        r.params.volume_id = Some(self.cfg.child_volume_id);
        r.params.hb_ttl_ms = Some(self.cfg.hb_ttl_ms);
        r.params.chunk_size = Some(self.chunk_size);
        r.params.volume_size = Some(self.volume_size);
        r.params.key = self.cfg.volume_key.map(|k| Bytes::copy_from_slice(&k));
        let info = if self.is_root() {
            ConnectFlags::IS_ROOT
        } else {
            ConnectFlags::IS_PROXY
        };
        r.params.connect_flags = Some(info.with(mode.connect_flag()));
        self.send_child(child, r);
    }

    /// Answer child CONNECTs that waited for our own.
    pub(crate) fn release_waiting_connects(&mut self, now: Millis) {
        let waiting = std::mem::take(&mut self.waiting_connect);
        for (child, m) in waiting {
            if self.is_ready() {
                self.child_connect(child, m, now);
            } else {
                self.send_child(
                    child,
                    Message::err_reply(m.header.xid, Status::ParentUnavailable),
                );
            }
        }
    }

    /// Check what every IO_REQUEST needs; on failure, the ERR_REPLY to send.
    fn check_request(&self, child: ChildId, m: &Message) -> Result<(u64, WriteMode), Box<Message>> {
        let xid = m.header.xid;
        let err = |s: Status| Box::new(Message::err_reply(xid, s));
        let bad = |s: Status, p: ParamType| {
            let mut e = Message::err_reply(xid, s);
            e.params.err_param = Some(p as u16);
            Box::new(e)
        };
        let Some(conn) = self.children.get(&child) else {
            return Err(err(Status::NotConnected));
        };
        if m.header.hops_left == 0 {
            return Err(err(Status::LoopDetected));
        }
        if m.params.volume_id != Some(self.cfg.child_volume_id) {
            return Err(err(Status::NoSuchVolume));
        }
        let Some(chunk) = m.params.block_num else {
            return Err(bad(Status::MissingParam, ParamType::BlockNum));
        };
        if chunk >= self.num_chunks() {
            return Err(bad(Status::OutOfRange, ParamType::BlockNum));
        }
        if let Some(d) = &m.params.data {
            if d.len() != self.data_len() {
                return Err(bad(Status::BadParamLength, ParamType::Data));
            }
        }
        Ok((chunk, conn.mode))
    }

    fn child_request(&mut self, child: ChildId, m: Message, now: Millis) {
        let (chunk, mode) = match self.check_request(child, &m) {
            Ok(v) => v,
            Err(reply) => {
                self.send_child(child, *reply);
                return;
            }
        };
        self.stats.child_requests += 1;
        let xid = m.header.xid;
        let from = Requester::Child {
            child,
            xid,
            hops_left: m.header.hops_left,
            originator: m.header.originator,
        };
        let sync = m.header.flags.contains(Flags::FORCE_SYNC) || mode == WriteMode::Sync;
        let want = m.params.permissions.unwrap_or(Perm::No);
        let req = if m.header.opcode == Opcode::Forward {
            Req::Forward
        } else {
            match m.params.io_op {
                Some(IoOp::Get) if want == Perm::No => {
                    let mut e = Message::err_reply(xid, Status::BadParamValue);
                    e.params.err_param = Some(ParamType::Permissions as u16);
                    self.send_child(child, e);
                    return;
                }
                Some(IoOp::Get) => Req::Grant { want, lock: false },
                Some(IoOp::Lock) => {
                    let record = self
                        .table
                        .get(&chunk)
                        .map_or(Perm::No, |e| e.child_perm(child));
                    // Strictly lower is a give-up, applied at once; equal is a
                    // renewal after a TTL ran out, served in turn like a grant.
                    if want < record {
                        self.child_downgrade(chunk, child, want, xid, now);
                        return;
                    }
                    Req::Grant { want, lock: true }
                }
                Some(IoOp::Put) => {
                    let Some(data) = m.params.data.clone() else {
                        let mut e = Message::err_reply(xid, Status::MissingParam);
                        e.params.err_param = Some(ParamType::Data as u16);
                        self.send_child(child, e);
                        return;
                    };
                    Req::Put {
                        data,
                        want,
                        sync,
                        version: m.params.version.unwrap_or(0),
                    }
                }
                Some(IoOp::Flush) => match self.child_flush(
                    chunk,
                    child,
                    want,
                    m.params.data.clone(),
                    m.params.version.unwrap_or(0),
                    sync,
                    xid,
                    now,
                ) {
                    Some(req) => req,
                    None => return,
                },
                Some(IoOp::Recover) | None => {
                    // Recovery after a parent's failure is not implemented
                    // yet; say so rather than pretend.
                    self.send_child(child, Message::err_reply(xid, Status::Unsupported));
                    return;
                }
            }
        };
        self.enqueue(chunk, from, req, now);
    }

    /// LOCK to a lower permission: applied at once, since giving up never waits.
    fn child_downgrade(&mut self, chunk: u64, child: ChildId, want: Perm, xid: u32, now: Millis) {
        if let Some(e) = self.table.get_mut(&chunk) {
            e.set_child(child, want);
        }
        let mut r = Message::new(Opcode::OkReply, xid);
        r.params.permissions = Some(want);
        self.send_child(child, r);
        self.run(chunk, now);
    }

    /// A FLUSH: its data and permission change apply on arrival (the sender
    /// held WRITE when it sent it, and a crossing INVALIDATE's answer comes
    /// after it on the same link). Returns the request that must run before
    /// the reply, or None if the reply has been sent.
    #[allow(clippy::too_many_arguments)]
    fn child_flush(
        &mut self,
        chunk: u64,
        child: ChildId,
        keep: Perm,
        data: Option<Bytes>,
        version: u64,
        sync: bool,
        xid: u32,
        now: Millis,
    ) -> Option<Req> {
        let record = self
            .table
            .get(&chunk)
            .map_or(Perm::No, |e| e.child_perm(child));
        let had_data = data.is_some();
        if let Some(d) = data {
            if self.head_applied(chunk) {
                // Our own full-chunk write, already upstream, is newer.
                tracing::debug!(
                    chunk,
                    child,
                    "FLUSH data superseded by a newer full-chunk write"
                );
            } else if record == Perm::Write {
                if let Err(s) = self.store_data(chunk, d, Incoming::Exact(version)) {
                    self.send_child(child, Message::err_reply(xid, s));
                    return None;
                }
            } else {
                // Stale: the child gave the chunk up (its INVALIDATE answer,
                // carrying these bytes or newer, came first). Applying it now
                // could overwrite a later writer.
                tracing::debug!(chunk, child, "stale FLUSH data ignored");
            }
        }
        let new = record.min(keep);
        if let Some(e) = self.table.get_mut(&chunk) {
            e.set_child(child, new);
        }
        // The root answers a FLUSH that carried data once its origin write
        // is done, refusing it if the write failed (see `step_pass_up`).
        if self.is_root() && had_data && record == Perm::Write && !sync {
            return Some(Req::PassUp {
                sync: false,
                keep: Perm::Write,
            });
        }
        if sync {
            let held = self.table.get(&chunk).map_or(Perm::No, |e| e.held);
            return Some(Req::PassUp {
                sync: true,
                keep: held,
            });
        }
        // A relay vouches for no write: the data goes on up before the
        // reply, which the next trusted node's answer makes.
        if self.is_relay() && had_data && record == Perm::Write {
            return Some(Req::PassUp {
                sync: false,
                keep: Perm::Read,
            });
        }
        // A writer gave its chunk up to a proxy: pass the data on now and keep
        // a copy for reading (seed example 4), rather than sit on the only
        // copy until our own sync daemon runs.
        let proxy = self.cfg.connect_lazily && !self.is_root();
        if proxy && had_data && record == Perm::Write && new == Perm::No {
            return Some(Req::PassUp {
                sync: false,
                keep: Perm::Read,
            });
        }
        let mut r = Message::new(Opcode::OkReply, xid);
        r.params.permissions = Some(new);
        self.send_child(child, r);
        self.run(chunk, now);
        None
    }

    fn child_reply(&mut self, child: ChildId, m: Message, now: Millis) {
        let xid = m.header.xid;
        let Some(Outstanding::Invalidate {
            chunk,
            child: expected,
            target,
        }) = self.outstanding.get(&xid).cloned()
        else {
            tracing::debug!(child, xid, "reply to nothing we asked");
            return;
        };
        if expected != child {
            tracing::warn!(child, xid, "reply from the wrong child ignored");
            return;
        }
        self.outstanding.remove(&xid);
        let Some(e) = self.table.get(&chunk) else {
            return;
        };
        let record = e.child_perm(child);
        let kept = if m.header.opcode == Opcode::OkReply {
            m.params.permissions.unwrap_or(Perm::No)
        } else {
            tracing::warn!(child, chunk, status = ?m.params.status, "child refused INVALIDATE; counting it as given up");
            Perm::No
        };
        if !e.recall.iter().any(|(c, x)| *c == child && *x == xid) {
            return;
        }
        // Never more than it had, never more than we asked it to keep.
        let new = record.min(kept).min(target);
        // Dirty data recalled while the head write is already applied (its
        // full chunk went up in our PUT) predates that write: drop it.
        let superseded = self.head_applied(chunk);
        let version = m.params.version.unwrap_or(0);
        if let (Some(d), Perm::Write) = (m.params.data, record) {
            if superseded {
                tracing::debug!(
                    child,
                    chunk,
                    "recalled data superseded by a newer full-chunk write"
                );
            } else if d.len() == self.data_len() {
                let _ = self.store_data(chunk, d, Incoming::Exact(version));
            } else {
                tracing::warn!(
                    child,
                    chunk,
                    "INVALIDATE answer with a wrong-sized chunk ignored"
                );
            }
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            e.set_child(child, new);
            e.recall.retain(|(c, x)| !(*c == child && *x == xid));
        }
        self.run(chunk, now);
    }

    /// The head request's write is already in our copy and upstream: any
    /// dirty data a child sends now predates it.
    fn head_applied(&self, chunk: u64) -> bool {
        self.table
            .get(&chunk)
            .and_then(|e| e.queue.front())
            .is_some_and(|p| p.applied)
    }

    /// A child's connection closed: forget its permissions and requests.
    pub fn child_gone(&mut self, child: ChildId, now: Millis) {
        // Also when its CONNECT still waits for ours: it must not be
        // admitted once that is answered.
        self.waiting_connect.retain(|(c, _)| *c != child);
        if self.children.remove(&child).is_none() {
            return;
        }
        self.outstanding
            .retain(|_, o| !matches!(o, Outstanding::Invalidate { child: c, .. } if *c == child));
        let mut touched = Vec::new();
        let mut dropped = Vec::new();
        for (chunk, e) in self.table.iter_mut() {
            let had = e.child_perm(child);
            if had == Perm::Write {
                // With sync writes everything it acknowledged is upstream; with
                // async ones its unflushed writes die with it.
                tracing::warn!(child, chunk, "child lost while holding WRITE");
            }
            let before = e.children.len() + e.recall.len() + e.queue.len();
            e.set_child(child, Perm::No);
            e.recall.retain(|(c, _)| *c != child);
            // A request already in progress stays (its reply goes to a
            // connection that is gone); queued ones behind it are dropped,
            // and answered too: the driver learns from every answer what
            // became of a write whose cookie it admitted (here: never
            // applied), so that a retry of it is answered truly.
            let mut first = true;
            e.queue.retain(|p| {
                let keep =
                    first || !matches!(p.from, Requester::Child { child: c, .. } if c == child);
                if !keep {
                    dropped.push((*chunk, p.from.clone()));
                }
                first = false;
                keep
            });
            if before != e.children.len() + e.recall.len() + e.queue.len() {
                touched.push(*chunk);
            }
        }
        // Sorted so that a simulation replays the same actions in the
        // same order (the stable sort keeps each chunk's queue order).
        dropped.sort_by_key(|(chunk, _)| *chunk);
        for (_, from) in dropped {
            self.answer(&from, Err(Status::ParentUnavailable));
        }
        touched.sort_unstable();
        for chunk in touched {
            self.run(chunk, now);
        }
    }
}
