//! B4 (issue 5): fan-out. One root, two untrusted relays under it, four
//! leaves under each relay; all eight leaves read the whole volume, cold,
//! at once (1 MiB requests in order, [`DEPTH`] in flight each). The figures
//! are the bytes the root sent (its sockets' count, `PeerStats::bytes_sent`,
//! over the reads only) and the wall time until every leaf has read
//! everything. The peer is one nbdkit (file plugin, loopback TCP) read by
//! eight fio jobs, each its own NBD connection reading the whole volume.
//!
//! The volume is made with keys, as a tree with relays must be: the root
//! seals and signs, each relay checks every record's signature and keeps
//! it sealed, each leaf opens it (checking its AEAD tag). The relays' and leaves' caches hold the
//! whole volume, so no eviction traffic mixes in. What the root sends
//! beyond twice the volume is the records' overhead, the protocol's
//! messages, and any chunk a relay asked for twice.
//!
//! The page cache is dropped before every run; the runs alternate canopy
//! and nbdkit for [`Size::rounds`] rounds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use canopy_peerd::config::{PeerConfig, PeerRole};
use canopy_peerd::Peer;
use tokio::task::JoinSet;

use crate::b2::{
    addr, cpu_seconds, drop_caches, leaf_config, make_keys, read_through, requests, root_config,
    runtime, samples, scratch, start, stop, verify, volume_file, whole_chunks, Pattern, CHUNK,
    DEPTH, VOLUME,
};
use crate::peers::{fio, nbdkit, Endpoint, FioJob};
use crate::progress::Progress;
use crate::table::{median, ratio, Table};

/// Relays under the root.
pub const RELAYS: usize = 2;

/// Leaves under each relay.
pub const LEAVES_PER_RELAY: usize = 4;

/// Every leaf's (and fio job's) pattern: the whole volume in order.
const PATTERN: Pattern = Pattern {
    name: "1M sequential",
    rw: "read",
    bs: 1 << 20,
};

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    /// Bytes of the volume; every leaf reads all of it.
    pub volume: u64,
    /// Rounds of the alternation.
    pub rounds: usize,
}

impl Size {
    /// The figures' run: 256 MiB, two rounds.
    pub const FULL: Size = Size {
        volume: 256 << 20,
        rounds: 2,
    };
    /// A run that only shows the harness works (CI).
    pub const SMOKE: Size = Size {
        volume: 8 << 20,
        rounds: 1,
    };
}

/// One round's figures.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// Bytes canopy's root sent while the leaves read.
    pub root_sent: u64,
    /// Seconds until every leaf had read everything.
    pub canopy_secs: f64,
    /// CPU seconds the whole tree used meanwhile.
    pub canopy_cpu: f64,
    /// Bytes nbdkit served (what its fio jobs read; its socket bytes are
    /// not in /proc/PID/io, which counts no send()).
    pub nbdkit_sent: u64,
    /// Seconds of the longest fio job.
    pub nbdkit_secs: f64,
    /// CPU seconds of nbdkit and fio.
    pub nbdkit_cpu: f64,
}

/// A relay under `parent` with only the verifying key, caching `chunks`.
fn relay_config(name: &str, parent: &str, chunks: u64, verify: &Path) -> PeerConfig {
    let mut c = PeerConfig::new(PeerRole::Relay, VOLUME);
    c.name = Some(name.into());
    c.listen = Some("127.0.0.1:0".into());
    c.parent = Some(parent.to_string());
    c.cache_chunks = Some(chunks as usize + 16);
    // As the leaves (`b2::leaf_config`).
    c.cache_prefault = Some(true);
    c.verify_key = Some(verify.to_path_buf());
    c
}

/// One canopy run: a new tree, every leaf reading the whole volume at
/// once. (bytes the root sent, seconds, CPU seconds).
async fn canopy_run(
    origin: &Path,
    volume: u64,
    keys: &Path,
    verify_key: &Path,
    progress: &Progress,
    what: &str,
) -> Result<(u64, f64, f64)> {
    let chunks = whole_chunks(volume)?;
    let mut peers: Vec<Peer> = Vec::new();
    let r = async {
        let root = start(root_config(origin, Some(keys))).await?;
        let root_addr = addr(&root)?;
        let root_handle = root.handle();
        peers.push(root);
        let mut leaves = Vec::new();
        for r in 0..RELAYS {
            let relay = start(relay_config(
                &format!("relay{r}"),
                &root_addr,
                chunks,
                verify_key,
            ))
            .await?;
            let relay_addr = addr(&relay)?;
            peers.push(relay);
            for l in 0..LEAVES_PER_RELAY {
                let name = format!("leaf{r}.{l}");
                let leaf = start(leaf_config(&name, &relay_addr, chunks, Some(keys))).await?;
                leaves.push(leaf.handle());
                peers.push(leaf);
            }
        }
        let before = root_handle.stats().await.context("root stats")?.bytes_sent;
        let reqs = requests(&PATTERN, chunks);
        let per = (PATTERN.bs / CHUNK).max(1);
        let keep = samples(chunks);
        let bar = progress.bar(reqs.len() as u64 * leaves.len() as u64, what, "requests");
        let cpu0 = cpu_seconds()?.0;
        let t0 = Instant::now();
        let mut all = JoinSet::new();
        for leaf in leaves {
            let (reqs, keep, bar) = (reqs.clone(), keep.clone(), bar.clone());
            all.spawn(async move {
                read_through(
                    &leaf,
                    &reqs,
                    per,
                    DEPTH as usize,
                    &keep,
                    &bar,
                    Duration::from_secs(600),
                )
                .await
            });
        }
        let mut kept = Vec::new();
        while let Some(r) = all.join_next().await {
            kept.push(r.context("leaf task failed")??);
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds()?.0 - cpu0;
        bar.finish_and_clear();
        let after = root_handle.stats().await.context("root stats")?.bytes_sent;
        for k in &kept {
            verify(origin, k, keep.len())?;
        }
        Ok::<_, anyhow::Error>((after.saturating_sub(before), secs, cpu))
    }
    .await;
    // Leaves first, the root last, so that nobody redials a stopped parent.
    peers.reverse();
    stop(peers).await;
    r
}

/// One nbdkit run: eight fio jobs reading the whole file from one nbdkit.
/// (bytes read, seconds of the longest job, CPU seconds of nbdkit and
/// fio).
fn nbdkit_run(
    origin: &Path,
    volume: u64,
    dir: &Path,
    progress: &Progress,
    what: &str,
) -> Result<(u64, f64, f64)> {
    let cpu0 = cpu_seconds()?.1;
    let at = Endpoint::free_tcp()?;
    let server = nbdkit(
        "file",
        &[origin.display().to_string()],
        &at,
        &dir.join("nbdkit.log"),
    )?;
    let jobs = (RELAYS * LEAVES_PER_RELAY) as u32;
    let job = FioJob {
        rw: PATTERN.rw,
        bs: PATTERN.bs,
        iodepth: DEPTH,
        size: volume,
        runtime: None,
        numjobs: jobs,
    };
    let r = fio(&at.uri(), &job, progress, what)?;
    drop(server);
    ensure!(
        r.bytes == volume * u64::from(jobs),
        "fio read {} of {} bytes",
        r.bytes,
        volume * u64::from(jobs)
    );
    Ok((r.bytes, r.seconds, cpu_seconds()?.1 - cpu0))
}

/// B4 as the harness runs it.
pub fn bench(smoke: bool, progress: &Progress) -> Result<Vec<Table>> {
    let size = if smoke { Size::SMOKE } else { Size::FULL };
    let rounds = run(size, smoke, progress)?;
    Ok(vec![table(&rounds, size)])
}

/// Run B4 at `size`: each round's figures.
pub fn run(size: Size, smoke: bool, progress: &Progress) -> Result<Vec<Round>> {
    crate::peers::require("nbdkit")?;
    crate::peers::require("fio")?;
    ensure!(
        size.volume.is_multiple_of(1 << 20) && size.volume > 0,
        "volume must be whole MiB"
    );
    let dir = tempfile::tempdir_in(scratch()).context("scratch directory")?;
    let origin = dir.path().join("volume.img");
    progress.stage(&format!("B4: writing a {} MiB volume", size.volume >> 20));
    volume_file(&origin, size.volume, progress)?;
    let (keys, verify_key) = make_keys(&dir.path().join("keys"))?;
    let rt = runtime()?;
    let mut rounds = Vec::new();
    for round in 1..=size.rounds {
        let tag = format!("B4 round {round}");
        progress.stage(&format!(
            "{tag}: canopy (root, 2 relays, 8 leaves), nbdkit (8 fio jobs)"
        ));
        drop_caches(smoke, progress)?;
        let (root_sent, canopy_secs, canopy_cpu) = rt.block_on(canopy_run(
            &origin,
            size.volume,
            &keys,
            &verify_key,
            progress,
            &format!("{tag} canopy"),
        ))?;
        drop_caches(smoke, progress)?;
        let (nbdkit_sent, nbdkit_secs, nbdkit_cpu) = nbdkit_run(
            &origin,
            size.volume,
            dir.path(),
            progress,
            &format!("{tag} nbdkit + fio"),
        )?;
        progress.stage(&format!(
            "{tag}: root sent {:.2}× the volume in {canopy_secs:.2} s; nbdkit {:.2}× in {nbdkit_secs:.2} s",
            root_sent as f64 / size.volume as f64,
            nbdkit_sent as f64 / size.volume as f64,
        ));
        rounds.push(Round {
            root_sent,
            canopy_secs,
            canopy_cpu,
            nbdkit_sent,
            nbdkit_secs,
            nbdkit_cpu,
        });
    }
    Ok(rounds)
}

/// B4's table: each round, then the medians.
pub fn table(rounds: &[Round], size: Size) -> Table {
    let v = size.volume as f64;
    let mut t = Table::new(
        format!(
            "B4, fan-out: {} MiB volume, root ← {RELAYS} relays ← {} leaves each, sealed, 1M sequential, depth {DEPTH}",
            size.volume >> 20,
            LEAVES_PER_RELAY
        ),
        &[
            "round",
            "root sent MiB",
            "root sent / volume",
            "canopy wall s",
            "nbdkit sent MiB",
            "nbdkit wall s",
            "wall canopy/nbdkit",
            "CPU s canopy / nbdkit+fio",
            "target met",
        ],
    );
    let met = |sent: f64, wall_ratio: f64| sent / v <= 2.2 && wall_ratio <= 1.0;
    for (i, r) in rounds.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            format!("{:.1}", r.root_sent as f64 / (1u64 << 20) as f64),
            format!("{:.3}×", r.root_sent as f64 / v),
            format!("{:.2}", r.canopy_secs),
            format!("{:.1}", r.nbdkit_sent as f64 / (1u64 << 20) as f64),
            format!("{:.2}", r.nbdkit_secs),
            ratio(r.canopy_secs, r.nbdkit_secs),
            format!("{:.1} / {:.1}", r.canopy_cpu, r.nbdkit_cpu),
            String::new(),
        ]);
    }
    let sent = median(
        &rounds
            .iter()
            .map(|r| r.root_sent as f64)
            .collect::<Vec<_>>(),
    );
    let wall_ratio = median(
        &rounds
            .iter()
            .map(|r| r.canopy_secs / r.nbdkit_secs)
            .collect::<Vec<_>>(),
    );
    t.row(vec![
        "median".into(),
        format!("{:.1}", sent / (1u64 << 20) as f64),
        format!("{:.3}×", sent / v),
        format!(
            "{:.2}",
            median(&rounds.iter().map(|r| r.canopy_secs).collect::<Vec<_>>())
        ),
        format!(
            "{:.1}",
            median(
                &rounds
                    .iter()
                    .map(|r| r.nbdkit_sent as f64)
                    .collect::<Vec<_>>()
            ) / (1u64 << 20) as f64
        ),
        format!(
            "{:.2}",
            median(&rounds.iter().map(|r| r.nbdkit_secs).collect::<Vec<_>>())
        ),
        format!("{wall_ratio:.2}×"),
        format!(
            "{:.1} / {:.1}",
            median(&rounds.iter().map(|r| r.canopy_cpu).collect::<Vec<_>>()),
            median(&rounds.iter().map(|r| r.nbdkit_cpu).collect::<Vec<_>>())
        ),
        if met(sent, wall_ratio) { "yes" } else { "no" }.into(),
    ]);
    t.note(
        "targets: root sends ≤ 2.2× the volume; wall time ≤ nbdkit's (median of per-round ratios)",
    );
    t.note("nbdkit: one server, 8 fio jobs (one NBD connection each), each reading the whole volume; page cache dropped before every run");
    t.note(crate::b2::PREFAULT_NOTE);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole tree on a tiny volume: every leaf reads what the file
    /// holds, and the root sends each chunk about once per relay (no
    /// timing asserted).
    #[test]
    fn the_root_sends_the_volume_once_per_relay() {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("v.img");
        let progress = Progress::new();
        let volume = 4 << 20;
        volume_file(&origin, volume, &progress).unwrap();
        let (keys, verify_key) = make_keys(&dir.path().join("keys")).unwrap();
        let rt = runtime().unwrap();
        let (sent, secs, _) = rt
            .block_on(canopy_run(
                &origin,
                volume,
                &keys,
                &verify_key,
                &progress,
                "test",
            ))
            .unwrap();
        assert!(secs > 0.0);
        assert!(sent >= RELAYS as u64 * volume, "{sent}");
        assert!(sent <= RELAYS as u64 * volume * 11 / 10, "{sent}");
    }
}
