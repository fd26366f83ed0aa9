//! Cold-read throughput of one leaf reading through one proxy from a root,
//! all in this process over loopback TCP.
//!
//! What it measures: the time to read every chunk of the first `--mib` MiB
//! of `--origin` exactly once through the leaf's [`NodeHandle::read`], with
//! `--depth` reads in flight, in file order or (`--random`) in an order
//! shuffled with a fixed seed. Nothing is cached anywhere when it starts
//! (the leaf and proxy are new, and `bench/cold-read.sh` drops the page
//! cache first), so each chunk costs a leaf -> proxy -> root round trip and
//! one origin read at the root. The leaf's and proxy's caches are sized to
//! hold every chunk read, so no eviction traffic is mixed into the figure.
//!
//! Why: it is the figure to hold against a plain network block server
//! (nbdkit's file plugin read by fio's nbd engine at the same block size and
//! depth, see `bench/cold-read.sh`), to see what the tree's protocol and
//! driver cost on a cold path.
//!
//! ```text
//! cargo run --release -p canopy-peerd --example cold_read -- \
//!     --origin /tmp/cold.img --chunk-size 64K --depth 8 --mib 1024 [--random]
//! ```
//!
//! Prints one line:
//! `canopy cold read: M MiB in S s = X MB/s (chunk C, depth N)` (MB = 10^6
//! bytes, as fio reports).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use canopy_peerd::config::{PeerConfig, PeerRole, Size};
use canopy_peerd::{start_peer, NodeHandle, Peer, RequestError};
use clap::Parser;
use tokio::task::{JoinError, JoinSet};

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// The root's origin file (read, never written).
    #[arg(long)]
    origin: PathBuf,
    /// Chunk size (power of two, 4K..=1M).
    #[arg(long, default_value = "64K")]
    chunk_size: Size,
    /// Reads in flight.
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// MiB to read from the start of the origin.
    #[arg(long)]
    mib: u64,
    /// Read the chunks in a shuffled order (fixed seed) instead of in order.
    #[arg(long)]
    random: bool,
}

async fn start(cfg: PeerConfig) -> Result<Peer> {
    cfg.validate("cold_read")?;
    let peer = start_peer(&cfg).await?;
    tokio::time::timeout(Duration::from_secs(20), peer.ready())
        .await
        .context("peer not ready within 20 s")??;
    Ok(peer)
}

/// Fisher-Yates with splitmix64: a fixed, dependency-free shuffle.
fn shuffle(v: &mut [u64], mut seed: u64) {
    let mut next = || {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Read `order` through `leaf` with `depth` reads in flight; return the
/// bytes of the chunks in `keep` for verification.
async fn read_all(
    leaf: &NodeHandle,
    order: &[u64],
    depth: usize,
    keep: &[u64],
) -> Result<Vec<(u64, Bytes)>> {
    let mut inflight = JoinSet::new();
    let mut kept = Vec::new();
    let mut done = |r: Result<(u64, Result<Bytes, RequestError>), JoinError>| -> Result<()> {
        let (chunk, data) = r.context("read task panicked")?;
        let data = data.with_context(|| format!("reading chunk {chunk}"))?;
        if keep.contains(&chunk) {
            kept.push((chunk, data));
        }
        Ok(())
    };
    for &chunk in order {
        if inflight.len() >= depth {
            let r = inflight.join_next().await.expect("set is not empty");
            done(r)?;
        }
        let h = leaf.clone();
        inflight.spawn(async move { (chunk, h.read(chunk).await) });
    }
    while let Some(r) = inflight.join_next().await {
        done(r)?;
    }
    Ok(kept)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.depth >= 1, "--depth must be at least 1");
    let chunk = args.chunk_size.0;
    let bytes = args.mib << 20;
    let file_len = std::fs::metadata(&args.origin)
        .with_context(|| format!("origin {}", args.origin.display()))?
        .len();
    ensure!(
        bytes <= file_len,
        "--mib {} is past the origin's {file_len} bytes",
        args.mib
    );
    let chunks = bytes.div_ceil(chunk);
    if chunks == 0 {
        bail!("nothing to read");
    }

    let mut root = PeerConfig::new(PeerRole::Root, "cold");
    root.name = Some("root".into());
    root.listen = Some("127.0.0.1:0".into());
    root.origin = Some(args.origin.clone());
    root.chunk_size = Some(args.chunk_size);
    let root = start(root).await?;
    let root_addr = root.local_addr().context("root listens")?.to_string();

    // Room for every chunk read, so the figure holds no eviction traffic.
    let capacity = usize::try_from(chunks)? + 16;
    let mut proxy = PeerConfig::new(PeerRole::Proxy, "cold");
    proxy.name = Some("proxy".into());
    proxy.listen = Some("127.0.0.1:0".into());
    proxy.parent = Some(root_addr);
    proxy.cache_chunks = Some(capacity);
    let proxy = start(proxy).await?;
    let proxy_addr = proxy.local_addr().context("proxy listens")?.to_string();

    let mut leaf = PeerConfig::new(PeerRole::Leaf, "cold");
    leaf.name = Some("leaf".into());
    leaf.parent = Some(proxy_addr);
    leaf.cache_chunks = Some(capacity);
    let leaf = start(leaf).await?;
    let handle = leaf.handle();

    let mut order: Vec<u64> = (0..chunks).collect();
    if args.random {
        shuffle(&mut order, 0x00c0_1d5e_ed00_0001);
    }
    let mut keep = vec![0, chunks / 3, chunks / 2, chunks - 1];
    keep.dedup();

    let t0 = Instant::now();
    let kept = read_all(&handle, &order, args.depth, &keep).await?;
    let secs = t0.elapsed().as_secs_f64();

    // Verify after timing, so the check's own reads cost nothing above.
    let file = std::fs::File::open(&args.origin)?;
    for (c, data) in &kept {
        let off = c * chunk;
        let len = usize::try_from(chunk.min(file_len - off))?;
        let mut want = vec![0u8; len];
        file.read_exact_at(&mut want, off)?;
        ensure!(data.len() >= len, "chunk {c}: {} bytes", data.len());
        ensure!(data[..len] == want[..], "chunk {c} differs from the origin");
    }
    ensure!(
        kept.len() == keep.len(),
        "not every sampled chunk came back"
    );

    println!(
        "canopy cold read: {} MiB in {secs:.3} s = {:.1} MB/s (chunk {}, depth {}{})",
        args.mib,
        bytes as f64 / secs / 1e6,
        args.chunk_size,
        args.depth,
        if args.random { ", random" } else { "" },
    );

    for p in [leaf, proxy, root] {
        let _ = tokio::time::timeout(Duration::from_secs(10), p.shutdown()).await;
    }
    Ok(())
}
