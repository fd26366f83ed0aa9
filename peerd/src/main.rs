//! `canopy-peerd`: run one node of a canopy tree (root, proxy, leaf or
//! untrusted relay).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use canopy_peerd::config::{DiskTier, Millis, PeerConfig, PeerRole, Size, WriteModeSetting};
use canopy_peerd::{lines, start_peer, Peer};
use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncWriteExt, BufReader};

const AFTER_HELP: &str = "\
Examples:
  canopy-peerd root  --listen 127.0.0.1:7000 --origin vol.img --size 64M --volume vol --name A
  canopy-peerd proxy --listen 127.0.0.1:7001 --parent 127.0.0.1:7000 --volume vol --name B
  canopy-peerd leaf  --parent 127.0.0.1:7001 --volume vol --name C --trace-protocol c.trace
  canopy-peerd --config peer.toml

A volume made with keys (canopy-keys new --volume vol --out DIR):
  canopy-peerd root  ... --keys DIR/vol.key
  canopy-peerd relay --listen 0.0.0.0:7002 --parent root.example:7000 --volume vol --verify-key vol.verify
  (a relay runs on a third party's host, as any user, with the .verify file only)

A root, proxy or relay logs its counters as JSON on SIGUSR1 and when it stops.

Sizes: bytes, or a binary suffix (4096, 64K, 1G). Durations: milliseconds, or a
unit (500ms, 30s, 5m, 1h). Logs go to stderr; set RUST_LOG (e.g. debug).";

/// Run one peer of a canopy tree: a root holding the authoritative copy of a
/// volume, a proxy that caches and forwards, a leaf that accesses it, or an
/// untrusted relay that caches and forwards sealed chunks.
#[derive(Parser, Debug)]
#[command(
    name = "canopy-peerd",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true
)]
struct Cli {
    /// Read every setting from this TOML file (the keys are the long flags
    /// with `_` for `-`, plus `role = "root"|"proxy"|"leaf"|"relay"`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    role: Option<RoleCmd>,
}

#[derive(Subcommand, Debug)]
enum RoleCmd {
    /// Serve a volume from an origin file or block device.
    Root(RootArgs),
    /// Cache and forward for children; connects to the parent when the first
    /// child asks for the volume.
    Proxy(ProxyArgs),
    /// Access the volume through commands on stdin (no block device).
    ///
    /// Prints `ready` once connected, then one reply line per command:
    ///   read CHUNK [OFFSET LEN]       -> ok HEX  (default: first 16 bytes)
    ///   write CHUNK OFFSET HEX [sync] -> ok
    ///   lock CHUNK read|write|no      -> ok
    ///   stats                         -> ok JSON
    /// Failures answer `err STATUS`. End of input stops the leaf.
    #[command(verbatim_doc_comment)]
    Leaf(LeafArgs),
    /// Cache and forward a volume made with keys, as an untrusted third
    /// party: with only the relay file (the verifying key), it can check
    /// every chunk record it passes on but neither read nor forge one, and
    /// it acknowledges no write itself. Runs as any user.
    Relay(RelayArgs),
}

/// Settings every role has.
#[derive(Args, Debug)]
struct Common {
    /// The volume's name; children must CONNECT with the same one.
    #[arg(long, value_name = "NAME")]
    volume: String,
    /// Name in protocol traces and logs (default: the role).
    #[arg(long, value_name = "N")]
    name: Option<String>,
    /// Write one line per message sent or received to FILE (`-`: stdout, or
    /// stderr for a leaf).
    #[arg(long, value_name = "FILE|-")]
    trace_protocol: Option<String>,
}

/// Settings of a node that serves children.
#[derive(Args, Debug)]
struct Serving {
    /// VOLUME_ID to give children (default: derived from the volume name,
    /// and for a proxy also from its listen address, so ids differ per hop).
    #[arg(long, value_name = "ID")]
    volume_id: Option<u32>,
    /// Chunks to PUSH ahead of a child that reads sequentially.
    #[arg(long, value_name = "N")]
    push_ahead: Option<u32>,
}

/// The volume's trusted key file, on a trusted node.
#[derive(Args, Debug)]
struct Keyed {
    /// The volume's trusted key file (from `canopy-keys new`; mode 0600), for
    /// a volume made with keys: chunk data is sealed on every link, and
    /// peers without the same keys are refused.
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// With --keys: the file where this node records the write cookies it
    /// has spent (created mode 0600), so that a write retried after a
    /// restart still gets its original receipt. Replays are refused with or
    /// without it [default for a root whose origin is a file:
    /// ORIGIN.cookies; else kept in memory].
    #[arg(long, value_name = "FILE", requires = "keys")]
    ledger: Option<PathBuf>,
}

/// Settings of a node with a parent.
#[derive(Args, Debug)]
struct Upward {
    /// The parent's address (HOST:PORT); dialled until it answers.
    #[arg(long, value_name = "ADDR")]
    parent: String,
    /// On a volume with keys: bad chunk records from the parent before it
    /// counts as failed and the link is dropped [default: 3; 0: never].
    #[arg(long, value_name = "N")]
    max_parent_faults: Option<u32>,
}

/// A cache's size and tiers.
#[derive(Args, Debug)]
struct Tiers {
    /// The cache's memory tier, in chunks [default: 4096]. What falls out of
    /// the tiers beyond the victim repository (an eighth as much again) is
    /// given back to the parent, oldest first.
    #[arg(long, value_name = "N", conflicts_with = "cache_mem")]
    cache_chunks: Option<usize>,
    /// The same limit in bytes (e.g. 1G), divided by the volume's chunk
    /// size once the root announces it.
    #[arg(long, value_name = "SIZE")]
    cache_mem: Option<Size>,
    /// A disk tier below the memory tier: a cache file (created at start,
    /// removed at stop) or block device, and its capacity, e.g.
    /// /var/cache/canopy/v.cache:10G. Repeat for more tiers; each gets its
    /// own hash function.
    #[arg(long, value_name = "PATH:SIZE")]
    cache_disk: Vec<DiskTier>,
    /// Commit the memory tier's RAM when the node first connects rather
    /// than as chunks arrive: for a host that dedicates the memory. Reads
    /// then never wait for the kernel to zero a page, and a host short of
    /// the memory shows at start rather than under load.
    #[arg(long)]
    cache_prefault: bool,
    /// Bytes to read ahead of a local reader whose reads follow one
    /// another (0: off) [default: 2M].
    #[arg(long, value_name = "SIZE")]
    read_ahead: Option<Size>,
}

/// A trusted node's cache and write settings.
#[derive(Args, Debug)]
struct Caching {
    #[command(flatten)]
    tiers: Tiers,
    /// When writes are acknowledged: by the root (sync), the parent
    /// (semi-sync) or this node (async) [default: sync].
    #[arg(long, value_name = "MODE")]
    write_mode: Option<WriteModeSetting>,
    /// How often dirty chunks are sent up [default: 5s].
    #[arg(long, value_name = "DURATION")]
    sync_interval: Option<Millis>,
}

#[derive(Args, Debug)]
struct RootArgs {
    /// Address to accept children on (HOST:PORT; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The authoritative store: a regular file or a block device.
    #[arg(long, value_name = "FILE")]
    origin: PathBuf,
    /// Chunk size, a power of two from 4K to 1M [default: 64K].
    #[arg(long, value_name = "SIZE")]
    chunk_size: Option<Size>,
    /// Volume size: creates a missing origin, extends a shorter one
    /// (default: the origin's size).
    #[arg(long, value_name = "SIZE")]
    size: Option<Size>,
    /// Global TTL children must heartbeat within [default: 30s].
    #[arg(long, value_name = "DURATION")]
    hb_ttl: Option<Millis>,
    /// Lifetime of a grant [default: 1200s].
    #[arg(long, value_name = "DURATION")]
    grant_ttl: Option<Millis>,
    #[command(flatten)]
    serving: Serving,
    #[command(flatten)]
    keyed: Keyed,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct ProxyArgs {
    /// Address to accept children on (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    #[command(flatten)]
    upward: Upward,
    #[command(flatten)]
    serving: Serving,
    #[command(flatten)]
    caching: Caching,
    #[command(flatten)]
    keyed: Keyed,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct LeafArgs {
    #[command(flatten)]
    upward: Upward,
    /// Also accept children on this address.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    #[command(flatten)]
    serving: Serving,
    #[command(flatten)]
    caching: Caching,
    #[command(flatten)]
    keyed: Keyed,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct RelayArgs {
    /// Address to accept children on (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    #[command(flatten)]
    upward: Upward,
    /// The volume's relay file (from `canopy-keys new`, `NAME.verify`): the
    /// verifying key only, which the volume's owner gives relay operators.
    #[arg(long, value_name = "FILE")]
    verify_key: PathBuf,
    #[command(flatten)]
    serving: Serving,
    #[command(flatten)]
    tiers: Tiers,
    #[command(flatten)]
    common: Common,
}

impl Common {
    fn base(self, role: PeerRole) -> PeerConfig {
        let mut c = PeerConfig::new(role, &self.volume);
        c.name = self.name;
        c.trace_protocol = self.trace_protocol;
        c
    }
}

impl Serving {
    fn apply(self, c: &mut PeerConfig) {
        c.volume_id = self.volume_id;
        c.push_ahead = self.push_ahead;
    }
}

impl Tiers {
    fn apply(self, c: &mut PeerConfig) {
        c.cache_chunks = self.cache_chunks;
        c.cache_mem = self.cache_mem;
        c.cache_disk = self.cache_disk;
        c.cache_prefault = self.cache_prefault.then_some(true);
        c.read_ahead = self.read_ahead;
    }
}

impl Upward {
    fn apply(self, c: &mut PeerConfig) {
        c.parent = Some(self.parent);
        c.max_parent_faults = self.max_parent_faults;
    }
}

impl Caching {
    fn apply(self, c: &mut PeerConfig) {
        self.tiers.apply(c);
        c.write_mode = self.write_mode;
        c.sync_interval = self.sync_interval;
    }
}

impl RoleCmd {
    /// The same `PeerConfig` a TOML file would give.
    fn into_config(self) -> PeerConfig {
        match self {
            RoleCmd::Root(a) => {
                let mut c = a.common.base(PeerRole::Root);
                c.listen = Some(a.listen);
                c.origin = Some(a.origin);
                c.chunk_size = a.chunk_size;
                c.size = a.size;
                c.hb_ttl = a.hb_ttl;
                c.grant_ttl = a.grant_ttl;
                c.keys = a.keyed.keys;
                c.ledger = a.keyed.ledger;
                a.serving.apply(&mut c);
                c
            }
            RoleCmd::Proxy(a) => {
                let mut c = a.common.base(PeerRole::Proxy);
                c.listen = Some(a.listen);
                c.keys = a.keyed.keys;
                c.ledger = a.keyed.ledger;
                a.upward.apply(&mut c);
                a.serving.apply(&mut c);
                a.caching.apply(&mut c);
                c
            }
            RoleCmd::Leaf(a) => {
                let mut c = a.common.base(PeerRole::Leaf);
                c.listen = a.listen;
                c.keys = a.keyed.keys;
                c.ledger = a.keyed.ledger;
                a.upward.apply(&mut c);
                a.serving.apply(&mut c);
                a.caching.apply(&mut c);
                c
            }
            RoleCmd::Relay(a) => {
                let mut c = a.common.base(PeerRole::Relay);
                c.listen = Some(a.listen);
                c.verify_key = Some(a.verify_key);
                a.upward.apply(&mut c);
                a.serving.apply(&mut c);
                a.tiers.apply(&mut c);
                c
            }
        }
    }
}

fn main() -> ExitCode {
    // Before any thread starts: chunk buffers stay in the heap (alloc.rs).
    let tuned = canopy_peerd::alloc::tune_for_chunks();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !tuned {
        tracing::debug!("the allocator's thresholds were not set (not glibc)");
    }
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canopy-peerd: {}", canopy_peerd::errline::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let cfg = match (cli.config, cli.role) {
        (Some(path), _) => PeerConfig::from_file(&path)?,
        (None, Some(role)) => {
            let c = role.into_config();
            c.validate("command line")?;
            c
        }
        (None, None) => {
            bail!("give a role (root, proxy, leaf, relay) or --config FILE; see --help")
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(run(cfg))
}

async fn run(cfg: PeerConfig) -> Result<()> {
    let peer = start_peer(&cfg).await?;
    let leaf = cfg.role == PeerRole::Leaf;
    tokio::select! {
        r = peer.ready() => {
            if let Err(e) = r {
                if leaf {
                    // A script waiting for `ready` sees why it will not come.
                    if let canopy_peerd::DriverError::Refused(s) = e {
                        println!("err {s}");
                    }
                }
                peer.shutdown().await;
                bail!("{e}");
            }
        }
        s = shutdown_signal() => {
            s?;
            peer.shutdown().await;
            return Ok(());
        }
    }
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY=1 failed");
    }
    tracing::info!(node = %cfg.name(), "ready");
    if leaf {
        serve_stdin(&peer).await?;
    } else {
        serve_signals(&peer).await?;
    }
    tracing::info!(node = %cfg.name(), "shutting down");
    log_stats(&peer).await;
    peer.shutdown().await;
    Ok(())
}

/// A daemon without stdin commands (root, proxy, relay): SIGUSR1 logs its
/// counters, until SIGTERM or SIGINT.
async fn serve_signals(peer: &Peer) -> Result<()> {
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot watch SIGUSR1")?;
    loop {
        tokio::select! {
            _ = usr1.recv() => log_stats(peer).await,
            s = shutdown_signal() => return s,
        }
    }
}

/// One log line with the node's counters as JSON (what a leaf's `stats`
/// command prints).
async fn log_stats(peer: &Peer) {
    match peer.handle().stats().await {
        Ok(s) => match serde_json::to_string(&s) {
            Ok(json) => tracing::info!(stats = %json, "stats"),
            Err(e) => tracing::warn!(error = %e, "cannot encode stats"),
        },
        Err(e) => tracing::warn!(error = %e, "cannot read stats"),
    }
}

/// The leaf: `ready`, then commands until end of input or a signal.
async fn serve_stdin(peer: &Peer) -> Result<()> {
    let mut out = tokio::io::stdout();
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    let handle = peer.handle();
    tokio::select! {
        r = lines::serve(&handle, BufReader::new(tokio::io::stdin()), out) => {
            r.context("stdin/stdout")?;
        }
        s = shutdown_signal() => s?,
    }
    Ok(())
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("cannot watch SIGINT")?,
    }
    Ok(())
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
    fn flags_map_to_the_config_a_file_would_give() {
        let cli = Cli::try_parse_from([
            "canopy-peerd",
            "proxy",
            "--listen",
            "127.0.0.1:7001",
            "--parent",
            "127.0.0.1:7000",
            "--volume",
            "vol",
            "--cache-chunks",
            "8",
            "--write-mode",
            "semi-sync",
            "--sync-interval",
            "30s",
            "--cache-disk",
            "/var/cache/canopy/a:10G",
            "--cache-disk",
            "/srv/b:c.cache:1M",
            "--cache-prefault",
            "--name",
            "B",
        ])
        .unwrap();
        let from_cli = cli.role.unwrap().into_config();
        let from_file = PeerConfig::from_toml(
            r#"
            role = "proxy"
            listen = "127.0.0.1:7001"
            parent = "127.0.0.1:7000"
            volume = "vol"
            cache_chunks = 8
            write_mode = "semi-sync"
            sync_interval = "30s"
            cache_disk = ["/var/cache/canopy/a:10G", "/srv/b:c.cache:1M"]
            cache_prefault = true
            name = "B"
            "#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(from_cli, from_file);
        assert!(from_file.node_config().cache_prefault);
        let disks = from_file.node_config().cache_disk;
        assert_eq!(
            disks,
            vec![
                ("/var/cache/canopy/a".into(), 10 << 30),
                ("/srv/b:c.cache".into(), 1 << 20)
            ]
        );
    }

    #[test]
    fn config_conflicts_with_a_role() {
        assert!(Cli::try_parse_from(["canopy-peerd", "--config", "x", "leaf"]).is_err());
    }
}
