//! A volume made with keys, through an untrusted relay, over loopback TCP:
//! root (trusted key file) ← relay (verifying key only) ← leaves (trusted).
//!
//! Between two nodes the tests can put a man in the middle, built into the
//! tests and never shipped, that reads every frame and can change it: the
//! adversary a relay operator is. For each attack the tests check that it
//! is detected and counted, that no trusted node returns wrong data to a
//! reader, and that no write is lost silently (the writer gets an error, or
//! the data is at the root).
//!
//! Every wait is bounded by `within`; nothing asserts on elapsed time.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use canopy_keys::TrustedKeys;
use canopy_peerd::config::{PeerConfig, PeerRole, Size};
use canopy_peerd::cookie::LinkCookies;
use canopy_peerd::{start_peer, Peer};
use canopy_proto::frame::{split_frame, write_frame};
use canopy_proto::{decode, Message, Opcode, Perm, Status};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::{addr, pattern, start, within};

const CHUNK: u64 = 4096;
const VOLUME: u64 = 1 << 20;

/// The volume's key files in `dir`: (trusted, relay).
fn keys(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let k = TrustedKeys::generate("vol").expect("keys");
    canopy_keys::write_new(dir, &k).expect("key files")
}

fn root_cfg(dir: &Path, keys: &Path) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Root, "vol");
    c.name = Some("A".into());
    c.listen = Some("127.0.0.1:0".into());
    c.origin = Some(dir.join("origin.img"));
    c.size = Some(Size(VOLUME));
    c.chunk_size = Some(Size(CHUNK));
    c.keys = Some(keys.to_path_buf());
    c
}

fn relay_cfg(parent: &str, verify: &Path) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Relay, "vol");
    c.name = Some("R".into());
    c.listen = Some("127.0.0.1:0".into());
    c.parent = Some(parent.to_string());
    c.verify_key = Some(verify.to_path_buf());
    c
}

fn leaf_cfg(name: &str, parent: &str, keys: Option<&Path>) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Leaf, "vol");
    c.name = Some(name.into());
    c.parent = Some(parent.to_string());
    c.keys = keys.map(Path::to_path_buf);
    // Attacks are counted here, not acted on: the tests drop the link
    // themselves where they mean to.
    c.max_parent_faults = Some(0);
    c
}

fn origin_bytes(dir: &Path, chunk: u64) -> Vec<u8> {
    let all = std::fs::read(dir.join("origin.img")).expect("origin readable");
    let start = (chunk * CHUNK) as usize;
    all[start..start + CHUNK as usize].to_vec()
}

/// What the man in the middle does to messages going one way.
#[derive(Clone, Debug, PartialEq)]
enum Attack {
    /// Nothing: pass every frame on.
    Pass,
    /// Flip one bit of the ciphertext of every message with chunk data.
    FlipData,
    /// Flip one bit of every record's signature.
    FlipSignature,
    /// Flip one bit of every record's nonce.
    FlipNonce,
    /// Serve the record of another chunk under this chunk's number (a
    /// valid record, for the wrong place).
    OtherChunk,
    /// Keep a reader on old data: drop every INVALIDATE, answering it
    /// upward as if the child had given the chunk up, and claim a TTL of
    /// an hour on every grant.
    Stale,
    /// Flip one bit of every write receipt.
    ForgeReceipt,
    /// Drop the cookie from every write.
    StripCookie,
    /// Garble every request: flag bits no peer knows.
    Garble,
    /// Garble every reply the same way.
    GarbleReplies,
    /// Truncate the next frame: a length prefix too short for any frame.
    Truncate,
    /// Keep the latest granted record of this chunk (in `captured`).
    Keep(u64),
    /// Withhold cookies: strip them from replies, drop GET_COOKIES answers.
    StarveCookies,
    /// Pass the next write (a message with a cookie) on, then close the
    /// connection both ways at once: the parent gets the write, and its
    /// answer never reaches the child.
    CutAfterWrite,
    /// Serve the kept record (an older valid version) in place of newer
    /// ones of its chunk, with its own old grant or with the new one.
    OldVersion {
        /// Also replay the old grant (else keep the message's own).
        old_grant: bool,
    },
}

/// One direction's output, shared with the other direction's pump, which
/// may answer in its place.
type Out = Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>;

/// A TCP man in the middle between a child (which connects to `addr`) and
/// its parent, that decodes every frame and applies `down` to what the
/// parent sends and `up` to what the child sends.
struct Mitm {
    addr: String,
    down: Arc<Mutex<Attack>>,
    up: Arc<Mutex<Attack>>,
    /// Messages with chunk data seen in either direction, and how many of
    /// those carried the plaintext the test wrote (must stay 0).
    records: Arc<AtomicU64>,
    /// A record seen on the way down, for `OtherChunk`.
    captured: Arc<Mutex<Option<Message>>>,
    /// Writes seen on the way up (with a cookie), and the latest
    /// connection's upward half, to replay them.
    writes: Arc<Mutex<Vec<Message>>>,
    /// COOKIE_SPENT answers seen on the way down.
    spent: Arc<Mutex<Vec<Message>>>,
    /// Connections accepted (a child that reconnects shows here).
    conns: Arc<AtomicU64>,
    up_out: Arc<Mutex<Option<Out>>>,
}

impl Mitm {
    async fn start(parent: String) -> Mitm {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let down = Arc::new(Mutex::new(Attack::Pass));
        let up = Arc::new(Mutex::new(Attack::Pass));
        let records = Arc::new(AtomicU64::new(0));
        let captured = Arc::new(Mutex::new(None));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let up_out = Arc::new(Mutex::new(None));
        let spent = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicU64::new(0));
        let m = Mitm {
            conns: conns.clone(),
            spent: spent.clone(),
            addr,
            down: down.clone(),
            up: up.clone(),
            records: records.clone(),
            captured: captured.clone(),
            writes: writes.clone(),
            up_out: up_out.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((child, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::Relaxed);
                let Ok(parent) = TcpStream::connect(&parent).await else {
                    continue;
                };
                let (cr, cw) = child.into_split();
                let (pr, pw) = parent.into_split();
                let (cw, pw): (Out, Out) = (
                    Arc::new(tokio::sync::Mutex::new(cw)),
                    Arc::new(tokio::sync::Mutex::new(pw)),
                );
                *up_out.lock() = Some(pw.clone());
                tokio::spawn(pump(
                    pr,
                    cw.clone(),
                    pw.clone(),
                    down.clone(),
                    records.clone(),
                    captured.clone(),
                    Some(spent.clone()),
                ));
                tokio::spawn(pump(
                    cr,
                    pw,
                    cw,
                    up.clone(),
                    records.clone(),
                    captured.clone(),
                    Some(writes.clone()),
                ));
            }
        });
        m
    }

    fn attack_down(&self, a: Attack) {
        *self.down.lock() = a;
    }

    fn attack_up(&self, a: Attack) {
        *self.up.lock() = a;
    }

    /// Send `m` up again, as captured, on the latest connection.
    async fn replay_up(&self, m: &Message) {
        let out = self.up_out.lock().clone().expect("a connection");
        let mut buf = BytesMut::new();
        write_frame(m, &mut buf);
        out.lock().await.write_all(&buf).await.expect("replay");
    }
}

/// Copy frames from `rd` to `wr`, applying the attack of the moment; an
/// answer the attack makes up goes back on `back`.
async fn pump(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    wr: Out,
    back: Out,
    attack: Arc<Mutex<Attack>>,
    records: Arc<AtomicU64>,
    captured: Arc<Mutex<Option<Message>>>,
    // What to keep of the messages passed on (see `Mitm::writes`, `spent`).
    writes: Option<Arc<Mutex<Vec<Message>>>>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        while let Ok(Some(frame)) = split_frame(&mut buf) {
            let Ok(mut m) = decode(&frame) else {
                return;
            };
            if m.params.data.is_some() {
                records.fetch_add(1, Ordering::Relaxed);
            }
            // Up: writes (with a cookie); down: COOKIE_SPENT answers.
            let keep = m.params.cookie.is_some() || m.params.status == Some(Status::CookieSpent);
            if let (Some(w), true) = (&writes, keep) {
                w.lock().push(m.clone());
            }
            let a = attack.lock().clone();
            if a == Attack::Truncate {
                // Once: then the stream is lost anyway.
                *attack.lock() = Attack::Pass;
                let _ = wr.lock().await.write_all(&[0, 0, 0, 1, 0xAA]).await;
                return;
            }
            if a == Attack::Stale && m.header.opcode == Opcode::Invalidate {
                // The child "gives it up" without ever hearing of it.
                let mut r = Message::new(Opcode::OkReply, m.header.xid);
                r.params.volume_id = m.params.volume_id;
                r.params.block_num = m.params.block_num;
                r.params.permissions = Some(Perm::No);
                let mut out = BytesMut::new();
                write_frame(&r, &mut out);
                if back.lock().await.write_all(&out).await.is_err() {
                    return;
                }
                continue;
            }
            let forward = tamper(&a, &mut m, &captured);
            if forward {
                let mut out = BytesMut::new();
                write_frame(&m, &mut out);
                if wr.lock().await.write_all(&out).await.is_err() {
                    return;
                }
            }
            if a == Attack::CutAfterWrite && m.params.cookie.is_some() {
                // Once. Both peers see the connection end; the other pump
                // stops when its read fails.
                *attack.lock() = Attack::Pass;
                let _ = wr.lock().await.shutdown().await;
                let _ = back.lock().await.shutdown().await;
                return;
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Apply `a` to `m`; false to drop it.
fn tamper(a: &Attack, m: &mut Message, captured: &Mutex<Option<Message>>) -> bool {
    let has_data = m.params.data.is_some();
    match a {
        Attack::Pass => {
            if has_data && m.params.verifier.is_some() {
                let mut c = captured.lock();
                if c.is_none() {
                    *c = Some(m.clone());
                }
            }
            true
        }
        Attack::FlipData if has_data => {
            let mut d = m.params.data.take().unwrap_or_default().to_vec();
            if let Some(b) = d.get_mut(17) {
                *b ^= 0x04;
            }
            m.params.data = Some(Bytes::from(d));
            true
        }
        Attack::FlipSignature if has_data => {
            let mut v = m.params.verifier.take().unwrap_or_default().to_vec();
            if let Some(b) = v.last_mut() {
                *b ^= 0x80;
            }
            m.params.verifier = Some(Bytes::from(v));
            true
        }
        Attack::FlipNonce if has_data => {
            let mut v = m.params.verifier.take().unwrap_or_default().to_vec();
            if let Some(b) = v.first_mut() {
                *b ^= 0x80;
            }
            m.params.verifier = Some(Bytes::from(v));
            true
        }
        Attack::OtherChunk if has_data => {
            if let Some(other) = captured.lock().as_ref() {
                if other.params.block_num != m.params.block_num {
                    m.params.data = other.params.data.clone();
                    m.params.verifier = other.params.verifier.clone();
                    m.params.version = other.params.version;
                }
            }
            true
        }
        Attack::Stale if m.params.ttl_ms.is_some_and(|t| t > 0) => {
            m.params.ttl_ms = Some(3_600_000);
            true
        }
        Attack::ForgeReceipt if m.params.receipt.is_some() => {
            let mut r = m.params.receipt.take().unwrap_or_default().to_vec();
            if let Some(b) = r.get_mut(3) {
                *b ^= 0x10;
            }
            m.params.receipt = Some(Bytes::from(r));
            true
        }
        Attack::Keep(chunk) if has_data && m.params.block_num == Some(*chunk) => {
            if m.params.grant.is_some() {
                *captured.lock() = Some(m.clone());
            }
            true
        }
        Attack::OldVersion { old_grant } if has_data => {
            if let Some(old) = captured.lock().as_ref() {
                if old.params.block_num == m.params.block_num
                    && old.params.version != m.params.version
                {
                    m.params.data = old.params.data.clone();
                    m.params.verifier = old.params.verifier.clone();
                    m.params.version = old.params.version;
                    if *old_grant {
                        m.params.grant = old.params.grant.clone();
                    }
                }
            }
            true
        }
        Attack::StarveCookies => {
            m.params.cookies = None;
            m.header.xid < 0xFFFF_0000
        }
        Attack::StripCookie => {
            m.params.cookie = None;
            true
        }
        Attack::Garble if m.header.opcode == Opcode::IoRequest => {
            m.header.flags = canopy_proto::Flags(m.header.flags.0 | 0x4000);
            true
        }
        Attack::GarbleReplies if m.header.opcode == Opcode::OkReply => {
            m.header.flags = canopy_proto::Flags(m.header.flags.0 | 0x4000);
            true
        }
        _ => true,
    }
}

/// A tree with keys: root A, relay R, and `leaves` leaves, each leaf
/// behind its own man in the middle to R, and R behind one to A.
struct Tree {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    root: Peer,
    relay: Peer,
    above_relay: Mitm,
    below_relay: Vec<Mitm>,
    leaves: Vec<Peer>,
}

async fn tree(leaves: usize) -> Tree {
    tree_with_ttl(leaves, None).await
}

/// The tree, the root's grants lasting `grant_ttl_ms` if given.
async fn tree_with_ttl(leaves: usize, grant_ttl_ms: Option<u64>) -> Tree {
    tree_with(leaves, grant_ttl_ms, None).await
}

/// The tree, with the root's grant TTL and HB_TTL if given.
async fn tree_with(leaves: usize, grant_ttl_ms: Option<u64>, hb_ttl_ms: Option<u64>) -> Tree {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (trusted, verify) = keys(&dir.join("keys"));
    let mut root_cfg = root_cfg(&dir, &trusted);
    root_cfg.grant_ttl = grant_ttl_ms.map(canopy_peerd::config::Millis);
    root_cfg.hb_ttl = hb_ttl_ms.map(canopy_peerd::config::Millis);
    let root = start(root_cfg).await;
    let above_relay = Mitm::start(addr(&root)).await;
    let relay = {
        let cfg = relay_cfg(&above_relay.addr, &verify);
        cfg.validate("test").expect("valid relay config");
        start_peer(&cfg).await.expect("relay starts")
    };
    let mut below_relay = Vec::new();
    let mut peers = Vec::new();
    for i in 0..leaves {
        let m = Mitm::start(addr(&relay)).await;
        let name = format!("L{i}");
        peers.push(start(leaf_cfg(&name, &m.addr, Some(&trusted))).await);
        below_relay.push(m);
    }
    Tree {
        _dir: tmp,
        dir,
        root,
        relay,
        above_relay,
        below_relay,
        leaves: peers,
    }
}

/// Read `chunk` until a read succeeds (the leaf may be dialling its parent
/// again after an attack), at most 100 tries 50 ms apart.
async fn read_eventually(h: &canopy_peerd::NodeHandle, chunk: u64) -> Option<Bytes> {
    for _ in 0..100 {
        if let Ok(d) = within("read", h.read(chunk)).await {
            return Some(d);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

async fn stats(p: &Peer) -> canopy_peerd::driver::PeerStats {
    within("stats", p.handle().stats()).await.expect("stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_cross_the_relay_sealed() {
    let t = tree(2).await;
    let (h0, h1) = (t.leaves[0].handle(), t.leaves[1].handle());
    let a = pattern(0x31, CHUNK as usize);
    within("write", h0.write(5, 0, a.clone(), true))
        .await
        .unwrap();
    assert_eq!(origin_bytes(&t.dir, 5), a.to_vec());
    let seen = within("read through the relay", h1.read(5)).await.unwrap();
    assert_eq!(seen, a);
    // A partial write from the other leaf, then the first reads it back.
    let b = pattern(0x90, 100);
    within("partial write", h1.write(5, 1000, b.clone(), true))
        .await
        .unwrap();
    let seen = within("read back", h0.read(5)).await.unwrap();
    assert_eq!(&seen[1000..1100], &b[..]);
    assert_eq!(&seen[..1000], &a[..1000]);

    // Every record that crossed a link was sealed: the men in the middle
    // saw records, never the plaintext.
    let seen_records: u64 = std::iter::once(&t.above_relay)
        .chain(t.below_relay.iter())
        .map(|m| m.records.load(Ordering::Relaxed))
        .sum();
    assert!(seen_records >= 4, "records seen: {seen_records}");
    for m in std::iter::once(&t.above_relay).chain(t.below_relay.iter()) {
        let captured = m.captured.lock();
        let rec = captured.as_ref().expect("a record crossed every link");
        {
            let d = rec.params.data.as_ref().unwrap();
            assert_eq!(d.len(), CHUNK as usize + canopy_keys::SEAL_OVERHEAD);
            assert!(
                !d.windows(64).any(|w| w == &a[..64] || w == &a[1000..1064]),
                "plaintext on the wire"
            );
        }
    }
    let r = stats(&t.relay).await;
    assert_eq!(r.bad_records, 0);
    assert!(r.cache.is_some(), "the relay caches records");
    for p in [&t.root, &t.leaves[0], &t.leaves[1]] {
        assert_eq!(stats(p).await.bad_records, 0);
    }
    for p in [&t.relay, &t.leaves[0], &t.leaves[1]] {
        assert_eq!(
            stats(p).await.grant_overclaims,
            0,
            "an honest grant counted"
        );
    }
}

/// For an attack on what the relay sends a reader: the reader refuses the
/// record (BAD_VERIFIER, counted) and never returns anything but the
/// written data.
async fn reader_refuses(attack: Attack) {
    let t = tree(2).await;
    let (h0, h1) = (t.leaves[0].handle(), t.leaves[1].handle());
    // Two chunks written and read once, so `OtherChunk` has a record of
    // chunk 3 to serve for chunk 4.
    let a = pattern(0x41, CHUNK as usize);
    let b = pattern(0x52, CHUNK as usize);
    within("write 3", h0.write(3, 0, a.clone(), true))
        .await
        .unwrap();
    within("write 4", h0.write(4, 0, b.clone(), true))
        .await
        .unwrap();
    assert_eq!(within("read 3", h1.read(3)).await.unwrap(), a);
    // Drop leaf 1's copy of chunk 4 so that its next read crosses the link.
    t.below_relay[1].attack_down(attack.clone());
    let before = stats(&t.leaves[1]).await.bad_records;
    let r = within("attacked read", h1.read(4)).await;
    match &r {
        Ok(d) => assert_eq!(d, &b, "{attack:?}: a reader got wrong data"),
        Err(e) => assert!(
            e.to_string().contains("BAD_VERIFIER"),
            "{attack:?}: unexpected error {e}"
        ),
    }
    let after = stats(&t.leaves[1]).await;
    assert!(
        after.bad_records > before,
        "{attack:?}: not detected (read returned {r:?})"
    );
    assert_eq!(after.bad_records_from_parent, after.bad_records);
    // Once the link is honest again, the reader gets the data.
    t.below_relay[1].attack_down(Attack::Pass);
    assert_eq!(within("honest read", h1.read(4)).await.unwrap(), b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_data_is_refused() {
    reader_refuses(Attack::FlipData).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_nonce_is_refused() {
    reader_refuses(Attack::FlipNonce).await;
}

/// A trusted reader opens a record by its AEAD tag alone, so a spoiled
/// signature over genuine ciphertext costs it nothing: it reads the right
/// data and counts no bad record. (A relay refuses such a record:
/// `the_relay_verifies_before_storing_or_forwarding`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_reader_needs_only_the_tag() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    // A chunk the leaf never held, so that its read crosses the link.
    t.below_relay[0].attack_down(Attack::FlipSignature);
    let below = &t.below_relay[0].records;
    let (bad0, seen0) = (
        stats(&t.leaves[0]).await.bad_records,
        below.load(Ordering::Relaxed),
    );
    let zeros = within("read", h.read(11)).await.unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
    assert!(
        below.load(Ordering::Relaxed) > seen0,
        "no record crossed the spoiling link"
    );
    assert_eq!(stats(&t.leaves[0]).await.bad_records, bad0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_chunks_record_is_refused() {
    reader_refuses(Attack::OtherChunk).await;
}

/// Signatures go only where they are checked: a trusted leaf straight
/// under the root says in its CONNECT that it opens records itself, and
/// the root sends it records and grants without signatures (the man in the
/// middle sees them all zero), while the relay gets them signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_go_only_to_nodes_that_check_them() {
    let t = tree(1).await;
    let trusted = t.dir.join("keys/vol.key");
    assert!(trusted.exists(), "{}", trusted.display());
    let direct = Mitm::start(addr(&t.root)).await;
    let leaf = start(leaf_cfg("D", &direct.addr, Some(&trusted))).await;
    let zeros = within("direct read", leaf.handle().read(12)).await.unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
    let through = within("relayed read", t.leaves[0].handle().read(13))
        .await
        .unwrap();
    assert!(through.iter().all(|&b| b == 0));

    let signature = |m: &Message| {
        let v = m.params.verifier.clone().expect("a record");
        let g = m.params.grant.clone().expect("a grant");
        let at = canopy_keys::GRANT_LEN - canopy_keys::GRANT_MAC_LEN - 64;
        (
            v[canopy_keys::NONCE_LEN..].to_vec(),
            g[at..at + 64].to_vec(),
        )
    };
    let seen = direct
        .captured
        .lock()
        .clone()
        .expect("a record to the leaf");
    let (rec_sig, grant_sig) = signature(&seen);
    assert_eq!((rec_sig, grant_sig), (vec![0; 64], vec![0; 64]), "unsigned");
    let seen = t
        .above_relay
        .captured
        .lock()
        .clone()
        .expect("a record to R");
    let (rec_sig, grant_sig) = signature(&seen);
    assert!(rec_sig != vec![0; 64] && grant_sig != vec![0; 64], "signed");
    leaf.shutdown().await;
}

/// Tampering with a write on its way to the root: the root refuses it
/// (BAD_VERIFIER, counted), the writer gets an error, and the root's copy
/// stays as it was. Nothing is acknowledged that the root does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_write_is_refused_and_the_writer_told() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    let a = pattern(0x61, CHUNK as usize);
    within("write", h.write(6, 0, a.clone(), true))
        .await
        .unwrap();
    t.above_relay.attack_up(Attack::FlipData);
    let b = pattern(0x72, CHUNK as usize);
    let r = within("attacked write", h.write(6, 0, b.clone(), true)).await;
    let root = stats(&t.root).await;
    assert!(root.bad_records >= 1, "root did not detect: {r:?}");
    match r {
        Err(e) => {
            assert!(e.to_string().contains("BAD_VERIFIER"), "{e}");
            assert_eq!(origin_bytes(&t.dir, 6), a.to_vec(), "refused write landed");
        }
        Ok(()) => panic!("a write the root refused was acknowledged"),
    }
    // The writer retries on an honest link, and it lands.
    t.above_relay.attack_up(Attack::Pass);
    within("retry", h.write(6, 0, b.clone(), true))
        .await
        .unwrap();
    assert_eq!(origin_bytes(&t.dir, 6), b.to_vec());
}

/// The relay itself checks what it is given: a record with a bad
/// signature from above is refused at the relay (counted there) and never
/// reaches the leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_verifies_before_storing_or_forwarding() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    let a = pattern(0x13, CHUNK as usize);
    within("write", h.write(2, 0, a.clone(), true))
        .await
        .unwrap();
    // A fresh chunk the relay has not cached: the read crosses A → R.
    t.above_relay.attack_down(Attack::FlipSignature);
    let r = within("attacked read", h.read(9)).await;
    assert!(r.is_err(), "read through a forged record succeeded: {r:?}");
    let relay = stats(&t.relay).await;
    assert!(relay.bad_records >= 1, "the relay did not check: {relay:?}");
    assert_eq!(stats(&t.leaves[0]).await.bad_records, 0, "forwarded");
    t.above_relay.attack_down(Attack::Pass);
    let zeros = within("honest read", h.read(9)).await.unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_keys_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (trusted, _verify) = keys(&tmp.path().join("keys"));
    let (other, _) = keys(&tmp.path().join("other"));
    let root = start(root_cfg(tmp.path(), &trusted)).await;
    for keys in [None, Some(other.as_path())] {
        let cfg = leaf_cfg("X", &addr(&root), keys);
        let peer = start_peer(&cfg).await.expect("leaf starts");
        let r = within("refused", peer.ready()).await;
        match r {
            Err(canopy_peerd::DriverError::Refused(Status::BadVerifier)) => {}
            other => panic!("keys {keys:?}: expected a BAD_VERIFIER refusal, got {other:?}"),
        }
        peer.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_for_another_volume_stops_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let k = TrustedKeys::generate("other").unwrap();
    let (trusted, _) = canopy_keys::write_new(tmp.path(), &k).unwrap();
    let cfg = root_cfg(tmp.path(), &trusted);
    let e = start_peer(&cfg).await.err().expect("refused");
    assert!(e.to_string().contains("other"), "{e}");
}

/// Freshness: a relay that withholds an INVALIDATE (answering it upward
/// itself) and claims a TTL of an hour can keep a reader on old data only
/// until the expiry the root signed (2 s here), never longer: once it has
/// passed, the reader asks again and reads the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_invalidation_delays_a_reader_no_longer_than_the_signed_expiry() {
    let t = tree_with_ttl(2, Some(2_000)).await;
    let (writer, reader) = (t.leaves[0].handle(), t.leaves[1].handle());
    t.below_relay[1].attack_down(Attack::Stale);
    let old = within("first read", reader.read(8)).await.unwrap();
    assert!(old.iter().all(|&b| b == 0));
    let new = pattern(0x77, CHUNK as usize);
    within("write", writer.write(8, 0, new.clone(), true))
        .await
        .unwrap();
    // Within the signed expiry the reader may still see the old contents;
    // that much delay a relay can cause.
    let early = within("early read", reader.read(8)).await.unwrap();
    assert!(early == old || early == new);
    // Past it, never. (The wait is for the protocol's timer; nothing here
    // asserts on how long anything took.)
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let late = within("late read", reader.read(8)).await.unwrap();
    assert_eq!(late, new, "the reader used a grant past its signed expiry");
    // The relay's claim of an hour is caught and counted.
    assert!(stats(&t.leaves[1]).await.grant_overclaims >= 1);
    assert_eq!(stats(&t.leaves[0]).await.grant_overclaims, 0, "honest path");
}

/// A grant whose signed expiry a relay replays after it passed is refused
/// (and so is one without a signed expiry at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_without_a_valid_signed_expiry_are_refused() {
    use canopy_peerd::seal::LinkKeys;
    let k = Arc::new(TrustedKeys::generate("vol").unwrap());
    let trusted = LinkKeys::trusted(k.clone());
    let mut grant = Message::new(Opcode::OkReply, 3);
    grant.params.block_num = Some(4);
    grant.params.version = Some(9);
    grant.params.permissions = Some(Perm::Read);
    grant.params.ttl_ms = Some(60_000);

    let mut unsigned = grant.clone();
    assert!(trusted.grant_up(&mut unsigned).is_err(), "unsigned grant");

    let mut signed = grant.clone();
    trusted.grant_down(&mut signed, &LinkCookies::default());
    let mut ok = signed.clone();
    trusted.grant_up(&mut ok).expect("a fresh grant");
    assert!(ok.params.ttl_ms.unwrap() <= 60_000);

    let mut other_version = signed.clone();
    other_version.params.version = Some(8);
    assert!(
        trusted.grant_up(&mut other_version).is_err(),
        "other version"
    );
    let mut more = signed.clone();
    more.params.permissions = Some(Perm::Write);
    assert!(trusted.grant_up(&mut more).is_err(), "more than signed");

    let expired = k.sign_grant(4, 9, Perm::Read as u8, 1);
    let mut replayed = grant.clone();
    replayed.params.grant = Some(Bytes::copy_from_slice(&expired.encode()));
    assert!(trusted.grant_up(&mut replayed).is_err(), "expired grant");

    // A zero TTL grants nothing to use: no signature needed.
    let mut zero = grant.clone();
    zero.params.ttl_ms = Some(0);
    assert!(trusted.grant_up(&mut zero).is_ok());
}

/// The cookies of a peer (a volume with keys has them).
async fn cookies(p: &Peer) -> canopy_peerd::cookie::CookieStats {
    stats(p)
        .await
        .cookies
        .expect("cookie stats on a volume with keys")
}

/// Writes through the relay carry cookies the root spends once, and come
/// back with receipts the writer checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_authorised_by_cookies_and_answered_with_receipts() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    for i in 0..3u8 {
        let d = pattern(0x20 + i, CHUNK as usize);
        within("write", h.write(u64::from(i), 0, d.clone(), true))
            .await
            .unwrap();
        assert_eq!(origin_bytes(&t.dir, u64::from(i)), d.to_vec());
    }
    let leaf = cookies(&t.leaves[0]).await;
    assert!(leaf.baked >= 3, "{leaf:?}");
    assert!(leaf.receipts_ok >= 3, "{leaf:?}");
    assert_eq!(leaf.receipts_bad, 0);
    let relay = cookies(&t.relay).await;
    assert!(relay.handed_out >= 1 && relay.baked >= 3, "{relay:?}");
    let root = cookies(&t.root).await;
    assert!(root.spent >= 3, "{root:?}");
    assert_eq!(root.cookies_refused + root.replays_refused, 0, "{root:?}");
}

/// A grant of WRITE brings cookies for the write that follows it, through
/// the relay's pool: a burst of writes does not wait on a GET_COOKIES round
/// trip queued behind the burst itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_grant_brings_cookies() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    // Both pools filled by their GET_COOKIES first, so that the relay has
    // cookies to pass on.
    let mut filled = false;
    for _ in 0..200 {
        if cookies(&t.relay).await.pool > 2 && cookies(&t.leaves[0]).await.pool > 0 {
            filled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(filled, "the pools never filled");
    let before = cookies(&t.leaves[0]).await;
    within("lock", h.lock(5, Perm::Write)).await.expect("lock");
    let after = cookies(&t.leaves[0]).await;
    assert_eq!(
        after.received,
        before.received + canopy_peerd::cookie::PER_REPLY as u64,
        "{before:?} then {after:?}"
    );
    assert_eq!(after.baked, before.baked, "no write went up");
}

/// A relay replays a captured write after a newer one landed: the root
/// refuses it (COOKIE_SPENT, counted) and the newer data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_write_is_refused() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    let a = pattern(0x41, CHUNK as usize);
    within("write a", h.write(4, 0, a.clone(), true))
        .await
        .unwrap();
    let old = t
        .above_relay
        .writes
        .lock()
        .last()
        .cloned()
        .expect("captured");
    let b = pattern(0x42, CHUNK as usize);
    within("write b", h.write(4, 0, b.clone(), true))
        .await
        .unwrap();
    t.above_relay.replay_up(&old).await;
    let mut refused = 0;
    for _ in 0..100 {
        refused = cookies(&t.root).await.replays_refused;
        if refused > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused >= 1, "the replay was not refused");
    assert_eq!(origin_bytes(&t.dir, 4), b.to_vec(), "the replay landed");
    let seen = within("read", h.read(4)).await.unwrap();
    assert_eq!(seen, b);
    // The answer is the one a retry of that write needs: COOKIE_SPENT with
    // the write's original receipt, from the ledger's reply cache.
    let answer = t
        .above_relay
        .spent
        .lock()
        .iter()
        .find(|m| m.header.xid == old.header.xid)
        .cloned()
        .expect("the root answered the replay");
    let verifier = canopy_keys::Verifier::load(&t.dir.join("keys/vol.verify")).unwrap();
    let baked = canopy_keys::BakedCookie::decode(old.params.cookie.as_ref().unwrap()).unwrap();
    let receipt =
        canopy_keys::Receipt::decode(answer.params.receipt.as_ref().expect("receipt")).unwrap();
    verifier
        .verify_receipt(&baked, &receipt)
        .expect("the original receipt");
}

/// The relay's link to the root is lost after a write went up and before
/// the root's answer came back. The root still spends the write's cookie
/// with the write's outcome, so the write retried later (the writer's
/// record and baked cookie, re-sent through the relay on a new connection)
/// gets COOKIE_SPENT with the original receipt, through the relay, and is
/// not applied again over a newer write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_retried_after_its_link_was_lost_gets_its_receipt() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    t.above_relay.attack_up(Attack::CutAfterWrite);
    let a = pattern(0x61, CHUNK as usize);
    // The leaf sends it again once the tree heals (see the next test);
    // here the point is what the root does with a later re-send.
    let _ = within("write a", h.write(5, 0, a.clone(), true)).await;
    let sent = t.below_relay[0]
        .writes
        .lock()
        .last()
        .cloned()
        .expect("the leaf's write, captured");
    // The tree heals: the relay dials the root again, the leaf the relay.
    let b = pattern(0x62, CHUNK as usize);
    let mut wrote = false;
    for _ in 0..100 {
        if within("write b", h.write(5, 0, b.clone(), true))
            .await
            .is_ok()
        {
            wrote = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(wrote, "the tree did not heal");
    assert!(t.above_relay.conns.load(Ordering::Relaxed) >= 2);
    assert_eq!(origin_bytes(&t.dir, 5), b.to_vec());

    // The retry, on the leaf's new connection, on an XID the leaf does
    // not use. Until the root has answered the original it is told to
    // wait (IN_RECOVERY); so ask until COOKIE_SPENT comes.
    let mut retry = sent.clone();
    retry.header.xid = 0x7F00_0001;
    let mut answer = None;
    for _ in 0..100 {
        t.below_relay[0].replay_up(&retry).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        answer = t.below_relay[0]
            .spent
            .lock()
            .iter()
            .find(|m| m.header.xid == retry.header.xid)
            .cloned();
        if answer.is_some() {
            break;
        }
    }
    let answer = answer.expect("the retry was answered COOKIE_SPENT");
    let verifier = canopy_keys::Verifier::load(&t.dir.join("keys/vol.verify")).unwrap();
    let baked = canopy_keys::BakedCookie::decode(sent.params.cookie.as_ref().unwrap()).unwrap();
    let receipt = canopy_keys::Receipt::decode(
        answer
            .params
            .receipt
            .as_ref()
            .expect("the original receipt, passed down by the relay"),
    )
    .unwrap();
    verifier
        .verify_receipt(&baked, &receipt)
        .expect("the original receipt");
    // The write was applied once: the retry did not land over b.
    assert_eq!(
        origin_bytes(&t.dir, 5),
        b.to_vec(),
        "the retry landed again"
    );
    assert!(cookies(&t.root).await.replays_refused >= 1);
    let seen = read_eventually(&h, 5).await.expect("read");
    assert_eq!(seen, b);
}

/// The relay's link to the root is lost after a sync write went up and
/// before its answer came back. The leaf does not fail the write: once the
/// tree has healed it sends it again with the record and cookie it first
/// went with, the root answers from its reply cache (the write was applied
/// once), and the leaf takes the valid receipt as the write's success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_was_lost_is_sent_again_and_applied_once() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    let before = cookies(&t.root).await;
    t.above_relay.attack_up(Attack::CutAfterWrite);
    let a = pattern(0x71, CHUNK as usize);
    within("write a", h.write(6, 0, a.clone(), true))
        .await
        .expect("the write completes across the lost link");
    assert_eq!(origin_bytes(&t.dir, 6), a.to_vec());
    assert!(
        t.above_relay.conns.load(Ordering::Relaxed) >= 2,
        "the link was cut"
    );
    let leaf = cookies(&t.leaves[0]).await;
    assert!(leaf.resent >= 1, "{leaf:?}");
    assert!(leaf.receipts_from_cache >= 1, "{leaf:?}");
    let after = cookies(&t.root).await;
    assert_eq!(after.spent, before.spent + 1, "applied once: {after:?}");
    let node = stats(&t.leaves[0]).await;
    assert!(node.node.puts_resent >= 1, "{:?}", node.node);
    let seen = read_eventually(&h, 6).await.expect("read");
    assert_eq!(seen, a);
}

/// A relay forges the receipt of a write: the writer refuses the
/// acknowledgement (counted) and its write fails; it retries, and holds a
/// valid receipt then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_receipt_fails_the_write() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    t.below_relay[0].attack_down(Attack::ForgeReceipt);
    let a = pattern(0x51, CHUNK as usize);
    let r = within("write", h.write(7, 0, a.clone(), true)).await;
    assert!(r.is_err(), "a write with a forged receipt was acknowledged");
    let leaf = cookies(&t.leaves[0]).await;
    assert!(leaf.receipts_bad >= 1, "{leaf:?}");
    t.below_relay[0].attack_down(Attack::Pass);
    within("retry", h.write(7, 0, a.clone(), true))
        .await
        .unwrap();
    assert_eq!(origin_bytes(&t.dir, 7), a.to_vec());
    assert!(cookies(&t.leaves[0]).await.receipts_ok >= 1);
    assert_eq!(within("read", h.read(7)).await.unwrap(), a);
}

/// A write without a cookie (a relay trying to originate or alter one) is
/// refused by the root, and the writer told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_a_cookie_is_refused() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    let a = pattern(0x61, CHUNK as usize);
    within("write", h.write(3, 0, a.clone(), true))
        .await
        .unwrap();
    t.above_relay.attack_up(Attack::StripCookie);
    let b = pattern(0x62, CHUNK as usize);
    let r = within("write", h.write(3, 0, b.clone(), true)).await;
    assert!(r.is_err(), "a write without a cookie was acknowledged");
    assert!(cookies(&t.root).await.cookies_refused >= 1);
    assert_eq!(origin_bytes(&t.dir, 3), a.to_vec(), "it landed");
    t.above_relay.attack_up(Attack::Pass);
    within("retry", h.write(3, 0, b.clone(), true))
        .await
        .unwrap();
    assert_eq!(origin_bytes(&t.dir, 3), b.to_vec());
    assert_eq!(within("read", h.read(3)).await.unwrap(), b);
}

/// Garbled requests are refused (counted as undecodable) and fail; a
/// truncated frame loses the stream, which the reader closes (counted),
/// and the leaf reconnects. Readers only ever see the written data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_and_truncated_frames_are_detected() {
    let t = tree(1).await;
    let h = t.leaves[0].handle();
    let a = pattern(0x71, CHUNK as usize);
    within("write", h.write(8, 0, a.clone(), true))
        .await
        .unwrap();
    t.below_relay[0].attack_up(Attack::Garble);
    let r = within("garbled read", h.read(12)).await;
    assert!(r.is_err(), "a garbled request was served: {r:?}");
    assert!(stats(&t.relay).await.decode_errors >= 1);
    t.below_relay[0].attack_up(Attack::Pass);

    // A garbled reply fails the request it answers; it does not hang.
    t.below_relay[0].attack_down(Attack::GarbleReplies);
    let r = within("read with a garbled reply", h.read(14)).await;
    assert!(r.is_err(), "a garbled reply was used: {r:?}");
    assert!(stats(&t.leaves[0]).await.decode_errors >= 1);
    t.below_relay[0].attack_down(Attack::Pass);

    t.below_relay[0].attack_down(Attack::Truncate);
    let r = within("truncated read", h.read(13)).await;
    assert!(r.is_err(), "a read over a lost stream succeeded: {r:?}");
    assert!(stats(&t.leaves[0]).await.decode_errors >= 1);
    // The leaf dials again; reads are right.
    assert_eq!(read_eventually(&h, 8).await, Some(a));
}

/// Random bytes on connect: the relay drops the connection (counted) and
/// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_connect_are_refused() {
    let t = tree(1).await;
    let before = stats(&t.relay).await.decode_errors;
    for seed in 0..4u8 {
        let mut s = TcpStream::connect(addr(&t.relay)).await.expect("connect");
        let junk: Vec<u8> = (0..256u32)
            .map(|i| (i as u8).wrapping_mul(151).wrapping_add(seed))
            .collect();
        s.write_all(&junk).await.expect("write");
        let mut b = [0u8; 64];
        // The relay closes the connection (or answers an error first).
        let _ = within("close", async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return Ok::<(), ()>(()),
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    assert!(stats(&t.relay).await.decode_errors > before);
    let h = t.leaves[0].handle();
    let a = pattern(0x19, CHUNK as usize);
    within("write", h.write(1, 0, a.clone(), true))
        .await
        .unwrap();
    assert_eq!(within("read", h.read(1)).await.unwrap(), a);
}

/// A relay serves an older valid version of a chunk. With the grant for
/// the new version, the reader refuses it at once (the grant is signed for
/// other contents); with the old record's own grant, as soon as that
/// grant's signed expiry has passed. Both are counted, and the reader
/// never returns the old data once it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_valid_version_is_refused() {
    let t = tree_with_ttl(2, Some(2_000)).await;
    let (writer, reader) = (t.leaves[0].handle(), t.leaves[1].handle());
    let a = pattern(0x0A, CHUNK as usize);
    within("write a", writer.write(6, 0, a.clone(), true))
        .await
        .unwrap();
    t.below_relay[1].attack_down(Attack::Keep(6));
    assert_eq!(within("read a", reader.read(6)).await.unwrap(), a);
    assert!(t.below_relay[1].captured.lock().is_some(), "kept nothing");
    let b = pattern(0x0B, CHUNK as usize);
    within("write b", writer.write(6, 0, b.clone(), true))
        .await
        .unwrap();

    t.below_relay[1].attack_down(Attack::OldVersion { old_grant: false });
    let before = stats(&t.leaves[1]).await.bad_records;
    let r = within("read with the new grant", reader.read(6)).await;
    assert!(
        r.is_err(),
        "an old record under a new grant was accepted: {r:?}"
    );
    assert!(stats(&t.leaves[1]).await.bad_records > before);

    // The old record with its own grant: good until the grant's signed
    // expiry (2 s, the delay a relay can cause), refused after it. (The
    // wait is for the protocol's timer; nothing asserts on time taken.)
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    t.below_relay[1].attack_down(Attack::OldVersion { old_grant: true });
    let before = stats(&t.leaves[1]).await.bad_records;
    let r = within("read with the old grant", reader.read(6)).await;
    assert!(
        r.is_err(),
        "an old record past its grant's expiry was accepted: {r:?}"
    );
    assert!(stats(&t.leaves[1]).await.bad_records > before);

    t.below_relay[1].attack_down(Attack::Pass);
    assert_eq!(read_eventually(&reader, 6).await, Some(b));
}

/// Many writes at once from an async leaf with a small cache, through a
/// relay: cookies keep up (the pool refills from write replies and
/// GET_COOKIES), no write waits for ever, and the origin ends with every
/// last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_storm_through_a_relay_never_runs_out_of_cookies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (trusted, verify) = keys(&dir.join("keys"));
    let root = start(root_cfg(&dir, &trusted)).await;
    let relay = {
        let mut cfg = relay_cfg(&addr(&root), &verify);
        cfg.cache_chunks = Some(32);
        start_peer(&cfg).await.expect("relay starts")
    };
    let mut cfg = leaf_cfg("W", &addr(&relay), Some(&trusted));
    cfg.write_mode = Some(canopy_peerd::config::WriteModeSetting::Async);
    cfg.cache_chunks = Some(16);
    let leaf = start(cfg).await;
    let h = leaf.handle();
    let chunks = VOLUME / CHUNK;
    let mut last = std::collections::HashMap::new();
    for round in 0..8u64 {
        let mut set = tokio::task::JoinSet::new();
        for c in 0..chunks {
            let d = pattern((round * 7 + c) as u8, CHUNK as usize);
            last.insert(c, d.clone());
            let h = h.clone();
            set.spawn(async move { h.write(c, 0, d, false).await });
        }
        within("a round of writes", async {
            while let Some(r) = set.join_next().await {
                r.expect("task").expect("write");
            }
        })
        .await;
    }
    within("flush", h.flush()).await.expect("flush");
    for c in 0..chunks {
        assert_eq!(origin_bytes(&dir, c), last[&c].to_vec(), "chunk {c}");
    }
    let leaf_cookies = cookies(&leaf).await;
    assert_eq!(leaf_cookies.receipts_bad, 0, "{leaf_cookies:?}");
    assert!(leaf_cookies.baked >= chunks, "{leaf_cookies:?}");
}

/// A parent that hands out no cookies makes writes wait, never fail or go
/// without one, and never costs the writer its parent: HEARTBEATs pass the
/// waiting writes. Once cookies come, the writes complete in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_cookies_without_losing_the_parent() {
    let t = tree_with(1, None, Some(1_000)).await;
    let h = t.leaves[0].handle();
    t.below_relay[0].attack_down(Attack::StarveCookies);
    let writes = tokio::spawn({
        let h = h.clone();
        async move {
            for i in 0..200u64 {
                let d = pattern(i as u8, CHUNK as usize);
                h.write(i % (VOLUME / CHUNK), 0, d, true).await?;
            }
            Ok::<(), canopy_peerd::driver::RequestError>(())
        }
    });
    // The pool runs dry and writes start to wait.
    let mut waited = false;
    for _ in 0..200 {
        if cookies(&t.leaves[0]).await.pool_waits > 0 {
            waited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(waited, "the writes never ran out of cookies");
    // Three HB_TTLs with a write waiting: the leaf keeps its parent. (The
    // wait is for the protocol's timers; nothing asserts on time taken.)
    tokio::time::sleep(std::time::Duration::from_millis(3_000)).await;
    assert_eq!(
        t.below_relay[0].conns.load(Ordering::Relaxed),
        1,
        "the leaf lost its parent"
    );
    assert!(!writes.is_finished(), "writes went on without cookies");
    t.below_relay[0].attack_down(Attack::Pass);
    within("the writes", writes)
        .await
        .expect("task")
        .expect("writes");
    for i in (200 - VOLUME / CHUNK)..200u64 {
        assert_eq!(
            origin_bytes(&t.dir, i % (VOLUME / CHUNK)),
            pattern(i as u8, CHUNK as usize).to_vec()
        );
    }
    assert_eq!(cookies(&t.leaves[0]).await.receipts_bad, 0);
}
