//! `canopy-ublk`: serve a canopy volume as a local block device.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use canopy_cache::{HashKind, Medium};
use canopy_origin::size::ByteSize;
use canopy_origin::{check_chunk_size, check_volume_size, OriginError, OriginStore};
use canopy_peerd::config::{Size, WriteModeSetting};
use canopy_peerd::{PeerConfig, PeerRole};
use canopy_ublk::control::{self, CacheChange, Reply, Report, Request, Served};
use canopy_ublk::device::{self, ServeOptions, Stored};
use canopy_ublk::leaf_device::{self, LeafOptions};
use canopy_ublk::nbd::ExportAddr;
use canopy_ublk::spec::{cache_layout, VolumeSpec, SPEC_VERSION};
use canopy_ublk::volume::CacheMode;
use clap::{Args, Parser, Subcommand};

/// Serve a canopy volume as /dev/ublkbN through the Linux ublk driver.
///
/// The volume's authoritative copy (the origin) is a local file or block
/// device; reads and writes go through canopy's stacked cache (a memory
/// tier, optional disk tiers, and a victim repository). Needs root and the
/// ublk_drv kernel module.
#[derive(Parser, Debug)]
#[command(name = "canopy-ublk", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create /dev/ublkbN for a volume and serve it in the foreground.
    ///
    /// Prints the device path on stdout once the device is live. SIGINT or
    /// SIGTERM writes every dirty chunk back to the origin, removes the
    /// device and exits 0. If the daemon is killed instead, the device
    /// stays and `canopy-ublk recover --id N` re-attaches to it.
    Add(AddArgs),
    /// Re-attach to a device whose daemon died (user recovery).
    ///
    /// Reuses the origin, cache and write mode saved when the device was
    /// added. Requests the kernel held while no daemon ran are served once
    /// recovery completes. Everything acknowledged by a FLUSH is on the
    /// origin; in writethrough mode every acknowledged write is.
    Recover {
        /// Device id (the N of /dev/ublkbN).
        #[arg(long)]
        id: u32,
    },
    /// List ublk devices, with the origin of those canopy serves.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop and remove a device: flush through its daemon, or delete it
    /// directly when its daemon is gone.
    Del {
        /// Device id (the N of /dev/ublkbN).
        #[arg(long)]
        id: u32,
    },
    /// Show the running daemon's per-tier cache statistics.
    Stats {
        /// Device id (the N of /dev/ublkbN).
        #[arg(long)]
        id: u32,
        /// Print JSON (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change the cache stack of a running device, while I/O continues.
    ///
    /// No dirty data is lost: chunks of a removed or shrunk tier cascade to
    /// the tiers below and the victim repository, which writes them back.
    Cache {
        /// Device id (the N of /dev/ublkbN).
        #[arg(long)]
        id: u32,
        /// Print the resulting statistics as JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        change: CacheCmd,
    },
}

#[derive(Args, Debug)]
struct AddArgs {
    /// The origin: a file or block device holding the volume (a standalone
    /// volume; give --parent instead for a leaf of a tree).
    #[arg(long, value_name = "FILE", required_unless_present = "parent")]
    origin: Option<PathBuf>,
    /// Serve a volume of a canopy tree instead of a local origin: the
    /// parent (a root or proxy's listen address, HOST:PORT) that chunks
    /// come from. The device's size and chunk size are the root's.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["origin", "size", "cache_mode"],
          requires = "volume")]
    parent: Option<String>,
    /// The volume's name in the tree (with --parent).
    #[arg(long, value_name = "NAME", requires = "parent")]
    volume: Option<String>,
    /// When a leaf's writes are acknowledged (with --parent): `sync` once
    /// the root has them durably, `semi-sync` once the parent has them,
    /// `async` at once (a background FLUSH sends them up). FLUSH and FUA
    /// make writes durable at the root in every mode.
    #[arg(long, value_name = "MODE", requires = "parent", default_value = "sync")]
    write_mode: WriteModeSetting,
    /// Also serve children of this leaf on HOST:PORT (with --parent), as
    /// the seed's proxies with local access do.
    #[arg(long, value_name = "ADDR", requires = "parent")]
    listen: Option<String>,
    /// Write one line per protocol message sent or received to FILE (with
    /// --parent; `-` for standard error).
    #[arg(long, value_name = "FILE", requires = "parent")]
    trace_protocol: Option<String>,
    /// The volume's trusted key file (from `canopy-keys new`; mode 0600),
    /// for a tree volume made with keys (with --parent): chunks are sealed
    /// on the wire and checked on arrival, so the parent may be an
    /// untrusted relay.
    #[arg(long, value_name = "FILE", requires = "parent")]
    keys: Option<PathBuf>,
    /// Bad chunk records from the parent before it counts as failed and
    /// the link is dropped (with --keys) [default: 3; 0: never].
    #[arg(long, value_name = "N", requires = "keys")]
    max_parent_faults: Option<u32>,
    /// Create the origin file with this size (a multiple of 512; suffixes
    /// K, M, G, T). Without it the origin must exist and its size is used.
    #[arg(long, value_name = "SIZE")]
    size: Option<ByteSize>,
    /// Chunk size: the unit the cache and (later) the network move. A power
    /// of two from 4K to 1M.
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    chunk_size: ByteSize,
    /// Memory tier capacity (0 for none). For a leaf of a tree: the memory
    /// tier of its cache; what falls out of its tiers and victim repository
    /// goes back to the parent.
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    cache_mem: ByteSize,
    /// A disk tier: a cache file and its capacity. Repeat for more tiers;
    /// they stack below the memory tier in the order given.
    #[arg(long, value_name = "PATH:SIZE", value_parser = parse_disk_tier)]
    cache_disk: Vec<(PathBuf, ByteSize)>,
    /// Commit the memory tier's RAM at start rather than as chunks arrive:
    /// for a host that dedicates the memory. Reads then never wait for the
    /// kernel to zero a page, and a host short of the memory shows at
    /// start rather than under load later.
    #[arg(long)]
    cache_prefault: bool,
    /// When writes are acknowledged.
    #[arg(long, value_enum, default_value_t = CacheMode::Writethrough)]
    cache_mode: CacheMode,
    /// Hardware queues (one serving thread each).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Requests in flight per queue.
    #[arg(long, value_name = "D", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    depth: u16,
    /// Ask for this device id (default: the driver picks one).
    #[arg(long, value_name = "N")]
    id: Option<u32>,
    /// Export the volume over NBD: `unix:PATH` (a Unix socket, created mode
    /// 0600) or `tcp:HOST:PORT`, beside /dev/ublkbN (or instead, with
    /// --no-device). qemu attaches to it directly; so do nbd-client,
    /// nbdfuse and nbdcopy. NBD has no authentication: bind TCP only where
    /// every peer may read and write the volume.
    #[arg(long, value_name = "ADDR")]
    export_nbd: Option<ExportAddr>,
    /// Make no /dev/ublkbN: serve the volume over the NBD export only.
    /// Needs neither the ublk driver nor root. Prints the export's NBD URI
    /// on stdout once clients can connect; SIGINT or SIGTERM lets clients'
    /// requests in flight finish, writes every dirty chunk back and exits 0.
    #[arg(long, requires = "export_nbd", conflicts_with = "id")]
    no_device: bool,
    /// Read the settings from a TOML file whose keys are these options'
    /// long names with `_` for `-` (e.g. `chunk_size = "64K"`, `cache_disk =
    /// ["/c:1G"]`). A setting given both there and as a flag is an error.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum CacheCmd {
    /// Insert a tier.
    AddTier {
        /// Position in the stack (0 = top; default: bottom).
        #[arg(long)]
        index: Option<usize>,
        /// A memory tier of this capacity.
        #[arg(
            long,
            value_name = "SIZE",
            conflicts_with = "disk",
            required_unless_present = "disk"
        )]
        memory: Option<ByteSize>,
        /// A disk tier: cache file and capacity.
        #[arg(long, value_name = "PATH:SIZE", value_parser = parse_disk_tier)]
        disk: Option<(PathBuf, ByteSize)>,
        /// Hash choosing the set: `modulo` (low-order bits) or `mix[:KEY]`.
        #[arg(long, value_parser = parse_hash, default_value = "mix")]
        hash: HashKind,
    },
    /// Remove a tier; its chunks move down the stack.
    RemoveTier {
        /// Position in the stack (0 = top).
        #[arg(long)]
        index: usize,
    },
    /// Change a tier's hash function; its chunks are re-placed.
    Rehash {
        /// Position in the stack (0 = top).
        #[arg(long)]
        index: usize,
        /// `modulo` (low-order bits) or `mix[:KEY]` (keyed mixing).
        #[arg(long, value_parser = parse_hash)]
        hash: HashKind,
    },
    /// Change a tier's capacity.
    Resize {
        /// Position in the stack (0 = top).
        #[arg(long)]
        index: usize,
        /// New capacity.
        #[arg(long, value_name = "SIZE")]
        size: ByteSize,
    },
}

fn parse_disk_tier(s: &str) -> Result<(PathBuf, ByteSize), String> {
    let (path, size) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' is not PATH:SIZE"))?;
    if path.is_empty() {
        return Err(format!("'{s}' has no path before ':'"));
    }
    let size: ByteSize = size.parse().map_err(|e| format!("{e}"))?;
    Ok((PathBuf::from(path), size))
}

fn parse_hash(s: &str) -> Result<HashKind, String> {
    match s.split_once(':') {
        None if s == "modulo" => Ok(HashKind::Modulo),
        None if s == "mix" => Ok(HashKind::Mix {
            key: canopy_ublk::spec::DEFAULT_MIX_KEY,
        }),
        Some(("mix", key)) => {
            let key = match key.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => key.parse(),
            }
            .map_err(|_| format!("'{key}' is not a 64-bit key"))?;
            Ok(HashKind::Mix { key })
        }
        _ => Err(format!("'{s}' is not a hash: use modulo, mix or mix:KEY")),
    }
}

fn main() -> ExitCode {
    // Before any thread starts: chunk buffers stay in the heap, as in
    // canopy-peerd (canopy_peerd::alloc).
    canopy_peerd::alloc::tune_for_chunks();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match expand_config(std::env::args().collect()) {
        Ok(args) => Cli::parse_from(args),
        Err(e) => {
            eprintln!("canopy-ublk: {}", canopy_peerd::errline::one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, most general first.
            eprintln!("canopy-ublk: {}", canopy_peerd::errline::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `add --config FILE [flags]` becomes `add <the file's flags> [flags]`, so
/// clap checks file and flags alike (and rejects a setting given twice).
fn expand_config(args: Vec<String>) -> Result<Vec<String>> {
    if args.get(1).map(String::as_str) != Some("add") {
        return Ok(args);
    }
    let mut out = Vec::with_capacity(args.len());
    let mut file = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            file = Some(it.next().context("--config needs a FILE")?);
        } else if let Some(f) = a.strip_prefix("--config=") {
            file = Some(f.to_string());
        } else {
            out.push(a);
        }
    }
    if let Some(f) = file {
        let extra = canopy_ublk::addconfig::config_args(std::path::Path::new(&f))?;
        out.splice(2..2, extra);
    }
    Ok(out)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Add(a) => add(a),
        Command::Recover { id } => {
            device::preflight()?;
            let spec = device::stored_spec(id)?;
            // The device keeps its queue geometry across the crash; libublk
            // sizes its per-queue tables from what we pass, so it must match.
            let (queues, depth) = device::queue_geometry(id)?;
            canopy_ublk::namespace::isolate();
            device::serve(ServeOptions {
                spec,
                id: Some(id),
                queues,
                depth,
                recover: true,
                // The export is not part of the saved spec: a recovered
                // device serves /dev/ublkbN only.
                nbd: None,
            })
        }
        Command::List { json } => list(json),
        Command::Del { id } => device::delete(id),
        Command::Stats { id, json } => {
            let report = expect_report(control::call(id, &Request::Stats)?)?;
            print_report(&report, json)
        }
        Command::Cache { id, json, change } => {
            let change = match change {
                CacheCmd::AddTier {
                    index,
                    memory,
                    disk,
                    hash,
                } => {
                    let (medium, size) = match (memory, disk) {
                        (Some(size), None) => (Medium::Memory, size),
                        (None, Some((path, size))) => (Medium::Disk { path }, size),
                        _ => bail!("give exactly one of --memory or --disk"),
                    };
                    let index = match index {
                        Some(i) => i,
                        None => match expect_report(control::call(id, &Request::Stats)?)?.served {
                            Served::Embedded { cache, .. } => cache.tiers.len(),
                            Served::Leaf { .. } => {
                                bail!("device {id} is a leaf of a tree: its cache is the node's")
                            }
                        },
                    };
                    CacheChange::AddTier {
                        index,
                        medium,
                        size: size.0,
                        hash,
                    }
                }
                CacheCmd::RemoveTier { index } => CacheChange::RemoveTier { index },
                CacheCmd::Rehash { index, hash } => CacheChange::Rehash { index, hash },
                CacheCmd::Resize { index, size } => CacheChange::Resize {
                    index,
                    size: size.0,
                },
            };
            let report = expect_report(control::call(id, &Request::Cache { change })?)?;
            print_report(&report, json)
        }
    }
}

fn add(a: AddArgs) -> Result<()> {
    if let Some(parent) = a.parent.clone() {
        return add_leaf(a, parent);
    }
    let Some(origin) = a.origin.clone() else {
        bail!("give --origin FILE (a standalone volume) or --parent ADDR (a leaf of a tree)");
    };
    let chunk_size = usize::try_from(a.chunk_size.0).unwrap_or(usize::MAX);
    check_chunk_size(chunk_size)?;
    // Validate everything a user can get wrong before asking the kernel for
    // a device, so a typo never leaves a half-made /dev/ublkbN behind.
    let disks: Vec<(PathBuf, u64)> = a.cache_disk.iter().map(|(p, s)| (p.clone(), s.0)).collect();
    let mut cache = cache_layout(chunk_size, a.cache_mem.0, &disks)?;
    cache.prefault = a.cache_prefault;
    match a.size {
        Some(size) => check_volume_size(size.0)?,
        None if !origin.exists() => return Err(OriginError::Missing(origin.clone()).into()),
        None => {}
    }
    if !a.no_device {
        device::preflight()?;
    }
    // Creating (or sizing) the origin up front reports its errors now; the
    // daemon reopens it with the same checks.
    let store = OriginStore::open(&origin, a.size.map(|s| s.0), chunk_size)?;
    drop(store);
    let origin_path = std::fs::canonicalize(&origin)
        .with_context(|| format!("resolving {}", origin.display()))?;
    let spec = VolumeSpec {
        canopy: SPEC_VERSION,
        origin: origin_path,
        mode: a.cache_mode,
        cache,
    };
    if let (true, Some(addr)) = (a.no_device, &a.export_nbd) {
        // No device, so no mount of it to isolate from: the namespace
        // (which needs root) is left alone.
        return canopy_ublk::nbd::daemon::serve_embedded(&spec, addr);
    }
    canopy_ublk::namespace::isolate();
    device::serve(ServeOptions {
        spec,
        id: a.id,
        queues: a.queues,
        depth: a.depth,
        recover: false,
        nbd: a.export_nbd.clone(),
    })
}

/// `add --parent`: the device as a leaf of a tree.
fn add_leaf(a: AddArgs, parent: String) -> Result<()> {
    let volume = a.volume.clone().context("--parent needs --volume NAME")?;
    let mut peer = PeerConfig::new(PeerRole::Leaf, &volume);
    peer.parent = Some(parent);
    peer.listen = a.listen.clone();
    peer.write_mode = Some(a.write_mode);
    peer.cache_mem = Some(Size(a.cache_mem.0));
    peer.cache_prefault = a.cache_prefault.then_some(true);
    // The same stacked cache as the embedded volume, detached from any
    // origin: what falls out goes back to the parent.
    peer.cache_disk = a
        .cache_disk
        .iter()
        .map(|(path, size)| canopy_peerd::config::DiskTier {
            path: path.clone(),
            size: Size(size.0),
        })
        .collect();
    peer.trace_protocol = a.trace_protocol.clone();
    peer.keys = a.keys.clone();
    peer.max_parent_faults = a.max_parent_faults;
    peer.validate("the command line")?;
    if let (true, Some(addr)) = (a.no_device, &a.export_nbd) {
        return canopy_ublk::nbd::daemon::serve_leaf(&peer, addr);
    }
    device::preflight()?;
    canopy_ublk::namespace::isolate();
    leaf_device::serve_leaf(LeafOptions {
        peer,
        id: a.id,
        queues: a.queues,
        depth: a.depth,
        nbd: a.export_nbd.clone(),
    })
}

fn list(json: bool) -> Result<()> {
    let devices = device::list_devices();
    if json {
        let rows: Vec<_> = devices
            .iter()
            .map(|d| {
                let (spec, leaf) = match &d.stored {
                    Some(Stored::Embedded(s)) => (Some(s), None),
                    Some(Stored::Leaf(p)) => (None, Some(p)),
                    None => (None, None),
                };
                serde_json::json!({
                    "id": d.id,
                    "device": format!("/dev/ublkb{}", d.id),
                    "state": d.state,
                    "spec": spec,
                    "leaf": leaf,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if devices.is_empty() {
        println!("no ublk devices");
        return Ok(());
    }
    println!(
        "{:<4} {:<14} {:<9} {:<13} origin",
        "id", "device", "state", "mode"
    );
    for d in devices {
        let (mode, origin) = match &d.stored {
            Some(Stored::Embedded(s)) => (
                format!("{:?}", s.mode).to_lowercase(),
                s.origin.display().to_string(),
            ),
            Some(Stored::Leaf(p)) => (
                match p.write_mode() {
                    WriteModeSetting::Sync => "sync",
                    WriteModeSetting::SemiSync => "semi-sync",
                    WriteModeSetting::Async => "async",
                }
                .to_string(),
                format!(
                    "volume {} from {}",
                    p.volume,
                    p.parent.as_deref().unwrap_or("?")
                ),
            ),
            None => ("-".into(), "(not canopy)".into()),
        };
        println!(
            "{:<4} {:<14} {:<9} {:<13} {}",
            d.id,
            format!("/dev/ublkb{}", d.id),
            d.state,
            mode,
            origin
        );
    }
    Ok(())
}

fn expect_report(reply: Reply) -> Result<Report> {
    match reply {
        Reply::Ok { report } => Ok(*report),
        Reply::Error { message } => bail!("{message}"),
    }
}

fn print_report(r: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let (mode, cache, origin) = match &r.served {
        Served::Embedded {
            mode,
            cache,
            origin,
        } => (mode, cache, origin),
        Served::Leaf { peer, queue_hits } => {
            print_leaf(r, peer, *queue_hits);
            return Ok(());
        }
    };
    let c = cache;
    println!(
        "{}  mode {}  size {}  chunk {}  io errors {}",
        r.device,
        format!("{mode:?}").to_lowercase(),
        ByteSize(r.size),
        ByteSize(c.chunk_size as u64),
        r.io_errors
    );
    println!(
        "{:<4} {:<7} {:>12} {:<22} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "tier",
        "medium",
        "sets x ways",
        "hash",
        "used/slots",
        "dirty",
        "hits",
        "misses",
        "promoted",
        "demoted",
        "evicted"
    );
    for t in &c.tiers {
        println!(
            "{:<4} {:<7} {:>12} {:<22} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
            t.index,
            t.medium,
            format!("{}x{}", t.groups, t.ways),
            t.hash,
            format!("{}/{}", t.occupied, t.groups * t.ways),
            t.dirty,
            t.hits,
            t.misses,
            t.promotions,
            t.demotions,
            t.evictions
        );
    }
    let v = &c.victim;
    println!(
        "victim {}/{} (dirty {})  spills {}  rescues {}  drains {}  writebacks {}  drops {}  errors {}",
        v.len, v.capacity, v.dirty, v.spills, v.rescues, v.drains, v.writebacks, v.drops, v.errors
    );
    let o = origin;
    println!(
        "origin {}  {}  fills {}  writes {}  syncs {}  zeroed chunks {}",
        o.path.display(),
        if o.direct { "O_DIRECT" } else { "buffered" },
        o.reads,
        o.writes,
        o.syncs,
        o.zeroes
    );
    Ok(())
}

fn print_leaf(r: &Report, p: &canopy_peerd::PeerStats, queue_hits: u64) {
    let n = &p.node;
    println!(
        "{}  leaf {}  size {}  chunk {}  io errors {}",
        r.device,
        p.name,
        ByteSize(r.size),
        ByteSize(u64::from(p.chunk_size)),
        r.io_errors
    );
    println!(
        "parent {}  ready {}  children {}",
        if p.parent_link { "up" } else { "down" },
        p.ready,
        p.children
    );
    println!(
        "reads served on the queues {}  local requests {}  sent to parent {}  invalidations received {}  evictions {}  sync flushes {}  lost dirty {}",
        queue_hits, n.local_done, n.parent_requests, n.invalidates_received, n.evictions, n.sync_flushes, n.lost_dirty
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_disk_tiers_and_hashes() {
        assert_eq!(
            parse_disk_tier("/var/cache/c1:1G"),
            Ok((PathBuf::from("/var/cache/c1"), ByteSize(1 << 30)))
        );
        assert!(parse_disk_tier("nosize").is_err());
        assert!(parse_disk_tier(":1G").is_err());
        assert_eq!(parse_hash("modulo"), Ok(HashKind::Modulo));
        assert_eq!(parse_hash("mix:0x10"), Ok(HashKind::Mix { key: 16 }));
        assert_eq!(parse_hash("mix:7"), Ok(HashKind::Mix { key: 7 }));
        assert!(parse_hash("sha").is_err());
        assert!(parse_hash("mix:zz").is_err());
    }
}
