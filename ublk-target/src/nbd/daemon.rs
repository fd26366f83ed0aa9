//! `canopy-ublk add --no-device --export-nbd ADDR`: a daemon that serves the
//! volume over NBD only. No ublk device is made, so it needs neither the
//! ublk driver nor root (only access to the origin, or the parent, and the
//! socket path).
//!
//! Threads: the NBD server's (see [`super::server`]), the cache cleaner (an
//! embedded volume) or the node's runtime (a tree leaf), and the main
//! thread, which waits for SIGINT/SIGTERM. The stop signals are blocked
//! before any thread starts, so only that wait takes them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use canopy_cache::CacheStack;
use canopy_origin::OriginStore;
use canopy_peerd::PeerConfig;
use nix::sys::signal::SigSet;

use super::tree::TreeBackend;
use super::{mode_name, ExportAddr, NbdServer};
use crate::device::block_stop_signals;
use crate::leaf_device::{join_tree, Joined};
use crate::spec::VolumeSpec;
use crate::volume::Volume;

/// How long a clean stop waits for a leaf's final FLUSH to reach the root.
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(60);

/// Serve the volume `spec` describes on `addr` until SIGINT or SIGTERM.
/// Then stop taking requests, answer those in flight, write every dirty
/// chunk back to the origin and return.
///
/// Prints the export's NBD URI on stdout once clients can connect (the
/// one line scripts read, as `add` prints the device path).
pub fn serve_embedded(spec: &VolumeSpec, addr: &ExportAddr) -> Result<()> {
    let stop_signals = block_stop_signals()?;
    let origin = OriginStore::open(&spec.origin, None, spec.cache.chunk_size)?;
    let cache = Arc::new(
        CacheStack::new(spec.cache.clone(), Arc::new(origin)).context("building the cache")?,
    );
    let _cleaner = cache.spawn_cleaner(Duration::from_millis(50));
    let volume = Arc::new(Volume::new(cache, spec.mode));
    let server = NbdServer::start(addr, volume.clone()).context("starting the NBD export")?;
    announce(&server);
    tracing::info!(
        origin = %spec.origin.display(),
        mode = mode_name(spec.mode),
        size = volume.size(),
        "serving over NBD only (no ublk device)"
    );
    wait_for_stop(&stop_signals);
    // Clients first: once the server has stopped no write can arrive, so
    // the flush below is the last word on the origin.
    server.stop();
    volume
        .cache()
        .flush()
        .context("final flush to the origin")?;
    tracing::info!("stopped; origin is up to date");
    Ok(())
}

/// Serve a volume of a canopy tree, as a leaf under `peer.parent`, on
/// `addr` until SIGINT or SIGTERM. Then stop taking requests, answer those
/// in flight, send every acknowledged write up (durable at the root) and
/// leave the tree. Prints the export's NBD URI once clients can connect.
pub fn serve_leaf(peer: &PeerConfig, addr: &ExportAddr) -> Result<()> {
    let stop_signals = block_stop_signals()?;
    let Joined {
        rt,
        peer: node,
        leaf,
        size,
    } = join_tree(peer, 1)?;
    let chunk_size = leaf.chunk_size();
    let backend = Arc::new(TreeBackend::new(leaf.clone(), rt.handle().clone()));
    let server = NbdServer::start(addr, backend).context("starting the NBD export")?;
    announce(&server);
    tracing::info!(
        size,
        chunk_size,
        "serving a tree leaf over NBD only (no ublk device)"
    );
    wait_for_stop(&stop_signals);
    server.stop();
    let flushed =
        rt.block_on(async { tokio::time::timeout(FINAL_FLUSH_WAIT, leaf.node().flush()).await });
    let result = match flushed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("final flush to the root")),
        Err(_) => Err(anyhow::anyhow!(
            "final flush did not reach the root within {FINAL_FLUSH_WAIT:?}"
        )),
    };
    rt.block_on(node.shutdown());
    result?;
    tracing::info!("stopped; every acknowledged write is at the root");
    Ok(())
}

fn wait_for_stop(stop_signals: &SigSet) {
    match stop_signals.wait() {
        Ok(sig) => tracing::info!(signal = ?sig, "stopping"),
        Err(e) => tracing::error!(error = %e, "waiting for a stop signal failed; stopping"),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// The export is ready: print its URI and tell systemd.
fn announce(server: &NbdServer) {
    use std::io::Write;
    println!("{server}");
    let _ = std::io::stdout().flush();
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not tell systemd we are ready");
    }
}
