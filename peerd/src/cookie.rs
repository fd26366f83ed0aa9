//! Write cookies on the links of a volume with keys (issue 4; seed 001
//! "Untrusted Intermediaries"; DESIGN.md "Cookies").
//!
//! Like sealing (`seal.rs`), cookies are the links' business: the node
//! (`canopy-node`) never sees one. Every write that goes up a link (a PUT
//! or FLUSH with data, or an INVALIDATE answer carrying data) carries a
//! baked cookie in `COOKIE`, and the reply to a PUT or FLUSH carries its
//! receipt in `RECEIPT`:
//!
//! - **A trusted node's parent link** takes a sealed raw cookie from the
//!   node's pool, opens it and bakes it for the record it sends. On the
//!   reply it checks the receipt: an OK without a valid one becomes a
//!   BAD_VERIFIER refusal of the write, so the write fails (and is
//!   counted) rather than being taken as done.
//! - **A trusted node's child links** accept each write only with a valid
//!   cookie that this node issued and has not spent (`ledger.rs`), and
//!   answer a write with its receipt and a fresh cookie. A write whose
//!   cookie is spent is never applied again: the same write (a retry, or a
//!   replay) gets COOKIE_SPENT with its original receipt, or IN_RECOVERY
//!   while the original is not answered yet; another write gets
//!   COOKIE_SPENT alone. A link that closes leaves its writes' cookies in
//!   use until the node answers them (`LinkKeys::link_closed`).
//! - **A relay** cannot bake or burn. It checks each baked cookie's
//!   binding to the record and its expiry, keeps it with the record, passes
//!   it up with the record, and passes the receipt that comes back down.
//!   The signatures are the trusted nodes' to check (the one that spends
//!   the cookie, and the writer that baked it), which spares the relay two
//!   ed25519 verifications a write.
//!
//! Pools fill from `COOKIES` in write replies and from GET_COOKIES, which
//! the parent link sends itself (XIDs from `canopy_node::LINK_XIDS` up)
//! whenever the pool runs low; a child link answers GET_COOKIES with fresh
//! cookies (trusted) or from the pool (relay).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use canopy_keys::{BakedCookie, Receipt, SealedCookie, SealedRecord, SEALED_COOKIE_LEN};
use canopy_node::LINK_XIDS;
use canopy_proto::{Message, Opcode, ParamType, Perm, Status};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::seal::{Kind, LinkKeys, SealFault};

/// Cookies asked for in one GET_COOKIES (64 × 64 bytes is `MAX_OPAQUE`).
pub const GET_COOKIES_BATCH: usize = 64;
/// Ask for more once the pool holds fewer than this: about what a busy
/// writer has in flight (a ublk device's queue depth), so that writes do
/// not wait on a round trip for cookies.
pub const POOL_LOW: usize = 64;
/// Cookies handed out with every write reply (seed 001: "a new raw cookie
/// in the response" to every write). Two, not one, so that pools grow back
/// to a reserve from replies alone, also below a relay, whose own pool is
/// what it hands on, and writes that get no reply (INVALIDATE answers)
/// do not drain them.
pub const PER_REPLY: usize = 2;
/// The most cookies a pool keeps; more are dropped.
const POOL_MAX: usize = 1024;
/// The most writes a relay tracks between their cookie and their receipt.
const RELAY_WRITES_MAX: usize = 4096;
/// Retained writes (`Cookies::retained`) past which each new one first
/// drops those whose cookies expired.
const RETAINED_SWEEP: usize = 256;
/// How long a parent link waits for a GET_COOKIES answer before asking
/// again.
pub const ASK_AGAIN: Duration = Duration::from_secs(1);

/// A node's cookie counters, for `stats` (in the stats JSON as `cookies`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CookieStats {
    /// Sealed cookies handed to children (issued, or passed on by a relay).
    pub handed_out: u64,
    /// Cookies received from the parent.
    pub received: u64,
    /// Writes sent up with a baked cookie.
    pub baked: u64,
    /// Writes this node accepted with a cookie it then spent (issuer).
    pub spent: u64,
    /// Writes refused because their cookie was spent: retries answered
    /// from the reply cache, replays, conflicting uses.
    pub replays_refused: u64,
    /// Writes refused for a missing, forged, mis-bound, expired or unknown
    /// cookie.
    pub cookies_refused: u64,
    /// Receipts checked and found valid.
    pub receipts_ok: u64,
    /// Write replies from the parent with a missing or forged receipt.
    pub receipts_bad: u64,
    /// Cookies from the parent that did not open (trusted) or had the
    /// wrong length.
    pub cookies_bad: u64,
    /// Waits (of up to `ASK_AGAIN` each) of parked writes for cookies.
    pub pool_waits: u64,
    /// Writes sent up again (their answer was lost with a parent) with the
    /// record and cookie they first went with.
    #[serde(default)]
    pub resent: u64,
    /// COOKIE_SPENT answers with a valid receipt: writes that were applied
    /// before, answered from the spending node's reply cache, taken as done.
    #[serde(default)]
    pub receipts_from_cache: u64,
    /// Cookies in the pool now.
    pub pool: u64,
}

#[derive(Default)]
struct Counters {
    handed_out: AtomicU64,
    received: AtomicU64,
    baked: AtomicU64,
    spent: AtomicU64,
    replays_refused: AtomicU64,
    cookies_refused: AtomicU64,
    receipts_ok: AtomicU64,
    receipts_bad: AtomicU64,
    cookies_bad: AtomicU64,
    pool_waits: AtomicU64,
    resent: AtomicU64,
    receipts_from_cache: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The node-wide cookie state (part of [`LinkKeys`]).
#[derive(Default)]
pub struct Cookies {
    pool: Mutex<VecDeque<SealedCookie>>,
    /// Signalled when cookies arrive (a write waiting for one).
    filled: Notify,
    /// Signalled when a child took cookies (the parent link tops up).
    want: Notify,
    /// A relay's writes in flight: the baked cookie that came with each
    /// record (by record digest), then the receipt that came back.
    relay_baked: Mutex<Bounded<BakedCookie>>,
    relay_receipts: Mutex<Bounded<Bytes>>,
    /// A trusted writer's write requests sent up and not answered yet, by
    /// chunk (the node has one in flight per chunk): kept across a parent
    /// loss for the node's re-send (`LinkKeys::resend_up`).
    retained: Mutex<HashMap<u64, Retained>>,
    counters: Counters,
}

/// A write request as it went up: sealed, with its baked cookie.
struct Retained {
    /// The plaintext and version it was sealed from, to know the node's
    /// re-send for the same write.
    plain: Bytes,
    version: Option<u64>,
    /// The message as framed (sealed record, cookie), and its cookie.
    sealed: Message,
    baked: BakedCookie,
}

/// A map by record digest that forgets its oldest entries past
/// [`RELAY_WRITES_MAX`]: a relay's writes whose replies never came (their
/// writers have long failed them) must not pile up.
struct Bounded<V> {
    map: HashMap<[u8; 32], V>,
    order: VecDeque<[u8; 32]>,
}

impl<V> Default for Bounded<V> {
    fn default() -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V> Bounded<V> {
    fn insert(&mut self, k: [u8; 32], v: V) {
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
        }
        while self.map.len() > RELAY_WRITES_MAX {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        // Removed entries leave stale keys in `order`; drop them when they
        // outnumber the live ones.
        if self.order.len() > 2 * RELAY_WRITES_MAX {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }

    fn get(&self, k: &[u8; 32]) -> Option<&V> {
        self.map.get(k)
    }

    fn remove(&mut self, k: &[u8; 32]) -> Option<V> {
        self.map.remove(k)
    }
}

/// What a link remembers of the writes in flight on it, by XID.
enum Inflight {
    /// The baked cookie of a write (our own going up, or a child's we
    /// accepted).
    Baked(BakedCookie),
    /// A relay: the record digest of a write it passes on.
    Digest([u8; 32]),
}

/// One connection's cookie state, shared by its reader and writer, and
/// what its child said of itself in its CONNECT.
pub struct LinkCookies {
    inflight: Mutex<HashMap<u32, Inflight>>,
    next_xid: AtomicU32,
    asked: Mutex<Option<Instant>>,
    /// The child opens records itself (CONNECT_FLAGS OPENS_RECORDS), so
    /// records and grants to it go without signatures (`seal.rs`). Set by
    /// the reader on the child's CONNECT; until then everything is signed.
    pub(crate) opens_records: AtomicBool,
}

impl Default for LinkCookies {
    fn default() -> Self {
        LinkCookies {
            inflight: Mutex::new(HashMap::new()),
            next_xid: AtomicU32::new(LINK_XIDS),
            asked: Mutex::new(None),
            opens_records: AtomicBool::new(false),
        }
    }
}

/// Why a child's write is refused (answered in the driver).
#[derive(Debug)]
pub struct Refusal {
    /// The status of the refusal.
    pub status: Status,
    /// Why, for the log.
    pub why: &'static str,
    /// The original receipt, for a write whose cookie was spent on it.
    pub receipt: Option<Bytes>,
}

impl Refusal {
    fn cookie(why: &'static str) -> Self {
        Refusal {
            status: Status::NoPermission,
            why,
            receipt: None,
        }
    }
}

/// What to do with a reply that came up the parent link.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Give it to the node.
    Deliver,
    /// The link's own (a GET_COOKIES answer): consumed here.
    Consumed,
}

/// Whether `m` is a write going up: chunk data in a request, or in an
/// INVALIDATE answer.
pub fn is_write(m: &Message) -> bool {
    m.params.data.is_some() && matches!(m.header.opcode, Opcode::IoRequest | Opcode::OkReply)
}

fn is_reply(m: &Message) -> bool {
    matches!(m.header.opcode, Opcode::OkReply | Opcode::ErrReply)
}

impl Cookies {
    fn take_raw(&self) -> Option<SealedCookie> {
        self.pool.lock().pop_front()
    }

    fn take_bytes(&self, n: usize) -> Bytes {
        let mut pool = self.pool.lock();
        let k = n.min(pool.len());
        let mut out = BytesMut::with_capacity(k * SEALED_COOKIE_LEN);
        for c in pool.drain(..k) {
            out.extend_from_slice(c.as_bytes());
        }
        out.freeze()
    }

    fn add(&self, bytes: &[u8]) {
        let mut n = 0;
        {
            let mut pool = self.pool.lock();
            for c in bytes.chunks(SEALED_COOKIE_LEN) {
                match SealedCookie::from_bytes(c) {
                    Ok(c) if pool.len() < POOL_MAX => {
                        pool.push_back(c);
                        n += 1;
                    }
                    Ok(_) => {}
                    Err(_) => bump(&self.counters.cookies_bad, 1),
                }
            }
        }
        bump(&self.counters.received, n);
        if n > 0 {
            self.filled.notify_waiters();
        }
    }

    /// The counters now.
    pub fn stats(&self) -> CookieStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CookieStats {
            handed_out: g(&c.handed_out),
            received: g(&c.received),
            baked: g(&c.baked),
            spent: g(&c.spent),
            replays_refused: g(&c.replays_refused),
            cookies_refused: g(&c.cookies_refused),
            receipts_ok: g(&c.receipts_ok),
            receipts_bad: g(&c.receipts_bad),
            cookies_bad: g(&c.cookies_bad),
            pool_waits: g(&c.pool_waits),
            pool: self.pool.lock().len() as u64,
            resent: g(&c.resent),
            receipts_from_cache: g(&c.receipts_from_cache),
        }
    }

    /// Drop every pooled cookie (a new parent link).
    pub fn clear(&self) {
        self.pool.lock().clear();
    }

    /// Wait until cookies arrive or `timeout` passes.
    pub async fn wait_filled(&self, timeout: Duration) {
        bump(&self.counters.pool_waits, 1);
        let _ = tokio::time::timeout(timeout, self.filled.notified()).await;
    }

    /// Wait until a child takes cookies from the pool.
    pub async fn wanted(&self) {
        self.want.notified().await;
    }
}

impl LinkKeys {
    /// Whether the parent link should ask for cookies now: the pool is low
    /// and no GET_COOKIES is in flight (or it went unanswered).
    pub fn should_ask(&self, link: &LinkCookies) -> bool {
        if self.cookies.pool.lock().len() >= POOL_LOW {
            return false;
        }
        let mut asked = link.asked.lock();
        if asked.is_some_and(|t| t.elapsed() < ASK_AGAIN) {
            return false;
        }
        *asked = Some(Instant::now());
        true
    }

    /// A GET_COOKIES for the parent, on one of the link's own XIDs.
    pub fn get_cookies(&self, link: &LinkCookies) -> Message {
        let mut xid = link.next_xid.fetch_add(1, Ordering::Relaxed);
        if xid < LINK_XIDS {
            // Wrapped: start the link's range again.
            link.next_xid.store(LINK_XIDS + 1, Ordering::Relaxed);
            xid = LINK_XIDS;
        }
        Message::new(Opcode::GetCookies, xid)
    }

    /// A child's GET_COOKIES: fresh cookies from a trusted node, or what a
    /// relay's pool holds (which it then tops up).
    pub fn answer_get_cookies(&self, m: &Message, now_ms: u64) -> Message {
        let mut r = Message::new(Opcode::OkReply, m.header.xid);
        self.hand_out(&mut r, self.fresh(GET_COOKIES_BATCH, now_ms));
        // An empty answer still says "none now" rather than nothing.
        r.params.cookies.get_or_insert_with(Bytes::new);
        r
    }

    /// On the parent link, a write going up as `rec`: attach its baked
    /// cookie. `Err` when a trusted node's pool is empty: the caller parks
    /// the write (and what follows it), asks for cookies, and calls again
    /// when they come.
    /// `plain`: the write's plaintext, for a write request (kept with the
    /// sealed message and cookie until the write is answered, so that the
    /// node's re-send of it after a parent loss goes with the same ones).
    pub fn bake_up(
        &self,
        link: &LinkCookies,
        m: &mut Message,
        rec: &SealedRecord,
        plain: Option<&Bytes>,
    ) -> Result<(), NoCookie> {
        let c = &self.cookies;
        let track = m.header.opcode == Opcode::IoRequest;
        match &self.kind {
            Kind::Trusted { keys, .. } => {
                let baked = loop {
                    let sealed = c.take_raw().ok_or(NoCookie)?;
                    match keys.open_cookie(&sealed) {
                        Ok(raw) => break keys.bake(&raw, rec),
                        // Garbled on the way down: count it, try the next.
                        Err(_) => bump(&c.counters.cookies_bad, 1),
                    }
                };
                m.params.cookie = Some(Bytes::copy_from_slice(&baked.encode()));
                if let (true, Some(p)) = (track, plain) {
                    self.retain(m, p, &baked);
                }
                if track {
                    link.inflight
                        .lock()
                        .insert(m.header.xid, Inflight::Baked(baked));
                }
            }
            Kind::Relay(v) => {
                let digest = rec.digest(&v.id());
                // A write that came without a cookie goes up without one,
                // and the trusted node above refuses it. One with no reply
                // to wait for (an INVALIDATE answer) is done with it.
                let mut baked = c.relay_baked.lock();
                let b = if track {
                    baked.get(&digest).cloned()
                } else {
                    baked.remove(&digest)
                };
                drop(baked);
                if let Some(b) = b {
                    m.params.cookie = Some(Bytes::copy_from_slice(&b.encode()));
                }
                if track {
                    link.inflight
                        .lock()
                        .insert(m.header.xid, Inflight::Digest(digest));
                }
            }
        }
        bump(&c.counters.baked, 1);
        Ok(())
    }

    /// Keep a write request as sent (see `Cookies::retained`). Entries of
    /// writes never answered nor re-sent go once their cookie expires.
    fn retain(&self, m: &Message, plain: &Bytes, baked: &BakedCookie) {
        let Some(chunk) = m.params.block_num else {
            return;
        };
        let now = wall_ms();
        let mut r = self.cookies.retained.lock();
        // Answered writes leave at once; this sweep is for the rest, and
        // runs only once they are many (a writer has ~queue depth in flight).
        if r.len() >= RETAINED_SWEEP {
            r.retain(|_, w| w.baked.expires_ms > now);
        }
        r.insert(
            chunk,
            Retained {
                plain: plain.clone(),
                version: m.params.version,
                sealed: m.clone(),
                baked: baked.clone(),
            },
        );
    }

    /// On the parent link, the node's re-send (RECOVERY_OP) of a write
    /// whose answer was lost: the message as it first went, sealed, with
    /// its first cookie, on the re-send's XID. None when this write never
    /// went up with a cookie (it was waiting for one when the link was
    /// lost): it is then sealed and baked afresh, as a first send.
    pub fn resend_up(&self, link: &LinkCookies, m: &Message) -> Option<Message> {
        let chunk = m.params.block_num?;
        let plain = m.params.data.as_ref()?;
        let r = self.cookies.retained.lock();
        let w = r.get(&chunk)?;
        // The same write: same plaintext under the same version (a newer
        // write of the chunk would have replaced the entry anyway).
        if w.plain != *plain || w.version != m.params.version {
            return None;
        }
        let mut again = w.sealed.clone();
        again.header = m.header.clone();
        again.params.volume_id = m.params.volume_id;
        link.inflight
            .lock()
            .insert(m.header.xid, Inflight::Baked(w.baked.clone()));
        bump(&self.cookies.counters.resent, 1);
        Some(again)
    }

    /// A write's answer came: it is no longer kept for a re-send.
    fn answered(&self, b: &BakedCookie) {
        let mut r = self.cookies.retained.lock();
        if r.get(&b.chunk).is_some_and(|w| w.baked.value == b.value) {
            r.remove(&b.chunk);
        }
    }

    /// On the parent link, a message from the parent: pool its cookies,
    /// consume a GET_COOKIES answer, and check the receipt of a write's
    /// reply (`Err`: missing or forged, to be refused).
    pub fn reply_up(&self, link: &LinkCookies, m: &mut Message) -> Result<Delivery, SealFault> {
        let c = &self.cookies;
        if let Some(b) = m.params.cookies.take() {
            c.add(&b);
        }
        if !is_reply(m) {
            return Ok(Delivery::Deliver);
        }
        if m.header.xid >= LINK_XIDS {
            *link.asked.lock() = None;
            return Ok(Delivery::Consumed);
        }
        let Some(w) = link.inflight.lock().remove(&m.header.xid) else {
            return Ok(Delivery::Deliver);
        };
        if let Inflight::Baked(b) = &w {
            // IN_RECOVERY: the first attempt is still being applied above,
            // and the node asks again with the same record and cookie.
            if m.params.status != Some(Status::InRecovery) {
                self.answered(b);
            }
            if m.params.status == Some(Status::CookieSpent) && m.params.receipt.is_some() {
                return self.spent_with_receipt(b, m);
            }
        }
        if m.header.opcode == Opcode::ErrReply {
            if m.params.status == Some(Status::NoPermission)
                && m.params.err_param == Some(ParamType::Cookie as u16)
            {
                // Our cookies are not the parent's (it restarted since it
                // issued them, say): drop them and fetch fresh ones.
                c.pool.lock().clear();
            }
            if let Inflight::Digest(d) = w {
                c.relay_baked.lock().remove(&d);
                // A retry answered from the reply cache (COOKIE_SPENT with
                // the original receipt): the receipt goes down with the
                // refusal, for the writer to check.
                if let Some(r) = m.params.receipt.clone() {
                    c.relay_receipts.lock().insert(d, r);
                }
            }
            return Ok(Delivery::Deliver);
        }
        let baked = match &w {
            Inflight::Baked(b) => b.clone(),
            Inflight::Digest(d) => {
                // A relay passes the receipt down as it came: the writer,
                // who baked the cookie, checks it.
                c.relay_baked.lock().remove(d);
                if let Some(r) = m.params.receipt.clone() {
                    c.relay_receipts.lock().insert(*d, r);
                }
                return Ok(Delivery::Deliver);
            }
        };
        let check = m
            .params
            .receipt
            .as_ref()
            .ok_or(SealFault::Receipt("missing"))
            .and_then(|r| Receipt::decode(r).map_err(|_| SealFault::Receipt("malformed")))
            .and_then(|r| {
                self.verifier()
                    .verify_receipt(&baked, &r)
                    .map_err(|_| SealFault::Receipt("forged"))
            });
        match check {
            Ok(()) => {
                bump(&c.counters.receipts_ok, 1);
                Ok(Delivery::Deliver)
            }
            Err(e) => {
                bump(&c.counters.receipts_bad, 1);
                Err(e)
            }
        }
    }

    /// COOKIE_SPENT with a receipt, for our write `b`: the write was
    /// applied before (this is a re-send, answered from the spending
    /// node's reply cache). With a valid receipt it is done: the node gets
    /// an OK that grants nothing (it holds no permission on the chunk
    /// since the loss, and the write's data is above). A forged one fails
    /// the write like a forged receipt on an OK.
    fn spent_with_receipt(&self, b: &BakedCookie, m: &mut Message) -> Result<Delivery, SealFault> {
        let c = &self.cookies;
        let valid = m
            .params
            .receipt
            .as_ref()
            .and_then(|r| Receipt::decode(r).ok())
            .is_some_and(|r| self.verifier().verify_receipt(b, &r).is_ok());
        if !valid {
            bump(&c.counters.receipts_bad, 1);
            return Err(SealFault::Receipt("forged"));
        }
        bump(&c.counters.receipts_ok, 1);
        bump(&c.counters.receipts_from_cache, 1);
        let mut ok = Message::new(Opcode::OkReply, m.header.xid);
        ok.params.volume_id = m.params.volume_id;
        ok.params.block_num = Some(b.chunk);
        ok.params.permissions = Some(Perm::No);
        *m = ok;
        Ok(Delivery::Deliver)
    }

    /// On a child link, a write from the child whose record checked
    /// (`digest` is its record's, from [`LinkKeys::incoming`]): check its
    /// cookie, and at a trusted node admit it to the ledger.
    pub fn write_down(
        &self,
        link: &LinkCookies,
        m: &mut Message,
        digest: Option<[u8; 32]>,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let c = &self.cookies;
        let out = self.check_write(link, m, digest, now_ms);
        if let Err(r) = &out {
            let counter = if r.status == Status::CookieSpent {
                &c.counters.replays_refused
            } else {
                &c.counters.cookies_refused
            };
            bump(counter, 1);
        }
        out
    }

    fn check_write(
        &self,
        link: &LinkCookies,
        m: &mut Message,
        digest: Option<[u8; 32]>,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let bytes = m
            .params
            .cookie
            .take()
            .ok_or(Refusal::cookie("a write without a cookie"))?;
        let baked =
            BakedCookie::decode(&bytes).map_err(|_| Refusal::cookie("a malformed cookie"))?;
        // The trusted node that spends it checks the writer's signature; a
        // relay checks the cookie's binding only, and leaves the signature
        // (an ed25519 verification a write) to it.
        if matches!(self.kind, Kind::Trusted { .. }) {
            self.verifier()
                .verify_baked(&baked)
                .map_err(|_| Refusal::cookie("a forged cookie"))?;
        }
        let bound = Some(baked.chunk) == m.params.block_num
            && Some(baked.version) == m.params.version
            && Some(baked.digest) == digest;
        if !bound {
            return Err(Refusal::cookie("a cookie baked for another write"));
        }
        let track = m.header.opcode == Opcode::IoRequest;
        match &self.kind {
            Kind::Trusted { issuer, .. } => match issuer.admit(&baked, now_ms) {
                crate::ledger::Admit::Accept => {
                    if track {
                        link.inflight
                            .lock()
                            .insert(m.header.xid, Inflight::Baked(baked));
                    } else {
                        // An INVALIDATE answer has no reply to carry a
                        // receipt: it is spent now.
                        issuer.complete(&baked, true, now_ms);
                        bump(&self.cookies.counters.spent, 1);
                    }
                    Ok(())
                }
                crate::ledger::Admit::Retry(r) => Err(Refusal {
                    status: Status::CookieSpent,
                    why: "a write whose cookie is spent (retry or replay): not applied again",
                    receipt: Some(Bytes::copy_from_slice(&r.encode())),
                }),
                crate::ledger::Admit::InProgress => Err(Refusal {
                    status: Status::InRecovery,
                    why: "a retry of a write not answered yet: ask again later",
                    receipt: None,
                }),
                crate::ledger::Admit::Spent => Err(Refusal {
                    status: Status::CookieSpent,
                    why: "a cookie spent on another write",
                    receipt: None,
                }),
                crate::ledger::Admit::Unknown => {
                    Err(Refusal::cookie("a cookie not issued here, or expired"))
                }
            },
            Kind::Relay(_) => {
                if baked.expires_ms <= now_ms {
                    return Err(Refusal::cookie("an expired cookie"));
                }
                let Some(d) = digest else {
                    return Err(Refusal::cookie("a cookie baked for another write"));
                };
                self.cookies.relay_baked.lock().insert(d, baked);
                if track {
                    link.inflight
                        .lock()
                        .insert(m.header.xid, Inflight::Digest(d));
                }
                Ok(())
            }
        }
    }

    /// On a child link, a message to the child: a reply to a write gets
    /// its receipt (a trusted node spends the cookie now, if the write
    /// succeeded) and fresh cookies.
    pub fn reply_down(&self, link: &LinkCookies, m: &mut Message, now_ms: u64) {
        if !is_reply(m) {
            return;
        }
        let ok = m.header.opcode == Opcode::OkReply;
        let c = &self.cookies;
        let Some(w) = link.inflight.lock().remove(&m.header.xid) else {
            // A grant of WRITE permission is followed by a write: it
            // brings that write's cookies along. A burst of writes (mkfs
            // discarding a whole device) then finds cookies waiting, instead
            // of a GET_COOKIES round trip queued behind the burst itself.
            if ok && m.params.permissions == Some(Perm::Write) {
                let fresh = self.fresh(PER_REPLY, now_ms);
                self.hand_out(m, fresh);
            }
            return;
        };
        let fresh = match (&self.kind, w) {
            (Kind::Trusted { issuer, .. }, Inflight::Baked(b)) => {
                if let Some(r) = issuer.complete(&b, ok, now_ms) {
                    m.params.receipt = Some(Bytes::copy_from_slice(&r.encode()));
                    bump(&c.counters.spent, 1);
                }
                issuer.issue(PER_REPLY, now_ms)
            }
            (Kind::Relay(_), Inflight::Digest(d)) => {
                m.params.receipt = c.relay_receipts.lock().remove(&d);
                c.relay_baked.lock().remove(&d);
                self.fresh(PER_REPLY, now_ms)
            }
            _ => Bytes::new(),
        };
        self.hand_out(m, fresh);
    }

    /// Up to `n` cookies for a child: fresh from a trusted node; from a
    /// relay's pool, which its parent link then tops up.
    fn fresh(&self, n: usize, now_ms: u64) -> Bytes {
        match &self.kind {
            Kind::Trusted { issuer, .. } => issuer.issue(n, now_ms),
            Kind::Relay(_) => {
                let b = self.cookies.take_bytes(n);
                self.cookies.want.notify_one();
                b
            }
        }
    }

    /// Attach `fresh` cookies to a message for a child, and count them.
    fn hand_out(&self, m: &mut Message, fresh: Bytes) {
        if !fresh.is_empty() {
            bump(
                &self.cookies.counters.handed_out,
                (fresh.len() / SEALED_COOKIE_LEN) as u64,
            );
            m.params.cookies = Some(fresh);
        }
    }

    /// A link closed. At a relay, what it kept of the writes on it goes.
    /// At a trusted node the cookies of writes accepted on it stay in use:
    /// the node still answers each of those writes (applied, or failed),
    /// and the driver passes the answer to [`LinkKeys::reply_down`] with
    /// this link's state although nothing is sent, so that the cookie is
    /// spent with the write's true outcome. A retry of the write (the
    /// writer re-sending it through another path) is then told to wait
    /// (IN_RECOVERY) until that answer, and gets the original receipt or
    /// learns the write failed. Voiding them here instead would leave a
    /// retry unable to tell whether the write was applied.
    pub fn link_closed(&self, link: &LinkCookies) {
        if let Kind::Relay(_) = &self.kind {
            let inflight: Vec<Inflight> = link.inflight.lock().drain().map(|(_, w)| w).collect();
            for w in inflight {
                if let Inflight::Digest(d) = w {
                    self.cookies.relay_baked.lock().remove(&d);
                    self.cookies.relay_receipts.lock().remove(&d);
                }
            }
        }
    }

    /// Whether this node spends its children's cookies (a trusted node,
    /// not a relay).
    pub fn spends_cookies(&self) -> bool {
        matches!(self.kind, Kind::Trusted { .. })
    }

    /// Whether this link's state still waits for answers to writes it
    /// admitted (see [`LinkKeys::link_closed`]).
    pub fn awaits_answers(&self, link: &LinkCookies) -> bool {
        self.spends_cookies() && !link.inflight.lock().is_empty()
    }

    /// Make the spends recorded so far durable (at a clean stop); a no-op
    /// on a relay or without a ledger file.
    pub fn sync_ledger(&self) -> Result<(), crate::ledger::LedgerError> {
        match &self.kind {
            Kind::Trusted { issuer, .. } => issuer.sync(),
            Kind::Relay(_) => Ok(()),
        }
    }

    /// The cookie counters.
    pub fn cookie_stats(&self) -> CookieStats {
        self.cookies.stats()
    }

    /// The node-wide cookie state (pool waits).
    pub fn cookie_state(&self) -> &Cookies {
        &self.cookies
    }
}

/// Milliseconds since the epoch (cookie expiries are wall-clock times).
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A trusted node has no cookie to bake for a write yet.
#[derive(Debug)]
pub struct NoCookie;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_map_forgets_its_oldest() {
        let mut b: Bounded<u32> = Bounded::default();
        for i in 0..(RELAY_WRITES_MAX as u32 + 10) {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            b.insert(k, i);
            if i % 2 == 0 {
                b.remove(&k);
            }
        }
        assert!(b.map.len() <= RELAY_WRITES_MAX);
        assert!(b.order.len() <= 2 * RELAY_WRITES_MAX + 1);
        let mut last = [0u8; 32];
        last[..4].copy_from_slice(&(RELAY_WRITES_MAX as u32 + 9).to_le_bytes());
        assert_eq!(b.get(&last), Some(&(RELAY_WRITES_MAX as u32 + 9)));
    }

    /// A write whose link closed before the node answered it: its cookie
    /// stays in use (a retry is told to wait), and the node's answer,
    /// passed in with the closed link's state, spends it; the retry then
    /// gets the original receipt.
    #[test]
    fn an_answer_after_the_link_closed_still_spends_the_cookie() {
        use canopy_keys::TrustedKeys;
        use canopy_proto::IoOp;
        use std::sync::Arc;

        let k = Arc::new(TrustedKeys::generate("vol").expect("keys"));
        let writer = LinkKeys::trusted(k.clone());
        let root = LinkKeys::trusted(k.clone());
        let now = wall_ms();
        writer.cookies.add(&root.fresh(4, now));

        let mut m = Message::new(Opcode::IoRequest, 7);
        m.params.io_op = Some(IoOp::Put);
        m.params.block_num = Some(3);
        m.params.version = Some(9);
        m.params.data = Some(Bytes::from(vec![0xAB; 4096]));
        let rec = writer
            .outgoing(&mut m, &LinkCookies::default())
            .expect("seal")
            .expect("record");
        let wlink = LinkCookies::default();
        writer
            .bake_up(&wlink, &mut m, &rec, None)
            .expect("a cookie");
        let baked = BakedCookie::decode(m.params.cookie.as_ref().expect("baked")).expect("decode");

        let arrive = |m: &Message| {
            let mut at_root = [m.clone()];
            let d = root.incoming(&mut at_root)[0]
                .as_ref()
                .ok()
                .copied()
                .flatten();
            let [m] = at_root;
            (m, d)
        };
        let first = LinkCookies::default();
        let (mut w, d) = arrive(&m);
        root.write_down(&first, &mut w, d, now).expect("admitted");
        root.link_closed(&first);
        assert!(root.awaits_answers(&first), "the cookie stays in use");

        // A retry on another link before the answer: ask again later.
        let second = LinkCookies::default();
        let (mut retry, d) = arrive(&m);
        let r = root.write_down(&second, &mut retry, d, now);
        assert_eq!(r.map_err(|r| r.status).err(), Some(Status::InRecovery));

        // The node answers the write on the closed link.
        let mut answer = Message::new(Opcode::OkReply, 7);
        root.reply_down(&first, &mut answer, now);
        assert!(answer.params.receipt.is_some());
        assert!(!root.awaits_answers(&first));

        // The retry now gets the original receipt, not a second apply.
        let (mut retry, d) = arrive(&m);
        let refusal = root
            .write_down(&second, &mut retry, d, now)
            .expect_err("not applied again");
        assert_eq!(refusal.status, Status::CookieSpent);
        let receipt = Receipt::decode(&refusal.receipt.expect("the receipt")).expect("decode");
        k.verifier()
            .verify_receipt(&baked, &receipt)
            .expect("the original receipt");
        assert_eq!(
            answer.params.receipt.as_deref(),
            Some(&receipt.encode()[..])
        );
    }

    /// The writer's side of a re-send: the node's RECOVERY_OP write goes
    /// with the first send's record and cookie (another write does not),
    /// and COOKIE_SPENT with that write's receipt reaches the node as an
    /// OK that grants nothing; with a forged receipt it is refused.
    #[test]
    fn a_resent_write_goes_as_it_first_went() {
        use canopy_keys::TrustedKeys;
        use canopy_proto::{Flags, IoOp};
        use std::sync::Arc;

        let k = Arc::new(TrustedKeys::generate("vol").expect("keys"));
        let writer = LinkKeys::trusted(k.clone());
        let root = LinkKeys::trusted(k.clone());
        writer.cookies.add(&root.fresh(4, wall_ms()));
        let put = |xid: u32, byte: u8| {
            let mut m = Message::new(Opcode::IoRequest, xid);
            m.params.io_op = Some(IoOp::Put);
            m.params.block_num = Some(3);
            m.params.version = Some(9);
            m.params.data = Some(Bytes::from(vec![byte; 4096]));
            m
        };
        // First send, on a link that is then lost.
        let node_msg = put(7, 0xAB);
        let mut first = node_msg.clone();
        let plain = first.params.data.clone();
        let rec = writer
            .outgoing(&mut first, &LinkCookies::default())
            .expect("seal")
            .expect("record");
        writer
            .bake_up(&LinkCookies::default(), &mut first, &rec, plain.as_ref())
            .expect("a cookie");

        // The node's re-send, on a new link.
        let link = LinkCookies::default();
        let mut again = node_msg.clone();
        again.header.xid = 8;
        again.header.flags = again.header.flags.with(Flags::RECOVERY_OP);
        let sent = writer.resend_up(&link, &again).expect("the same write");
        assert_eq!(sent.header.xid, 8);
        assert!(sent.header.flags.contains(Flags::RECOVERY_OP));
        assert_eq!(sent.params.data, first.params.data, "the same record");
        assert_eq!(sent.params.cookie, first.params.cookie, "the same cookie");
        let mut other = put(9, 0xCD);
        other.header.flags = other.header.flags.with(Flags::RECOVERY_OP);
        assert!(writer.resend_up(&link, &other).is_none(), "another write");
        assert_eq!(writer.cookie_stats().resent, 1);

        // Answered from the reply cache with the true receipt: an OK that
        // grants nothing, and the write is no longer kept.
        let baked = BakedCookie::decode(sent.params.cookie.as_ref().expect("cookie")).expect("ok");
        let receipt = k.burn(&baked).encode();
        let mut spent = Message::err_reply(8, Status::CookieSpent);
        spent.params.receipt = Some(Bytes::copy_from_slice(&receipt));
        assert_eq!(
            writer.reply_up(&link, &mut spent).ok(),
            Some(Delivery::Deliver)
        );
        assert_eq!(spent.header.opcode, Opcode::OkReply);
        assert_eq!(spent.params.permissions, Some(Perm::No));
        assert_eq!(spent.params.block_num, Some(3));
        assert_eq!(writer.cookie_stats().receipts_from_cache, 1);
        assert!(
            writer.resend_up(&link, &again).is_none(),
            "answered: forgotten"
        );

        // Another write, whose re-send gets a forged receipt: refused, as
        // a forged receipt on an OK is (the write fails).
        let mut first = put(10, 0xEF);
        first.params.block_num = Some(4);
        let plain = first.params.data.clone();
        let rec = writer
            .outgoing(&mut first, &LinkCookies::default())
            .expect("seal")
            .expect("record");
        writer
            .bake_up(&LinkCookies::default(), &mut first, &rec, plain.as_ref())
            .expect("a cookie");
        let mut again = put(11, 0xEF);
        again.params.block_num = Some(4);
        again.header.flags = again.header.flags.with(Flags::RECOVERY_OP);
        writer.resend_up(&link, &again).expect("kept");
        let mut forged = Message::err_reply(11, Status::CookieSpent);
        let mut bad = receipt.to_vec();
        bad[5] ^= 1;
        forged.params.receipt = Some(Bytes::from(bad));
        assert!(writer.reply_up(&link, &mut forged).is_err());
        let s = writer.cookie_stats();
        assert_eq!((s.receipts_bad, s.receipts_from_cache, s.resent), (1, 1, 2));
    }

    #[test]
    fn pools_take_whole_cookies_only() {
        let c = Cookies::default();
        c.add(&[7u8; SEALED_COOKIE_LEN * 3 + 5]);
        let s = c.stats();
        assert_eq!((s.pool, s.received, s.cookies_bad), (3, 3, 1));
        assert_eq!(c.take_bytes(2).len(), 2 * SEALED_COOKIE_LEN);
        assert!(c.take_raw().is_some());
        assert!(c.take_raw().is_none());
    }
}
