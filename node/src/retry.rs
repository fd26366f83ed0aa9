//! Re-sending a full-chunk PUT whose answer was lost with the parent
//! (issue 4, "Retries"; [`crate::NodeConfig::retry_writes`]).
//!
//! A PUT carries the whole chunk, so sending it again never merges stale
//! bytes into anything: it is the same write. What makes it safe to send
//! twice is the layer below the node. On a volume with keys each write
//! carries a single-use cookie, and the driver's link re-sends the write
//! with the record and cookie it first went with. The trusted node that
//! spends the cookie applies the write at most once: a re-send of one it
//! applied is answered from its reply cache (COOKIE_SPENT with the original
//! receipt, which the link hands the node as an OK that grants nothing),
//! one still in progress gets IN_RECOVERY (ask again shortly), and one it
//! never saw is applied now. Without such a layer a re-send could land
//! twice, over a newer write, so the node only re-sends when told to.
//!
//! While its PUT waits to go again, the chunk's row stays busy (its `up`
//! keeps the old XID), so nothing else runs on it; the write fails after
//! [`RETRY_WINDOW_HBS`] heartbeat TTLs without an answer.

use canopy_proto::{Flags, Message, Status};

use crate::entry::UpKind;
use crate::node::{Node, Outstanding};
use crate::Millis;

/// How long a PUT may wait to be answered after its first loss, in
/// heartbeat TTLs: the parent has that long to come back (or the driver
/// to reach it again) before the write fails with PARENT_UNAVAILABLE.
pub(crate) const RETRY_WINDOW_HBS: u64 = 2;

/// How long to wait before asking again after IN_RECOVERY (the first
/// attempt is still being applied above).
pub(crate) const RETRY_AGAIN_MS: Millis = 250;

/// A PUT sent up for the head request of its chunk, kept until answered.
#[derive(Debug, Clone)]
pub(crate) struct SentPut {
    /// The PUT as first sent (a re-send gets a new XID and RECOVERY_OP).
    pub msg: Message,
    /// When the write fails if still unanswered; set at its first loss.
    pub give_up: Option<Millis>,
    /// When to send it again (None: it is in flight).
    pub resend_at: Option<Millis>,
}

impl Node {
    /// Remember a PUT just sent for `chunk`'s head request, to send it
    /// again if its answer is lost.
    pub(crate) fn keep_put(&mut self, chunk: u64, msg: &Message) {
        if !self.cfg.retry_writes {
            return;
        }
        if let Some(e) = self.table.get_mut(&chunk) {
            e.sent_put = Some(SentPut {
                msg: msg.clone(),
                give_up: None,
                resend_at: None,
            });
        }
    }

    /// The parent was lost with `chunk`'s PUT unanswered: if it is kept,
    /// hold the head request for a re-send (true); otherwise the caller
    /// fails it as before (false).
    pub(crate) fn hold_put(&mut self, chunk: u64, up: Option<(u32, UpKind)>, now: Millis) -> bool {
        let window = RETRY_WINDOW_HBS * u64::from(self.cfg.hb_ttl_ms);
        let Some(e) = self.table.get_mut(&chunk) else {
            return false;
        };
        let Some((xid, UpKind::Put)) = up else {
            e.sent_put = None;
            return false;
        };
        let Some(put) = e.sent_put.as_mut() else {
            return false;
        };
        put.give_up = Some(put.give_up.unwrap_or(now + window));
        put.resend_at = Some(now);
        // Busy until answered or given up: nothing else runs on the row.
        e.up = Some((xid, UpKind::Put));
        self.resend.insert(chunk);
        tracing::info!(
            chunk,
            "parent lost with a write in flight: it goes again once reconnected"
        );
        true
    }

    /// The answer to `chunk`'s PUT was IN_RECOVERY: its first attempt is
    /// still being applied above. Ask again shortly (true), if the PUT is
    /// kept.
    pub(crate) fn put_in_recovery(&mut self, chunk: u64, xid: u32, now: Millis) -> bool {
        let window = RETRY_WINDOW_HBS * u64::from(self.cfg.hb_ttl_ms);
        let Some(e) = self.table.get_mut(&chunk) else {
            return false;
        };
        let Some(put) = e.sent_put.as_mut() else {
            return false;
        };
        put.give_up = Some(put.give_up.unwrap_or(now + window));
        put.resend_at = Some(now + RETRY_AGAIN_MS);
        e.up = Some((xid, UpKind::Put));
        self.resend.insert(chunk);
        true
    }

    /// Send the PUTs that are due again (when connected), and fail those
    /// past their window. Called once connected, and from the timers.
    pub(crate) fn resend_puts(&mut self, now: Millis) {
        let due: Vec<u64> = self.resend.iter().copied().collect();
        for chunk in due {
            let Some(put) = self.table.get(&chunk).and_then(|e| e.sent_put.clone()) else {
                self.resend.remove(&chunk);
                continue;
            };
            if put.give_up.is_some_and(|t| now >= t) {
                self.give_up_put(chunk, now);
                continue;
            }
            let Some(volume_id) = self.parent_volume_id() else {
                continue;
            };
            if put.resend_at.is_some_and(|t| now < t) {
                continue;
            }
            let xid = self.alloc_xid(Outstanding::Up { chunk, sent: now });
            let mut m = put.msg.clone();
            m.header.xid = xid;
            m.header.flags = m.header.flags.with(Flags::RECOVERY_OP);
            m.params.volume_id = Some(volume_id);
            if let Some(e) = self.table.get_mut(&chunk) {
                e.up = Some((xid, UpKind::Put));
                if let Some(p) = e.sent_put.as_mut() {
                    p.resend_at = None;
                }
            }
            self.resend.remove(&chunk);
            self.stats.puts_resent += 1;
            tracing::info!(chunk, xid, "sending a write again after losing its answer");
            self.send_parent(m);
        }
    }

    /// `chunk`'s PUT found no parent in time: its write fails.
    fn give_up_put(&mut self, chunk: u64, now: Millis) {
        self.resend.remove(&chunk);
        if let Some(e) = self.table.get_mut(&chunk) {
            e.sent_put = None;
            e.up = None;
        }
        tracing::warn!(chunk, "no parent to send a write to again; it fails");
        self.fail_head(chunk, Status::ParentUnavailable);
        if let Some(e) = self.table.get_mut(&chunk) {
            e.queue.pop_front();
        }
        self.run(chunk, now);
    }

    /// The earliest PUT re-send or give-up due, for `poll_timeout`.
    pub(crate) fn next_resend(&self) -> Option<Millis> {
        let connected = self.parent_volume_id().is_some();
        self.resend
            .iter()
            .filter_map(|c| self.table.get(c).and_then(|e| e.sent_put.as_ref()))
            .filter_map(|p| {
                let at = p.resend_at.filter(|_| connected);
                match (at, p.give_up) {
                    (Some(a), Some(g)) => Some(a.min(g)),
                    (a, g) => a.or(g),
                }
            })
            .min()
    }
}
