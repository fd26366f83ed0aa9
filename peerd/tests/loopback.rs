//! A whole tree in one process over loopback TCP: a root over a temporary
//! origin file, a proxy, and leaves driven through their `NodeHandle`s.
//!
//! Every wait is bounded by `within`, so a protocol hang fails the test
//! instead of hanging CI. Nothing asserts on elapsed time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use canopy_peerd::config::{PeerConfig, PeerRole, Size};
use canopy_peerd::{lines, start_peer, DriverError, Peer, RequestError};
use canopy_proto::{Perm, Status};

mod common;
use common::{addr, pattern, start, within};

const CHUNK: u64 = 4096;
const VOLUME: u64 = 1 << 20;

fn root_cfg(dir: &Path, trace: Option<&Path>) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Root, "vol");
    c.name = Some("A".into());
    c.listen = Some("127.0.0.1:0".into());
    c.origin = Some(dir.join("origin.img"));
    c.size = Some(Size(VOLUME));
    c.chunk_size = Some(Size(CHUNK));
    c.trace_protocol = trace.map(|p| p.display().to_string());
    c
}

fn proxy_cfg(parent: &Peer, trace: Option<&Path>) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Proxy, "vol");
    c.name = Some("B".into());
    c.listen = Some("127.0.0.1:0".into());
    c.parent = Some(addr(parent));
    c.trace_protocol = trace.map(|p| p.display().to_string());
    c
}

fn leaf_cfg(name: &str, parent: &Peer, volume: &str, trace: Option<&Path>) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Leaf, volume);
    c.name = Some(name.into());
    c.parent = Some(addr(parent));
    c.trace_protocol = trace.map(|p| p.display().to_string());
    c
}

fn origin_bytes(dir: &Path, chunk: u64, len: usize) -> Vec<u8> {
    let all = std::fs::read(dir.join("origin.img")).expect("origin readable");
    let start = (chunk * CHUNK) as usize;
    all[start..start + len].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_write_invalidation_and_origin_through_a_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let proxy = start(proxy_cfg(&root, None)).await;
    let leaf1 = start(leaf_cfg("C", &proxy, "vol", None)).await;
    let leaf2 = start(leaf_cfg("D", &proxy, "vol", None)).await;
    let (h1, h2) = (leaf1.handle(), leaf2.handle());

    // A fresh origin reads as zeros, through two hops.
    let before = within("first read", h2.read(7)).await.unwrap();
    assert_eq!(before.len(), CHUNK as usize);
    assert!(before.iter().all(|&b| b == 0));

    // leaf1 writes (sync): once acknowledged, the root's file has it.
    let a = pattern(0x10, 64);
    within("leaf1 write", h1.write(7, 100, a.clone(), true))
        .await
        .unwrap();
    assert_eq!(origin_bytes(dir.path(), 7, 100 + 64)[100..], a[..]);

    // leaf2 had chunk 7 cached (READ): the write must have invalidated it.
    let seen = within("leaf2 read", h2.read(7)).await.unwrap();
    assert_eq!(&seen[100..164], &a[..]);
    assert!(seen[..100].iter().all(|&b| b == 0));

    // And back: leaf2 writes, leaf1 (which held WRITE) reads the new bytes.
    let b = pattern(0xa0, 32);
    within("leaf2 write", h2.write(7, 120, b.clone(), false))
        .await
        .unwrap();
    let seen = within("leaf1 read", h1.read(7)).await.unwrap();
    assert_eq!(&seen[100..120], &a[..20]);
    assert_eq!(&seen[120..152], &b[..]);
    assert_eq!(&seen[152..164], &a[52..64]);
    // leaf2's write was sync too (the default mode): the origin has both.
    assert_eq!(origin_bytes(dir.path(), 7, 164)[100..164], seen[100..164]);

    // Other chunks are untouched.
    let other = within("leaf1 read 8", h1.read(8)).await.unwrap();
    assert!(other.iter().all(|&x| x == 0));

    let s = within("stats", h1.stats()).await.unwrap();
    assert!(s.ready && s.parent_link && !s.root);
    assert_eq!(s.chunk_size as u64, CHUNK);
    assert_eq!(s.volume_size, VOLUME);

    for p in [leaf1, leaf2, proxy, root] {
        within("shutdown", p.shutdown()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_in_different_subtrees() {
    let dir = tempfile::tempdir().unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let proxy = start(proxy_cfg(&root, None)).await;
    let under_proxy = start(leaf_cfg("C", &proxy, "vol", None)).await;
    let under_root = start(leaf_cfg("D", &root, "vol", None)).await;
    let (h1, h2) = (under_proxy.handle(), under_root.handle());

    let full = pattern(1, CHUNK as usize);
    within("full write", h1.write(3, 0, full.clone(), true))
        .await
        .unwrap();
    assert_eq!(within("read", h2.read(3)).await.unwrap(), full);
    assert_eq!(origin_bytes(dir.path(), 3, CHUNK as usize), full[..]);

    let patch = pattern(0x77, 8);
    within("patch", h2.write(3, 8, patch.clone(), true))
        .await
        .unwrap();
    let seen = within("read back", h1.read(3)).await.unwrap();
    assert_eq!(&seen[8..16], &patch[..]);
    assert_eq!(&seen[..8], &full[..8]);

    // Writes past the chunk or the volume are refused, not truncated.
    let e = within(
        "oversized",
        h1.write(3, CHUNK as u32 - 4, pattern(0, 8), true),
    )
    .await;
    assert_eq!(e, Err(RequestError::Refused(Status::OutOfRange)));
    let e = within("past the end", h1.read(VOLUME / CHUNK)).await;
    assert_eq!(e, Err(RequestError::Refused(Status::OutOfRange)));

    for p in [under_proxy, under_root, proxy, root] {
        within("shutdown", p.shutdown()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_volume_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let proxy = start(proxy_cfg(&root, None)).await;

    for parent in [&root, &proxy] {
        let cfg = leaf_cfg("X", parent, "not-vol", None);
        let leaf = start_peer(&cfg).await.unwrap();
        let r = within("refusal", leaf.ready()).await;
        assert_eq!(r, Err(DriverError::Refused(Status::NoSuchVolume)));
        // A request retries CONNECT and fails with the same status.
        let e = within("request after refusal", leaf.handle().read(0)).await;
        assert_eq!(e, Err(RequestError::Refused(Status::NoSuchVolume)));
        within("shutdown", leaf.shutdown()).await;
    }

    // The tree still serves the right volume afterwards.
    let good = start(leaf_cfg("C", &proxy, "vol", None)).await;
    within("read", good.handle().read(0)).await.unwrap();
    for p in [good, proxy, root] {
        within("shutdown", p.shutdown()).await;
    }
}

fn read_trace(p: &PathBuf) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_trace_names_node_direction_and_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (ta, tb, tc) = (
        dir.path().join("a.trace"),
        dir.path().join("b.trace"),
        dir.path().join("c.trace"),
    );
    let root = start(root_cfg(dir.path(), Some(&ta))).await;
    let proxy = start(proxy_cfg(&root, Some(&tb))).await;
    let leaf = start(leaf_cfg("C", &proxy, "vol", Some(&tc))).await;
    within("read", leaf.handle().read(7)).await.unwrap();

    // Lines are flushed as written: readable while the nodes run.
    let c = read_trace(&tc);
    assert!(c[0].starts_with("C send parent CONNECT xid="), "{c:?}");
    assert!(c[0].contains("VOLUME_NAME=\"vol\""), "{c:?}");
    assert!(
        c.iter().any(|l| l.starts_with("C recv parent OK_REPLY")),
        "{c:?}"
    );
    assert!(
        c.iter()
            .any(|l| l.starts_with("C send parent IO_REQUEST/GET") && l.contains("BLOCK_NUM=7")),
        "{c:?}"
    );

    // Seed example 1: the proxy connects upward only when its child does,
    // and remaps the volume id between its two sides.
    let b = read_trace(&tb);
    let first_recv = b
        .iter()
        .position(|l| l.starts_with("B recv child#1 CONNECT"))
        .expect("child CONNECT");
    let own = b
        .iter()
        .position(|l| l.starts_with("B send parent CONNECT"))
        .expect("own CONNECT");
    assert!(first_recv < own, "{b:?}");
    let id_of = |l: &String| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("VOLUME_ID="))
            .map(str::to_string)
    };
    let up = b
        .iter()
        .find(|l| l.starts_with("B send parent IO_REQUEST/GET"))
        .and_then(id_of);
    let down = b
        .iter()
        .find(|l| l.starts_with("B recv child#1 IO_REQUEST/GET"))
        .and_then(id_of);
    assert!(up.is_some() && down.is_some() && up != down, "{b:?}");

    let a = read_trace(&ta);
    assert!(
        a.iter()
            .any(|l| l.starts_with("A recv child#1 IO_REQUEST/GET") && l.contains("BLOCK_NUM=7")),
        "{a:?}"
    );
    assert!(
        a.iter()
            .any(|l| l.starts_with("A send child#1 OK_REPLY") && l.contains("DATA=<4096 bytes>")),
        "{a:?}"
    );

    for p in [leaf, proxy, root] {
        within("shutdown", p.shutdown()).await;
    }
    // The leaf said DISCONNECT on its way out.
    assert!(read_trace(&tc)
        .iter()
        .any(|l| l.starts_with("C send parent DISCONNECT")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_protocol_and_locks() {
    let dir = tempfile::tempdir().unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let leaf = start(leaf_cfg("C", &root, "vol", None)).await;
    let h = leaf.handle();

    let script = "write 7 4 deadbeef sync\nread 7 4 4\n\nread 7\nlock 9 write\nlock 9 no\nbogus\nread 9999\nstats\n";
    let mut out = Vec::new();
    within("script", lines::serve(&h, script.as_bytes(), &mut out))
        .await
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    let replies: Vec<&str> = out.lines().collect();
    assert_eq!(replies.len(), 8, "{out}");
    assert_eq!(replies[0], "ok");
    assert_eq!(replies[1], "ok deadbeef");
    assert_eq!(replies[2], "ok 00000000deadbeef0000000000000000");
    assert_eq!(replies[3], "ok");
    assert_eq!(replies[4], "ok");
    assert!(replies[5].starts_with("err USAGE unknown command"), "{out}");
    assert_eq!(replies[6], "err OUT_OF_RANGE");
    assert!(
        replies[7].starts_with("ok {") && replies[7].contains("\"name\":\"C\""),
        "{out}"
    );
    assert_eq!(
        origin_bytes(dir.path(), 7, 8)[4..],
        [0xde, 0xad, 0xbe, 0xef]
    );

    // A lock is a permission like any other: a shared one blocks nobody reading.
    within("lock read", h.lock(9, Perm::Read)).await.unwrap();
    within("read locked", h.read(9)).await.unwrap();
    within("unlock", h.lock(9, Perm::No)).await.unwrap();

    within("shutdown", leaf.shutdown()).await;
    within("shutdown", root.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_reconnects_after_its_parent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let leaf = start(leaf_cfg("C", &root, "vol", None)).await;
    let h = leaf.handle();
    within("write", h.write(2, 0, pattern(9, 4), true))
        .await
        .unwrap();

    // Restart the root on the same address; the leaf redials by itself.
    let mut cfg = root_cfg(dir.path(), None);
    cfg.listen = Some(addr(&root));
    within("root down", root.shutdown()).await;
    let root = start(cfg).await;
    let seen = within("read after restart", async {
        loop {
            match h.read(2).await {
                Ok(d) => break d,
                Err(RequestError::Refused(Status::ParentUnavailable)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(&seen[..4], &pattern(9, 4)[..]);
    for p in [leaf, root] {
        within("shutdown", p.shutdown()).await;
    }
}

/// A proxy whose parent link bounced must reconnect for the children it
/// already has. Ignored: canopy-node's `parent_up` with `connect_lazily`
/// waits for a *new* child or local request before it sends CONNECT, so the
/// existing children get PARENT_UNAVAILABLE until one arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_reconnects_for_existing_children() {
    let dir = tempfile::tempdir().unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let proxy = start(proxy_cfg(&root, None)).await;
    let leaf = start(leaf_cfg("C", &proxy, "vol", None)).await;
    let h = leaf.handle();
    within("read", h.read(2)).await.unwrap();

    let mut cfg = root_cfg(dir.path(), None);
    cfg.listen = Some(addr(&root));
    within("root down", root.shutdown()).await;
    let root = start(cfg).await;
    within("read after restart", async {
        loop {
            match h.read(2).await {
                Ok(_) => break,
                Err(RequestError::Refused(Status::ParentUnavailable)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    for p in [leaf, proxy, root] {
        within("shutdown", p.shutdown()).await;
    }
}

/// Garbage from a peer is answered or cut off, never trusted or fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_err_reply_and_bad_framing_closes() {
    use canopy_proto::frame::split_frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let mut s = tokio::net::TcpStream::connect(root.local_addr().unwrap())
        .await
        .unwrap();

    // A whole header with an unknown opcode (99) and XID 42.
    let mut body = vec![99u8, 32, 0, 0];
    body.extend_from_slice(&[0u8; 16]);
    body.extend_from_slice(&42u32.to_be_bytes());
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    s.write_all(&frame).await.unwrap();

    let mut buf = bytes::BytesMut::new();
    let reply = within("err reply", async {
        loop {
            if let Some(f) = split_frame(&mut buf).unwrap() {
                break canopy_proto::decode(&f).unwrap();
            }
            assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed early");
        }
    })
    .await;
    assert_eq!(reply.header.opcode, canopy_proto::Opcode::ErrReply);
    assert_eq!(reply.header.xid, 42);
    assert_eq!(reply.params.status, Some(Status::InvalidHeader));

    // A length no message can have: the root closes the connection.
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let n = within("close", s.read_buf(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0);

    // And it still serves others.
    let leaf = start(leaf_cfg("C", &root, "vol", None)).await;
    within("read", leaf.handle().read(1)).await.unwrap();
    let st = within("stats", root.handle().stats()).await.unwrap();
    // The undecodable message, and the stream whose framing was lost.
    assert_eq!(st.decode_errors, 2);
    for p in [leaf, root] {
        within("shutdown", p.shutdown()).await;
    }
}

/// More reads at once than the root runs origin reads (32): the rest wait
/// in its backlog, and every chunk still comes back with the origin's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_cold_reads_through_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<u8> = (0..VOLUME as usize)
        .map(|i| (i / CHUNK as usize) as u8 ^ i as u8)
        .collect();
    std::fs::write(dir.path().join("origin.img"), &contents).unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let leaf = start(leaf_cfg("D", &root, "vol", None)).await;
    let h = leaf.handle();
    let chunks = VOLUME / CHUNK;
    let mut reads = tokio::task::JoinSet::new();
    for chunk in 0..chunks {
        let h = h.clone();
        reads.spawn(async move { (chunk, h.read(chunk).await) });
    }
    let mut seen = 0;
    while let Some(r) = within("concurrent reads", reads.join_next()).await {
        let (chunk, data) = r.expect("read task");
        let data = data.expect("read succeeds");
        let start = (chunk * CHUNK) as usize;
        assert!(
            data[..] == contents[start..start + CHUNK as usize],
            "chunk {chunk} differs from the origin"
        );
        seen += 1;
    }
    assert_eq!(seen, chunks);
    leaf.shutdown().await;
    root.shutdown().await;
}

/// A node whose request queue never empties still sends its HEARTBEATs:
/// its timers are not starved by the requests (a biased select once polled
/// them last, and a leaf flooded by mkfs's discards went silent until its
/// parent dropped it). Thousands of cached reads keep the leaf's queue full
/// for several of the root's 3 × HB_TTL grace periods; the root drops no
/// child for silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_node_keeps_heartbeating() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = root_cfg(dir.path(), None);
    cfg.hb_ttl = Some(canopy_peerd::config::Millis(200));
    let root = start(cfg).await;
    let leaf = start(leaf_cfg("D", &root, "vol", None)).await;
    let h = leaf.handle();
    within("first read", h.read(0)).await.expect("read");
    // Reads of a cached chunk never leave the leaf: the root hears only
    // its HEARTBEATs while this runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..2048 {
        let h = h.clone();
        let stop = stop.clone();
        readers.spawn(async move {
            let mut n = 0u64;
            while n < 10_000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                h.read(0).await?;
                n += 1;
            }
            Ok::<u64, RequestError>(n)
        });
    }
    // Five grace periods (3 × 200 ms each) of flood: the wait is for the
    // protocol's timers, and nothing asserts on time taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    while let Some(n) = within("readers", readers.join_next()).await {
        // A failed read means the leaf lost its parent.
        reads += n.expect("reader task").expect("a cached read");
    }
    let s = within("root stats", root.handle().stats())
        .await
        .expect("stats");
    assert_eq!(
        s.node.children_silent, 0,
        "the root dropped the flooded leaf ({reads} reads)"
    );
    assert_eq!(s.children, 1);
    leaf.shutdown().await;
    root.shutdown().await;
}

/// The stacked cache as the nodes' store: a proxy with a tiny memory tier
/// over a disk tier, and an async leaf whose cache holds four chunks, so its
/// victim cleaner FLUSHes dirty chunks up (giving WRITE back) to make room.
/// Every byte read back is the last written, and after a clean stop the
/// origin holds every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_tier_and_victim_cleaner() {
    let dir = tempfile::tempdir().unwrap();
    let root = start(root_cfg(dir.path(), None)).await;
    let mut pc = proxy_cfg(&root, None);
    pc.cache_chunks = Some(8);
    let tier = dir.path().join("proxy.cache");
    pc.cache_disk = vec![canopy_peerd::config::DiskTier {
        path: tier.clone(),
        size: Size(1 << 20),
    }];
    let proxy = start(pc).await;
    let mut wc = leaf_cfg("W", &proxy, "vol", None);
    wc.cache_chunks = Some(4);
    wc.write_mode = Some(canopy_peerd::config::WriteModeSetting::Async);
    let writer = start(wc).await;
    let reader = start(leaf_cfg("R", &proxy, "vol", None)).await;
    let (hw, hr) = (writer.handle(), reader.handle());

    let chunks = 64u64;
    for chunk in 0..chunks {
        let data = pattern(chunk as u8, 512);
        within("write", hw.write(chunk, 256, data, false))
            .await
            .expect("async write");
    }
    // The disk tier exists once the proxy knows the chunk size.
    assert!(tier.exists(), "the proxy's disk tier file");
    for chunk in 0..chunks {
        let seen = within("read", hr.read(chunk)).await.expect("read");
        assert_eq!(
            &seen[256..768],
            &pattern(chunk as u8, 512)[..],
            "chunk {chunk}"
        );
        assert!(seen[..256].iter().all(|&b| b == 0));
    }

    let w = within("writer stats", hw.stats()).await.expect("stats");
    assert!(
        w.node.evictions >= chunks - 8,
        "writer evictions: {}",
        w.node.evictions
    );
    let wc = w.cache.expect("the writer has a cache stack");
    assert_eq!(wc.tiers.len(), 1);
    let p = within("proxy stats", proxy.handle().stats())
        .await
        .expect("stats");
    let pcache = p.cache.expect("the proxy has a cache stack");
    assert_eq!(pcache.tiers.len(), 2);
    assert_eq!(pcache.tiers[1].medium, "disk");
    assert!(pcache.tiers[1].demotions > 0, "{:?}", pcache.tiers[1]);

    writer.shutdown().await;
    reader.shutdown().await;
    proxy.shutdown().await;
    root.shutdown().await;
    for chunk in 0..chunks {
        assert_eq!(
            &origin_bytes(dir.path(), chunk, 768)[256..],
            &pattern(chunk as u8, 512)[..],
            "origin chunk {chunk}"
        );
    }
    assert!(!tier.exists(), "the disk tier file is removed at stop");
}
