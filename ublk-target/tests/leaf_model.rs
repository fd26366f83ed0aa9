//! The leaf device's request mapping ([`LeafVolume`]) against a byte-array
//! model, through a real tree on loopback: a root over a temporary origin, a
//! proxy, and two leaves. This is what `/dev/ublkbN` on a tree leaf does,
//! minus the kernel, so it runs on hosts without ublk.
//!
//! Reads go through `try_read` first, as on a queue thread, so the
//! published copies are checked against the model too.
//!
//! Every wait is bounded (`within`); nothing asserts on elapsed time.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use canopy_peerd::config::{PeerConfig, PeerRole, Size, WriteModeSetting};
use canopy_peerd::{start_peer, start_peer_with_view, Peer, ReadView};
use canopy_ublk::leaf::LeafVolume;
use canopy_ublk::volume::Op;

const CHUNK: u64 = 4096;
const VOLUME: u64 = 64 * CHUNK;

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(30), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

async fn start(cfg: PeerConfig) -> Peer {
    cfg.validate("test").expect("valid config");
    let peer = start_peer(&cfg).await.expect("peer starts");
    within("ready", peer.ready()).await.expect("peer ready");
    peer
}

fn addr(p: &Peer) -> String {
    p.local_addr().expect("peer listens").to_string()
}

async fn root(dir: &Path) -> Peer {
    let mut c = PeerConfig::new(PeerRole::Root, "vol");
    c.listen = Some("127.0.0.1:0".into());
    c.origin = Some(dir.join("origin.img"));
    c.size = Some(Size(VOLUME));
    c.chunk_size = Some(Size(CHUNK));
    start(c).await
}

async fn proxy(parent: &Peer) -> Peer {
    let mut c = PeerConfig::new(PeerRole::Proxy, "vol");
    c.listen = Some("127.0.0.1:0".into());
    c.parent = Some(addr(parent));
    start(c).await
}

/// A leaf as `canopy-ublk add --parent` builds it: a node publishing its
/// reads plus the volume mapping over its handle, sized from what the
/// parent announced.
async fn leaf(parent: &Peer, mode: WriteModeSetting, cache_mem: u64) -> (Peer, LeafVolume) {
    let mut c = PeerConfig::new(PeerRole::Leaf, "vol");
    c.parent = Some(addr(parent));
    c.write_mode = Some(mode);
    c.cache_mem = Some(Size(cache_mem));
    c.validate("test").expect("valid config");
    let view = Arc::new(ReadView::new());
    let peer = start_peer_with_view(&c, view.clone())
        .await
        .expect("peer starts");
    within("ready", peer.ready()).await.expect("peer ready");
    let stats = within("stats", peer.handle().stats()).await.expect("stats");
    assert_eq!(stats.volume_size, VOLUME);
    assert_eq!(u64::from(stats.chunk_size), CHUNK);
    let v = LeafVolume::new(
        peer.handle(),
        Some(view),
        stats.volume_size,
        CHUNK as usize,
        1,
    );
    (peer, v)
}

/// splitmix64: a seeded, reproducible stream without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A sector-aligned range of up to three chunks.
fn range(rng: &mut Rng) -> (u64, usize) {
    let sectors = VOLUME / 512;
    let start = rng.below(sectors);
    let max = (sectors - start).min(3 * CHUNK / 512);
    let n = 1 + rng.below(max);
    (start * 512, (n * 512) as usize)
}

/// Read as a queue thread does: from the published copies when they cover
/// the request, else through the node.
async fn check_read(v: &LeafVolume, model: &[u8], offset: u64, len: usize, what: &str) {
    let mut hit = vec![0u8; len];
    let data = if v.try_read(0, offset, len, &mut hit) {
        hit
    } else {
        let c = within(what, v.handle(Some(Op::Read), offset, len, Bytes::new())).await;
        assert_eq!(c.result, len as i32, "{what}: read {offset}+{len}");
        c.data.expect("a read returns data").to_vec()
    };
    let want = &model[offset as usize..offset as usize + len];
    assert!(
        data[..] == want[..],
        "{what}: read {offset}+{len} differs from the model"
    );
}

async fn flush(v: &LeafVolume, what: &str) {
    let c = within(what, v.handle(Some(Op::Flush), 0, 0, Bytes::new())).await;
    assert_eq!(c.result, 0, "{what}: flush");
}

/// Random requests of every kind at two leaves in `mode`; every read, from
/// either leaf, returns the model's bytes (the tree keeps them coherent);
/// after both leaves FLUSH, the root's origin file is the model.
async fn random_requests(mode: WriteModeSetting, seed: u64) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = root(dir.path()).await;
    let b = proxy(&a).await;
    // A small cache on one leaf, so chunks are given back (with their dirty
    // data or FORWARD duty) while the test runs.
    let (_d, d) = leaf(&b, mode, 8 * CHUNK).await;
    let (_e, e) = leaf(&a, mode, 1 << 20).await;
    let mut model = vec![0u8; VOLUME as usize];
    let mut rng = Rng(seed);
    let what = format!("{mode:?} seed {seed}");
    for step in 0..300 {
        let v = if rng.below(2) == 0 { &d } else { &e };
        let (offset, len) = range(&mut rng);
        let what = format!("{what} step {step}");
        match rng.below(10) {
            0..=3 => check_read(v, &model, offset, len, &what).await,
            4..=6 => {
                let fua = rng.below(4) == 0;
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let c = within(
                    &what,
                    v.handle(
                        Some(Op::Write { fua }),
                        offset,
                        len,
                        Bytes::from(data.clone()),
                    ),
                )
                .await;
                assert_eq!(c.result, len as i32, "{what}: write");
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            7 => flush(v, &what).await,
            _ => {
                let op = if rng.below(2) == 0 {
                    Op::Discard
                } else {
                    Op::WriteZeroes
                };
                let c = within(&what, v.handle(Some(op), offset, len, Bytes::new())).await;
                assert_eq!(c.result, len as i32, "{what}: {op:?}");
                model[offset as usize..offset as usize + len].fill(0);
            }
        }
    }
    flush(&d, "final flush d").await;
    flush(&e, "final flush e").await;
    let origin = std::fs::read(dir.path().join("origin.img")).expect("origin");
    assert!(
        origin == model,
        "{what}: the origin is not the model after FLUSH"
    );
    assert_eq!(d.errors() + e.errors(), 0);
    d.hits() + e.hits()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_leaves_match_the_model() {
    let mut hits = 0;
    for seed in 1..=3 {
        hits += random_requests(WriteModeSetting::Sync, seed).await;
    }
    // Repeat reads were served from published copies, and still matched.
    assert!(hits > 0, "no read was served without the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_sync_leaves_match_the_model() {
    let mut hits = 0;
    for seed in 11..=13 {
        hits += random_requests(WriteModeSetting::SemiSync, seed).await;
    }
    // Repeat reads were served from published copies, and still matched.
    assert!(hits > 0, "no read was served without the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_leaves_match_the_model() {
    let mut hits = 0;
    for seed in 21..=23 {
        hits += random_requests(WriteModeSetting::Async, seed).await;
    }
    // Repeat reads were served from published copies, and still matched.
    assert!(hits > 0, "no read was served without the node");
}

/// FLUSH in async mode is what makes a write durable: before it the write
/// is only in the leaf, after it the origin has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_write_reaches_the_origin_on_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = root(dir.path()).await;
    let (_d, d) = leaf(&a, WriteModeSetting::Async, 1 << 20).await;
    let data = Bytes::from(vec![0xab; 1024]);
    let c = within(
        "write",
        d.handle(Some(Op::Write { fua: false }), 8192, 1024, data),
    )
    .await;
    assert_eq!(c.result, 1024);
    let origin = std::fs::read(dir.path().join("origin.img")).expect("origin");
    assert!(
        origin[8192..9216].iter().all(|&b| b == 0),
        "an async write is acknowledged before it goes up"
    );
    flush(&d, "flush").await;
    let origin = std::fs::read(dir.path().join("origin.img")).expect("origin");
    assert!(origin[8192..9216].iter().all(|&b| b == 0xab));
}

/// Requests the volume cannot serve get an errno, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_an_errno() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = root(dir.path()).await;
    let (_d, d) = leaf(&a, WriteModeSetting::Sync, 1 << 20).await;
    let past = d
        .handle(Some(Op::Read), VOLUME - 512, 1024, Bytes::new())
        .await;
    assert_eq!(past.result, -libc::EINVAL);
    let wrapping = d
        .handle(Some(Op::Read), u64::MAX - 511, 512, Bytes::new())
        .await;
    assert_eq!(wrapping.result, -libc::EINVAL);
    let unknown = d.handle(None, 0, 512, Bytes::new()).await;
    assert_eq!(unknown.result, -libc::EOPNOTSUPP);
    let short = d
        .handle(
            Some(Op::Write { fua: false }),
            0,
            1024,
            Bytes::from(vec![1; 512]),
        )
        .await;
    assert_eq!(short.result, -libc::EINVAL);
    assert_eq!(d.errors(), 0, "refusals are not I/O errors");
}

/// With the root gone, a chunk the leaf does not hold fails with EIO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_parent_is_an_io_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = root(dir.path()).await;
    let (_d, d) = leaf(&a, WriteModeSetting::Sync, 1 << 20).await;
    within("root stops", a.shutdown()).await;
    let c = within(
        "read after the root stopped",
        d.handle(Some(Op::Read), 0, 4096, Bytes::new()),
    )
    .await;
    assert_eq!(c.result, -libc::EIO);
    assert_eq!(d.errors(), 1);
}
