//! The ublk daemon: creates (or recovers) `/dev/ublkbN`, serves its queues
//! from the [`Volume`], and shuts down cleanly on SIGINT/SIGTERM.
//!
//! Threads: libublk runs one thread per queue; each serves its requests
//! synchronously (cache hits never leave that thread). Beside them run the
//! cache cleaner, the control socket, and a signal thread. Signals are
//! blocked in every thread but the signal thread, so a SIGTERM can never
//! interrupt a queue mid-request.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use canopy_cache::CacheStack;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkFlags, UblkIORes};
use nix::sys::signal::{SigSet, Signal};

use crate::control::{self, ControlServer};
use crate::leaf_device::LeafSpec;
use crate::spec::VolumeSpec;
use crate::volume::{Op, Volume};
use canopy_origin::OriginStore;
use canopy_peerd::PeerConfig;

/// Largest request the kernel sends us (libublk's default buffer size).
const IO_BUF_BYTES: u32 = 512 << 10;

/// How the daemon should come up.
pub struct ServeOptions {
    /// What to serve.
    pub spec: VolumeSpec,
    /// Device id to ask for (`None`: let the driver choose).
    pub id: Option<u32>,
    /// Hardware queues.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Re-attach to a device whose daemon died instead of adding one.
    pub recover: bool,
    /// Also export the volume over NBD there (`add --export-nbd`).
    pub nbd: Option<crate::nbd::ExportAddr>,
}

/// Check what the kernel side needs before touching anything, so each
/// missing piece gets its own one-line explanation.
pub fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("canopy-ublk must run as root to create ublk devices");
    }
    if !std::path::Path::new("/dev/ublk-control").exists() {
        bail!(
            "the ublk driver is not loaded (/dev/ublk-control is missing): \
             run `modprobe ublk_drv` (needs Linux 6.0+ with CONFIG_BLK_DEV_UBLK)"
        );
    }
    Ok(())
}

/// Serve a volume until it is stopped. Returns after the device is removed
/// (clean stop) with every dirty chunk written back to the origin.
pub fn serve(opts: ServeOptions) -> Result<()> {
    preflight()?;
    let stop_signals = block_stop_signals()?;
    let spec = opts.spec.clone();
    let origin = OriginStore::open(&spec.origin, None, spec.cache.chunk_size)?;
    let size = origin.size();
    let cache = Arc::new(
        CacheStack::new(spec.cache.clone(), Arc::new(origin)).context("building the cache")?,
    );
    let _cleaner = cache.spawn_cleaner(Duration::from_millis(50));
    let volume = Arc::new(Volume::new(cache, spec.mode));
    // Before the device: a bad address stops `add` before /dev/ublkbN exists.
    let nbd = opts
        .nbd
        .as_ref()
        .map(|addr| crate::nbd::NbdServer::start(addr, volume.clone()))
        .transpose()
        .context("starting the NBD export")?;

    // USER_RECOVERY keeps /dev/ublkbN alive when the daemon dies, so
    // `recover` can re-attach. REISSUE replays the requests that were in
    // flight at the crash instead of failing them: safe because every canopy
    // request is idempotent (a read, or a write of the same bytes).
    let flags = libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE;
    let ctrl = build_ctrl(opts.id, opts.queues, opts.depth, flags as u64, opts.recover)?;
    let flush = {
        let volume = volume.clone();
        move || {
            if let Err(e) = volume.cache().flush() {
                tracing::error!(error = %e, "flush before stop failed; will retry after the queues stop");
            }
        }
    };
    let (server, bdev) = start_controls(&ctrl, volume.clone(), stop_signals, flush)?;

    let spec_json = serde_json::to_value(&spec)?;
    let q_volume = volume.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &q_volume);
    ctrl.run_target(target_init(size, spec_json), q_fn, announce(bdev.clone()))
        .map_err(|e| anyhow::anyhow!("running the ublk device: {e}"))?;

    // NBD clients next (their requests in flight are answered), so that no
    // write can arrive after the final flush.
    if let Some(nbd) = nbd {
        nbd.stop();
    }
    // The queues are gone. Write back what is still dirty before the device
    // (and the only other copy of that data) goes away.
    volume
        .cache()
        .flush()
        .context("final flush to the origin")?;
    if let Err(e) = ctrl.del_dev() {
        tracing::debug!(error = %e, "device already removed");
    }
    drop(server);
    tracing::info!(device = %bdev, "stopped; origin is up to date");
    Ok(())
}

/// Bind the device's control socket and start the two ways to stop it (a
/// `Shutdown` request, SIGINT/SIGTERM): each runs `flush`, then stops the
/// device. Returns the socket (removed when dropped) and the device path.
pub(crate) fn start_controls(
    ctrl: &Arc<UblkCtrl>,
    target: Arc<dyn control::Target>,
    stop_signals: SigSet,
    flush: impl Fn() + Clone + Send + 'static,
) -> Result<(ControlServer, String)> {
    let dev_id = ctrl.dev_info().dev_id;
    let bdev = format!("/dev/ublkb{dev_id}");
    let (server, listener) = ControlServer::bind(dev_id).context("binding the control socket")?;
    let stopper = {
        let ctrl = ctrl.clone();
        move || {
            flush();
            kill_device(&ctrl);
        }
    };
    ControlServer::spawn(listener, target, bdev.clone(), stopper.clone())
        .context("starting the control thread")?;
    spawn_signal_thread(stop_signals, stopper)?;
    Ok((server, bdev))
}

/// Block the stop signals before any thread exists (the cache cleaner,
/// libublk's queues, tokio's workers): threads inherit the mask, so only the
/// signal thread will ever take them, and never in the middle of a request.
pub(crate) fn block_stop_signals() -> Result<SigSet> {
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGTERM);
    stop_signals
        .thread_block()
        .context("blocking SIGINT/SIGTERM")?;
    Ok(stop_signals)
}

/// The thread that waits for SIGINT/SIGTERM and stops the device cleanly.
fn spawn_signal_thread(
    stop_signals: SigSet,
    stopper: impl FnOnce() + Send + 'static,
) -> Result<()> {
    std::thread::Builder::new()
        .name("canopy-signals".into())
        .spawn(move || {
            if let Ok(sig) = stop_signals.wait() {
                tracing::info!(signal = ?sig, "stopping");
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                stopper();
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Add (or, with `recover`, start recovering) a ublk device.
pub(crate) fn build_ctrl(
    id: Option<u32>,
    queues: u16,
    depth: u16,
    ctrl_flags: u64,
    recover: bool,
) -> Result<Arc<UblkCtrl>> {
    let dev_flags = if recover {
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let id = id.map(|i| i as i32).unwrap_or(-1);
    let ctrl = Arc::new(
        UblkCtrlBuilder::default()
            .name("canopy")
            .id(id)
            .nr_queues(queues)
            .depth(depth)
            .io_buf_bytes(IO_BUF_BYTES)
            .ctrl_flags(ctrl_flags)
            .dev_flags(dev_flags)
            .build()
            .map_err(|e| anyhow::anyhow!("creating the ublk device: {e}"))?,
    );
    if recover {
        ctrl.start_user_recover()
            .map_err(|e| anyhow::anyhow!("starting user recovery of device {id}: {e}"))?;
    }
    Ok(ctrl)
}

/// The device parameters, set before the device starts.
pub(crate) fn target_init(
    size: u64,
    spec_json: serde_json::Value,
) -> impl FnOnce(&mut UblkDev) -> Result<(), libublk::UblkError> {
    move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        let p = &mut dev.tgt.params;
        // The cache is volatile until FLUSH, and FUA is honoured per write:
        // telling the kernel both makes filesystems order their journals
        // correctly instead of assuming every write is already stable.
        p.basic.attrs = libublk::sys::UBLK_ATTR_VOLATILE_CACHE | libublk::sys::UBLK_ATTR_FUA;
        p.types |= libublk::sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard.discard_granularity = 4096;
        p.discard.max_discard_sectors = u32::MAX >> 9;
        p.discard.max_write_zeroes_sectors = u32::MAX >> 9;
        p.discard.max_discard_segments = 1;
        dev.set_target_json(spec_json);
        Ok(())
    }
}

/// Called once the device is live: print its path and tell systemd.
pub(crate) fn announce(bdev: String) -> impl FnOnce(&UblkCtrl) + Send + Sync + 'static {
    move |_: &UblkCtrl| {
        // The one line on stdout: scripts read the device path from it.
        println!("{bdev}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tracing::info!(device = %bdev, "serving");
        // Under systemd (Type=notify) the unit is "started" only now that
        // the device exists; outside systemd this does nothing.
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            tracing::warn!(error = %e, "could not tell systemd we are ready");
        }
    }
}

/// Stop the device: the queue threads see the abort and exit, which makes
/// `run_target` return.
pub(crate) fn kill_device(ctrl: &UblkCtrl) {
    // libublk sends control commands through a per-thread io_uring; this
    // thread (signal or control) has none until it makes one.
    let ring = libublk::ctrl::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(16)
                    .map_err(libublk::UblkError::IOError)?,
            );
        }
        Ok(())
    });
    if let Err(e) = ring {
        tracing::error!(error = %e, "cannot create a control ring to stop the device");
        return;
    }
    if let Err(e) = ctrl.kill_dev() {
        tracing::error!(error = %e, "stopping the device failed");
    }
}

/// One queue thread: fetch requests, serve each from the volume, commit.
fn serve_queue(qid: u16, dev: &UblkDev, volume: &Arc<Volume>) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let handler_bufs = bufs.clone();
    let volume = volume.clone();
    let handler = move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let iod = q.get_iod(tag);
        let op = Op::from_ublk(iod.op_flags);
        let offset = iod.start_sector << 9;
        let len = (iod.nr_sectors as usize) << 9;
        let Some(buf) = handler_bufs.get(tag as usize) else {
            // Cannot happen (one buffer per tag), but a tag never completed
            // would hang its request forever: fail it instead.
            tracing::error!(qid, tag, "request for a tag without a buffer");
            let _ = q.complete_io_cmd_unified(
                tag,
                BufDesc::Slice(&[]),
                Ok(UblkIORes::Result(-libc::EIO)),
            );
            return;
        };
        // SAFETY: each tag owns its buffer, and the kernel hands a tag to
        // this thread only once at a time, so nothing else touches these
        // bytes until we commit the result below.
        let data = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), buf.len()) };
        let res = volume.handle(op, offset, len, data);
        commit(q, qid, tag, buf, res);
    };
    let Some(queue) = open_queue(qid, dev, &bufs) else {
        return;
    };
    queue.wait_and_handle_io(handler);
}

/// Set up queue `qid` with one buffer per tag and fetch its first
/// requests; `None` (logged) if the kernel refused.
// `&Vec`, not a slice: libublk's BufDescList::Slices takes a `&Vec`.
#[allow(clippy::ptr_arg)]
pub(crate) fn open_queue<'a>(
    qid: u16,
    dev: &'a UblkDev,
    bufs: &Vec<IoBuf<u8>>,
) -> Option<UblkQueue<'a>> {
    match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(bufs))))
    {
        Ok(q) => Some(q),
        Err(e) => {
            tracing::error!(qid, error = %e, "setting up the queue failed");
            None
        }
    }
}

/// Complete request `tag` with `res` (bytes done or a negative errno); its
/// data, for a read, is already in `buf`.
pub(crate) fn commit(q: &UblkQueue, qid: u16, tag: u16, buf: &IoBuf<u8>, res: i32) {
    if let Err(e) = q.complete_io_cmd_unified(
        tag,
        BufDesc::Slice(buf.as_slice()),
        Ok(UblkIORes::Result(res)),
    ) {
        tracing::error!(qid, tag, error = %e, "committing a request failed");
    }
}

/// Read the spec a canopy daemon stored for device `id` (for `recover`),
/// or explain why there is none.
pub fn stored_spec(id: u32) -> Result<VolumeSpec> {
    match stored(id)? {
        Stored::Embedded(spec) => Ok(spec),
        Stored::Leaf(_) => bail!(
            "device {id} is a leaf of a canopy tree, which is not recovered (its grants \
             died with its daemon): remove it with `canopy-ublk del --id {id}` and add it again"
        ),
    }
}

/// What a canopy daemon stored for a device.
pub enum Stored {
    /// An embedded volume, with what `recover` needs.
    Embedded(VolumeSpec),
    /// A leaf of a tree, with its node's settings.
    Leaf(Box<PeerConfig>),
}

/// Read what a canopy daemon stored for device `id`.
pub fn stored(id: u32) -> Result<Stored> {
    let ctrl =
        UblkCtrl::new_simple(id as i32).map_err(|e| anyhow::anyhow!("no ublk device {id}: {e}"))?;
    let data = ctrl.get_target_data_from_json().with_context(|| {
        format!(
            "device {id} has no saved target data in {}",
            UblkCtrl::run_dir()
        )
    })?;
    if let Ok(leaf) = serde_json::from_value::<LeafSpec>(data.clone()) {
        return Ok(Stored::Leaf(Box::new(leaf.leaf)));
    }
    let spec: VolumeSpec = serde_json::from_value(data)
        .with_context(|| format!("device {id} was not created by canopy-ublk"))?;
    Ok(Stored::Embedded(spec))
}

/// Hardware queues and depth of an existing device.
pub fn queue_geometry(id: u32) -> Result<(u16, u16)> {
    let ctrl =
        UblkCtrl::new_simple(id as i32).map_err(|e| anyhow::anyhow!("no ublk device {id}: {e}"))?;
    let info = ctrl.dev_info();
    Ok((info.nr_hw_queues, info.queue_depth))
}

/// One row of `canopy-ublk list`.
pub struct DeviceInfo {
    /// Device id.
    pub id: u32,
    /// Kernel state (LIVE, QUIESCED, ...).
    pub state: &'static str,
    /// What canopy stored for it (`None`: not canopy's).
    pub stored: Option<Stored>,
}

/// Every ublk device on the host.
pub fn list_devices() -> Vec<DeviceInfo> {
    let found = Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = found.clone();
    UblkCtrl::for_each_dev_id(move |id| sink.borrow_mut().push(id));
    let mut ids = found.take();
    ids.sort_unstable();
    ids.into_iter()
        .map(|id| {
            let state = UblkCtrl::new_simple(id as i32)
                .map(|c| match c.dev_info().state as u32 {
                    libublk::sys::UBLK_S_DEV_LIVE => "live",
                    libublk::sys::UBLK_S_DEV_QUIESCED => "quiesced",
                    libublk::sys::UBLK_S_DEV_DEAD => "dead",
                    _ => "unknown",
                })
                .unwrap_or("unknown");
            DeviceInfo {
                id,
                state,
                stored: stored(id).ok(),
            }
        })
        .collect()
}

/// Remove device `id`: ask its daemon to flush and stop; when no daemon
/// answers (it was killed), delete the device directly.
pub fn delete(id: u32) -> Result<()> {
    preflight()?;
    match control::call(id, &control::Request::Shutdown) {
        Ok(_) => {
            // Wait (bounded) for the daemon to remove the device.
            for _ in 0..600 {
                if !std::path::Path::new(&format!("/dev/ublkc{id}")).exists() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            bail!("device {id} did not go away within 60 s after shutdown was requested");
        }
        Err(control::ControlError::NotRunning { .. }) => {
            let ctrl = UblkCtrl::new_simple(id as i32)
                .map_err(|e| anyhow::anyhow!("no ublk device {id}: {e}"))?;
            ctrl.del_dev()
                .map_err(|e| anyhow::anyhow!("deleting device {id}: {e}"))?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
