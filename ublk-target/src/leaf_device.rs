//! The ublk daemon for a leaf of a canopy tree: `/dev/ublkbN` served by a
//! node that this process runs on a tokio runtime, connected to a parent.
//!
//! Threads: libublk's queue threads take requests from the kernel. A read
//! whose chunks the node has published (it served them before and nothing
//! has changed them since) is served on the queue thread itself
//! ([`LeafVolume::try_read`]). Any other request is handed to the runtime
//! as a task ([`LeafVolume::handle`]), so a queue never blocks on the
//! network and keeps its whole depth in flight.
//! A finished task puts its completion on the queue's channel and bumps the
//! queue's eventfd; the queue keeps a read of that eventfd in its own
//! io_uring, so the wakeup arrives as one more completion among the
//! kernel's, and the queue thread commits every finished request (the ublk
//! commit must come from the queue's own ring).

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use canopy_peerd::{start_peer_with_view, Peer, PeerConfig, PeerStats, ReadView};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde::{Deserialize, Serialize};

use crate::control::{CacheChange, Report, Served, Target};
use crate::device::{
    announce, block_stop_signals, build_ctrl, commit, open_queue, preflight, start_controls,
    target_init,
};
use crate::leaf::{Completion, LeafVolume};
use crate::volume::Op;

/// The tag the eventfd read carries: above any real tag (depth <= 4096).
const WAKE_TAG: u16 = u16::MAX;

/// How long a clean stop waits for the final FLUSH to reach the root.
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(60);

/// How the leaf daemon should come up.
pub struct LeafOptions {
    /// The node: parent, volume, write mode, cache, listen address.
    pub peer: PeerConfig,
    /// Device id to ask for (`None`: let the driver choose).
    pub id: Option<u32>,
    /// Hardware queues.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Also export the volume over NBD there (`add --export-nbd`).
    pub nbd: Option<crate::nbd::ExportAddr>,
}

/// What a leaf device stores in libublk's per-device JSON, so `list` can
/// say what it serves and `recover` can say why it will not.
#[derive(Serialize, Deserialize)]
pub(crate) struct LeafSpec {
    /// The node's settings.
    pub leaf: PeerConfig,
}

/// A leaf that has joined its volume: the runtime its node runs on, the
/// node, and the volume the device (or an NBD export) serves.
pub(crate) struct Joined {
    pub rt: tokio::runtime::Runtime,
    pub peer: Peer,
    pub leaf: Arc<LeafVolume>,
    /// The volume's size in bytes.
    pub size: u64,
}

/// Start the node of `cfg` (a leaf) and wait until it has joined the
/// volume through its parent; `queues` threads will serve it.
pub(crate) fn join_tree(cfg: &PeerConfig, queues: usize) -> Result<Joined> {
    // Two workers: the node task and the links are light, and the machine's
    // cores belong to the queue (or NBD worker) threads too.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("canopy-net")
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    let parent = cfg.parent.clone().unwrap_or_default();
    let view = Arc::new(ReadView::new());
    let (peer, stats) = rt.block_on(async {
        let peer = start_peer_with_view(cfg, view.clone()).await?;
        tracing::info!(%parent, volume = %cfg.volume, "connecting to the parent");
        peer.ready()
            .await
            .with_context(|| format!("joining volume {} through {parent}", cfg.volume))?;
        let stats = peer.handle().stats().await?;
        anyhow::Ok((peer, stats))
    })?;
    let size = stats.volume_size;
    let chunk_size = usize::try_from(stats.chunk_size).unwrap_or(0);
    if chunk_size == 0 || size == 0 || size % 512 != 0 {
        bail!("the parent announced an unusable volume: {size} bytes in chunks of {chunk_size}");
    }
    tracing::info!(size, chunk_size, "joined the volume");
    let leaf = Arc::new(LeafVolume::new(
        peer.handle(),
        Some(view),
        size,
        chunk_size,
        queues,
    ));
    Ok(Joined {
        rt,
        peer,
        leaf,
        size,
    })
}

/// Serve the volume from the tree until stopped. Returns after the device is
/// removed, with every acknowledged write sent up (and, for those a FLUSH
/// covered, durable at the root).
pub fn serve_leaf(opts: LeafOptions) -> Result<()> {
    preflight()?;
    let stop_signals = block_stop_signals()?;
    let Joined {
        rt,
        peer,
        leaf,
        size,
    } = join_tree(&opts.peer, usize::from(opts.queues))?;
    let nbd = opts
        .nbd
        .as_ref()
        .map(|addr| {
            let backend = crate::nbd::tree::TreeBackend::new(leaf.clone(), rt.handle().clone());
            crate::nbd::NbdServer::start(addr, Arc::new(backend))
        })
        .transpose()
        .context("starting the NBD export")?;

    // No USER_RECOVERY: a restarted leaf is a new node of the tree (its
    // grants died with it), so there is nothing for `recover` to re-attach.
    let ctrl = build_ctrl(opts.id, opts.queues, opts.depth, 0, false)?;
    let flush = {
        let leaf = leaf.clone();
        let rt = rt.handle().clone();
        move || {
            if let Err(e) = rt.block_on(leaf.node().flush()) {
                tracing::error!(error = %e, "flush before stop failed");
            }
        }
    };
    let target = Arc::new(LeafTarget {
        leaf: leaf.clone(),
        rt: rt.handle().clone(),
    });
    let (server, bdev) = start_controls(&ctrl, target, stop_signals, flush)?;

    let spec_json = serde_json::to_value(LeafSpec {
        leaf: opts.peer.clone(),
    })?;
    let q_leaf = leaf.clone();
    let q_rt = rt.handle().clone();
    let q_fn = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &q_leaf, &q_rt);
    ctrl.run_target(target_init(size, spec_json), q_fn, announce(bdev.clone()))
        .map_err(|e| anyhow::anyhow!("running the ublk device: {e}"))?;

    // NBD clients next, so that the final flush covers all they wrote.
    if let Some(nbd) = nbd {
        nbd.stop();
    }
    // The queues are gone: what they acknowledged goes up before the node
    // stops (the driver's stop gives every chunk back, sending dirty ones).
    let flushed =
        rt.block_on(async { tokio::time::timeout(FINAL_FLUSH_WAIT, leaf.node().flush()).await });
    match flushed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "final flush failed"),
        Err(_) => tracing::error!("final flush did not finish within {FINAL_FLUSH_WAIT:?}"),
    }
    rt.block_on(peer.shutdown());
    if let Err(e) = ctrl.del_dev() {
        tracing::debug!(error = %e, "device already removed");
    }
    drop(server);
    tracing::info!(device = %bdev, "stopped");
    Ok(())
}

/// The control socket's view of a leaf.
struct LeafTarget {
    leaf: Arc<LeafVolume>,
    rt: tokio::runtime::Handle,
}

impl Target for LeafTarget {
    fn report(&self, device: &str) -> Report {
        // A stopped node has no figures; an empty report says so.
        let peer: PeerStats = self
            .rt
            .block_on(self.leaf.node().stats())
            .unwrap_or_default();
        Report {
            device: device.to_string(),
            size: self.leaf.size(),
            io_errors: self.leaf.errors(),
            served: Served::Leaf {
                peer: Box::new(peer),
                queue_hits: self.leaf.hits(),
            },
        }
    }

    fn reconfigure(&self, _change: &CacheChange) -> Result<(), String> {
        Err("a tree leaf keeps its chunks in the node; it has no cache tiers to change".into())
    }
}

/// One queue thread: hand each request to the runtime, commit what finished
/// when the eventfd says so.
fn serve_queue(qid: u16, dev: &UblkDev, leaf: &Arc<LeafVolume>, rt: &tokio::runtime::Handle) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let wake = match EventFd::from_flags(EfdFlags::EFD_CLOEXEC) {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            tracing::error!(qid, error = %e, "cannot create the queue's eventfd");
            return;
        }
    };
    let (done_tx, done_rx) = mpsc::channel::<(u16, Completion)>();
    // The eventfd read lands here, and one may be in flight until the ring
    // itself goes: libublk keeps the queue's ring per thread, past this
    // function, and a task finishing during the stop may still wake it. So
    // these 8 bytes are never freed (one per queue per daemon).
    let counter_ptr: *mut u64 = Box::leak(Box::new(0u64));
    let wake_fd = wake.as_raw_fd();

    let Some(queue) = open_queue(qid, dev, &bufs) else {
        return;
    };
    if let Err(e) = arm_wake(&queue, wake_fd, counter_ptr) {
        tracing::error!(qid, error = %e, "cannot watch the queue's eventfd");
        return;
    }
    let leaf = leaf.clone();
    let rt = rt.clone();
    let handler_bufs = bufs.clone();
    let handler = move |q: &UblkQueue, tag: u16, io: &UblkIOCtx| {
        if io.is_tgt_io() {
            if tag != WAKE_TAG {
                return;
            }
            while let Ok((t, c)) = done_rx.try_recv() {
                complete(q, qid, t, c, &handler_bufs);
            }
            // Re-arm for the next completions, unless the queue is going
            // away (a pending read would keep nothing alive, but a new one
            // submitted now would be pointless).
            if !q.is_stopping() {
                if let Err(e) = arm_wake(q, wake_fd, counter_ptr) {
                    tracing::error!(qid, error = %e, "cannot re-arm the queue's eventfd");
                }
            }
            return;
        }
        let iod = q.get_iod(tag);
        let op = Op::from_ublk(iod.op_flags);
        let offset = iod.start_sector << 9;
        let len = (iod.nr_sectors as usize) << 9;
        if op == Some(Op::Read) {
            if let Some(buf) = handler_bufs.get(tag as usize) {
                // SAFETY: the tag owns its buffer until we commit it, and
                // the kernel does not touch it before that.
                let dst = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), buf.len()) };
                if leaf.try_read(usize::from(qid), offset, len, dst) {
                    // A hit: done on this thread, no task, no node.
                    commit(q, qid, tag, buf, i32::try_from(len).unwrap_or(i32::MAX));
                    return;
                }
            }
        }
        // A write's bytes are copied out now: the buffer belongs to the tag,
        // and the task may outlive this call.
        let data = match (op, handler_bufs.get(tag as usize)) {
            (Some(Op::Write { .. }), Some(buf)) => {
                Bytes::copy_from_slice(&buf.as_slice()[..len.min(buf.len())])
            }
            _ => Bytes::new(),
        };
        let leaf = leaf.clone();
        let tx = done_tx.clone();
        let wake = wake.clone();
        rt.spawn(async move {
            let c = leaf.handle(op, offset, len, data).await;
            // A closed channel means the queue is gone (device stopped):
            // there is nobody left to complete for.
            if tx.send((tag, c)).is_ok() {
                if let Err(e) = wake.write(1) {
                    tracing::error!(qid, error = %e, "cannot wake the queue");
                }
            }
        });
    };
    queue.wait_and_handle_io(handler);
}

/// Queue a read of the eventfd in the queue's ring; its completion comes
/// back to the handler as a target I/O with [`WAKE_TAG`].
fn arm_wake(q: &UblkQueue, fd: i32, counter: *mut u64) -> Result<(), libublk::UblkError> {
    let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(fd), counter.cast::<u8>(), 8)
        .build()
        .user_data(UblkIOCtx::build_user_data(WAKE_TAG, 0, 0, true));
    q.ublk_submit_sqe_sync(sqe)
}

/// Copy a read's bytes into the tag's buffer and complete the request.
fn complete(q: &UblkQueue, qid: u16, tag: u16, c: Completion, bufs: &[IoBuf<u8>]) {
    let Some(buf) = bufs.get(tag as usize) else {
        tracing::error!(qid, tag, "completion for a tag without a buffer");
        return;
    };
    if let Some(data) = &c.data {
        let n = data.len().min(buf.len());
        // SAFETY: the tag is ours until we commit it below, and the kernel
        // does not touch its buffer before that.
        let dst = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), n) };
        dst.copy_from_slice(&data[..n]);
    }
    commit(q, qid, tag, buf, c.result);
}
