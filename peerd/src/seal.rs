//! The seal layer between a node and its links (issue 4; DESIGN.md,
//! "Security model").
//!
//! On a volume made with keys, chunk data never crosses a link in the
//! clear. The node (`canopy-node`) always works on whole chunks and their
//! versions; this layer turns each `DATA` into a sealed record on the way
//! out and checks it on the way in, in the links' own tasks, so the node
//! task never waits on cryptography:
//!
//! - A **trusted** node (it holds the trusted key file) seals what it sends
//!   (`DATA` becomes the ciphertext, `VERIFIER` carries nonce ‖ signature,
//!   and `BLOCK_NUM`/`VERSION` are the record's chunk and version), and
//!   opens what it receives, which checks the AEAD tag. It does not check
//!   the signature: a tag that checks under the data key proves as much to
//!   a trusted node, since only trusted nodes hold either secret, and a
//!   trusted node never passes a received record on (it seals afresh).
//!   Likewise it checks a grant's MAC rather than its signature
//!   (`canopy_keys::SignedGrant`). Both cut a sealed cold read's CPU by a
//!   fifth (issue 5, B2).
//! - A **relay** (it holds only the verifying key) can do neither. It
//!   checks the signature of every record it receives, from either side,
//!   and hands the node the record as one opaque blob of
//!   [`RELAY_OVERHEAD`] bytes more than a chunk (ciphertext ‖ nonce ‖
//!   signature ‖ version), which the node stores and forwards as if it were
//!   the chunk; on the way out the blob becomes message fields again.
//!   Records that arrive together (one read from the socket) are verified
//!   as a batch.
//!
//! A record that fails its check is never given to the node: the caller
//! answers BAD_VERIFIER (see `driver.rs`), counts it, and drops it.
//!
//! **Freshness.** A grant (a message to a child with `PERMISSIONS` and a
//! non-zero `TTL`) carries a signed expiry in `GRANT`: chunk, version,
//! permission and a wall-clock deadline, signed by the trusted node that
//! made it (now + TTL). A relay cannot sign: it passes on the last grant it
//! got from its parent for the chunk. A node receiving a grant checks it
//! and lowers the `TTL` the node sees to what is left of it, and refuses a
//! grant that is missing, forged, for other contents, or already expired.
//! So a relay can withhold an INVALIDATE, or claim a longer TTL, but a
//! reader under it never uses a copy past the expiry a trusted node signed
//! (hosts' clocks must agree to well within the grant TTL, 1200 s by
//! default).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use canopy_keys::{
    SealError, SealedRecord, SignedGrant, TrustedKeys, Verifier, SEAL_OVERHEAD, VERIFIER_LEN,
};
use canopy_proto::{ConnectFlags, Message, Opcode, Perm};
use parking_lot::Mutex;

use crate::cookie::{Cookies, LinkCookies};
use crate::ledger::{Issuer, LedgerError};

/// How much longer than a chunk a relay's stored record is: the AEAD tag,
/// the verifier (nonce ‖ signature) and the version.
pub const RELAY_OVERHEAD: usize = SEAL_OVERHEAD + VERIFIER_LEN + 8;

/// The most bytes of records a relay verifies as one batch: the size of a
/// core's L2 here. Records that arrive together beyond this are verified in
/// several batches, because a batch is hashed whole before any of it is
/// repacked, and past the cache the repack reads it from memory again (B3:
/// sixteen 64 KiB records per batch ran 1.1–1.4 GB/s per core against
/// 0.8–1.0 one by one; sixteen of 1 MiB ran slower than one by one).
pub const VERIFY_BATCH_BYTES: usize = 1 << 20;

/// The keys a node's links work with, shared by all its links.
pub struct LinkKeys {
    pub(crate) kind: Kind,
    /// A relay's latest signed grant from its parent, per chunk, to pass on
    /// with its own grants of the chunk (empty on a trusted node). One
    /// entry per chunk at most, so bounded by the volume's size.
    grants: Mutex<HashMap<u64, Bytes>>,
    /// Write cookies: the pool, a relay's writes in flight (`cookie.rs`).
    pub(crate) cookies: Cookies,
    /// Grants from the parent that claimed a TTL past their signed expiry.
    overclaims: AtomicU64,
}

/// How far a grant's TTL may run past its signed expiry before it counts
/// as an overclaim. An honest parent's TTL is what it had left when it
/// sent the grant; what is left on arrival is less by the time in transit,
/// the hosts' clock skew, and the time the message sat in our socket while
/// our reader waited on a busy node, which under load runs to seconds (an
/// honest relay in the VM scenario reached 1 s thousands of times). Past
/// an HB_TTL (30 s by default) the link would have been dropped anyway.
const OVERCLAIM_SLACK_MS: u64 = 30_000;

pub(crate) enum Kind {
    /// A trusted node: seals and opens, issues and spends cookies.
    Trusted {
        keys: Arc<TrustedKeys>,
        issuer: Box<Issuer>,
    },
    /// An untrusted relay: verifies, and passes records on sealed.
    Relay(Arc<Verifier>),
}

/// Why a message's record was refused.
#[derive(Debug, thiserror::Error)]
pub enum SealFault {
    /// Chunk data without the fields a record needs.
    #[error("chunk data without {0}")]
    Missing(&'static str),
    /// The record is malformed, or its signature or tag does not check.
    #[error(transparent)]
    Bad(#[from] SealError),
    /// The record's fields are malformed (lengths).
    #[error(transparent)]
    Decode(#[from] canopy_keys::DecodeError),
    /// A grant without a valid signed expiry for what it grants.
    #[error("grant {0}")]
    Grant(&'static str),
    /// A reply to a write whose receipt is not the burnt cookie of it.
    #[error("write reply with a {0} receipt")]
    Receipt(&'static str),
}

/// Milliseconds since the epoch: signed expiries are wall-clock times, as
/// they are compared on other hosts.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a message grants, if it grants something for a while: the chunk,
/// the permission and the TTL (`PERMISSIONS` of READ or more, `TTL` above
/// zero; a zero TTL grants nothing to use).
fn grant_of(m: &Message) -> Option<(u64, Perm, u32)> {
    let perm = m.params.permissions.filter(|p| *p >= Perm::Read)?;
    let ttl = m.params.ttl_ms.filter(|t| *t > 0)?;
    Some((m.params.block_num?, perm, ttl))
}

impl LinkKeys {
    /// A trusted node's keys, with a cookie ledger in memory.
    pub fn trusted(keys: Arc<TrustedKeys>) -> Self {
        let issuer = Box::new(Issuer::in_memory(keys.clone()));
        LinkKeys {
            kind: Kind::Trusted { keys, issuer },
            grants: Mutex::new(HashMap::new()),
            cookies: Cookies::default(),
            overclaims: AtomicU64::new(0),
        }
    }

    /// A trusted node's keys, with its cookie ledger in `ledger` (loaded,
    /// or created).
    pub fn trusted_with_ledger(keys: Arc<TrustedKeys>, ledger: &Path) -> Result<Self, LedgerError> {
        let issuer = Box::new(Issuer::open(keys.clone(), ledger, wall_ms())?);
        Ok(LinkKeys {
            kind: Kind::Trusted { keys, issuer },
            grants: Mutex::new(HashMap::new()),
            cookies: Cookies::default(),
            overclaims: AtomicU64::new(0),
        })
    }

    /// A relay's verifying key.
    pub fn relay(verifier: Arc<Verifier>) -> Self {
        LinkKeys {
            kind: Kind::Relay(verifier),
            grants: Mutex::new(HashMap::new()),
            cookies: Cookies::default(),
            overclaims: AtomicU64::new(0),
        }
    }

    pub(crate) fn verifier(&self) -> &Verifier {
        match &self.kind {
            Kind::Trusted { keys: k, .. } => k.verifier(),
            Kind::Relay(v) => v,
        }
    }

    /// The volume's global identity, for CONNECT (`NodeConfig::volume_key`).
    pub fn volume_key(&self) -> [u8; 32] {
        self.verifier().id().0
    }

    /// The volume these keys are for.
    pub fn volume(&self) -> &str {
        self.verifier().volume()
    }

    /// On the way to a child: a grant gets its signed expiry (a trusted
    /// node signs now + TTL, or only MACs it for a child that opens records
    /// itself; a relay passes on its parent's).
    pub fn grant_down(&self, m: &mut Message, link: &LinkCookies) {
        let Some((chunk, perm, ttl)) = grant_of(m) else {
            return;
        };
        m.params.grant = match &self.kind {
            Kind::Trusted { keys: k, .. } => {
                let version = m.params.version.unwrap_or(0);
                let expires = wall_ms().saturating_add(u64::from(ttl));
                let g = if link.opens_records.load(Ordering::Relaxed) {
                    k.mac_grant(chunk, version, perm as u8, expires)
                } else {
                    k.sign_grant(chunk, version, perm as u8, expires)
                };
                Some(Bytes::copy_from_slice(&g.encode()))
            }
            // Without one the child refuses the grant: the relay got this
            // chunk without a grant it could pass on.
            Kind::Relay(_) => self.grants.lock().get(&chunk).cloned(),
        };
    }

    /// From the parent: check a grant's signed expiry and lower its TTL to
    /// what is left of it (a relay also keeps it, to pass on).
    pub fn grant_up(&self, m: &mut Message) -> Result<(), SealFault> {
        let Some((chunk, perm, ttl)) = grant_of(m) else {
            return Ok(());
        };
        let bytes = m
            .params
            .grant
            .take()
            .ok_or(SealFault::Grant("without a signed expiry"))?;
        let g = SignedGrant::decode(&bytes)?;
        match &self.kind {
            // The MAC proves to a trusted node what the signature would
            // (grant.rs), for a fraction of the cost.
            Kind::Trusted { keys: k, .. } => k
                .check_grant(&g)
                .map_err(|_| SealFault::Grant("with a bad MAC"))?,
            Kind::Relay(v) => v
                .verify_grant(&g)
                .map_err(|_| SealFault::Grant("with a bad signature"))?,
        }
        if g.chunk != chunk || m.params.version.is_some_and(|v| v != g.version) {
            return Err(SealFault::Grant("signed for another chunk or version"));
        }
        if g.perm < perm as u8 {
            return Err(SealFault::Grant("for more than was signed"));
        }
        let left = g.expires_ms.saturating_sub(wall_ms());
        if left == 0 {
            return Err(SealFault::Grant("past its signed expiry"));
        }
        if u64::from(ttl) > left.saturating_add(OVERCLAIM_SLACK_MS) {
            // A relay (or a parent's clock) claims more time than was
            // signed: evidence of a relay that withholds invalidations.
            self.overclaims.fetch_add(1, Ordering::Relaxed);
        }
        m.params.ttl_ms = Some(ttl.min(u32::try_from(left).unwrap_or(u32::MAX)));
        if matches!(self.kind, Kind::Relay(_)) {
            self.grants.lock().insert(chunk, bytes);
        }
        Ok(())
    }

    /// On a child link: a CONNECT from the child tells whether it opens
    /// records itself (OPENS_RECORDS), and so whether what goes to it needs
    /// signatures. A trusted node takes its word: a child that claims it
    /// falsely (a relay) gets records and grants it cannot check or pass on,
    /// which harms only it and what is below it, as dropping them would. A
    /// relay signs nothing, so it ignores the flag.
    pub fn connect_down(&self, link: &LinkCookies, m: &Message) {
        if m.header.opcode != Opcode::Connect || matches!(self.kind, Kind::Relay(_)) {
            return;
        }
        let opens = m
            .params
            .connect_flags
            .is_some_and(|f| f.contains(ConnectFlags::OPENS_RECORDS));
        link.opens_records.store(opens, Ordering::Relaxed);
    }

    /// Grants from the parent whose TTL ran past their signed expiry (each
    /// lowered to it).
    pub fn grant_overclaims(&self) -> u64 {
        self.overclaims.load(Ordering::Relaxed)
    }

    /// Turn an outgoing message's `DATA` into record fields, returning the
    /// record (a write going up bakes a cookie for it). A message the node
    /// built without a chunk number cannot be sealed; it is refused rather
    /// than sent in the clear. A trusted node's CONNECT says that it opens
    /// records itself, and a child that said so gets its records unsigned.
    pub fn outgoing(
        &self,
        m: &mut Message,
        link: &LinkCookies,
    ) -> Result<Option<SealedRecord>, SealFault> {
        if m.header.opcode == Opcode::Connect && matches!(self.kind, Kind::Trusted { .. }) {
            let flags = m.params.connect_flags.unwrap_or_default();
            m.params.connect_flags = Some(flags.with(ConnectFlags::OPENS_RECORDS));
        }
        let Some(data) = m.params.data.take() else {
            return Ok(None);
        };
        let chunk = m.params.block_num.ok_or(SealFault::Missing("BLOCK_NUM"))?;
        let version = m.params.version.unwrap_or(0);
        let rec = match &self.kind {
            // Only a child link's reader sets the flag, so whatever goes
            // up (writes, which relays check) is always signed.
            Kind::Trusted { keys: k, .. } if link.opens_records.load(Ordering::Relaxed) => {
                k.seal_unsigned(chunk, version, &data)
            }
            Kind::Trusted { keys: k, .. } => k.seal(chunk, version, &data),
            Kind::Relay(_) => unpack(chunk, data)?,
        };
        m.params.verifier = Some(Bytes::copy_from_slice(&rec.verifier_bytes()));
        m.params.version = Some(rec.version);
        m.params.data = Some(rec.ciphertext.clone());
        Ok(Some(rec))
    }

    /// Check the records of messages that arrived together, and turn each
    /// into what the node works with: the chunk (trusted) or the opaque
    /// record (relay). Returns each message's outcome, in order, with the
    /// record's digest for a write that carries a cookie (what the cookie
    /// must be bound to); a message without data always passes.
    pub fn incoming(&self, msgs: &mut [Message]) -> Vec<Result<Option<[u8; 32]>, SealFault>> {
        let mut out: Vec<Result<Option<[u8; 32]>, SealFault>> = Vec::with_capacity(msgs.len());
        let mut recs: Vec<(usize, SealedRecord)> = Vec::new();
        let id = self.verifier().id();
        for (i, m) in msgs.iter().enumerate() {
            match record_of(m) {
                Ok(Some(rec)) => {
                    let digest = m.params.cookie.is_some().then(|| rec.digest(&id));
                    recs.push((i, rec));
                    out.push(Ok(digest));
                }
                Ok(None) => out.push(Ok(None)),
                Err(e) => out.push(Err(e)),
            }
        }
        if recs.is_empty() {
            return out;
        }
        match &self.kind {
            Kind::Trusted { keys: k, .. } => {
                // The AEAD tag alone authenticates a record to a trusted
                // node (see the module's docs); the signature is the
                // relays' proof.
                for (i, rec) in recs {
                    match k.open_unverified_signature(&rec) {
                        Ok(plain) => {
                            msgs[i].params.data = Some(plain);
                            msgs[i].params.verifier = None;
                        }
                        Err(e) => out[i] = Err(e.into()),
                    }
                }
            }
            Kind::Relay(v) => {
                // Batch verification (see verify_in_batches).
                let checks = verify_in_batches(v, &recs);
                for ((i, rec), check) in recs.into_iter().zip(checks) {
                    match check {
                        Ok(()) => {
                            msgs[i].params.data = Some(pack(&rec));
                            msgs[i].params.verifier = None;
                        }
                        Err(e) => out[i] = Err(e.into()),
                    }
                }
            }
        }
        out
    }
}

/// Check the records' signatures in batches of at most
/// [`VERIFY_BATCH_BYTES`], one by one only to find the bad record if a batch
/// fails; one outcome per record, in order.
fn verify_in_batches(v: &Verifier, recs: &[(usize, SealedRecord)]) -> Vec<Result<(), SealError>> {
    let mut checks = Vec::with_capacity(recs.len());
    let mut start = 0;
    while start < recs.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < recs.len() && (end == start || bytes < VERIFY_BATCH_BYTES) {
            bytes += recs[end].1.ciphertext.len();
            end += 1;
        }
        let refs: Vec<&SealedRecord> = recs[start..end].iter().map(|(_, r)| r).collect();
        checks.extend(v.verify_each(&refs));
        start = end;
    }
    checks
}

/// The record a received message carries, if it carries data.
fn record_of(m: &Message) -> Result<Option<SealedRecord>, SealFault> {
    let Some(data) = &m.params.data else {
        return Ok(None);
    };
    let chunk = m.params.block_num.ok_or(SealFault::Missing("BLOCK_NUM"))?;
    let verifier = m
        .params
        .verifier
        .as_ref()
        .ok_or(SealFault::Missing("VERIFIER (unsealed data)"))?;
    let version = m.params.version.unwrap_or(0);
    Ok(Some(SealedRecord::from_parts(
        chunk,
        version,
        verifier,
        data.clone(),
    )?))
}

/// A relay's stored form of a record: ciphertext ‖ nonce ‖ signature ‖
/// version. The ciphertext comes first, so the node's cache keeps its first
/// chunk-size bytes in a tier's slot and only the rest aside.
fn pack(rec: &SealedRecord) -> Bytes {
    let mut b = BytesMut::with_capacity(rec.ciphertext.len() + VERIFIER_LEN + 8);
    b.put_slice(&rec.ciphertext);
    b.put_slice(&rec.verifier_bytes());
    b.put_u64_le(rec.version);
    b.freeze()
}

/// The record in a relay's stored blob (see [`pack`]).
fn unpack(chunk: u64, blob: Bytes) -> Result<SealedRecord, SealFault> {
    let tail = VERIFIER_LEN + 8;
    if blob.len() < tail + SEAL_OVERHEAD {
        return Err(SealFault::Missing("a whole stored record"));
    }
    let ct_len = blob.len() - tail;
    let verifier = blob.slice(ct_len..ct_len + VERIFIER_LEN);
    let mut v = [0u8; 8];
    v.copy_from_slice(&blob[ct_len + VERIFIER_LEN..]);
    let version = u64::from_le_bytes(v);
    Ok(SealedRecord::from_parts(
        chunk,
        version,
        &verifier,
        blob.slice(..ct_len),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_proto::IoOp;

    fn keys() -> Arc<TrustedKeys> {
        Arc::new(TrustedKeys::generate("vol").expect("keys"))
    }

    fn put(chunk: u64, version: u64, data: &[u8]) -> Message {
        let mut m = Message::new(Opcode::IoRequest, 7);
        m.params.io_op = Some(IoOp::Flush);
        m.params.block_num = Some(chunk);
        m.params.version = Some(version);
        m.params.data = Some(Bytes::copy_from_slice(data));
        m
    }

    #[test]
    fn trusted_to_relay_to_trusted() {
        let k = keys();
        let trusted = LinkKeys::trusted(k.clone());
        let relay = LinkKeys::relay(Arc::new(k.verifier().clone()));
        let plain = vec![0xAB; 4096];

        let mut m = put(3, 9, &plain);
        trusted.outgoing(&mut m, &LinkCookies::default()).unwrap();
        assert_ne!(m.params.data.as_deref(), Some(&plain[..]), "sealed");
        assert_eq!(
            m.params.verifier.as_ref().map(Bytes::len),
            Some(VERIFIER_LEN)
        );

        let mut at_relay = [m];
        assert!(relay.incoming(&mut at_relay).iter().all(Result::is_ok));
        let blob = at_relay[0].params.data.clone().unwrap();
        assert_eq!(blob.len(), plain.len() + RELAY_OVERHEAD);
        assert!(at_relay[0].params.verifier.is_none());

        let [mut m] = at_relay;
        relay.outgoing(&mut m, &LinkCookies::default()).unwrap();
        let mut at_root = [m];
        assert!(trusted.incoming(&mut at_root).iter().all(Result::is_ok));
        assert_eq!(at_root[0].params.data.as_deref(), Some(&plain[..]));
        assert_eq!(at_root[0].params.version, Some(9));
    }

    #[test]
    fn tampering_is_refused_on_both_kinds_of_node() {
        let k = keys();
        let trusted = LinkKeys::trusted(k.clone());
        let relay = LinkKeys::relay(Arc::new(k.verifier().clone()));
        let mut m = put(3, 9, &[1; 64]);
        trusted.outgoing(&mut m, &LinkCookies::default()).unwrap();

        let mut flipped = m.clone();
        let mut d = flipped.params.data.take().unwrap().to_vec();
        d[5] ^= 1;
        flipped.params.data = Some(Bytes::from(d));
        let mut other_version = m.clone();
        other_version.params.version = Some(8);
        let mut other_chunk = m.clone();
        other_chunk.params.block_num = Some(4);
        let mut unsealed = put(3, 9, &[1; 64]);
        unsealed.params.verifier = None;

        for bad in [flipped, other_version, other_chunk, unsealed] {
            for keys in [&trusted, &relay] {
                let mut msgs = [bad.clone()];
                assert!(keys.incoming(&mut msgs)[0].is_err(), "{bad}");
            }
        }
    }

    /// A reply granting READ on `chunk` at `version` for a minute.
    fn read_grant(chunk: u64, version: u64) -> Message {
        let mut g = Message::new(Opcode::OkReply, 3);
        g.params.block_num = Some(chunk);
        g.params.version = Some(version);
        g.params.permissions = Some(Perm::Read);
        g.params.ttl_ms = Some(60_000);
        g
    }

    /// The VERIFIER field with one bit flipped (`at` 0 is in the nonce,
    /// the last byte in the signature).
    fn flip_verifier(m: &Message, at: usize) -> Message {
        let mut m = m.clone();
        let mut v = m.params.verifier.take().unwrap().to_vec();
        v[at] ^= 0x80;
        m.params.verifier = Some(Bytes::from(v));
        m
    }

    #[test]
    fn a_trusted_node_needs_the_tag_and_a_relay_the_signature() {
        let k = keys();
        let trusted = LinkKeys::trusted(k.clone());
        let relay = LinkKeys::relay(Arc::new(k.verifier().clone()));
        let plain = vec![0x5A; 1000];
        let mut m = put(3, 9, &plain);
        trusted.outgoing(&mut m, &LinkCookies::default()).unwrap();

        // A spoiled signature over a genuine ciphertext: the relay refuses
        // it; a trusted node gets the genuine data, which the tag proves.
        let bad_sig = flip_verifier(&m, VERIFIER_LEN - 1);
        let mut at_relay = [bad_sig.clone()];
        assert!(relay.incoming(&mut at_relay)[0].is_err());
        let mut at_trusted = [bad_sig];
        assert!(trusted.incoming(&mut at_trusted)[0].is_ok());
        assert_eq!(at_trusted[0].params.data.as_deref(), Some(&plain[..]));

        // A spoiled nonce: the tag no longer checks, nor the signature.
        let bad_nonce = flip_verifier(&m, 0);
        for keys in [&trusted, &relay] {
            let mut msgs = [bad_nonce.clone()];
            assert!(keys.incoming(&mut msgs)[0].is_err());
        }
    }

    #[test]
    fn a_trusted_node_checks_a_grants_mac_and_a_relay_its_signature() {
        let k = keys();
        let trusted = LinkKeys::trusted(k.clone());
        let relay = LinkKeys::relay(Arc::new(k.verifier().clone()));
        let mut g = read_grant(4, 9);
        trusted.grant_down(&mut g, &LinkCookies::default());
        let bytes = g.params.grant.clone().unwrap();
        assert_eq!(bytes.len(), canopy_keys::GRANT_LEN);
        for keys in [&trusted, &relay] {
            let mut ok = g.clone();
            keys.grant_up(&mut ok).expect("an honest grant");
        }
        // Flip a bit in the signature, then in the MAC (the last bytes).
        let spoiled = |at: usize| {
            let mut m = g.clone();
            let mut b = bytes.to_vec();
            b[at] ^= 1;
            m.params.grant = Some(Bytes::from(b));
            m
        };
        let sig_at = canopy_keys::GRANT_LEN - canopy_keys::GRANT_MAC_LEN - 1;
        let mac_at = canopy_keys::GRANT_LEN - 1;
        assert!(relay.grant_up(&mut spoiled(sig_at)).is_err());
        assert!(trusted.grant_up(&mut spoiled(sig_at)).is_ok());
        assert!(relay.grant_up(&mut spoiled(mac_at)).is_ok());
        assert!(trusted.grant_up(&mut spoiled(mac_at)).is_err());
        // Another volume's keys: neither.
        let other = LinkKeys::trusted(keys());
        assert!(other.grant_up(&mut g.clone()).is_err());
    }

    #[test]
    fn a_child_that_opens_records_gets_them_and_its_grants_unsigned() {
        let k = keys();
        let parent = LinkKeys::trusted(k.clone());
        let relay = LinkKeys::relay(Arc::new(k.verifier().clone()));
        let up = LinkCookies::default();

        // A trusted child says so in its CONNECT; a relay does not.
        let connect = |keys: &LinkKeys| {
            let mut c = Message::new(Opcode::Connect, 1);
            c.params.connect_flags = Some(ConnectFlags::SYNC_WRITE);
            keys.outgoing(&mut c, &up).unwrap();
            c
        };
        let (trusted_hello, relay_hello) = (connect(&parent), connect(&relay));
        let opens = |c: &Message| {
            c.params
                .connect_flags
                .is_some_and(|f| f.contains(ConnectFlags::OPENS_RECORDS))
        };
        assert!(opens(&trusted_hello) && !opens(&relay_hello));
        assert!(trusted_hello
            .params
            .connect_flags
            .is_some_and(|f| f.contains(ConnectFlags::SYNC_WRITE)));

        // The parent's child link learns it from the CONNECT.
        let down = LinkCookies::default();
        parent.connect_down(&down, &trusted_hello);
        assert!(down.opens_records.load(Ordering::Relaxed));

        let plain = vec![0x3C; 2000];
        let mut m = put(6, 2, &plain);
        parent.outgoing(&mut m, &down).unwrap();
        let v = m.params.verifier.clone().unwrap();
        assert_eq!(&v[canopy_keys::NONCE_LEN..], &[0u8; 64][..], "unsigned");
        let mut at_child = [m.clone()];
        assert!(parent.incoming(&mut at_child)[0].is_ok());
        assert_eq!(at_child[0].params.data.as_deref(), Some(&plain[..]));
        let mut at_relay = [m];
        assert!(
            relay.incoming(&mut at_relay)[0].is_err(),
            "a relay refuses it"
        );

        let g = read_grant(6, 2);
        let mut to_child = g.clone();
        parent.grant_down(&mut to_child, &down);
        let bytes = to_child.params.grant.clone().unwrap();
        let sig = canopy_keys::GRANT_LEN - canopy_keys::GRANT_MAC_LEN - 64;
        assert_eq!(&bytes[sig..sig + 64], &[0u8; 64][..], "unsigned grant");
        parent.grant_up(&mut to_child.clone()).expect("MAC checks");
        assert!(relay.grant_up(&mut to_child).is_err(), "a relay refuses it");

        // A CONNECT without the flag (a relay, or a new connection) gets
        // everything signed again.
        parent.connect_down(&down, &relay_hello);
        assert!(!down.opens_records.load(Ordering::Relaxed));
        let mut m = put(6, 2, &plain);
        parent.outgoing(&mut m, &down).unwrap();
        assert!(relay.incoming(&mut [m])[0].is_ok());
        let mut signed = g.clone();
        parent.grant_down(&mut signed, &down);
        relay.grant_up(&mut signed).expect("signed grant");

        // A relay signs nothing, so the flag means nothing to it.
        let relay_down = LinkCookies::default();
        relay.connect_down(&relay_down, &trusted_hello);
        assert!(!relay_down.opens_records.load(Ordering::Relaxed));
    }

    #[test]
    fn a_batch_with_one_bad_record_refuses_only_that_one() {
        let k = keys();
        let trusted = LinkKeys::trusted(k.clone());
        let relay = LinkKeys::relay(Arc::new(k.verifier().clone()));
        let mut msgs: Vec<Message> = (0..8)
            .map(|i| {
                let mut m = put(i, 1, &[i as u8; 256]);
                trusted.outgoing(&mut m, &LinkCookies::default()).unwrap();
                m
            })
            .collect();
        msgs[5].params.version = Some(2);
        let out = relay.incoming(&mut msgs);
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.is_err(), i == 5, "record {i}: {r:?}");
        }
    }

    #[test]
    fn records_beyond_one_batchs_bytes_are_checked_in_several_batches() {
        let k = keys();
        let trusted = LinkKeys::trusted(k.clone());
        let relay = LinkKeys::relay(Arc::new(k.verifier().clone()));
        // Records of 2/5 of a batch's bytes: three to a batch, so seven
        // make three batches; a bad record in the first and in the last is
        // found, and only those are refused; the others come out as stored
        // records.
        let size = VERIFY_BATCH_BYTES * 2 / 5;
        assert!(3 * size >= VERIFY_BATCH_BYTES && 2 * size < VERIFY_BATCH_BYTES);
        let mut msgs: Vec<Message> = (0..7)
            .map(|i| {
                let mut m = put(i, 1, &vec![i as u8; size]);
                trusted.outgoing(&mut m, &LinkCookies::default()).unwrap();
                m
            })
            .collect();
        msgs[1].params.version = Some(2);
        msgs[6].params.block_num = Some(99);
        let out = relay.incoming(&mut msgs);
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.is_err(), i == 1 || i == 6, "record {i}: {r:?}");
        }
        for i in [0, 2, 3, 4, 5] {
            let blob = msgs[i].params.data.as_ref().unwrap();
            assert_eq!(blob.len(), size + RELAY_OVERHEAD);
        }
    }
}
