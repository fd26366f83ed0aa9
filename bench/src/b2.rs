//! B2 (issue 5): cold reads. A leaf with an empty cache reads a volume
//! through loopback TCP straight from a root, with the volume made with
//! keys (every chunk sealed by the root, opened and checked by the leaf)
//! and without; the peer is fio's `nbd` engine reading the same file from
//! nbdkit's file plugin over loopback TCP. Two patterns: 1 MiB requests in
//! order, and 64 KiB requests in a shuffled order (every block once), each
//! with [`DEPTH`] requests in flight on both sides.
//!
//! canopy runs in this process through the `canopy-peerd` library, as the
//! daemons would (the same driver, sockets and origin reads), and reads
//! through the leaf's [`NodeHandle`]: a request of `bs` bytes is the reads
//! of its chunks, all at once, as the ublk target splits a device request.
//!
//! Fairness: the root reads its origin with O_DIRECT, while nbdkit's file
//! plugin goes through the page cache (with the kernel's readahead). The
//! page cache is dropped before every run, so both start cold; they are
//! not equal, and a sequential run favours nbdkit's readahead.
//!
//! Every run starts new peers (no cache anywhere), and the runs alternate
//! canopy sealed, canopy plain, nbdkit, for [`Size::rounds`] rounds; the
//! table has each round and the medians, ratios against nbdkit in the same
//! round.
//!
//! The helpers that B4 shares (the volume file, keys, starting peers,
//! reading a volume through a leaf, dropping caches) live here too.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use canopy_peerd::config::{PeerConfig, PeerRole, Size as CfgSize};
use canopy_peerd::{start_peer, NodeHandle, Peer};
use indicatif::ProgressBar;
use tokio::task::JoinSet;

use crate::peers::{fio, nbdkit, Endpoint, FioJob};
use crate::progress::Progress;
use crate::table::{median, ratio, Table};

/// The volume's chunk size: canopy's default (64 KiB).
pub const CHUNK: u64 = 64 << 10;

/// Requests in flight, on both sides.
pub const DEPTH: u32 = 8;

/// The volume's name (the keys are made for it).
pub const VOLUME: &str = "bench";

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Bytes of the volume, all read once per run.
    pub volume: u64,
    /// Rounds of the alternation.
    pub rounds: usize,
}

impl Size {
    /// The figures' run: 1 GiB, two rounds.
    pub const FULL: Size = Size {
        volume: 1 << 30,
        rounds: 2,
    };
    /// A run that only shows the harness works (CI): every path runs,
    /// once, on 16 MiB.
    pub const SMOKE: Size = Size {
        volume: 16 << 20,
        rounds: 1,
    };
}

/// A read pattern: fio's `rw` and block size.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    /// Its name in the table.
    pub name: &'static str,
    /// fio's `--rw`.
    pub rw: &'static str,
    /// Bytes per request.
    pub bs: u64,
}

impl Pattern {
    /// Whether requests come in a shuffled order.
    pub fn random(&self) -> bool {
        self.rw == "randread"
    }
}

/// B2's patterns.
pub const PATTERNS: [Pattern; 2] = [
    Pattern {
        name: "1M sequential",
        rw: "read",
        bs: 1 << 20,
    },
    Pattern {
        name: "64k random",
        rw: "randread",
        bs: 64 << 10,
    },
];

/// Drop the page cache (after a sync), so that the next run starts cold.
/// Needs root; a smoke run only warns without it (its figures mean
/// nothing), a full run fails, since its figures would not be cold.
pub fn drop_caches(smoke: bool, progress: &Progress) -> Result<()> {
    nix::unistd::sync();
    match std::fs::write("/proc/sys/vm/drop_caches", "3\n") {
        Ok(()) => Ok(()),
        Err(e) if smoke => {
            progress.stage(&format!(
                "cannot drop the page cache ({e}); smoke run goes on"
            ));
            Ok(())
        }
        Err(e) => Err(anyhow!(
            "cannot drop the page cache ({e}): cold-read figures need root"
        )),
    }
}

/// CPU seconds (user + system) used so far by this process, and by its
/// children that have been waited for (nbdkit, fio), from /proc/self/stat.
/// Wall time on a machine shared with other work says little alone; CPU
/// time per run is what the work cost, whoever else ran.
pub fn cpu_seconds() -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    parse_cpu(&stat).context("parsing /proc/self/stat")
}

/// (utime + stime, cutime + cstime) of a /proc/PID/stat line, in seconds
/// (USER_HZ is 100 on Linux).
fn parse_cpu(stat: &str) -> Option<(f64, f64)> {
    // The command name may hold spaces and parentheses: fields start
    // after the last ')'; the first of them is field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 4 {
        return None;
    }
    Some(((f[0] + f[1]) as f64 / 100.0, (f[2] + f[3]) as f64 / 100.0))
}

/// What a run measured: bytes per second, and CPU seconds spent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figure {
    /// Bytes per second.
    pub rate: f64,
    /// CPU seconds (canopy: this process; nbdkit: nbdkit and fio).
    pub cpu: f64,
}

/// splitmix64: a fixed, dependency-free stream for the volume's contents
/// and the shuffles.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Write `bytes` of pseudo-random data (incompressible, so nothing on the
/// way can shortcut it) to `path`, and make it durable.
pub fn volume_file(path: &Path, bytes: u64, progress: &Progress) -> Result<()> {
    use std::io::Write as _;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut state = 0x00c0_1d5e_ed00_0001u64;
    let mut block = vec![0u8; 1 << 20];
    let bar = progress.bar(bytes.div_ceil(1 << 20), "writing the volume", "MiB");
    let mut left = bytes;
    while left > 0 {
        for w in block.chunks_exact_mut(8) {
            w.copy_from_slice(&splitmix(&mut state).to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
        bar.inc(1);
    }
    f.sync_all()?;
    bar.finish_and_clear();
    Ok(())
}

/// Fisher-Yates with splitmix64: the same shuffle every run.
pub fn shuffle(v: &mut [u64], mut seed: u64) {
    for i in (1..v.len()).rev() {
        let j = (splitmix(&mut seed) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// The volume's key files in `dir`, made as the product makes them
/// (`canopy-keys new`): (trusted key file, relay verify file).
pub fn make_keys(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let k = canopy_keys::TrustedKeys::generate(VOLUME).context("generating keys")?;
    canopy_keys::write_new(dir, &k).context("writing key files")
}

/// A root serving `origin` with chunks of [`CHUNK`], on a free loopback
/// port; with the trusted key file `keys` if given.
pub fn root_config(origin: &Path, keys: Option<&Path>) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Root, VOLUME);
    c.name = Some("root".into());
    c.listen = Some("127.0.0.1:0".into());
    c.origin = Some(origin.to_path_buf());
    c.chunk_size = Some(CfgSize(CHUNK));
    c.keys = keys.map(Path::to_path_buf);
    c
}

/// A leaf under `parent` whose cache holds `chunks` (so no eviction
/// traffic mixes into a cold read), with the trusted key file `keys`.
///
/// Its memory tier is committed when it connects (`cache_prefault`), as
/// on a host that dedicates the memory: an empty cache in a daemon that
/// has run for a while, not the first touch of fresh memory, which costs
/// about 1.5 s per GiB of kernel page zeroing in this VM and a third of
/// B4's CPU. The leaf is ready, and the clock starts, only after that.
pub fn leaf_config(name: &str, parent: &str, chunks: u64, keys: Option<&Path>) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Leaf, VOLUME);
    c.name = Some(name.into());
    c.parent = Some(parent.to_string());
    c.cache_chunks = Some(chunks as usize + 16);
    c.cache_prefault = Some(true);
    c.keys = keys.map(Path::to_path_buf);
    c
}

/// Start a peer and wait (20 s at most) until it is ready.
pub async fn start(cfg: PeerConfig) -> Result<Peer> {
    cfg.validate("canopy-bench")?;
    let peer = start_peer(&cfg).await?;
    tokio::time::timeout(Duration::from_secs(20), peer.ready())
        .await
        .context("peer not ready within 20 s")??;
    Ok(peer)
}

/// The address a started peer listens on.
pub fn addr(p: &Peer) -> Result<String> {
    Ok(p.local_addr().context("peer does not listen")?.to_string())
}

/// Stop peers, each within 10 s (a stop that hangs is not the figure's
/// business, and must not hang the run).
pub async fn stop(peers: Vec<Peer>) {
    for p in peers {
        let _ = tokio::time::timeout(Duration::from_secs(10), p.shutdown()).await;
    }
}

/// Read `requests` (first chunk of each) through `leaf`, each request
/// `per` chunks read at once, `depth` requests in flight. Returns the
/// chunks listed in `keep` for verification. `bar` counts requests done.
/// Bounded: every read is answered or fails (the driver answers STOPPED
/// when it stops), and the whole run by `limit`.
pub async fn read_through(
    leaf: &NodeHandle,
    requests: &[u64],
    per: u64,
    depth: usize,
    keep: &[u64],
    bar: &ProgressBar,
    limit: Duration,
) -> Result<Vec<(u64, Bytes)>> {
    let run = async {
        let mut inflight: JoinSet<Result<Vec<(u64, Bytes)>>> = JoinSet::new();
        let mut kept = Vec::new();
        let mut next = requests.iter();
        loop {
            while inflight.len() < depth {
                let Some(&first) = next.next() else { break };
                let h = leaf.clone();
                let keep: Vec<u64> = keep
                    .iter()
                    .copied()
                    .filter(|c| (first..first + per).contains(c))
                    .collect();
                inflight.spawn(async move {
                    // The request's chunks at once, as a device request is.
                    let mut chunks = JoinSet::new();
                    for c in first..first + per {
                        let h = h.clone();
                        chunks.spawn(async move { (c, h.read(c).await) });
                    }
                    let mut out = Vec::new();
                    while let Some(r) = chunks.join_next().await {
                        let (c, data) = r.context("read task failed")?;
                        let data = data.with_context(|| format!("reading chunk {c}"))?;
                        if keep.contains(&c) {
                            out.push((c, data));
                        }
                    }
                    Ok(out)
                });
            }
            let Some(r) = inflight.join_next().await else {
                break;
            };
            kept.extend(r.context("request task failed")??);
            bar.inc(1);
        }
        Ok::<_, anyhow::Error>(kept)
    };
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| anyhow!("reads did not finish within {limit:?}"))?
}

/// Check that `kept` chunks hold what `origin` holds.
pub fn verify(origin: &Path, kept: &[(u64, Bytes)], want: usize) -> Result<()> {
    let file = std::fs::File::open(origin)?;
    let len = file.metadata()?.len();
    for (c, data) in kept {
        let off = c * CHUNK;
        let n = usize::try_from(CHUNK.min(len.saturating_sub(off)))?;
        let mut expect = vec![0u8; n];
        file.read_exact_at(&mut expect, off)?;
        ensure!(data.len() >= n, "chunk {c}: {} bytes", data.len());
        ensure!(data[..n] == expect[..], "chunk {c} differs from the origin");
    }
    ensure!(
        kept.len() == want,
        "{} of {want} sampled chunks came back",
        kept.len()
    );
    Ok(())
}

/// Chunks sampled for verification: first, middle, last and two between.
pub fn samples(chunks: u64) -> Vec<u64> {
    let mut s = vec![0, chunks / 3, chunks / 2, 2 * chunks / 3, chunks - 1];
    s.sort_unstable();
    s.dedup();
    s
}

/// The requests of `pattern` over a volume of `chunks`: each request's
/// first chunk, in order or shuffled.
pub fn requests(pattern: &Pattern, chunks: u64) -> Vec<u64> {
    let per = (pattern.bs / CHUNK).max(1);
    let mut r: Vec<u64> = (0..chunks).step_by(per as usize).collect();
    if pattern.random() {
        shuffle(&mut r, 0x5eed_b2b2);
    }
    r
}

/// One canopy run: a new root and leaf, the whole volume read once with
/// `pattern`. Bytes per second.
async fn canopy_run(
    origin: &Path,
    volume: u64,
    keys: Option<&Path>,
    pattern: &Pattern,
    progress: &Progress,
    what: &str,
) -> Result<Figure> {
    let chunks = whole_chunks(volume)?;
    let root = start(root_config(origin, keys)).await?;
    let leaf = match start(leaf_config("leaf", &addr(&root)?, chunks, keys)).await {
        Ok(l) => l,
        Err(e) => {
            stop(vec![root]).await;
            return Err(e);
        }
    };
    let reqs = requests(pattern, chunks);
    let per = (pattern.bs / CHUNK).max(1);
    let keep = samples(chunks);
    let bar = progress.bar(reqs.len() as u64, what, "requests");
    let cpu0 = cpu_seconds()?.0;
    let t0 = Instant::now();
    let r = read_through(
        &leaf.handle(),
        &reqs,
        per,
        DEPTH as usize,
        &keep,
        &bar,
        Duration::from_secs(600),
    )
    .await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds()?.0 - cpu0;
    bar.finish_and_clear();
    stop(vec![leaf, root]).await;
    verify(origin, &r?, keep.len())?;
    Ok(Figure {
        rate: volume as f64 / secs,
        cpu,
    })
}

/// One nbdkit run: nbdkit's file plugin on loopback TCP, fio reading the
/// whole file once with `pattern`. Bytes per second.
fn nbdkit_run(
    origin: &Path,
    volume: u64,
    pattern: &Pattern,
    dir: &Path,
    progress: &Progress,
    what: &str,
) -> Result<Figure> {
    let cpu0 = cpu_seconds()?.1;
    let at = Endpoint::free_tcp()?;
    let server = nbdkit(
        "file",
        &[origin.display().to_string()],
        &at,
        &dir.join("nbdkit.log"),
    )?;
    let job = FioJob {
        rw: pattern.rw,
        bs: pattern.bs,
        iodepth: DEPTH,
        size: volume,
        runtime: None,
        numjobs: 1,
    };
    let r = fio(&at.uri(), &job, progress, what)?;
    // Stopped and reaped, so that its CPU time is the children's.
    drop(server);
    ensure!(r.bytes == volume, "fio read {} of {volume} bytes", r.bytes);
    Ok(Figure {
        rate: r.bytes_per_sec,
        cpu: cpu_seconds()?.1 - cpu0,
    })
}

/// One round's figures for one pattern, bytes per second.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// canopy, sealed.
    pub sealed: Figure,
    /// canopy, without keys.
    pub plain: Figure,
    /// nbdkit + fio.
    pub nbdkit: Figure,
}

/// B2 as the harness runs it.
pub fn bench(smoke: bool, progress: &Progress) -> Result<Vec<Table>> {
    let size = if smoke { Size::SMOKE } else { Size::FULL };
    let rounds = run(size, smoke, progress)?;
    Ok(vec![table(&rounds, size)])
}

/// A runtime for the in-process tree, as the daemon builds its own.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

/// Run B2 at `size`: per pattern, the rounds' figures.
pub fn run(size: Size, smoke: bool, progress: &Progress) -> Result<Vec<(Pattern, Vec<Round>)>> {
    crate::peers::require("nbdkit")?;
    crate::peers::require("fio")?;
    ensure!(
        size.volume.is_multiple_of(1 << 20) && size.volume > 0,
        "volume must be whole MiB"
    );
    let dir = tempfile::tempdir_in(scratch()).context("scratch directory")?;
    let origin = dir.path().join("volume.img");
    progress.stage(&format!("B2: writing a {} MiB volume", size.volume >> 20));
    volume_file(&origin, size.volume, progress)?;
    let (keys, _verify) = make_keys(&dir.path().join("keys"))?;
    let rt = runtime()?;
    let mut out = Vec::new();
    for p in PATTERNS {
        out.push((p, Vec::new()));
    }
    for round in 1..=size.rounds {
        for (p, rounds) in out.iter_mut() {
            let tag = format!("B2 {} round {round}", p.name);
            progress.stage(&format!("{tag}: canopy sealed, canopy plain, nbdkit"));
            drop_caches(smoke, progress)?;
            let sealed = rt.block_on(canopy_run(
                &origin,
                size.volume,
                Some(&keys),
                p,
                progress,
                &format!("{tag} canopy sealed"),
            ))?;
            drop_caches(smoke, progress)?;
            let plain = rt.block_on(canopy_run(
                &origin,
                size.volume,
                None,
                p,
                progress,
                &format!("{tag} canopy plain"),
            ))?;
            drop_caches(smoke, progress)?;
            let nbd = nbdkit_run(
                &origin,
                size.volume,
                p,
                dir.path(),
                progress,
                &format!("{tag} nbdkit + fio"),
            )?;
            progress.stage(&format!(
                "{tag}: sealed {:.0} MB/s, plain {:.0} MB/s, nbdkit {:.0} MB/s",
                sealed.rate / 1e6,
                plain.rate / 1e6,
                nbd.rate / 1e6
            ));
            rounds.push(Round {
                sealed,
                plain,
                nbdkit: nbd,
            });
        }
    }
    Ok(out)
}

/// Where volumes go: `CANOPY_BENCH_DIR`, else the system's temporary
/// directory (which must not be a tmpfs: the runs are meant to read a
/// disk, and O_DIRECT needs a filesystem that takes it).
pub fn scratch() -> PathBuf {
    std::env::var_os("CANOPY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// B2's table: each round, then the medians (of the figures, and of the
/// per-round ratios).
pub fn table(results: &[(Pattern, Vec<Round>)], size: Size) -> Table {
    let mut t = Table::new(
        format!(
            "B2, cold read: {} MiB volume, {} KiB chunks, depth {DEPTH}, loopback TCP, leaf ← root",
            size.volume >> 20,
            CHUNK >> 10
        ),
        &[
            "pattern",
            "round",
            "canopy sealed MB/s",
            "canopy plain MB/s",
            "nbdkit file + fio MB/s",
            "sealed/nbdkit",
            "plain/nbdkit",
            "CPU s sealed / plain / nbdkit+fio",
            "target met",
        ],
    );
    let cpu = |r: &Round| {
        format!(
            "{:.1} / {:.1} / {:.1}",
            r.sealed.cpu, r.plain.cpu, r.nbdkit.cpu
        )
    };
    for (p, rounds) in results {
        for (i, r) in rounds.iter().enumerate() {
            t.row(vec![
                p.name.to_string(),
                (i + 1).to_string(),
                format!("{:.0}", r.sealed.rate / 1e6),
                format!("{:.0}", r.plain.rate / 1e6),
                format!("{:.0}", r.nbdkit.rate / 1e6),
                ratio(r.sealed.rate, r.nbdkit.rate),
                ratio(r.plain.rate, r.nbdkit.rate),
                cpu(r),
                String::new(),
            ]);
        }
        let med = |f: &dyn Fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        let sealed_ratio = med(&|r| r.sealed.rate / r.nbdkit.rate);
        let plain_ratio = med(&|r| r.plain.rate / r.nbdkit.rate);
        let met = sealed_ratio >= 0.8 && plain_ratio >= 1.0;
        t.row(vec![
            p.name.to_string(),
            "median".into(),
            format!("{:.0}", med(&|r| r.sealed.rate) / 1e6),
            format!("{:.0}", med(&|r| r.plain.rate) / 1e6),
            format!("{:.0}", med(&|r| r.nbdkit.rate) / 1e6),
            format!("{sealed_ratio:.2}×"),
            format!("{plain_ratio:.2}×"),
            format!(
                "{:.1} / {:.1} / {:.1}",
                med(&|r| r.sealed.cpu),
                med(&|r| r.plain.cpu),
                med(&|r| r.nbdkit.cpu)
            ),
            if met { "yes" } else { "no" }.into(),
        ]);
    }
    t.note("targets: sealed ≥ 0.8× nbdkit, plain ≥ 1.0× nbdkit (median of per-round ratios); MB = 10^6 bytes");
    t.note("page cache dropped before every run; the root reads its origin with O_DIRECT, nbdkit's file plugin through the page cache (with readahead)");
    t.note(
        "CPU s: canopy's whole tree (this process) during the reads; nbdkit's and fio's together",
    );
    t.note(PREFAULT_NOTE);
    t
}

/// How the canopy runs of B2 and B4 treat their caches' memory.
pub const PREFAULT_NOTE: &str = "canopy's caches are empty but their memory is committed (`cache_prefault`) before the clock starts: the kernel zeroing fresh pages on first touch cost about 1.5 s per GiB in this VM";

/// Fail unless `v` is a whole number of chunks (the runs read whole
/// chunks).
pub fn whole_chunks(v: u64) -> Result<u64> {
    if v == 0 || !v.is_multiple_of(CHUNK) {
        bail!("{v} bytes is not a whole number of {CHUNK}-byte chunks");
    }
    Ok(v / CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cover_every_chunk_once_in_either_order() {
        for p in PATTERNS {
            let per = (p.bs / CHUNK).max(1);
            let r = requests(&p, 64);
            let mut all: Vec<u64> = r.iter().flat_map(|&f| f..f + per).collect();
            all.sort_unstable();
            assert_eq!(all, (0..64).collect::<Vec<_>>(), "{}", p.name);
            if p.random() {
                assert_ne!(r, (0..64).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn samples_and_whole_chunks() {
        assert_eq!(samples(1), vec![0]);
        assert_eq!(samples(100), vec![0, 33, 50, 66, 99]);
        assert_eq!(whole_chunks(CHUNK * 3).unwrap(), 3);
        assert!(whole_chunks(CHUNK + 1).is_err());
    }

    #[test]
    fn cpu_times_come_from_proc_stat() {
        // A command name with a space and a parenthesis, as the kernel
        // allows; utime 150, stime 50, cutime 7, cstime 3 ticks.
        let stat = "42 (a b) c) S 1 1 1 0 -1 0 0 0 0 0 150 50 7 3 20 0 1 0";
        assert_eq!(parse_cpu(stat), Some((2.0, 0.1)));
        assert_eq!(parse_cpu("42 (x) S 1"), None);
        assert!(cpu_seconds().is_ok());
    }

    /// The in-process tree, sealed, reads what the file holds (no timing).
    #[test]
    fn a_sealed_leaf_reads_the_volume_from_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("v.img");
        let progress = Progress::new();
        volume_file(&origin, 2 << 20, &progress).unwrap();
        let (keys, _) = make_keys(&dir.path().join("keys")).unwrap();
        let rt = runtime().unwrap();
        for keys in [Some(keys.as_path()), None] {
            for p in PATTERNS {
                let f = rt
                    .block_on(canopy_run(&origin, 2 << 20, keys, &p, &progress, "test"))
                    .unwrap();
                assert!(f.rate > 0.0 && f.cpu >= 0.0);
            }
        }
    }
}
